#!/usr/bin/env python
"""Training throughput: the harness's training step against the MSDNet reference's, side by side.

Both train the 7-exit CIFAR-100 budgeted-batch MSDNet (6.86 ... 137.28 MFLOPs) at batch 64 with
SGD (lr 0.1, momentum 0.9, wd 1e-4) on the same random uint8 images (a CIFAR-100 file written to a
scratch directory; there is no CIFAR here and the speed does not depend on the pixels):

* ``ref``: the reference as shipped (kalviny/MSDNet-PyTorch@f654595, read from ``--reference``):
  its ``main.py`` ``train()`` (sum of CE over the exits, ``loss.item()``, top-1/5 of every exit via
  ``.item()``), its ``dataloader.py`` (torchvision CIFAR100 dataset, PIL RandomCrop(32, 4) +
  RandomHorizontalFlip + ToTensor + Normalize, DataLoader over the 45k ``--use-valid`` subset,
  ``-j 0``) and its ``models/msdnet.py``. Only ``.cuda()`` is made a no-op on CPU, the
  DataParallel wrapper is left out (on CPU it only calls the module) and torchvision's md5 check
  of the dataset files is skipped. Where CUDA is available (``gpu_check.py`` drives this worker
  there) the model is wrapped in DataParallel and moved to the GPU with ``cudnn.benchmark`` on,
  as ``main.py`` does.
* ``ours``: the step ``eebench.training.train()`` runs: uint8 NCHW tensors on the device, the
  epoch plan, ``crop_flip`` + ``normalize`` per batch, the ``standard`` method's ``train_step`` (sum
  of CE, no host sync; the loss is summed on the device), the harness's MSDNet.
* ``harness``: ``eebench.training.train()`` itself, one epoch of ``--iters`` batches per round
  (so each round also pays one tiny validation pass of 64 images and one checkpoint write): a check
  that the real loop is as fast as the step it runs.

Modifiers: ``+cl`` channels_last, ``+mallopt`` ``keep_freed_memory()`` in that process (what the
train rule does), ``+compile`` the network's forward under ``torch.compile`` (``recipe.compile:
default``; compiled during the warm-up steps, which are not timed). Every variant runs in its own
process; rounds are interleaved (see ``_bench.py``).

    python benchmarks/train_throughput.py --reference /tmp/MSDNet-PyTorch
    python benchmarks/train_throughput.py --reference ... --variants ref ours ours+mallopt ours+cl+mallopt
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _bench  # noqa: E402

BATCH = 64
N_TRAIN = 45_000
MFLOPS_FINAL_EXIT = 137.28  # multiply-adds per image, the reference op_counter's figure
TRAIN_GFLOP_PER_IMAGE = 3 * 2 * MFLOPS_FINAL_EXIT / 1e3  # forward + 2x backward, 2 flops per MAC
MSDNET_CIFAR100 = dict(
    n_blocks=7,
    step_mode="lin_grow",
    step=1,
    base=1,
    n_channels=16,
    growth_rate=6,
    gr_factor=[1, 2, 4],
    bn_factor=[1, 2, 4],
    n_scales=3,
    prune="max",
    reduction=0.5,
    bottleneck=True,
)


def parse_variant(name: str) -> tuple[str, set[str]]:
    base, *mods = name.split("+")
    if base not in ("ref", "ours", "harness") or not set(mods) <= {"cl", "mallopt", "compile"}:
        raise argparse.ArgumentTypeError(f"unknown variant {name!r}: ref|ours|harness, then +cl, +mallopt, +compile")
    if base == "ref" and set(mods) & {"cl", "compile"}:
        raise argparse.ArgumentTypeError("the reference runs as shipped (NCHW, eager)")
    return base, set(mods)


# --- workers -------------------------------------------------------------------------------------
def reference_worker(opts: argparse.Namespace, mods: set[str]):
    import torch

    state: dict = {}

    def setup():
        torch.set_num_threads(opts.threads)
        if "mallopt" in mods:
            _bench.keep_freed_memory()
        argv = [*_bench.REFERENCE_ARGV, "--data-root", opts.data, *getattr(opts, "reference_args", [])]
        ref = _bench.import_reference_main(Path(opts.reference), argv, opts.scratch)
        _bench.accept_fake_cifar()
        args = ref.args
        model = getattr(ref.models, args.arch)(args)  # as main.py; DataParallel left out on CPU
        criterion = torch.nn.CrossEntropyLoss()
        if torch.cuda.is_available():  # as main.py does it on a GPU
            model = torch.nn.DataParallel(model).cuda()
            criterion = criterion.cuda()
            torch.backends.cudnn.benchmark = True
        optimizer = torch.optim.SGD(model.parameters(), args.lr, momentum=args.momentum, weight_decay=args.weight_decay)
        train_loader, _, _ = ref.get_dataloaders(args)
        state.update(ref=ref, model=model, criterion=criterion, optimizer=optimizer, chunk=_bench.Chunk(train_loader))
        run(opts.warmup)
        return {"params": sum(p.numel() for p in model.parameters()), "batches_per_epoch": len(train_loader)}

    def run(n: int):
        state["chunk"].take = n
        state["ref"].train(state["chunk"], state["model"], state["criterion"], state["optimizer"], 0)
        if torch.cuda.is_available():
            torch.cuda.synchronize()  # the last optimizer step is still queued

    return setup, run


def ours_worker(opts: argparse.Namespace, mods: set[str], harness: bool):
    import torch

    sys.path.insert(0, str(_bench.ROOT))
    from eebench.augment import crop_flip, epoch_plan, normalize
    from eebench.inference import keep_freed_memory
    from eebench.methods.base import TrainContext
    from eebench.methods.standard import Standard
    from eebench.recipe import Recipe
    from eebench.training import TrainData, make_optimizer, train
    from models import InputSpec, build_model

    state: dict = {"epoch": 0, "batch": 0, "round": 0}
    channels_last = "cl" in mods

    def setup():
        torch.set_num_threads(opts.threads)
        if "mallopt" in mods:
            keep_freed_memory()
        images, labels = _bench.random_cifar(opts.images, seed=opts.seed)
        state["images"] = images[:N_TRAIN].permute(0, 3, 1, 2).contiguous()  # the harness's uint8 NCHW
        state["labels"] = labels[:N_TRAIN]
        model = build_model("msdnet", InputSpec(3, 32, 100), **MSDNET_CIFAR100)
        recipe = Recipe(
            batch_size=BATCH,
            channels_last="on" if channels_last else "off",
            compile="default" if "compile" in mods else False,
        )
        state.update(model=model, recipe=recipe)
        if "compile" in mods and not harness:  # as train() does it
            model.forward_all = torch.compile(model.forward_all)
        if not harness:
            if channels_last:
                model.to(memory_format=torch.channels_last)
            ctx = TrainContext(
                exit_costs=torch.linspace(0.05, 1, 7),
                num_classes=100,
                epochs=recipe.epochs,
                steps_per_epoch=N_TRAIN // BATCH,
            )
            method = Standard(model, Standard.Params(), ctx)
            state.update(
                method=method,
                optimizer=make_optimizer(recipe, list(method.trainable_parameters())),
                mean=torch.tensor(MEAN),
                std=torch.tensor(STD),
            )
            new_epoch()
        run(opts.warmup)
        return {"params": sum(p.numel() for p in model.parameters())}

    def new_epoch():
        plan = epoch_plan(N_TRAIN, 4, opts.seed, state["epoch"])
        state.update(order=plan.order, offsets=plan.offsets, flips=plan.flips)

    def run_step_loop(n: int):
        """The body of train()'s batch loop, as it is there."""
        model, recipe, images, labels = state["model"], state["recipe"], state["images"], state["labels"]
        model.train()
        steps = N_TRAIN // BATCH
        loss_sum = torch.zeros((), dtype=torch.float64)
        for _ in range(n):
            if state["batch"] == steps:
                state["epoch"] += 1
                state["batch"] = 0
                new_epoch()
            b = state["batch"]
            idx = state["order"][b * BATCH : (b + 1) * BATCH]
            x = normalize(
                crop_flip(images[idx], state["offsets"][idx], state["flips"][idx], 4), state["mean"], state["std"]
            )
            if channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            step = state["epoch"] * steps + b
            for group in state["optimizer"].param_groups:
                group["lr"] = recipe.lr_at(step, recipe.epochs * steps, steps)
            loss_sum += state["method"].train_step(x, labels[idx], state["optimizer"], step).double()
            state["batch"] += 1
        return {"loss": float(loss_sum) / n}  # the one host sync, after the timed steps (as per epoch)

    def run_harness(n: int):
        state["round"] += 1
        images, labels = state["images"], state["labels"]
        data = TrainData(images[: n * BATCH], labels[: n * BATCH], images[-64:], labels[-64:], MEAN, STD, 4, True)
        recipe = Recipe(
            epochs=1,
            batch_size=BATCH,
            channels_last=state["recipe"].channels_last,
            compile=state["recipe"].compile if state["round"] == 1 else False,
        )  # compiled once
        state_dir = tempfile.mkdtemp(dir=opts.scratch)
        try:
            result = train(
                state["model"],
                lambda m, ctx: Standard(m, Standard.Params(), ctx),
                data,
                recipe,
                torch.linspace(0.05, 1, 7),
                100,
                opts.seed + state["round"],
                state_dir,
                "bench",
                torch.device("cpu"),
            )
        finally:
            shutil.rmtree(state_dir, ignore_errors=True)
        return {"loss": result.history[-1]["loss"]}

    run = run_harness if harness else run_step_loop
    return setup, run


MEAN = (0.5071, 0.4867, 0.4408)  # the reference's CIFAR-100 normalisation
STD = (0.2675, 0.2565, 0.2761)


# --- parent ---------------------------------------------------------------------------------------
def main() -> None:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--reference", help="checkout of kalviny/MSDNet-PyTorch (needed for the 'ref' variants)")
    p.add_argument(
        "--variants",
        nargs="+",
        default=["ref", "ours"],
        help="ref, ours, harness, each optionally +cl and/or +mallopt (default: ref ours, i.e. the "
        "reference as shipped against what train() does on CPU: NCHW, no mallopt)",
    )
    p.add_argument("--iters", type=int, default=10, help="timed training steps per variant per round")
    p.add_argument("--repeats", type=int, default=8, help="interleaved rounds")
    p.add_argument("--warmup", type=int, default=5, help="untimed steps at start-up")
    p.add_argument("--threads", type=int, default=2, help="torch.set_num_threads in every variant")
    p.add_argument("--images", type=int, default=60_000, help="random images (50k train file + 10k test file)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--quiet-below",
        type=float,
        default=0.25,
        help="before each round wait until other processes use less than this share of the CPUs",
    )
    p.add_argument("--max-wait", type=float, default=30.0, help="longest wait for quiet per round, seconds")
    p.add_argument("--verbose", action="store_true", help="show the workers' stderr")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    p.add_argument("--data", help=argparse.SUPPRESS)
    p.add_argument("--scratch", help=argparse.SUPPRESS)
    opts = p.parse_args()
    for v in opts.variants:
        parse_variant(v)

    if opts.worker:
        base, mods = parse_variant(opts.worker)
        if base == "ref":
            _bench.serve(*reference_worker(opts, mods))
        else:
            _bench.serve(*ours_worker(opts, mods, harness=base == "harness"))
        return

    if any(v.startswith("ref") for v in opts.variants):
        opts.reference = str(_bench.check_reference(opts.reference, ("main.py", "dataloader.py", "models/msdnet.py")))
    import torch

    torch.set_num_threads(opts.threads)
    print(f"training throughput, 7-exit CIFAR-100 MSDNet, batch {BATCH}; {_bench.machine_line()}")
    peak_before = _bench.matmul_gflops()
    scratch = tempfile.mkdtemp(prefix="eebench-train-bench-")
    workers = []
    try:
        images, labels = _bench.random_cifar(opts.images, seed=opts.seed)
        _bench.write_fake_cifar100(Path(scratch) / "data", images, labels)
        del images, labels
        common = [
            __file__,
            "--threads",
            str(opts.threads),
            "--warmup",
            str(opts.warmup),
            "--seed",
            str(opts.seed),
            "--images",
            str(opts.images),
            "--data",
            str(Path(scratch) / "data"),
            "--scratch",
            scratch,
        ]
        if opts.reference:
            common += ["--reference", opts.reference]
        for v in opts.variants:
            print(f"starting {v} (build, {opts.warmup} warm-up steps) ...", flush=True)
            workers.append(_bench.Worker(v, [*common, "--worker", v], quiet=not opts.verbose))
            print(f"  {v}: {workers[-1].info}", flush=True)
        print(f"{opts.repeats} interleaved rounds of {opts.iters} steps ({opts.iters * BATCH} images) per variant")
        times = _bench.interleave(workers, opts.iters, opts.repeats, quiet=opts.quiet_below, max_wait=opts.max_wait)
    finally:
        for w in workers:
            w.close()
        shutil.rmtree(scratch, ignore_errors=True)
    peak_after = _bench.matmul_gflops()
    peak = (peak_before + peak_after) / 2

    rates = {name: [opts.iters * BATCH / t for t in ts] for name, ts in times.items()}
    print()
    print("\n".join(_bench.ratio_table(rates, opts.variants[0], "img/s")))
    print()
    print(f"fp32 4096^2 matmul peak: {peak_before:.0f} GFLOP/s before, {peak_after:.0f} after (mean {peak:.0f})")
    print(
        f"training cost {TRAIN_GFLOP_PER_IMAGE:.3f} GFLOP/img (3 x 2 x {MFLOPS_FINAL_EXIT}M multiply-adds); "
        f"ceiling at that peak {peak / TRAIN_GFLOP_PER_IMAGE:.0f} img/s"
    )
    for name, r in rates.items():
        mean = sum(r) / len(r)
        print(
            f"  {name:<20} {mean * TRAIN_GFLOP_PER_IMAGE:6.1f} GFLOP/s = "
            f"{100 * mean * TRAIN_GFLOP_PER_IMAGE / peak:4.1f}% "
            f"of matmul peak; 45k epoch {N_TRAIN / mean:5.0f} s"
        )
    print(_bench.load_average())


if __name__ == "__main__":
    main()

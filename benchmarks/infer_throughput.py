#!/usr/bin/env python
"""Inference into the cache: the harness's ``run_network`` against the reference's ``validate()``.

Both run every exit of the 7-exit CIFAR-100 MSDNet over the same 10,000 random test images:

* ``ref``: the reference as shipped (kalviny/MSDNet-PyTorch@f654595, from ``--reference``): its
  ``main.py`` ``validate()`` (``torch.no_grad``, loss of every exit with ``loss.item()``, top-1/5
  of every exit with ``.item()``) over its ``dataloader.py`` test loader (torchvision CIFAR100,
  PIL -> ToTensor + Normalize, batch 64, ``-j 0``). Only ``.cuda()`` is a no-op on CPU and the
  dataset's md5 check is skipped; DataParallel is left out (on CPU it only calls the module).
* ``ours``: ``eebench.inference.run_network`` as ``pipeline.infer_cell`` calls it (inference_mode,
  uint8 NCHW tensors normalised per batch, logits + features of every exit gathered on the host).

Variant syntax: ``ref`` or ``ours``, then ``+cl`` (channels_last), ``+fold`` (BatchNorm folded
into the convolutions, ``models.base.fold_batchnorm``), ``+mallopt``
(``keep_freed_memory()`` in that process), ``@B`` (batch size; default ``--batch-size``).
Each variant runs in its own process; one round = one pass over the images per variant,
interleaved (see ``_bench.py``).

    python benchmarks/infer_throughput.py --reference /tmp/MSDNet-PyTorch
    python benchmarks/infer_throughput.py --reference ... --variants ref ours+mallopt@256 ours+cl+mallopt@256
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _bench  # noqa: E402
from train_throughput import MEAN, MSDNET_CIFAR100, STD  # noqa: E402

MFLOPS_FINAL_EXIT = 137.28
N_TRAIN_FILE = 50_000


def parse_variant(name: str, default_batch: int) -> tuple[str, set[str], int]:
    name, _, batch = name.partition("@")
    base, *mods = name.split("+")
    if base not in ("ref", "ours") or not set(mods) <= {"cl", "mallopt", "fold"}:
        raise argparse.ArgumentTypeError(f"unknown variant {name!r}: ref|ours, then +cl, +mallopt, @batch")
    if base == "ref" and ("cl" in mods or batch):
        raise argparse.ArgumentTypeError("the reference runs as shipped (NCHW, batch 64)")
    return base, set(mods), int(batch) if batch else (64 if base == "ref" else default_batch)


def reference_worker(opts, mods):
    import torch

    state: dict = {}

    def setup():
        torch.set_num_threads(opts.threads)
        if "mallopt" in mods:
            _bench.keep_freed_memory()
        ref = _bench.import_reference_main(
            Path(opts.reference), [*_bench.REFERENCE_ARGV, "--data-root", opts.data], opts.scratch
        )
        _bench.accept_fake_cifar()
        model = getattr(ref.models, ref.args.arch)(ref.args)
        _, _, test_loader = ref.get_dataloaders(ref.args)
        state.update(ref=ref, model=model, loader=test_loader, chunk=_bench.Chunk(test_loader))
        state["chunk"].take = opts.warmup_batches
        ref.validate(state["chunk"], model, torch.nn.CrossEntropyLoss())
        return {"batches": len(test_loader), "images": len(test_loader.dataset)}

    def run(_passes: int):
        state["ref"].validate(state["loader"], state["model"], torch.nn.CrossEntropyLoss())

    return setup, run


def ours_worker(opts, mods, batch):
    import torch

    sys.path.insert(0, str(_bench.ROOT))
    from eebench.inference import keep_freed_memory, run_network
    from eebench.methods.base import TrainContext
    from eebench.methods.standard import Standard
    from models import InputSpec, build_model

    state: dict = {}
    channels_last = "cl" in mods
    device = torch.device("cpu")

    def setup():
        torch.set_num_threads(opts.threads)
        if "mallopt" in mods:
            keep_freed_memory()
        images, _ = _bench.random_cifar(N_TRAIN_FILE + opts.images, seed=opts.seed)
        test = images[N_TRAIN_FILE:].permute(0, 3, 1, 2).contiguous()  # the harness's uint8 NCHW
        model = build_model("msdnet", InputSpec(3, 32, 100), **MSDNET_CIFAR100)
        if "fold" in mods:  # BatchNorm folded into the convolutions
            from models.base import fold_batchnorm

            fold_batchnorm(model.eval())
        if channels_last:  # as pipeline.infer_cell does
            model.to(memory_format=torch.channels_last)
        method = Standard(model, Standard.Params(), TrainContext(torch.ones(7), 100, 1, 1))
        state.update(model=model, test=test, transform=method.eval_outputs)
        call(test[: opts.warmup_batches * batch])
        return {"images": len(test)}

    def call(images):
        return run_network(
            state["model"],
            images,
            MEAN,
            STD,
            batch,
            device,
            channels_last,
            with_features=True,
            transform=state["transform"],
        )

    def run(_passes: int):
        out = call(state["test"])
        return {"logits": list(out["logits"].shape)}

    return setup, run


def main() -> None:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--reference", help="checkout of kalviny/MSDNet-PyTorch (needed for the 'ref' variant)")
    p.add_argument(
        "--variants",
        nargs="+",
        default=["ref", "ours+cl+mallopt"],
        help="ref | ours[+cl][+mallopt][@B] (default: ref ours+cl+mallopt)",
    )
    p.add_argument("--batch-size", type=int, default=256, help="our batch size where a variant names none")
    p.add_argument("--images", type=int, default=10_000, help="test images per pass")
    p.add_argument("--repeats", type=int, default=3, help="interleaved rounds (one pass each)")
    p.add_argument("--warmup-batches", type=int, default=2)
    p.add_argument("--threads", type=int, default=2)
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
    parsed = [parse_variant(v, opts.batch_size) for v in opts.variants]

    if opts.worker:
        base, mods, batch = parse_variant(opts.worker, opts.batch_size)
        _bench.serve(*(reference_worker(opts, mods) if base == "ref" else ours_worker(opts, mods, batch)))
        return

    if any(b == "ref" for b, _, _ in parsed):
        opts.reference = str(_bench.check_reference(opts.reference, ("main.py", "dataloader.py", "models/msdnet.py")))
    import torch

    torch.set_num_threads(opts.threads)
    print(f"inference throughput, 7-exit CIFAR-100 MSDNet, {opts.images} images; {_bench.machine_line()}")
    names = [v if b == "ref" or "@" in v else f"{v}@{bs}" for v, (b, _, bs) in zip(opts.variants, parsed)]
    scratch = tempfile.mkdtemp(prefix="eebench-infer-bench-")
    workers = []
    try:
        images, labels = _bench.random_cifar(N_TRAIN_FILE + opts.images, seed=opts.seed)
        _bench.write_fake_cifar100(Path(scratch) / "data", images, labels, n_train=N_TRAIN_FILE)
        del images, labels
        common = [
            __file__,
            "--threads",
            str(opts.threads),
            "--seed",
            str(opts.seed),
            "--images",
            str(opts.images),
            "--warmup-batches",
            str(opts.warmup_batches),
            "--batch-size",
            str(opts.batch_size),
            "--data",
            str(Path(scratch) / "data"),
            "--scratch",
            scratch,
        ]
        if opts.reference:
            common += ["--reference", opts.reference]
        for name in names:
            print(f"starting {name} ...", flush=True)
            workers.append(_bench.Worker(name, [*common, "--worker", name], quiet=not opts.verbose))
        print(f"{opts.repeats} interleaved rounds of one {opts.images}-image pass per variant")
        times = _bench.interleave(workers, 1, opts.repeats, quiet=opts.quiet_below, max_wait=opts.max_wait)
    finally:
        for w in workers:
            w.close()
        shutil.rmtree(scratch, ignore_errors=True)
    rates = {name: [opts.images / t for t in ts] for name, ts in times.items()}
    print()
    print("\n".join(_bench.ratio_table(rates, names[0], "img/s")))
    gflop = 2 * MFLOPS_FINAL_EXIT / 1e3
    print(
        f"\nforward cost {gflop:.3f} GFLOP/img (2 x {MFLOPS_FINAL_EXIT}M multiply-adds); "
        + ", ".join(f"{n} {sum(r) / len(r) * gflop:.0f} GFLOP/s" for n, r in rates.items())
    )
    print(_bench.load_average())


if __name__ == "__main__":
    main()

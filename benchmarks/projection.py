#!/usr/bin/env python
"""PROJECTION of the GPU hours ``config/paper.yaml`` needs: measured work, assumed GPU speed.

Measured here, on CPU, from the harness's own code (nothing is trained):
* FLOPs: ``F_K`` (last-exit multiply-adds, reference convention, as ``python -m eebench flops``)
  of every architecture, and the FLOPs one real ``train_step`` of each method performs, counted
  with ``torch.utils.flop_counter.FlopCounterMode`` (forward, backward, L2W's second-order meta
  step; convs and matmuls at 2 FLOPs per multiply-add). The textbook 3 x 2 x F_K is printed
  beside it.
* Kernel count: the ATen operators one ``train_step`` dispatches (forward, backward, optimizer
  with ``foreach`` as on GPU), view and metadata operators left out. Eager PyTorch on a GPU
  launches about one kernel per such operator.
* Work per cell: epochs (the cell's recipe) x train-split size (CIFAR 45,000; ImageNet
  1,231,167) / batch steps, plus one validation pass per epoch (5,000 / 50,000 images); a
  pretrained variant (converted, not trained) only the inference over val and test; with
  ``val_from: test`` the whole training pool trains and val is part of the test set.

Assumed (stated, adjustable): one H100 SXM runs a step in max(FLOP time, launch time):
* FLOP time = step FLOPs / (``--util`` x 989 TFLOP/s bf16 dense peak). Default util 0.05.
  Anchor: NVIDIA's tuned ResNet-50 v1.5 trains at 2,470 img/s on one A100-80GB with mixed
  precision (DeepLearningExamples, PyTorch/Classification/ConvNets/resnet50v1.5/README.md), i.e.
  3 x 2 x 4.1 GFLOP x 2470 = 61 TFLOP/s, 20% of the A100's 312 TFLOP/s; convnets gain less than
  the 3.2x peak ratio on H100, and MSDNet's convs have 6-512 channels and dense concatenations,
  so a quarter of that fraction is assumed.
* launch time = kernels x ``--us-per-kernel`` (default 10 us: eager dispatch + launch per
  operator; batch-64 CIFAR steps are launch-bound, which is why torch.compile / CUDA graphs
  help there).
Not modelled: data loading (ImageNet JPEG decoding needs many CPU cores per GPU), checkpoint
writes, queueing, failed or repeated runs. This is a PROJECTION, not a measurement.

With ``--measured GPU_CHECK.json`` (written by ``benchmarks/gpu_check.py``) nothing is assumed
about the GPU and nothing is counted: each training cell's seconds per step and per evaluated
image were measured there, on that GPU, with the cell's own recipe (batch, precision, compile),
and the hours are epochs x steps x step time + one validation pass per epoch + one inference
pass over val and test. Data loading, checkpoints and queueing are still left out.

    python benchmarks/projection.py                       # config/paper.yaml
    python benchmarks/projection.py --util 0.2 --us-per-kernel 5
    python benchmarks/projection.py --measured gpu_check.json
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import torch
import yaml
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _bench  # noqa: E402

sys.path.insert(0, str(_bench.ROOT))
from eebench.config import cells, fill_defaults, is_posthoc, is_pretrained, recipe_for, val_from, val_size  # noqa: E402
from eebench.datasets import dataset_info  # noqa: E402
from eebench.methods import TrainContext  # noqa: E402
from eebench.pipeline import _method_factory, build_network, flops_record  # noqa: E402
from eebench.training import make_optimizer  # noqa: E402

H100_BF16_DENSE = 989e12  # FLOP/s, H100 SXM5 datasheet (1979 is the 2:4-sparsity figure)
# split sizes; digits: make_split of scikit-learn's 1797 images (25% test, 20% of the rest val)
TRAIN_SIZE = {"cifar10": 45_000, "cifar100": 45_000, "imagenet": 1_231_167, "digits": 1078}
VAL_SIZE = {"cifar10": 5_000, "cifar100": 5_000, "imagenet": 50_000, "digits": 270}
TEST_SIZE = {"cifar10": 10_000, "cifar100": 10_000, "imagenet": 50_000, "digits": 449}
VIEW_OPS = {  # no kernel of their own
    "view",
    "_unsafe_view",
    "reshape",
    "t",
    "transpose",
    "permute",
    "expand",
    "as_strided",
    "detach",
    "alias",
    "slice",
    "select",
    "unsqueeze",
    "squeeze",
    "split",
    "chunk",
    "split_with_sizes",
    "unbind",
    "empty",
    "empty_like",
    "empty_strided",
    "lift_fresh",
    "_to_copy_noop",
    "numel",
    "sym_size",
    "sym_stride",
    "is_same_size",
    "unsafe_split",
    "flatten",
    "_reshape_alias",
    "narrow",
    "_local_scalar_dense",
    "size",
    "stride",
    "contiguous",
    "lift",
    "new_empty",
    "new_empty_strided",
}


class KernelCounter(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.__name__.split(".")[0]
        if name not in VIEW_OPS:
            self.count += 1
        return func(*args, **(kwargs or {}))


@dataclass
class StepCost:
    flops_per_image: float  # training FLOPs per image (counted)
    kernels_per_step: float
    eval_kernels_per_batch: float
    batch: int


def split_sizes(config: dict, dataset: str) -> tuple[int, int, int]:
    """(training images, val images per epoch, images inferred once: val + test) of a dataset; with
    ``val_from: test`` val is ``val_size`` images of the test set and the whole pool trains."""
    if val_from(config, dataset) == "test":
        held_out = val_size(config, dataset) or VAL_SIZE[dataset]
        n_val = held_out if held_out >= 1 else round(held_out * TEST_SIZE[dataset])
        return TRAIN_SIZE[dataset] + VAL_SIZE[dataset], int(n_val), TEST_SIZE[dataset]
    return TRAIN_SIZE[dataset], VAL_SIZE[dataset], VAL_SIZE[dataset] + TEST_SIZE[dataset]


def count_step_cost(
    config: dict, dataset: str, arch: str, variant: str, probe_batch: int, flops: list[float], trained: bool = True
) -> StepCost:
    """Count FLOPs and kernels of a real train_step of ``variant`` (after a first, uncounted one);
    for a pretrained variant (``trained`` false) only the evaluation's kernels."""
    torch.manual_seed(0)
    info = dataset_info(dataset, config)
    model = build_network(config, dataset, arch)
    recipe = recipe_for(config, dataset, variant)
    costs = torch.tensor(flops, dtype=torch.float32) / flops[-1]
    steps_per_epoch = TRAIN_SIZE[dataset] // recipe.batch_size
    ctx = TrainContext(
        exit_costs=costs, num_classes=info.input.num_classes, epochs=recipe.epochs, steps_per_epoch=steps_per_epoch
    )
    method = _method_factory(config, variant)(model, ctx)
    opt = make_optimizer(recipe, list(method.trainable_parameters()))
    if opt is not None:
        for group in opt.param_groups:
            group["foreach"] = True  # the GPU default (multi-tensor kernels)
    c, s = info.input.channels, info.input.size
    x = torch.randn(probe_batch, c, s, s)
    y = torch.randint(0, info.input.num_classes, (probe_batch,))
    if not trained:
        model.eval()
        kc = KernelCounter()
        with torch.inference_mode(), kc:
            method.eval_outputs(model.forward_all(x))
        return StepCost(0.0, 0.0, kc.count, recipe.batch_size)
    model.train()
    method.train_step(x, y, opt, 0)  # first step: lazy set-up (JEI-DNN freezes its trunk here)
    interval = getattr(method.params, "meta_interval", 1)
    # one counted step; where meta steps come once every ``interval`` batches, a meta step and a plain one
    steps = [interval, 1] if interval > 1 else [1]
    counted = []
    for step in steps:
        kc, fc = KernelCounter(), FlopCounterMode(display=False)
        with fc, kc:
            method.train_step(x, y, opt, step)
        counted.append((kc.count, fc.get_total_flops()))
    weights = [1 / interval, 1 - 1 / interval] if interval > 1 else [1.0]
    kernels = sum(w * k for w, (k, _) in zip(weights, counted))
    step_flops = sum(w * f for w, (_, f) in zip(weights, counted))
    model.eval()
    kc = KernelCounter()
    with torch.inference_mode(), kc:
        method.eval_outputs(model.forward_all(x))
    return StepCost(step_flops / probe_batch, kernels, kc.count, recipe.batch_size)


# --- from measured step times ------------------------------------------------------------------
def measured_projection(
    config: dict, measured: dict[str, dict], speedup: float | None = None, missing_ok: bool = False
) -> tuple[list[dict], dict]:
    """Rows per training cell and GPU-hour totals from measured seconds per step and per image.

    ``measured`` maps "dataset/arch/variant" to gpu_check's figures (``step_s``,
    ``eval_s_per_image``, ``batch``). ``speedup``: a measured speed-up of the training step that is
    applied to every cell, for a second, extrapolated total. ``missing_ok``: cells without figures
    are left out of the totals and listed in ``totals["missing"]`` instead of raising.
    """
    train_cells = [c for c in cells(config) if not is_posthoc(config, c.variant)]
    keys = sorted({(c.dataset, c.arch, c.variant) for c in train_cells})
    missing = ["/".join(k) for k in keys if "/".join(k) not in measured]
    if missing and not missing_ok:
        raise KeyError(
            f"no measured figures for {len(missing)} training cell(s) of this config, e.g. {missing[0]}; "
            "run benchmarks/gpu_check.py with the same config (--projection-config)"
        )
    rows = []
    for key in (k for k in keys if "/".join(k) not in missing):
        dataset, _, variant = key
        m = measured["/".join(key)]
        recipe = recipe_for(config, dataset, variant)
        if m["batch"] != recipe.batch_size:
            raise ValueError(
                f"{'/'.join(key)}: measured at batch {m['batch']}, the config trains at {recipe.batch_size}"
            )
        seeds = sum(1 for c in train_cells if (c.dataset, c.arch, c.variant) == key)
        steps = recipe.epochs * (TRAIN_SIZE[dataset] // recipe.batch_size)
        train_s = steps * m["step_s"]
        eval_s = (recipe.epochs * VAL_SIZE[dataset] + VAL_SIZE[dataset] + TEST_SIZE[dataset]) * m["eval_s_per_image"]
        hours = (train_s + eval_s) / 3600
        rows.append(
            dict(
                cell="/".join(key),
                seeds=seeds,
                epochs=recipe.epochs,
                batch=recipe.batch_size,
                step_ms=1e3 * m["step_s"],
                img_s=recipe.batch_size / m["step_s"],
                eval_share=eval_s / (train_s + eval_s),
                hours=hours,
                total=hours * seeds,
                train_hours=train_s / 3600 * seeds,
            )
        )
    by_dataset: dict[str, float] = defaultdict(float)
    for r in rows:
        by_dataset[r["cell"].split("/")[0]] += r["total"]
    totals = {"as_configured": sum(by_dataset.values()), "by_dataset": dict(by_dataset), "missing": missing}
    if speedup:
        # only the training steps are sped up; evaluation stays as measured
        totals["speedup"] = speedup
        totals["at_speedup_extrapolated"] = sum(
            r["total"] - r["train_hours"] + r["train_hours"] / speedup for r in rows
        )
    return rows, totals


def format_measured(rows: list[dict], totals: dict) -> list[str]:
    head = (
        f"{'cell (dataset/arch/method)':<44} {'seeds':>5} {'ep':>4} {'bs':>4} {'ms/step':>8} {'img/s':>7} "
        f"{'eval%':>6} {'h/seed':>7} {'GPU h':>7}"
    )
    lines = [head, "-" * len(head)]
    for r in sorted(rows, key=lambda r: -r["total"]):
        lines.append(
            f"{r['cell']:<44} {r['seeds']:>5} {r['epochs']:>4} {r['batch']:>4} {r['step_ms']:>8.1f} "
            f"{r['img_s']:>7.0f} {100 * r['eval_share']:>5.1f}% {r['hours']:>7.2f} {r['total']:>7.1f}"
        )
    lines.append("-" * len(head))
    total = totals["as_configured"]
    lines.append(
        "MEASURED-STEP PROJECTION, GPU hours (one GPU per job, each cell's recipe as configured): "
        + ", ".join(f"{d} {h:.1f}" for d, h in totals["by_dataset"].items())
        + f"; total {total:.1f} h ({total / 24:.1f} GPU-days)"
    )
    if totals.get("missing"):
        lines.append(
            f"INCOMPLETE: {len(totals['missing'])} cell(s) could not be measured and are not in the total: "
            + ", ".join(totals["missing"])
        )
    if "at_speedup_extrapolated" in totals:
        lines.append(
            f"EXTRAPOLATION: with every training step {totals['speedup']:.2f}x faster (the best switches' "
            f"speed-up over the configured recipe, measured on the CIFAR-100 MSDNet step only; methods "
            f"that cannot be compiled would not get its compiled part): {totals['at_speedup_extrapolated']:.1f} h"
        )
    lines.append("Not included: data loading (ImageNet JPEG decoding), checkpoint writes, queueing, reruns.")
    return lines


def measured_main(path: str, configfile: str | None) -> None:
    """Print the projection from the figures gpu_check.py wrote to ``path``."""
    import json

    checks = json.loads(Path(path).read_text()).get("checks", [])
    found = [c for c in checks if c.get("group") == "projection" and c.get("figures", {}).get("cells")]
    if not found:
        sys.exit(
            f"error: {path} holds no measured projection (a 'projection' check with cells); "
            "run benchmarks/gpu_check.py --json ... first"
        )
    figures = found[-1]["figures"]
    config_path = Path(configfile) if configfile else _bench.ROOT / figures["config"]
    config = fill_defaults(yaml.safe_load(config_path.read_text()))
    if "experiments" in figures:  # gpu_check --small measures a restricted set of experiments
        config["experiments"] = figures["experiments"]
    speed = next((c["figures"] for c in checks if c.get("group") == "speed_train" and c.get("status") == "pass"), None)
    speedup = None
    if speed is not None and speed.get("configured_variant") in speed.get("img_s_median", {}):
        rates = speed["img_s_median"]
        speedup = rates[speed["best"]] / rates[speed["configured_variant"]]
    rows, totals = measured_projection(config, figures["cells"], speedup, missing_ok=True)
    print(f"measured on {figures['device']} ({path}) for {config_path}")
    print("\n".join(format_measured(rows, totals)))


def main() -> None:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--configfile", help="default: config/paper.yaml (with --measured: the config it was measured for)")
    p.add_argument("--util", type=float, default=0.05, help="assumed fraction of the bf16 dense peak reached")
    p.add_argument("--us-per-kernel", type=float, default=10.0, help="assumed eager cost per kernel, microseconds")
    p.add_argument("--peak", type=float, default=H100_BF16_DENSE, help="GPU peak FLOP/s (default H100 SXM bf16 dense)")
    p.add_argument("--probe-batch", type=int, default=8, help="batch of the counted steps (ImageNet: 4)")
    p.add_argument("--measured", help="gpu_check.py's JSON: project from its measured step times instead")
    opts = p.parse_args()
    if opts.measured:
        measured_main(opts.measured, opts.configfile)
        return
    opts.configfile = opts.configfile or str(_bench.ROOT / "config" / "paper.yaml")
    torch.set_num_threads(1)  # counting only: one thread is fastest on a shared machine
    config = fill_defaults(yaml.safe_load(Path(opts.configfile).read_text()))
    train_cells = [c for c in cells(config) if not is_posthoc(config, c.variant)]
    print(
        f"PROJECTION for {opts.configfile}: {len(train_cells)} training cells "
        f"(assumed: {opts.util:.0%} of {opts.peak / 1e12:.0f} TFLOP/s, {opts.us_per_kernel:g} us per kernel)",
        flush=True,
    )

    t0 = time.perf_counter()
    costs: dict[tuple[str, str, str], StepCost] = {}
    exit_flops: dict[tuple[str, str], list[float]] = {}
    for cell in train_cells:
        key = (cell.dataset, cell.arch, cell.variant)
        if key in costs:
            continue
        t1 = time.perf_counter()
        if (cell.dataset, cell.arch) not in exit_flops:
            net = build_network(config, cell.dataset, cell.arch)
            exit_flops[(cell.dataset, cell.arch)] = flops_record(
                net, dataset_info(cell.dataset, config).input, config.get("flops_convention", "reference")
            )["flops"]
        batch = 4 if cell.dataset == "imagenet" else opts.probe_batch
        costs[key] = count_step_cost(
            config,
            cell.dataset,
            cell.arch,
            cell.variant,
            batch,
            exit_flops[(cell.dataset, cell.arch)],
            not is_pretrained(config, cell.variant),
        )
        print(f"  counted {'/'.join(key)} in {time.perf_counter() - t1:.0f} s", file=sys.stderr, flush=True)
    print(f"(counted {len(costs)} (dataset, architecture, method) steps in {time.perf_counter() - t0:.0f} s)\n")

    rows = []
    for (dataset, arch, variant), cost in costs.items():
        n_seeds = sum(1 for c in train_cells if (c.dataset, c.arch, c.variant) == (dataset, arch, variant))
        recipe = recipe_for(config, dataset, variant)
        n_train, n_val, infer_n = split_sizes(config, dataset)
        epochs = 0 if is_pretrained(config, variant) else recipe.epochs  # converted, not trained
        steps = epochs * (n_train // recipe.batch_size)
        step_flops = cost.flops_per_image * recipe.batch_size
        t_flop = step_flops / (opts.util * opts.peak)
        t_launch = cost.kernels_per_step * opts.us_per_kernel * 1e-6
        train_s = steps * max(t_flop, t_launch)
        f = exit_flops[(dataset, arch)][-1]
        val_batches = epochs * math.ceil(n_val / recipe.eval_batch_size)
        val_s = max(
            epochs * n_val * 2 * 2 * f / (opts.util * opts.peak),
            val_batches * cost.eval_kernels_per_batch * opts.us_per_kernel * 1e-6,
        )
        infer_s = max(
            infer_n * 2 * 2 * f / (opts.util * opts.peak),
            math.ceil(infer_n / config.get("infer_batch_size", 512))
            * cost.eval_kernels_per_batch
            * opts.us_per_kernel
            * 1e-6,
        )
        hours = (train_s + val_s + infer_s) / 3600
        rows.append(
            dict(
                cell=f"{dataset}/{arch}/{variant}",
                seeds=n_seeds,
                epochs=epochs,
                batch=recipe.batch_size,
                fk=f / 1e6,
                textbook=6 * f / 1e9,
                counted=cost.flops_per_image / 1e9,
                kernels=cost.kernels_per_step,
                bound="-" if not steps else "FLOPs" if t_flop > t_launch else "launch",
                step_ms=1e3 * max(t_flop, t_launch),
                img_s=recipe.batch_size / max(t_flop, t_launch) if steps else float("nan"),
                hours=hours,
                total=hours * n_seeds,
            )
        )
    head = (
        f"{'cell (dataset/arch/method)':<44} {'seeds':>5} {'ep':>4} {'bs':>4} {'F_K M':>8} {'6F GF':>6} "
        f"{'cnt GF':>7} {'kern/step':>9} {'bound':>6} {'ms/step':>8} {'img/s':>7} {'h/seed':>7} {'GPU h':>7}"
    )
    print(head)
    print("-" * len(head))
    by_dataset: dict[str, float] = defaultdict(float)
    for r in sorted(rows, key=lambda r: -r["total"]):
        print(
            f"{r['cell']:<44} {r['seeds']:>5} {r['epochs']:>4} {r['batch']:>4} {r['fk']:>8.1f} {r['textbook']:>6.2f} "
            f"{r['counted']:>7.2f} {r['kernels']:>9.0f} {r['bound']:>6} {r['step_ms']:>8.1f} {r['img_s']:>7.0f} "
            f"{r['hours']:>7.2f} {r['total']:>7.1f}"
        )
        by_dataset[r["cell"].split("/")[0]] += r["total"]
    print("-" * len(head))
    total = sum(by_dataset.values())
    print(
        "PROJECTED GPU hours (one H100 per job): "
        + ", ".join(f"{d} {h:.0f}" for d, h in by_dataset.items())
        + f"; total {total:.0f} h ({total / 24:.1f} GPU-days)"
    )
    print(
        "6F GF = textbook training GFLOPs per image (3 x 2 x F_K); cnt GF = counted in a real train_step "
        "(per image); img/s = projected training images per second per GPU."
    )
    print("PROJECTION: FLOPs and kernel counts are measured; GPU utilisation and per-kernel cost are assumptions.")


if __name__ == "__main__":
    main()

#!/usr/bin/env python
"""GPU check: does every CUDA path of the harness work on this machine, and how fast is it?

One command (sized for at most 8 minutes on one GPU; not yet timed on one) that runs every check
below, prints a table and writes a JSON (``--json``): one entry per check with its name, group,
status (pass, fail or skipped, with the reason), seconds and figures. The exit status is 1 when
any check failed.

Correctness, on CIFAR-shaped random data (uint8 3x32x32, 100 classes) held on the device:

* ``environment``: torch, CUDA, cuDNN, device, memory, which optional packages are importable.
* ``train``: every registered training method (on MSDNet, or the first architecture offering
  what it requires), a method's ``frozen`` switch where its parameters have one, and the
  standard method on every other architecture, through ``training.train`` for one short epoch in
  fp32 and in bf16: the mean loss is finite; every parameter the method trains (its
  ``trainable_parameters()`` and its extra networks) that received a gradient moved;
  parameters that need no gradient, those outside what it trains and the running statistics of
  frozen BatchNorm layers are bit-identical; everything stayed on the device; the convolutions
  ran in the precision asked for.
* ``cache``: ``run_network`` into a cache as the infer rule runs it (BatchNorm folded,
  channels_last), against the unfolded network on the CPU in fp32.
* ``posthoc``: every post-hoc method fitted on that val cache, scoring the test cache.
* ``curve``: budgeted curves (``calibration.budgeted_curve``) of the plain scores and of each
  post-hoc method's, with per-exit FLOPs from torch's flop counter; on val the thresholds must
  send floor(N pi_k) samples out at each exit (up to tied scores).
* ``dynamic``: real early exit (``eebench.dynamic``) against the simulated protocol, where the
  module exists.
* ``ddp``: ``training.train`` under torchrun: one process (NCCL, gloo on CPU, is initialised and
  reduces a tensor), and two processes with DDP where two GPUs exist (always on CPU, gloo); both
  processes must end with identical weights.
* ``resume``: a run killed twice (``stop_after_batches``) and resumed ends as an uninterrupted
  run: bit-identical on CPU, within float tolerance on a GPU (beside the difference between two
  uninterrupted runs).

Speed, each variant in its own process, built and warmed up once (the compiled ones compile then,
untimed), then interleaved rounds (``_bench.interleave``), ``torch.cuda.synchronize`` around
each timed chunk:

* ``speed_train``: the 7-exit CIFAR-100 MSDNet training step at batch 64 (the step
  ``training.train`` runs: on-device crop and flip, normalisation, the standard method's step) in
  img/s for the ``TRAIN_VARIANTS`` (fp32, tf32, bf16, channels_last, torch.compile ``default``
  and ``reduce-overhead``), and the reference MSDNet ``train()`` when ``--reference`` gives its
  checkout.
* ``speed_infer``: ``run_network`` at batch 1024 as the infer rule runs it.
* ``flops_share``: FLOPs of one training step (``torch.utils.flop_counter``) times steps per
  second, against the device's datasheet peak and a measured matmul peak.
* ``sharing``: total training img/s of 1, 2 and 4 processes training at once on the one GPU.
* ``projection``: the training step and evaluation cost of every training cell of
  ``config/paper.yaml`` measured as configured, and the GPU hours projected from them
  (``benchmarks/projection.py --measured`` reads the same figures from the JSON).

    python3 benchmarks/gpu_check.py --json gpu_check.json
    python3 benchmarks/gpu_check.py --reference /tmp/MSDNet-PyTorch --json gpu_check.json
    python benchmarks/gpu_check.py --device cpu --small --json out.json   # tiny sizes, minutes

Needs torch, torchvision, numpy and pandas (pyyaml for the projection, which is skipped without
it); neither Snakemake nor fvcore.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import importlib.util
import json
import math
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _bench  # noqa: E402

sys.path.insert(0, str(_bench.ROOT))
from eebench import io  # noqa: E402
from eebench.augment import epoch_plan, normalize  # noqa: E402
from eebench.cache import correctness, scored_outputs  # noqa: E402
from eebench.calibration import NO_EXIT, budgeted_curve, exit_indices, geometric_exit_distributions  # noqa: E402
from eebench.datasets import dataset_info  # noqa: E402
from eebench.inference import run_network  # noqa: E402
from eebench.methods import METHODS  # noqa: E402
from eebench.methods.common import frozen_batchnorms  # noqa: E402
from eebench.posthoc import POSTHOC  # noqa: E402
from eebench.provenance import device_name, git_commit, versions  # noqa: E402
from eebench.recipe import Recipe  # noqa: E402
from eebench.registry import build_params  # noqa: E402
from eebench.training import TrainData, _TrainingRun, train  # noqa: E402
from models import MultiExitNetwork, build_model, get_architecture, list_architectures  # noqa: E402
from models.base import fold_batchnorm  # noqa: E402

CIFAR100 = dataset_info("cifar100")
SPEC = CIFAR100.input  # 3 x 32 x 32, 100 classes
PREFERRED_ARCH = "msdnet"  # the architecture of the paper's tables, where a method can train it
# dense peak FLOP/s by NVIDIA's datasheets: fp32 (CUDA cores), tf32 and bf16 (tensor cores)
# (words the device name contains, as torch.cuda.get_device_name gives it) -> peaks
DATASHEET_PEAKS = {
    ("H200",): {"fp32": 67e12, "tf32": 494.7e12, "bf16": 989.4e12},
    ("H100", "PCIe"): {"fp32": 51e12, "tf32": 378e12, "bf16": 756e12},
    ("H100", "HBM3"): {"fp32": 67e12, "tf32": 494.7e12, "bf16": 989.4e12},  # SXM5: "NVIDIA H100 80GB HBM3"
    ("A100",): {"fp32": 19.5e12, "tf32": 156e12, "bf16": 312e12},
}


@dataclass(frozen=True)
class Sizes:
    """How big each check runs: the GPU sizes, or tiny ones for the CPU test (``--small``)."""

    small: bool
    batch: int  # training batch of the correctness checks
    train_batches: int  # batches per epoch there
    cache_images: int  # val and test images of the cache (the train cache too)
    infer_batch: int
    speed_batch: int
    speed_iters: int  # steps per timed chunk
    speed_rounds: int
    warmup: int
    infer_images: int
    sharing: tuple[int, ...]  # numbers of processes training at once
    projection_steps: int  # timed steps per cell
    matmul_n: int

    def arch_params(self, family: str) -> dict[str, Any]:
        """The architecture's defaults (its CIFAR model), or its tiny test setting."""
        return dict(get_architecture(family).network_class.test_params) if self.small else {}


FULL = Sizes(
    False,
    batch=64,
    train_batches=4,
    cache_images=2048,
    infer_batch=1024,
    speed_batch=64,
    speed_iters=20,
    speed_rounds=5,
    warmup=5,
    infer_images=8192,
    sharing=(1, 2, 4),
    projection_steps=6,
    matmul_n=8192,
)
SMALL = Sizes(
    True,
    batch=8,
    train_batches=2,
    cache_images=64,
    infer_batch=32,
    speed_batch=8,
    speed_iters=2,
    speed_rounds=2,
    warmup=1,
    infer_images=64,
    sharing=(1, 2),
    projection_steps=1,
    matmul_n=256,
)
# --small projects config/config.yaml restricted to this experiment (two cells: gater_frozen and
# the standard cell it starts from), so that the CPU test stays short
SMALL_EXPERIMENTS = [{"datasets": ["digits"], "architectures": ["msdnet"], "methods": ["gater_frozen"]}]


# --- reporting ---------------------------------------------------------------------------------
class Skip(Exception):
    """The check does not apply here; the message says why."""


class CheckFailed(Exception):
    def __init__(self, reason: str, figures: dict[str, Any] | None = None):
        super().__init__(reason)
        self.figures = figures or {}


def expect(condition: bool, reason: str, figures: dict[str, Any] | None = None) -> None:
    if not condition:
        raise CheckFailed(reason, figures)


def _plain(value: Any) -> Any:
    """JSON-safe figures: floats rounded to 6 significant digits, nan and inf as strings."""
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, torch.Tensor):
        return _plain(value.tolist())
    if isinstance(value, float):
        return float(f"{value:.6g}") if math.isfinite(value) else str(value)
    if isinstance(value, (torch.dtype, torch.device, Path)):
        return str(value)
    return value


class Report:
    """The checks run so far; the JSON is rewritten after each, so a killed run keeps them."""

    def __init__(self, path: Path | None, header: dict[str, Any], only: set[str], skip: set[str]):
        self.path, self.header, self.only, self.skip = path, header, only, skip
        self.checks: list[dict[str, Any]] = []
        self.started = time.perf_counter()

    def selected(self, group: str) -> bool:
        return (not self.only or group in self.only) and group not in self.skip

    def run(self, group: str, name: str, fn: Callable[[], dict[str, Any] | None]) -> dict[str, Any]:
        t0 = time.perf_counter()
        entry: dict[str, Any] = {"name": name, "group": group, "status": "pass", "reason": "", "figures": {}}
        if not self.selected(group):
            entry.update(status="skipped", reason="not selected (--only / --skip)")
        else:
            try:
                entry["figures"] = fn() or {}
            except Skip as err:
                entry.update(status="skipped", reason=str(err))
            except CheckFailed as err:
                entry.update(status="fail", reason=str(err), figures=err.figures)
            except Exception as err:  # noqa: BLE001 - a crash is a failed check, reported with its cause
                tail = "".join(traceback.format_exception(err)[-3:]).strip().replace("\n", " | ")
                entry.update(status="fail", reason=f"{type(err).__name__}: {err}"[:400], traceback=tail[-1500:])
        entry["seconds"] = round(time.perf_counter() - t0, 2)
        entry["figures"] = _plain(entry["figures"])
        self.checks.append(entry)
        reason = f"  ({entry['reason']})" if entry["reason"] else ""
        print(f"[{time.perf_counter() - self.started:6.0f} s] {entry['status']:>7}  {name}{reason}", flush=True)
        self.write()
        return entry

    def write(self) -> None:
        if self.path is None:
            return
        io.write_json(
            self.path, {**self.header, "elapsed_s": round(time.perf_counter() - self.started, 1), "checks": self.checks}
        )

    def failed(self) -> list[dict[str, Any]]:
        return [c for c in self.checks if c["status"] == "fail"]

    def table(self) -> str:
        width = max(len(c["name"]) for c in self.checks)
        lines = [f"{'check':<{width}}  {'status':>7}  {'s':>6}  figures / reason"]
        for c in self.checks:
            detail = c["reason"] if c["status"] != "pass" else _summary(c["figures"])
            lines.append(f"{c['name']:<{width}}  {c['status']:>7}  {c['seconds']:>6.1f}  {detail}"[:220])
        return "\n".join(lines)


def _summary(figures: dict[str, Any]) -> str:
    return ", ".join(f"{k} {v}" for k, v in figures.items() if isinstance(v, (int, float, str)))[:160]


# --- shared pieces ------------------------------------------------------------------------------
def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def random_data(n_train: int, n_val: int, seed: int) -> TrainData:
    """CIFAR-100-shaped random uint8 images (N, 3, 32, 32) and labels, train and val."""
    images, labels = _bench.random_cifar(n_train + n_val, seed=seed, num_classes=SPEC.num_classes)
    images = images.permute(0, 3, 1, 2).contiguous()
    return TrainData(
        images[:n_train],
        labels[:n_train],
        images[n_train:],
        labels[n_train:],
        CIFAR100.mean,
        CIFAR100.std,
        CIFAR100.crop_padding,
        CIFAR100.hflip,
    )


def build(family: str, sizes: Sizes, seed: int = 0) -> MultiExitNetwork:
    torch.manual_seed(seed)
    return build_model(family, SPEC, **sizes.arch_params(family))


def exit_costs(network: MultiExitNetwork) -> torch.Tensor:
    k = network.num_exits
    return torch.linspace(1 / k, 1.0, k)


def family_for(method_cls: type) -> str:
    """MSDNet where the method can train it, else the first architecture offering what it needs."""
    offering = [
        f for f in list_architectures() if method_cls.requires <= get_architecture(f).network_class.capabilities
    ]
    return PREFERRED_ARCH if PREFERRED_ARCH in offering else offering[0]


def use_fp32(device: torch.device) -> None:
    """Plain fp32 for the comparisons (PyTorch lets cuDNN use TF32 by default)."""
    Recipe(precision="fp32").apply_matmul_precision(device)


def snapshot(model: nn.Module, method: Any) -> dict[str, torch.Tensor]:
    tensors = {f"model.{k}": v.detach().clone() for k, v in model.state_dict().items()}
    for name, module in method.extra_modules().items():
        tensors.update({f"{name}.{k}": v.detach().clone() for k, v in module.state_dict().items()})
    return tensors


def max_relative_difference(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    """Largest over tensors of max |a - b| / max |b|; inf when the keys differ."""
    if a.keys() != b.keys():
        return math.inf
    worst = 0.0
    for key, expected in b.items():
        actual = a[key].to(expected.device)
        if not expected.is_floating_point():
            worst = max(worst, 0.0 if torch.equal(actual, expected) else math.inf)
            continue
        scale = float(expected.abs().max()) if expected.numel() else 0.0
        diff = float((actual.double() - expected.double()).abs().max()) if expected.numel() else 0.0
        worst = max(worst, diff / scale if scale > 0 else diff)
    return worst


# --- environment ----------------------------------------------------------------------------------
def importable(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):
        return False


def check_environment(device: torch.device) -> dict[str, Any]:
    import numpy
    import pandas

    figures: dict[str, Any] = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "numpy": numpy.__version__,
        "pandas": pandas.__version__,
        "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version(),
        "cpus": os.cpu_count(),
        "platform": platform.platform(),
    }
    figures["importable"] = {
        name: importable(name) for name in ("yaml", "jsonschema", "fvcore", "snakemake", "torchvision")
    }
    if device.type == "cuda":
        expect(torch.cuda.is_available(), "torch sees no CUDA device (a CPU build of torch, or no driver)", figures)
        props = torch.cuda.get_device_properties(device)
        figures.update(
            device=props.name,
            capability=f"{props.major}.{props.minor}",
            memory_gib=round(props.total_memory / 2**30, 1),
            multiprocessors=props.multi_processor_count,
            gpus=torch.cuda.device_count(),
        )
        with contextlib.suppress(Exception):  # a tuple in recent torch, an int in older ones
            version = torch.cuda.nccl.version()
            figures["nccl"] = ".".join(map(str, version)) if isinstance(version, tuple) else str(version)
        x = torch.randn(256, 256, generator=torch.Generator().manual_seed(0))
        use_fp32(device)
        difference = float((x.to(device) @ x.to(device)).cpu().sub(x @ x).abs().max())
        figures["matmul_vs_cpu"] = difference
        expect(difference < 1e-2, f"a 256x256 fp32 matmul on the GPU differs from the CPU's by {difference}", figures)
    else:
        figures["device"] = _bench.machine_line()
    return figures


# --- training methods ------------------------------------------------------------------------------
@dataclass(frozen=True)
class TrainCase:
    method: str
    family: str
    params: dict[str, Any]
    label: str


def training_cases() -> list[TrainCase]:
    """Every method with its test_params on its architecture, a ``frozen`` switch where its
    parameters have one, and the standard method on every other architecture."""
    cases = []
    for name in METHODS.names():
        cls = METHODS.get(name)
        family = family_for(cls)
        cases.append(TrainCase(name, family, dict(cls.test_params), f"{name}@{family}"))
        if any(f.name == "frozen" and f.type in (bool, "bool") for f in cls.Params.__dataclass_fields__.values()):
            cases.append(TrainCase(name, family, {**cls.test_params, "frozen": True}, f"{name}+frozen@{family}"))
    standard_on = {c.family for c in cases if c.method == "standard"}
    for family in list_architectures():
        if family not in standard_on:
            cases.append(TrainCase("standard", family, {}, f"standard@{family}"))
    return cases


def conv_dtypes(model: nn.Module) -> tuple[set[torch.dtype], list[Any]]:
    """The dtypes the first convolution's outputs had in training forwards (hooks to remove)."""
    seen: set[torch.dtype] = set()
    conv = next(m for m in model.modules() if isinstance(m, nn.Conv2d))

    def hook(module: nn.Module, _inputs: Any, output: torch.Tensor) -> None:
        if module.training:
            seen.add(output.dtype)

    return seen, [conv.register_forward_hook(hook)]


def check_training(
    case: TrainCase, precision: str, device: torch.device, sizes: Sizes, scratch: Path, keep: dict[str, Any]
) -> dict[str, Any]:
    if precision != "fp32" and device.type != "cuda":
        raise Skip(f"{precision} is a GPU switch: on CPU the recipe trains in fp32, which the fp32 check covers")
    model = build(case.family, sizes)
    cls = METHODS.get(case.method)
    params = METHODS.make_params(case.method, case.params, f"{case.label} params")
    made: dict[str, Any] = {}
    seen, hooks = conv_dtypes(model)
    reached: set[int] = set()  # parameters a gradient was accumulated into, at any step

    def watch(parameters: Any) -> None:
        hooks.extend(p.register_post_accumulate_grad_hook(lambda p: reached.add(id(p))) for p in parameters)

    def factory(network: MultiExitNetwork, ctx: Any) -> Any:
        """The method, with a snapshot of everything before the first step."""
        made["method"] = method = cls(network, params, ctx)
        for module in method.extra_modules().values():
            module.to(device)
            watch(module.parameters())
        made["before"] = snapshot(network, method)
        return method

    watch(model.parameters())
    data = random_data(sizes.batch * sizes.train_batches, 2 * sizes.batch, seed=1)
    recipe = Recipe(
        epochs=1,
        batch_size=sizes.batch,
        lr=0.05,
        schedule="constant",
        precision=precision,
        eval_batch_size=2 * sizes.batch,
    )
    t0 = time.perf_counter()
    try:
        result = train(
            model,
            factory,
            data,
            recipe,
            exit_costs(model),
            SPEC.num_classes,
            seed=0,
            state_dir=scratch / f"train-{case.label}-{precision}",
            fingerprint=case.label,
            device=device,
        )
    finally:
        for h in hooks:
            h.remove()
    seconds = time.perf_counter() - t0
    method, before = made["method"], made["before"]
    after = snapshot(model, method)
    loss = result.history[-1]["loss"]
    trained = {id(p) for p in method.trainable_parameters()}
    trained.update(id(p) for m in method.extra_modules().values() for p in m.parameters())
    named = [(f"model.{n}", p) for n, p in model.named_parameters()]
    named += [(f"{m}.{n}", p) for m, module in method.extra_modules().items() for n, p in module.named_parameters()]
    moved = {n for n, _ in named if not torch.equal(after[n], before[n])}
    should_move = {n for n, p in named if id(p) in trained and id(p) in reached}
    unreached = {n for n, p in named if id(p) in trained and p.requires_grad and id(p) not in reached}
    frozen = {n for n, p in named if not p.requires_grad}
    outside = {n for n, p in named if id(p) not in trained}
    frozen_bn = {id(m) for m in frozen_batchnorms(model)}
    frozen_buffers = {
        f"model.{mn}.{bn}"
        for mn, m in model.named_modules()
        if id(m) in frozen_bn
        for bn, _ in m.named_buffers(recurse=False)
    }
    changed_buffers = {n for n in frozen_buffers if not torch.equal(after[n], before[n])}
    off_device = [n for n, t in after.items() if t.device.type != device.type]
    expected_dtype = recipe.autocast_dtype(device) or torch.float32
    figures = {
        "loss": loss,
        "parameters": len(named),
        "moved": len(moved),
        "frozen": len(frozen),
        "trained_without_gradient": len(unreached),
        "outside_training": len(outside - frozen),
        "frozen_bn_buffers": len(frozen_buffers),
        "conv_dtype": sorted(str(d) for d in seen),
        "seconds_1_epoch": seconds,
        "val_acc_last_exit": result.history[-1][f"val_acc_{model.num_exits}"],
    }
    expect(math.isfinite(loss), f"mean training loss {loss}", figures)
    expect(
        not (should_move - moved),
        f"{len(should_move - moved)} trained parameters that received a gradient "
        f"did not move, e.g. {sorted(should_move - moved)[:3]}",
        figures,
    )
    expect(not (moved & frozen), f"frozen parameters moved: {sorted(moved & frozen)[:3]}", figures)
    expect(
        not (moved & outside),
        f"parameters outside what the method trains moved: {sorted(moved & outside)[:3]}",
        figures,
    )
    expect(
        not changed_buffers,
        f"running statistics of frozen BatchNorm layers changed: {sorted(changed_buffers)[:3]}",
        figures,
    )
    expect(bool(moved), "nothing moved", figures)
    expect(not off_device, f"tensors not on {device.type} after training: {off_device[:3]}", figures)
    expect(
        seen == {expected_dtype},
        f"the first convolution ran in {sorted(map(str, seen))}, expected {expected_dtype}",
        figures,
    )
    if case.method == "standard" and case.family == PREFERRED_ARCH and precision == "fp32":
        keep["trained"] = (model, method)
    return figures


# --- cache, post-hoc, curves, dynamic exit ------------------------------------------------------------
def deployed(model: MultiExitNetwork, device: torch.device) -> MultiExitNetwork:
    """The network as the infer rule runs it: eval, BatchNorm folded, channels_last, on the device."""
    net = copy.deepcopy(model).to(device).eval()
    fold_batchnorm(net)
    return net.to(memory_format=torch.channels_last)


def check_cache(device: torch.device, sizes: Sizes, keep: dict[str, Any]) -> dict[str, Any]:
    if "trained" not in keep:
        raise Skip("needs the network of the fp32 standard@msdnet training check, which did not pass")
    model, method = keep["trained"]
    use_fp32(device)
    n = sizes.cache_images
    parts = {}
    for seed, part in enumerate(("val", "test", "train")):
        data = random_data(n, 0, seed=10 + seed)
        parts[part] = (data.train_images, data.train_labels)
    net = deployed(model, device)
    caches = {}
    t0 = time.perf_counter()
    for part, (images, labels) in parts.items():
        cache = run_network(
            net,
            images.to(device),
            CIFAR100.mean,
            CIFAR100.std,
            sizes.infer_batch,
            device,
            channels_last=True,
            with_features=True,
            transform=method.eval_outputs,
        )
        caches[part] = {**cache, "labels": labels, "split_size": len(labels)}
    seconds = time.perf_counter() - t0
    reference_net = copy.deepcopy(model).cpu().eval()
    m = min(n, 256)
    reference = run_network(
        reference_net,
        parts["test"][0][:m],
        CIFAR100.mean,
        CIFAR100.std,
        64,
        torch.device("cpu"),
        with_features=True,
        transform=method.eval_outputs,
    )
    test = caches["test"]
    scale = float(reference["logits"].abs().max())
    difference = float((test["logits"][:, :m] - reference["logits"]).abs().max())
    feature_difference = max(
        float((a[:m] - b).abs().max() / b.abs().max().clamp_min(1e-12))
        for a, b in zip(test["features"], reference["features"])
    )
    k = model.num_exits
    figures = {
        "exits": k,
        "images_per_part": n,
        "img_s": 3 * n / seconds,
        "logits_max_abs": scale,
        "logits_difference_vs_cpu": difference,
        "features_relative_difference_vs_cpu": feature_difference,
    }
    expect(
        test["logits"].shape == (k, n, SPEC.num_classes),
        f"cache logits of shape {tuple(test['logits'].shape)}",
        figures,
    )
    expect(
        test["logits"].device.type == "cpu" and all(f.device.type == "cpu" for f in test["features"]),
        "the cache is not on the CPU",
        figures,
    )
    expect(all(torch.isfinite(c["logits"]).all() for c in caches.values()), "non-finite logits in the cache", figures)
    expect(len(test["features"]) == k and all(f.shape[0] == n for f in test["features"]), "features missing", figures)
    expect(
        difference <= 1e-3 * max(scale, 1.0),
        f"logits differ from the CPU's by {difference:.3g} (largest logit {scale:.3g})",
        figures,
    )
    expect(
        feature_difference <= 1e-3, f"features differ from the CPU's by {feature_difference:.3g} (relative)", figures
    )
    keep.update(caches=caches, deployed=net, method=method)
    return figures


def check_posthoc(name: str, keep: dict[str, Any]) -> dict[str, Any]:
    if "caches" not in keep:
        raise Skip("needs the cache of the cache check, which did not pass")
    caches, flops = keep["caches"], keep_flops(keep)
    cls = POSTHOC.get(name)
    method = cls(build_params(cls.Params, dict(cls.test_params), name), flops, seed=0)
    t0 = time.perf_counter()
    method.fit(caches["val"], caches["train"] if cls.needs_train_split else None)
    scored = {part: method.score(caches[part]) for part in ("val", "test")}
    k, n = caches["test"]["logits"].shape[:2]
    figures = {
        "params": "test_params",
        "fit_and_score_s": time.perf_counter() - t0,
        "scores_shape": list(scored["test"].scores.shape),
    }
    for part, s in scored.items():
        expect(s.predictions.shape == (k, n), f"{part} predictions of shape {tuple(s.predictions.shape)}", figures)
        expect(s.scores.shape[-2:] == (k, n), f"{part} scores of shape {tuple(s.scores.shape)}", figures)
        expect(bool(torch.isfinite(s.scores).all()), f"non-finite {part} scores", figures)
    keep.setdefault("scored", {})[name] = scored
    return figures


def keep_flops(keep: dict[str, Any]) -> list[float]:
    """Cumulative FLOPs per exit of the deployed network (torch's flop counter, one image)."""
    if "flops" not in keep:
        net = keep["deployed"]
        x = torch.zeros(1, SPEC.channels, SPEC.size, SPEC.size, device=next(net.parameters()).device)
        flops = []
        with torch.inference_mode():
            for k in range(1, net.num_exits + 1):
                counter = FlopCounterMode(display=False)
                with counter:
                    net.forward_all(x, upto=k)
                flops.append(float(counter.get_total_flops()))
        keep["flops"] = flops
    return keep["flops"]


def check_curves(keep: dict[str, Any]) -> dict[str, Any]:
    if "caches" not in keep:
        raise Skip("needs the cache of the cache check, which did not pass")
    caches, flops = keep["caches"], keep_flops(keep)
    method = keep["method"]
    plain = {part: scored_outputs(caches[part], method.exit_score) for part in ("val", "test")}
    scorers = {"plain": plain, **keep.get("scored", {})}
    figures: dict[str, Any] = {"flops_per_exit": flops}
    for name, scored in scorers.items():
        correct = correctness(scored["test"], caches["test"]["labels"])
        curve = budgeted_curve(
            scored["val"].scores, scored["test"].scores, correct, flops, scored["test"].exit_distributions
        )
        figures[name] = {
            "budgets": len(curve.flops),
            "flops_range": [float(curve.flops.min()), float(curve.flops.max())],
            "accuracy_range": [float(curve.accuracy.min()), float(curve.accuracy.max())],
        }
        fractions = torch.as_tensor(curve.exit_fractions)
        expect(
            bool(torch.allclose(fractions.sum(1), torch.ones(len(fractions), dtype=fractions.dtype))),
            f"{name}: exit fractions do not sum to 1",
            figures,
        )
        expect(
            flops[0] * (1 - 1e-9) <= curve.flops.min() and curve.flops.max() <= flops[-1] * (1 + 1e-9),
            f"{name}: expected FLOPs outside [F_1, F_K]",
            figures,
        )
        expect(0 <= curve.accuracy.min() and curve.accuracy.max() <= 100, f"{name}: accuracy outside [0, 100]", figures)
        if name == "plain":
            keep["thresholds"] = torch.as_tensor(curve.thresholds)
            mismatched = _calibration_mismatches(scored["val"].scores, torch.as_tensor(curve.thresholds))
            figures[name]["untied_count_mismatches"] = mismatched
            expect(
                mismatched == 0,
                f"{mismatched} (budget, exit) pairs where val thresholds do not send "
                "floor(N pi_k) samples out and no tie explains it",
                figures,
            )
    return figures


def _calibration_mismatches(val_scores: torch.Tensor, thresholds: torch.Tensor) -> int:
    """(budget, exit) pairs whose val exit count differs from floor(N pi_k) without a tied score."""
    k, n = val_scores.shape
    _, distributions = geometric_exit_distributions(k)
    wanted = torch.floor(n * distributions).long()
    exits = exit_indices(val_scores, thresholds.to(val_scores.dtype))
    counts = torch.zeros_like(wanted).scatter_add_(1, exits, torch.ones_like(exits))
    bad = 0
    for b in range(len(wanted)):
        for j in range(k - 1):
            if thresholds[b, j] >= NO_EXIT:
                bad += int(counts[b, j] != 0)
            elif counts[b, j] != wanted[b, j] and int((val_scores[j] == thresholds[b, j]).sum()) < 2:
                bad += 1
    return bad


def check_dynamic(device: torch.device, sizes: Sizes, keep: dict[str, Any]) -> dict[str, Any]:
    try:
        from eebench.dynamic import MethodScorer, compare_with_simulation, run_dynamic_batches
    except ImportError:
        raise Skip("eebench.dynamic not available") from None
    if "thresholds" not in keep:
        raise Skip("needs the cache and curve checks, which did not pass")
    net, method, caches = keep["deployed"], keep["method"], keep["caches"]
    scorer = MethodScorer(method)
    images = random_data(sizes.cache_images, 0, seed=11).train_images  # the test part of the cache check
    mean, std = torch.tensor(CIFAR100.mean, device=device), torch.tensor(CIFAR100.std, device=device)
    x = normalize(images.to(device), mean, std).contiguous(memory_format=torch.channels_last)
    simulated = scorer.score_cache(caches["test"])
    thresholds = keep["thresholds"]
    figures: dict[str, Any] = {}
    for b in sorted({0, len(thresholds) // 3, 2 * len(thresholds) // 3, len(thresholds) - 1}):
        result = run_dynamic_batches(net, x, thresholds[b], scorer, sizes.infer_batch, record_scores=True)
        agreement = compare_with_simulation(result, simulated, thresholds[b])
        figures[f"budget_{b + 1}"] = {
            "agreement": agreement.describe(),
            "samples_per_segment": result.samples_per_segment,
        }
        expect(agreement.exact, f"budget {b + 1}: {agreement.describe()}", figures)
    b = len(thresholds) // 3
    times = {"dynamic": [], "full": []}
    for _ in range(3):
        for what in times:
            synchronize(device)
            t0 = time.perf_counter()
            if what == "dynamic":
                run_dynamic_batches(net, x, thresholds[b], scorer, sizes.infer_batch)
            else:
                with torch.inference_mode():
                    for i in range(0, len(x), sizes.infer_batch):
                        net.forward_all(x[i : i + sizes.infer_batch])
            synchronize(device)
            times[what].append(time.perf_counter() - t0)
    figures["budget_for_timing"] = b + 1
    figures["dynamic_img_s"] = len(x) / statistics.median(times["dynamic"])
    figures["full_network_img_s"] = len(x) / statistics.median(times["full"])
    return figures


# --- torchrun --------------------------------------------------------------------------------------
DDP_METHODS = ("standard", "gater")  # DDP around the forward, and a method with its own step


def ddp_worker(out: Path, device_name: str, small: bool) -> None:
    """One torchrun process: probe the backend, train each of DDP_METHODS, save this rank's result."""
    import torch.distributed as dist

    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    device = torch.device(device_name)
    backend = "nccl" if device.type == "cuda" else "gloo"
    torch.set_num_threads(1)
    probe = None
    if world == 1:  # one process: the harness trains on its own, so initialise the backend here
        if device.type == "cuda":
            torch.cuda.set_device(0)
        dist.init_process_group(backend)
        value = torch.ones(1, device=device)
        dist.all_reduce(value)
        probe = float(value.item())
        dist.destroy_process_group()
    sizes = SMALL if small else FULL
    result: dict[str, Any] = {"rank": rank, "world": world, "probe_all_reduce": probe}
    for name in DDP_METHODS:
        cls = METHODS.get(name)
        model = build("msdnet", sizes)
        params = METHODS.make_params(name, dict(cls.test_params))
        data = random_data(sizes.batch * sizes.train_batches, 2 * sizes.batch, seed=1)
        recipe = Recipe(epochs=1, batch_size=sizes.batch, lr=0.05, schedule="constant")
        history = train(
            model,
            lambda m, ctx: cls(m, params, ctx),
            data,
            recipe,
            exit_costs(model),
            SPEC.num_classes,
            0,
            out / f"state-{name}",
            name,
            device,
        ).history
        result[name] = {"loss": history[-1]["loss"]}
        torch.save({k: v.cpu() for k, v in model.state_dict().items()}, out / f"{name}.rank{rank}.pt")
    if dist.is_initialized():
        result["backend"] = dist.get_backend()
        dist.destroy_process_group()
    else:
        result["backend"] = backend if probe is not None else None
    (out / f"rank{rank}.json").write_text(json.dumps(result))


def check_ddp(nproc: int, device: torch.device, sizes: Sizes, scratch: Path) -> dict[str, Any]:
    if device.type == "cuda" and nproc > torch.cuda.device_count():
        raise Skip(
            f"{torch.cuda.device_count()} GPU(s): the harness gives each process a GPU of its own "
            f"(cuda:LOCAL_RANK), so {nproc} processes need {nproc} GPUs"
        )
    out = scratch / f"ddp{nproc}"
    out.mkdir(parents=True, exist_ok=True)
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "PYTHONPATH": os.pathsep.join(filter(None, [str(_bench.ROOT), os.environ.get("PYTHONPATH")])),
    }
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc-per-node={nproc}",
        __file__,
        "--ddp-worker",
        str(out),
        "--device",
        str(device),
        *(["--small"] if sizes.small else []),
    ]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    figures: dict[str, Any] = {"processes": nproc, "seconds": time.perf_counter() - t0}
    expect(
        proc.returncode == 0,
        f"torchrun exited with {proc.returncode}: " + (proc.stderr.strip().splitlines() or [""])[-1][:300],
        {**figures, "stderr": proc.stderr[-3000:]},
    )
    ranks = [json.loads((out / f"rank{r}.json").read_text()) for r in range(nproc)]
    expected_backend = "nccl" if device.type == "cuda" else "gloo"
    figures["backend"] = ranks[0]["backend"]
    figures["losses"] = {name: ranks[0][name]["loss"] for name in DDP_METHODS}
    expect(
        all(r["backend"] == expected_backend for r in ranks),
        f"backend {figures['backend']}, expected {expected_backend}",
        figures,
    )
    if nproc == 1:
        expect(
            ranks[0]["probe_all_reduce"] == 1.0,
            f"the one-process all_reduce gave {ranks[0]['probe_all_reduce']}",
            figures,
        )
    for name in DDP_METHODS:
        expect(all(math.isfinite(r[name]["loss"]) for r in ranks), f"{name}: non-finite loss", figures)
        weights = [torch.load(out / f"{name}.rank{r}.pt") for r in range(nproc)]
        differing = [k for k in weights[0] for w in weights[1:] if not torch.equal(w[k], weights[0][k])]
        expect(not differing, f"{name}: {len(differing)} tensors differ between processes", figures)
    return figures


# --- resume ----------------------------------------------------------------------------------------
def check_resume(device: torch.device, sizes: Sizes, scratch: Path) -> dict[str, Any]:
    steps = sizes.train_batches
    data = random_data(sizes.batch * steps, 2 * sizes.batch, seed=2)
    cls = METHODS.get("standard")

    def run(state_dir: Path, stop: int | None = None) -> dict[str, torch.Tensor]:
        model = build(PREFERRED_ARCH, sizes, seed=3)
        recipe = Recipe(epochs=2, batch_size=sizes.batch, lr=0.05, schedule="cosine")
        result = train(
            model,
            lambda m, ctx: cls(m, cls.Params(), ctx),
            data,
            recipe,
            exit_costs(model),
            SPEC.num_classes,
            0,
            state_dir,
            "resume",
            device,
            stop_after_batches=stop,
        )
        return {k: v.detach().cpu().clone() for k, v in result.model.state_dict().items()}

    whole = run(scratch / "resume-whole")
    killed = scratch / "resume-killed"
    stops = (1, steps)  # after batch 1 of epoch 1, then after batch 1 of epoch 2
    for stop in stops:
        try:
            run(killed, stop)
            raise CheckFailed(f"the run did not stop after {stop} batches")
        except SystemExit as exit_:
            expect(exit_.code == 143, f"a stopped run exited with {exit_.code}, expected 143 (128 + SIGTERM)")
    resumed = run(killed)
    difference = max_relative_difference(resumed, whole)
    figures: dict[str, Any] = {"batches": 2 * steps, "stopped_after": stops, "resumed_vs_whole_relative": difference}
    if device.type == "cpu":
        expect(
            difference == 0.0,
            f"resumed weights differ from the uninterrupted run's ({difference:.3g}); "
            "on CPU they must be bit-identical",
            figures,
        )
    else:
        figures["rerun_vs_whole_relative"] = max_relative_difference(run(scratch / "resume-again"), whole)
        expect(
            difference <= 1e-3,
            f"resumed weights differ from the uninterrupted run's by {difference:.3g} (relative; tolerance 1e-3)",
            figures,
        )
    return figures


# --- speed: the training step in worker processes ----------------------------------------------------
# variant -> recipe switches; channels_last "off"/"on" explicit (the recipe's "auto" is "on" on a GPU)
TRAIN_VARIANTS = {
    "fp32": {"channels_last": "off"},
    "fp32+cl": {"channels_last": "on"},  # what config/paper.yaml trains with on a GPU
    "tf32": {"precision": "tf32", "channels_last": "off"},
    "bf16": {"precision": "bf16", "channels_last": "off"},
    "bf16+cl": {"precision": "bf16", "channels_last": "on"},
    "fp32+cl+compile": {"channels_last": "on", "compile": "default"},
    "fp32+cl+reduce-overhead": {"channels_last": "on", "compile": "reduce-overhead"},
    "bf16+cl+reduce-overhead": {"precision": "bf16", "channels_last": "on", "compile": "reduce-overhead"},
}


# the variant that is what config/paper.yaml trains with (fp32, eager, channels_last: auto) there
CONFIGURED_VARIANT = {"cuda": "fp32+cl", "cpu": "fp32"}


def variant_skip_reason(name: str, device: torch.device, cpu_compile: bool) -> str | None:
    switches = TRAIN_VARIANTS[name]
    if device.type == "cpu":
        if switches.get("precision", "fp32") != "fp32":
            return "a GPU switch (on CPU the recipe trains in fp32)"
        if switches.get("compile") == "reduce-overhead":
            return "CUDA graphs: GPU only"
        if switches.get("compile") and not cpu_compile:
            return "torch.compile takes minutes on CPU (--cpu-compile to include it)"
    return None


def step_worker(spec: dict[str, Any]) -> None:
    """A persistent process running the standard method's training step on the 7-exit MSDNet
    (``_TrainingRun.train_batch``, the step ``training.train`` runs) with the given switches."""
    device = torch.device(spec["device"])
    sizes = SMALL if spec["small"] else FULL
    state: dict[str, Any] = {}

    def setup() -> dict[str, Any]:
        torch.set_num_threads(spec["threads"])
        model = build(PREFERRED_ARCH, sizes)
        batch = spec["batch"]
        data = random_data(batch * 50, batch, seed=4)
        recipe = Recipe(batch_size=batch, **spec["recipe"])
        cls = METHODS.get("standard")
        scratch = Path(tempfile.mkdtemp(prefix="eebench-gpu-check-step-"))
        run = _TrainingRun(
            model,
            lambda m, ctx: cls(m, cls.Params(), ctx),
            data,
            recipe,
            exit_costs(model),
            SPEC.num_classes,
            0,
            scratch / "checkpoint.pt",
            "speed",
            device,
        )
        shutil.rmtree(scratch, ignore_errors=True)
        state.update(run=run, epoch=-1, batch=run.steps_per_epoch, step=0)
        t0 = time.perf_counter()
        steps(sizes.warmup)
        info = {"warmup_s": time.perf_counter() - t0, "parameters": sum(p.numel() for p in model.parameters())}
        with contextlib.suppress(Exception):  # how often CUDA graphs were refused (private counters)
            from torch._dynamo.utils import counters

            info["cudagraph_skips"] = dict(counters["inductor"]).get("cudagraph_skips", 0)
        return info

    def next_batch() -> tuple[torch.Tensor, torch.Tensor]:
        run = state["run"]
        if state["batch"] == run.steps_per_epoch:
            state["epoch"] += 1
            state["batch"] = 0
            plan = epoch_plan(len(run.data.train_labels), run.data.crop_padding, run.seed, state["epoch"])
            order, size = plan.order.to(run.device), run.recipe.batch_size
            state["idx"] = [order[b * size : (b + 1) * size] for b in range(run.steps_per_epoch)]
            state["images"] = run.train_batches.epoch(state["epoch"], plan, state["idx"])
        idx = state["idx"][state["batch"]]
        state["batch"] += 1
        return next(state["images"]), idx

    def steps(n: int) -> dict[str, Any]:
        run = state["run"]
        loss = torch.zeros((), device=device, dtype=torch.float64)
        for _ in range(n):
            images, idx = next_batch()
            loss += run.train_batch(images, idx, state["step"]).double()
            state["step"] += 1
        return {"loss": float(loss) / max(n, 1)}  # the host sync that ends the timed chunk

    _bench.serve(setup, steps)


def reference_worker(spec: dict[str, Any]) -> None:
    import train_throughput

    opts = argparse.Namespace(
        threads=spec["threads"],
        reference=spec["reference"],
        data=spec["data"],
        scratch=spec["scratch"],
        warmup=spec["warmup"],
        reference_args=spec["reference_args"],
    )
    _bench.serve(*train_throughput.reference_worker(opts, set()))


def start_workers(specs: dict[str, dict[str, Any]], scratch: Path) -> tuple[dict[str, _bench.Worker], dict[str, str]]:
    """One process per spec, all building (and compiling) at once; waits until all are ready.
    Returns the ready workers and, for those that ended during set-up, the last line of their stderr."""
    workers, errors = {}, {}
    try:
        for name, spec in specs.items():
            log = scratch / f"worker-{name}.log"
            workers[name] = _bench.Worker(name, [__file__, "--worker", json.dumps(spec)], wait=False, log=log)
        for name, worker in list(workers.items()):
            try:
                worker.ready()
            except RuntimeError as err:
                lines = worker.log.read_text().strip().splitlines() if worker.log and worker.log.exists() else []
                errors[name] = f"{err}: {lines[-1] if lines else ''}"[:500]
                del workers[name]
    except BaseException:
        stop_workers(workers)
        raise
    return workers, errors


def stop_workers(workers: dict[str, _bench.Worker]) -> None:
    for worker in workers.values():
        try:
            worker.close()
        except (OSError, subprocess.TimeoutExpired):
            worker.proc.kill()


def check_speed_train(
    device: torch.device,
    sizes: Sizes,
    opts: argparse.Namespace,
    scratch: Path,
    keep: dict[str, Any],
    with_sharing: bool,
) -> dict[str, Any]:
    chosen = opts.variants or list(TRAIN_VARIANTS)
    skipped = {v: r for v in chosen if (r := variant_skip_reason(v, device, opts.cpu_compile))}
    names = [v for v in chosen if v not in skipped]
    threads = 1 if sizes.small else opts.threads
    specs = {
        v: {
            "kind": "step",
            "device": str(device),
            "small": sizes.small,
            "batch": sizes.speed_batch,
            "threads": threads,
            "recipe": TRAIN_VARIANTS[v],
        }
        for v in names
    }
    reference_note = "no --reference given"
    if opts.reference:
        reference = _bench.check_reference(opts.reference, ("main.py", "dataloader.py", "models/msdnet.py"))
        data = scratch / "cifar"
        images, labels = _bench.random_cifar(60_000, seed=0)
        _bench.write_fake_cifar100(data, images, labels)
        workers_j = str(min(16, os.cpu_count() or 1)) if device.type == "cuda" else "0"  # README's -j 16 on GPUs
        specs["reference"] = {
            "kind": "reference",
            "threads": threads,
            "reference": str(reference),
            "data": str(data),
            "scratch": str(scratch),
            "warmup": sizes.warmup,
            "reference_args": ["-j", workers_j],
        }
        reference_note = (
            f"kalviny/MSDNet-PyTorch train() at batch 64, -j {workers_j}, DataParallel and "
            "cudnn.benchmark as its main.py"
        )
    sharing = sharing_specs(device, sizes, opts) if with_sharing else {}
    workers, errors = start_workers({**specs, **sharing}, scratch)  # the sharing check's workers build meanwhile
    if not set(sharing) & set(errors):
        keep["sharing_workers"] = [workers.pop(name) for name in sharing]
    else:
        stop_workers({name: workers.pop(name) for name in sharing if name in workers})
    if names[0] not in workers:
        stop_workers(workers)
        raise CheckFailed(f"the baseline variant {names[0]} could not start: {errors[names[0]]}", {"errors": errors})
    try:
        times = _bench.interleave(
            list(workers.values()),
            sizes.speed_iters,
            sizes.speed_rounds,
            quiet=opts.quiet_below,
            max_wait=0.0 if sizes.small else opts.max_wait,
        )
    finally:
        stop_workers(workers)
    rates = {name: [sizes.speed_iters * sizes.speed_batch / t for t in ts] for name, ts in times.items()}
    print("\n".join(_bench.ratio_table(rates, names[0], "img/s")), flush=True)
    names = [n for n in names if n in rates]
    medians = {name: statistics.median(r) for name, r in rates.items()}
    best = max((n for n in medians if n != "reference"), key=medians.get)
    keep["train_rates"] = medians
    figures: dict[str, Any] = {
        "batch": sizes.speed_batch,
        "steps_per_chunk": sizes.speed_iters,
        "rounds": sizes.speed_rounds,
        "img_s_median": medians,
        "img_s_rounds": rates,
        "baseline": names[0],
        "ratio_to_baseline_median": {
            n: statistics.median(a / b for a, b in zip(r, rates[names[0]])) for n, r in rates.items()
        },
        "best": best,
        "configured_variant": CONFIGURED_VARIANT[device.type],
        "skipped_variants": skipped,
        "reference": reference_note,
        "workers": {name: w.info for name, w in workers.items()},
        "errors": errors,
    }
    if "reference" in rates:
        figures["best_vs_reference_median"] = statistics.median(a / b for a, b in zip(rates[best], rates["reference"]))
    expect(not errors, f"{len(errors)} variant(s) could not start: {errors}", figures)
    return figures


def check_speed_infer(device: torch.device, sizes: Sizes) -> dict[str, Any]:
    use_fp32(device)
    net = deployed(build(PREFERRED_ARCH, sizes), device)
    images = random_data(sizes.infer_images, 0, seed=5).train_images.to(device)

    def one_pass() -> float:
        synchronize(device)
        t0 = time.perf_counter()
        run_network(net, images, CIFAR100.mean, CIFAR100.std, sizes.infer_batch, device, channels_last=True)
        return time.perf_counter() - t0  # run_network ends with the cache on the CPU (synchronised)

    one_pass()
    seconds = [one_pass() for _ in range(3)]
    return {
        "batch": sizes.infer_batch,
        "images": len(images),
        "img_s_median": len(images) / statistics.median(seconds),
        "img_s_passes": [len(images) / s for s in seconds],
        "what": "fp32, BatchNorm folded, channels_last, logits and features to the CPU (the infer rule)",
    }


def step_flops(sizes: Sizes) -> float:
    """FLOPs of one training step of the standard method (forward and backward) at the speed batch."""
    model = build(PREFERRED_ARCH, sizes)
    cls = METHODS.get("standard")
    from eebench.methods import TrainContext

    method = cls(
        model,
        cls.Params(),
        TrainContext(exit_costs=exit_costs(model), num_classes=SPEC.num_classes, epochs=1, steps_per_epoch=1),
    )
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    x = torch.randn(sizes.speed_batch, SPEC.channels, SPEC.size, SPEC.size)
    y = torch.randint(0, SPEC.num_classes, (sizes.speed_batch,))
    counter = FlopCounterMode(display=False)
    with counter:
        method.train_step(x, y, optimizer, 0)
    return float(counter.get_total_flops())


def matmul_peak(device: torch.device, dtype: torch.dtype, n: int, tf32: bool = False) -> float:
    """Best of 5 n x n x n matrix products, FLOP/s."""
    torch.backends.cuda.matmul.allow_tf32 = tf32
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    a @ b
    best = math.inf
    for _ in range(5):
        synchronize(device)
        t0 = time.perf_counter()
        a @ b
        synchronize(device)
        best = min(best, time.perf_counter() - t0)
    torch.backends.cuda.matmul.allow_tf32 = False
    return 2 * n**3 / best


def datasheet_peak(device_name: str) -> dict[str, float] | None:
    for words, peaks in DATASHEET_PEAKS.items():
        if all(word in device_name for word in words):
            return peaks
    return None


def check_flops_share(device: torch.device, sizes: Sizes, keep: dict[str, Any]) -> dict[str, Any]:
    if "train_rates" not in keep:
        raise Skip("needs the speed_train figures, which did not pass")
    flops = step_flops(sizes)
    precisions = (
        {"fp32": torch.float32}
        if device.type == "cpu"
        else {"fp32": torch.float32, "tf32": torch.float32, "bf16": torch.bfloat16}
    )
    measured = {p: matmul_peak(device, dtype, sizes.matmul_n, tf32=p == "tf32") for p, dtype in precisions.items()}
    sheet = datasheet_peak(torch.cuda.get_device_name(device)) if device.type == "cuda" else None
    figures: dict[str, Any] = {
        "step_flops": flops,
        "flops_per_image": flops / sizes.speed_batch,
        "measured_matmul_peak": measured,
        "datasheet_peak": sheet or "device not in the table",
    }
    shares = {}
    for variant, img_s in keep["train_rates"].items():
        if variant == "reference":
            continue
        precision = TRAIN_VARIANTS[variant].get("precision", "fp32")
        achieved = flops / sizes.speed_batch * img_s
        shares[variant] = {
            "achieved_flop_s": achieved,
            "of_measured_matmul": achieved / measured[precision],
            **({"of_datasheet": achieved / sheet[precision]} if sheet else {}),
        }
    figures["shares"] = shares
    return figures


def sharing_specs(device: torch.device, sizes: Sizes, opts: argparse.Namespace) -> dict[str, dict[str, Any]]:
    recipe = TRAIN_VARIANTS[CONFIGURED_VARIANT[device.type]]
    return {
        f"share{i}": {
            "kind": "step",
            "device": str(device),
            "small": sizes.small,
            "batch": sizes.speed_batch,
            "threads": 1 if device.type == "cpu" else opts.threads,
            "recipe": recipe,
        }
        for i in range(max(sizes.sharing))
    }


def check_sharing(
    device: torch.device, sizes: Sizes, opts: argparse.Namespace, scratch: Path, keep: dict[str, Any]
) -> dict[str, Any]:
    """Total img/s of N processes training at once on the one device, N = sizes.sharing (the
    workers were started beside the speed_train check's, or are started here)."""
    workers = keep.pop("sharing_workers", None)
    if workers is None:
        started, errors = start_workers(sharing_specs(device, sizes, opts), scratch)
        workers = list(started.values())
        if errors:
            stop_workers(started)
            raise CheckFailed(f"{len(errors)} worker(s) could not start: {errors}")
    totals: dict[int, list[float]] = {n: [] for n in sizes.sharing}
    try:
        for r in range(sizes.speed_rounds):
            for n in sizes.sharing if r % 2 == 0 else sizes.sharing[::-1]:
                t0 = time.perf_counter()
                for w in workers[:n]:
                    w.start(sizes.speed_iters)
                for w in workers[:n]:
                    w.finish()
                totals[n].append(n * sizes.speed_iters * sizes.speed_batch / (time.perf_counter() - t0))
    finally:
        stop_workers(dict(enumerate(workers)))
    medians = {n: statistics.median(t) for n, t in totals.items()}
    return {
        "variant": CONFIGURED_VARIANT[device.type],
        "total_img_s_median": medians,
        "total_img_s_rounds": totals,
        "gain_over_one_process": {n: medians[n] / medians[1] for n in medians},
    }


# --- projection ----------------------------------------------------------------------------------------
def measure_cell(
    config: dict[str, Any], cell_key: tuple[str, str, str], device: torch.device, steps: int, warmup: int
) -> dict[str, Any]:
    """Seconds per training step (the cell's recipe, as configured) and per evaluated image."""
    from eebench.config import recipe_for
    from eebench.pipeline import _method_factory, build_network

    dataset, arch, variant = cell_key
    info = dataset_info(dataset)
    torch.manual_seed(0)
    network = build_network(config, dataset, arch)
    recipe = recipe_for(config, dataset, variant)
    batch = recipe.batch_size
    n_batches = warmup + steps
    g = torch.Generator().manual_seed(0)
    c, s = info.input.channels, info.input.size
    images = torch.randint(0, 256, (batch * n_batches, c, s, s), dtype=torch.uint8, generator=g)
    labels = torch.randint(0, info.input.num_classes, (batch * n_batches,), generator=g)
    data = TrainData(images, labels, images[:batch], labels[:batch], info.mean, info.std, info.crop_padding, info.hflip)
    scratch = Path(tempfile.mkdtemp(prefix="eebench-gpu-check-cell-"))
    try:
        run = _TrainingRun(
            network,
            _method_factory(config, variant),
            data,
            recipe,
            exit_costs(network),
            info.input.num_classes,
            0,
            scratch / "checkpoint.pt",
            "projection",
            device,
        )
        plan = epoch_plan(len(labels), info.crop_padding, 0, 0)
        order = plan.order.to(run.device)
        idx = [order[b * batch : (b + 1) * batch] for b in range(n_batches)]
        batches = run.train_batches.epoch(0, plan, idx)
        seconds = []
        for step in range(n_batches):
            x = next(batches)
            synchronize(device)
            t0 = time.perf_counter()
            run.train_batch(x, idx[step], step).item()
            seconds.append(time.perf_counter() - t0)
        timed = seconds[warmup:]
        eval_batch = min(recipe.eval_batch_size, len(images))
        eval_seconds = []
        for _ in range(3):
            synchronize(device)
            t0 = time.perf_counter()
            run_network(
                network,
                images[:eval_batch],
                info.mean,
                info.std,
                eval_batch,
                device,
                run.channels_last,
                with_features=False,
                transform=run.method.eval_outputs,
            )
            eval_seconds.append((time.perf_counter() - t0) / eval_batch)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return {
        "batch": batch,
        "step_s": statistics.mean(timed),
        "step_s_median": statistics.median(timed),
        "steps_timed": len(timed),
        "eval_s_per_image": statistics.median(eval_seconds[1:]),
        "precision": recipe.precision,
        "compile": recipe.compile,
        "channels_last": run.channels_last,
    }


def check_projection(
    device: torch.device, sizes: Sizes, opts: argparse.Namespace, keep: dict[str, Any]
) -> dict[str, Any]:
    if not importable("yaml"):
        raise Skip("pyyaml is not installed (bring its wheel: README, 'GPU check')")
    import projection
    import yaml

    from eebench.config import cells, fill_defaults, is_posthoc

    default = _bench.ROOT / "config" / ("config.yaml" if sizes.small else "paper.yaml")
    config_path = Path(opts.projection_config or default)
    config = fill_defaults(yaml.safe_load(config_path.read_text()))  # jsonschema is not on the GPU machine
    restricted = sizes.small and not opts.projection_config
    if restricted:
        config["experiments"] = SMALL_EXPERIMENTS
    keys = sorted({(c.dataset, c.arch, c.variant) for c in cells(config) if not is_posthoc(config, c.variant)})
    measured: dict[str, Any] = {}
    errors = {}
    for key in keys:
        name = "/".join(key)
        try:
            measured[name] = measure_cell(config, key, device, sizes.projection_steps, 1 if sizes.small else 2)
        except Exception as err:  # noqa: BLE001 - one cell that cannot run (out of memory, say) is reported
            errors[name] = f"{type(err).__name__}: {err}"[:300]
        finally:
            if device.type == "cuda":
                torch.cuda.empty_cache()
        if name in measured:
            print(
                f"    {name}: {1e3 * measured[name]['step_s']:.1f} ms/step at batch {measured[name]['batch']}",
                flush=True,
            )
    figures: dict[str, Any] = {
        "config": str(config_path.relative_to(_bench.ROOT) if config_path.is_relative_to(_bench.ROOT) else config_path),
        "device": str(device),
        "cells": measured,
        "errors": errors,
    }
    if restricted:
        figures["experiments"] = SMALL_EXPERIMENTS
    rates = keep.get("train_rates", {})
    best = max((n for n in rates if n != "reference"), key=rates.get, default=None)
    configured = CONFIGURED_VARIANT[device.type]
    speedup = rates[best] / rates[configured] if best and configured in rates else None
    rows, totals = projection.measured_projection(config, measured, speedup, missing_ok=True)
    print("\n".join(projection.format_measured(rows, totals)), flush=True)
    figures["gpu_hours"] = totals
    expect(
        not errors,
        f"{len(errors)} cell(s) could not be measured (left out of the hours), e.g. {next(iter(errors.items()), '')}",
        figures,
    )
    return figures


# --- main --------------------------------------------------------------------------------------------
def main() -> int:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--device", default="cuda", help="cuda (default) or cpu")
    p.add_argument("--small", action="store_true", help="tiny sizes (the CPU test)")
    p.add_argument("--json", type=Path, help="write the checks here")
    p.add_argument("--reference", help="checkout of kalviny/MSDNet-PyTorch for the reference training step")
    p.add_argument("--only", nargs="+", default=[], help="run only these groups (others are reported skipped)")
    p.add_argument("--skip", nargs="+", default=[], help="skip these groups")
    p.add_argument(
        "--variants",
        nargs="+",
        choices=list(TRAIN_VARIANTS),
        help="training-step variants to time (default: all; the first is the baseline)",
    )
    p.add_argument("--threads", type=int, default=4, help="torch threads in the speed workers on a GPU")
    p.add_argument("--cpu-compile", action="store_true", help="include the torch.compile variants on CPU (slow)")
    p.add_argument("--projection-config", help="config to project (default config/paper.yaml; --small: config.yaml)")
    p.add_argument(
        "--quiet-below",
        type=float,
        default=0.5,
        help="before each speed round wait until other processes use less than this share of the CPUs",
    )
    p.add_argument("--max-wait", type=float, default=5.0, help="longest such wait per round, seconds")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    p.add_argument("--ddp-worker", type=Path, help=argparse.SUPPRESS)
    opts = p.parse_args()
    if opts.worker:
        spec = json.loads(opts.worker)
        (step_worker if spec["kind"] == "step" else reference_worker)(spec)
        return 0
    if opts.ddp_worker:
        ddp_worker(opts.ddp_worker, opts.device, opts.small)
        return 0

    device = torch.device(opts.device)
    sizes = SMALL if opts.small else FULL
    if device.type == "cpu":  # one thread: tiny networks, and bit-equal resumes need a fixed count
        torch.set_num_threads(1)
    header = {
        "what": "benchmarks/gpu_check.py",
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "git_commit": git_commit(),
        "versions": versions(),
        "device": device_name(device) if device.type != "cuda" or torch.cuda.is_available() else "cuda (none)",
        "small": sizes.small,
        "argv": sys.argv[1:],
    }
    report = Report(opts.json, header, set(opts.only), set(opts.skip))
    keep: dict[str, Any] = {}
    scratch = Path(tempfile.mkdtemp(prefix="eebench-gpu-check-"))
    try:
        env = report.run("environment", "environment", lambda: check_environment(device))
        if env["status"] == "fail":
            print(report.table())
            return 1
        for case in training_cases():
            for precision in ("fp32", "bf16"):
                report.run(
                    "train",
                    f"train {case.label} {precision}",
                    lambda: check_training(case, precision, device, sizes, scratch, keep),
                )
        report.run("cache", "cache (run_network)", lambda: check_cache(device, sizes, keep))
        for name in POSTHOC.names():
            report.run("posthoc", f"posthoc {name}", lambda: check_posthoc(name, keep))
        report.run("curve", "budgeted curves", lambda: check_curves(keep))
        report.run("dynamic", "dynamic early exit", lambda: check_dynamic(device, sizes, keep))
        for nproc in (1, 2):
            report.run(
                "ddp",
                f"torchrun {nproc} process{'es' if nproc > 1 else ''}",
                lambda: check_ddp(nproc, device, sizes, scratch),
            )
        report.run("resume", "kill and resume", lambda: check_resume(device, sizes, scratch))
        report.run(
            "speed_train",
            "speed: training step",
            lambda: check_speed_train(device, sizes, opts, scratch, keep, report.selected("sharing")),
        )
        report.run("speed_infer", "speed: inference", lambda: check_speed_infer(device, sizes))
        report.run("flops_share", "speed: share of peak FLOP/s", lambda: check_flops_share(device, sizes, keep))
        report.run(
            "sharing", "speed: processes sharing the device", lambda: check_sharing(device, sizes, opts, scratch, keep)
        )
        report.run("projection", "projection (measured)", lambda: check_projection(device, sizes, opts, keep))
    finally:
        stop_workers(dict(enumerate(keep.get("sharing_workers", []))))
        shutil.rmtree(scratch, ignore_errors=True)
    print()
    print(report.table())
    failed = report.failed()
    print(
        f"\n{len(report.checks)} checks: {len(failed)} failed, "
        f"{sum(c['status'] == 'skipped' for c in report.checks)} skipped; {time.perf_counter() - report.started:.0f} s"
        + (f"; JSON: {opts.json}" if opts.json else "")
    )
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())

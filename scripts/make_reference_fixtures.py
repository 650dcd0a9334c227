#!/usr/bin/env python3
"""Write the checkpoint-conversion test fixtures from the reference repositories' own code.

For each fixture this imports a reference model from the checkout given on the command line,
builds a small configuration of it, gives every parameter and batch-norm statistic a random value,
saves a checkpoint exactly as that repository's training script saves it (DataParallel's
``module.`` prefixes, L2W's DDP ``model.module.state_dict()`` beside its weight network, BoostNet's
``{'state_dict': {'model': ...}}`` of a DDP backbone, the EENets code's whole pickled model, legacy
or zip serialisation as the code of its time wrote), and the reference model's per-exit outputs in
eval mode on a fixed input. Nothing of the reference code is written out; the tests convert the
saved checkpoints and compare with the saved outputs (``tests/test_checkpoints.py``).

    python scripts/make_reference_fixtures.py \\
        --msdnet /path/to/kalviny/MSDNet-PyTorch --l2w /path/to/LeapLabTHU/L2W-DEN \\
        --ranet /path/to/yangle15/RANet-pytorch --eenets /path/to/eksuas/eenets.pytorch \\
        --boostnet /path/to/SHI-Labs/Boosted-Dynamic-Networks [--out tests/fixtures/reference]

Sizes: the reference heads are fixed (128 channels on CIFAR, 1000 classes on ImageNet, 16-64
channels in the EENets ResNets), so a checkpoint is a few hundred KB even for narrow trunks. The
random values are multiples of a power of two with a few significant bits, which makes the files
compress about tenfold; each checkpoint is stored xz-compressed (``NAME.ckpt.xz``, the exact bytes
the reference wrote once decompressed) with ``NAME.expected.pt.xz`` (input, outputs, settings).
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import importlib.util
import io
import json
import lzma
import math
import subprocess
import sys
import tempfile
import types
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "tests" / "fixtures" / "reference"


# --- importing the reference code -------------------------------------------------------------
@contextlib.contextmanager
def on_path(repo: Path, *generic: str):
    """``repo`` first on sys.path; the repositories' generic top-level names (``models``,
    ``utils``) are forgotten before and after, so that one repository's never serves another."""

    def forget() -> None:
        for name in list(sys.modules):
            if name.split(".")[0] in generic:
                del sys.modules[name]

    forget()
    sys.path.insert(0, str(repo))
    try:
        yield
    finally:
        sys.path.remove(str(repo))
        forget()


def load_file(path: Path, name: str) -> types.ModuleType:
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def commit_of(repo: Path) -> str:
    try:
        return subprocess.run(
            ["git", "-C", str(repo), "rev-parse", "HEAD"], capture_output=True, text=True, check=True
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


# --- values, input, saving --------------------------------------------------------------------
def _grid(values: torch.Tensor, step: float) -> torch.Tensor:
    return (values / step).round() * step


def randomise(model: nn.Module, seed: int) -> None:
    """Every parameter and running statistic a random multiple of a power of two: weights of
    scale 1/sqrt(fan-in), batch-norm scales near 1 and variances in [0.5, 1.5], so that eval-mode
    outputs depend on every tensor (a swapped mean and variance, or weight and bias, shows)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, (nn.Conv2d, nn.Linear)):
                # two thirds zeros, the rest +-1 (rarely +-2) times twice a power of two near
                # 1/sqrt(fan-in): about 1.2 bits of information per weight, so xz packs them tightly
                step = 2.0 ** round(math.log2(1.0 / math.sqrt(module.weight[0].numel())))
                module.weight.copy_(_grid(0.5 * torch.randn(module.weight.shape, generator=g), 1.0) * step * 2)
                if module.bias is not None:
                    module.bias.copy_(_grid(torch.randn(module.bias.shape, generator=g) * 0.1, 1 / 64))
            elif isinstance(module, nn.modules.batchnorm._BatchNorm):
                n = module.num_features
                module.weight.copy_(_grid(1 + 0.2 * torch.randn(n, generator=g), 1 / 32))
                module.bias.copy_(_grid(0.1 * torch.randn(n, generator=g), 1 / 64))
                module.running_mean.copy_(_grid(0.1 * torch.randn(n, generator=g), 1 / 64))
                module.running_var.copy_(_grid(0.5 + torch.rand(n, generator=g), 1 / 32))
                module.num_batches_tracked.fill_(7)


def images(n: int, size: int, seed: int) -> torch.Tensor:
    """uint8 images (N, 3, H, W), an integer pattern that differs per image, channel and pixel
    (and compresses, unlike noise); the models read (x / 255 - 0.5) / 0.25."""
    i = torch.arange(size).view(1, 1, size, 1)
    j = torch.arange(size).view(1, 1, 1, size)
    c = torch.arange(3).view(1, 3, 1, 1)
    k = torch.arange(n).view(n, 1, 1, 1) + seed
    return ((i * i * (c + 2) + 5 * j * (k + 1) + 40 * c + (i * j) // (k + 3)) % 256).to(torch.uint8)


def normalised(pixels: torch.Tensor) -> torch.Tensor:
    return (pixels.float() / 255 - 0.5) / 0.25


def write_fixture(name: str, save: Callable[[str], None], expected: dict[str, Any]) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "checkpoint.pth.tar"
        save(str(path))
        raw = path.read_bytes()
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / f"{name}.ckpt.xz").write_bytes(lzma.compress(raw, preset=9 | lzma.PRESET_EXTREME))
    meta = expected.pop("meta")
    buffer = io.BytesIO()
    torch.save({**expected, "meta": json.dumps(meta, sort_keys=True)}, buffer)
    (OUT / f"{name}.expected.pt.xz").write_bytes(lzma.compress(buffer.getvalue(), preset=9))
    size = sum((OUT / f"{name}{suffix}").stat().st_size for suffix in (".ckpt.xz", ".expected.pt.xz"))
    print(f"{name}: checkpoint {len(raw) / 1e3:.0f} KB raw, fixture {size / 1e3:.0f} KB on disk")


def logits_of(outputs: list[torch.Tensor]) -> torch.Tensor:
    return torch.stack([o.detach() for o in outputs])


def empty_sgd(model: nn.Module) -> torch.optim.Optimizer:
    return torch.optim.SGD(model.parameters(), 0.1, momentum=0.9, weight_decay=1e-4)


# --- MSDNet (kalviny/MSDNet-PyTorch, LeapLabTHU/L2W-DEN) -------------------------------------
def msdnet_args(data: str, **ours: Any) -> tuple[types.SimpleNamespace, dict[str, Any]]:
    """The reference's parsed arguments for a configuration given in the harness's names."""
    args = types.SimpleNamespace(
        data=data,
        nBlocks=ours["n_blocks"],
        stepmode=ours["step_mode"],
        step=ours["step"],
        base=ours["base"],
        nChannels=ours["n_channels"],
        growthRate=ours["growth_rate"],
        grFactor=list(ours["gr_factor"]),
        bnFactor=list(ours["bn_factor"]),
        nScales=len(ours["gr_factor"]),
        prune=ours["prune"],
        reduction=ours["reduction"],
        bottleneck=ours["bottleneck"],
    )
    return args, {**ours, "n_scales": len(ours["gr_factor"])}


def msdnet_fixtures(repo: Path) -> None:
    with on_path(repo, "models"):
        ref = load_file(repo / "models" / "msdnet.py", "reference_kalviny_msdnet")
    source = f"kalviny/MSDNet-PyTorch@{commit_of(repo)}"

    def build(args, seed):
        with contextlib.redirect_stdout(io.StringIO()):  # the reference prints its layer plan
            model = ref.MSDNet(args)
        randomise(model, seed)
        return model.eval()

    # CIFAR layout, prune max with a transition in every layer, legacy serialisation (2018's torch)
    args, ours = msdnet_args(
        "cifar10",
        n_blocks=2,
        step_mode="even",
        step=2,
        base=1,
        n_channels=4,
        growth_rate=2,
        gr_factor=[1, 2, 4],
        bn_factor=[1, 2, 4],
        prune="max",
        reduction=0.5,
        bottleneck=True,
    )
    model, pixels = build(args, 1), images(3, 32, 11)
    with torch.no_grad():
        logits = logits_of(model(normalised(pixels)))
    wrapped = nn.DataParallel(model)  # main.py: model = torch.nn.DataParallel(model).cuda()

    def save_cifar(path):
        torch.save(
            {
                "epoch": 299,
                "arch": "msdnet",
                "state_dict": wrapped.state_dict(),
                "best_prec1": 71.5,
                "optimizer": empty_sgd(wrapped).state_dict(),
            },
            path,
            _use_new_zipfile_serialization=False,
        )

    write_fixture(
        "msdnet_cifar",
        save_cifar,
        {
            "pixels": pixels,
            "logits": logits,
            "meta": {
                "format": "msdnet",
                "family": "msdnet",
                "input": [3, 32, 10],
                "params": ours,
                "source": source,
                "saved_as": "main.py save_checkpoint of nn.DataParallel(model), legacy torch.save",
            },
        },
    )

    # ImageNet layout with four scales (the released models' shape), zip serialisation
    args, ours = msdnet_args(
        "ImageNet",
        n_blocks=2,
        step_mode="even",
        step=1,
        base=1,
        n_channels=4,
        growth_rate=4,
        gr_factor=[1, 2, 4, 4],
        bn_factor=[1, 2, 4, 4],
        prune="max",
        reduction=0.5,
        bottleneck=True,
    )
    model, pixels = build(args, 2), images(1, 160, 12)
    with torch.no_grad():
        logits = logits_of(model(normalised(pixels)))
    wrapped = nn.DataParallel(model)

    def save_imagenet(path):
        torch.save(
            {
                "epoch": 89,
                "arch": "msdnet",
                "state_dict": wrapped.state_dict(),
                "best_prec1": 74.2,
                "optimizer": empty_sgd(wrapped).state_dict(),
            },
            path,
        )

    write_fixture(
        "msdnet_imagenet",
        save_imagenet,
        {
            "pixels": pixels,
            "logits": logits,
            "meta": {
                "format": "msdnet",
                "family": "msdnet",
                "input": [3, 160, 1000],
                "params": ours,
                "source": source,
                "saved_as": "main.py save_checkpoint of nn.DataParallel(model)",
            },
        },
    )


def l2w_fixture(repo: Path) -> None:
    with on_path(repo, "models"):
        ref = load_file(repo / "models" / "msdnet.py", "reference_l2w_msdnet")
        weight_net = load_file(repo / "models" / "weight_predict.py", "reference_l2w_weight_predict")
    # ImageNet layout, lin_grow, prune min, no bottleneck
    args, ours = msdnet_args(
        "ImageNet",
        n_blocks=2,
        step_mode="lin_grow",
        step=1,
        base=2,
        n_channels=4,
        growth_rate=4,
        gr_factor=[1, 2, 4],
        bn_factor=[1, 2, 4],
        prune="min",
        reduction=0.5,
        bottleneck=False,
    )
    model = ref.MSDNet(args)
    randomise(model, 3)
    model.eval()
    meta_net = weight_net.MLP_tanh(input_size=2, hidden_size=8, num_layers=1, output_size=2)
    pixels = images(1, 80, 13)
    with torch.no_grad():
        logits = logits_of(model(normalised(pixels)))

    def save(path):
        # tools/main_imagenet_DDP.py saves model.module.state_dict() of its DDP model: no prefix
        torch.save(
            {
                "epoch": 100,
                "arch": "msdnet",
                "state_dict": model.state_dict(),
                "optimizer": empty_sgd(model).state_dict(),
                "best_prec1": 73.9,
                "is_best": True,
                "meta_state_dict": meta_net.state_dict(),
                "meta_optimizer": torch.optim.Adam(meta_net.parameters(), lr=1e-4).state_dict(),
            },
            path,
        )

    write_fixture(
        "l2w_imagenet",
        save,
        {
            "pixels": pixels,
            "logits": logits,
            "meta": {
                "format": "l2w",
                "family": "msdnet",
                "input": [3, 80, 1000],
                "params": ours,
                "source": f"LeapLabTHU/L2W-DEN@{commit_of(repo)}",
                "saved_as": "tools/main_imagenet_DDP.py save_checkpoint with model.module.state_dict()",
            },
        },
    )


# --- RANet (yangle15/RANet-pytorch) -----------------------------------------------------------
def ranet_args(data: str, stepmode_lg: str, **ours: Any) -> types.SimpleNamespace:
    return types.SimpleNamespace(
        data=data,
        dataset=data,
        nBlocks=ours["n_blocks"],
        block_step=ours["block_step"],
        stepmode="even" if ours["step_mode"] == "even" else stepmode_lg,
        step=ours["step"],
        nChannels=ours["n_channels"],
        growthRate=ours["growth_rate"],
        grFactor=list(ours["gr_factor"]),
        bnFactor=list(ours["bn_factor"]),
        scale_list=list(ours["scale_list"]),
        nScales=len(ours["scale_list"]),
        compress_factor=ours["compress_factor"],
        reduction=ours["reduction"],
        bnAfter=True,
    )


def ranet_fixture(repo: Path) -> None:
    with on_path(repo, "models"):
        ref = load_file(repo / "models" / "RANet.py", "reference_ranet")
    # CIFAR layout: the reference's heads pool 2x2, so the lowest resolution must be 8 (three
    # scales on 32x32); its fusion blocks need at least two layers (step >= 2)
    ours = dict(
        n_blocks=1,
        block_step=1,
        step_mode="even",
        step=2,
        n_channels=2,
        growth_rate=4,
        gr_factor=[2, 1, 1],
        bn_factor=[2, 1, 1],
        scale_list=[1, 2, 3],
        compress_factor=0.25,
        reduction=0.5,
    )
    model = ref.RANet(ranet_args("cifar10", "lg", **ours))
    randomise(model, 4)
    model.eval()
    pixels = images(3, 32, 14)
    with torch.no_grad():
        logits = logits_of(model(normalised(pixels)))
    wrapped = nn.DataParallel(model)  # main.py: model = torch.nn.DataParallel(model.cuda())

    def save(path):
        torch.save(
            {
                "epoch": 299,
                "arch": "RANet",
                "state_dict": wrapped.state_dict(),
                "best_prec1": 70.1,
                "optimizer": empty_sgd(wrapped).state_dict(),
            },
            path,
        )

    write_fixture(
        "ranet_cifar",
        save,
        {
            "pixels": pixels,
            "logits": logits,
            "meta": {
                "format": "ranet",
                "family": "ranet",
                "input": [3, 32, 10],
                "params": ours,
                "source": f"yangle15/RANet-pytorch@{commit_of(repo)}",
                "saved_as": "main.py save_checkpoint of nn.DataParallel(model)",
            },
        },
    )


# --- BoostNet (SHI-Labs/Boosted-Dynamic-Networks) ---------------------------------------------
@contextlib.contextmanager
def one_process_group():
    import torch.distributed as dist

    with tempfile.TemporaryDirectory() as tmp:
        dist.init_process_group("gloo", init_method=f"file://{tmp}/rendezvous", rank=0, world_size=1)
        try:
            yield
        finally:
            dist.destroy_process_group()


def boostnet_fixtures(repo: Path) -> None:
    # utils/distributed.py imports torch._utils._take_tensors, which newer torch no longer has; the
    # checkpoint format does not depend on it (a compatibility shim at import time only)
    import torch._utils as torch_utils

    if not hasattr(torch_utils, "_take_tensors"):
        torch_utils._take_tensors = lambda tensors, size: iter([tensors])
    with on_path(repo, "models", "utils"):
        models = importlib.import_module("models")
    source = f"SHI-Labs/Boosted-Dynamic-Networks@{commit_of(repo)}"
    reweight = 0.5

    def ensembles(model, args, x):
        dynamic = (models.dynamic_net_ranet if args.arch == "ranet" else models.dynamic_net)(model, args)
        with torch.no_grad():
            return logits_of(dynamic.forward(x))  # what eval_imagenet.py / eval_cifar100.py score

    def save_run(name, backbone, args, ours, pixels, family, input_spec, saved_as):
        with torch.no_grad():
            raw = logits_of(backbone(normalised(pixels)))
        boosted = ensembles(backbone, args, normalised(pixels))
        # train_imagenet.py wraps the backbone in DDP inside DynamicNet (after converting it to
        # SyncBatchNorm, whose state-dict names are BatchNorm's; DDP takes that only on a GPU)
        with one_process_group():
            ddp = nn.parallel.DistributedDataParallel(backbone)
            dynamic = (models.dynamic_net_ranet if args.arch == "ranet" else models.dynamic_net)(ddp, args)
            optimizer = torch.optim.SGD(ddp.parameters(), 0.1, momentum=0.9)
            scheduler = torch.optim.lr_scheduler.MultiStepLR(optimizer, [30, 60], gamma=0.1)

            def save(path):
                torch.save(
                    {
                        "epoch": 89,
                        "state_dict": dynamic.state_dict(),
                        "optimizer": optimizer.state_dict(),
                        "scheduler": scheduler.state_dict(),
                    },
                    path,
                )

            write_fixture(
                name,
                save,
                {
                    "pixels": pixels,
                    "logits": raw,
                    "ensemble_logits": boosted,
                    "meta": {
                        "format": "boostnet",
                        "family": family,
                        "input": input_spec,
                        "params": ours,
                        "source": source,
                        "ensemble_reweight": reweight,
                        "saved_as": saved_as,
                    },
                },
            )

    n_blocks = 2
    args, ours = msdnet_args(
        "imagenet",
        n_blocks=n_blocks,
        step_mode="even",
        step=1,
        base=1,
        n_channels=4,
        growth_rate=4,
        gr_factor=[1, 2, 4],
        bn_factor=[1, 2, 4],
        prune="max",
        reduction=0.5,
        bottleneck=True,
    )
    args.dataset, args.arch, args.ensemble_reweight = "imagenet", "msdnet_ge", [reweight] * n_blocks
    backbone = models.msdnet_ge(args)
    randomise(backbone, 5)
    save_run(
        "boostnet_msdnet_imagenet",
        backbone.eval(),
        args,
        ours,
        images(1, 80, 15),
        "msdnet",
        [3, 80, 1000],
        "train_imagenet.py: {'state_dict': DynamicNet.state_dict()} of a DDP msdnet_ge",
    )

    ours = dict(
        n_blocks=1,
        block_step=1,
        step_mode="lg",
        step=2,
        n_channels=4,
        growth_rate=4,
        gr_factor=[2, 1],
        bn_factor=[2, 1],
        scale_list=[1, 2],
        compress_factor=0.25,
        reduction=0.5,
    )
    args = ranet_args("imagenet", "lin_grow", **ours)
    args.arch = "ranet"
    args.ensemble_reweight = [reweight] * (ours["n_blocks"] * len(ours["scale_list"]))
    backbone = models.ranet(args)
    randomise(backbone, 6)
    save_run(
        "boostnet_ranet_imagenet",
        backbone.eval(),
        args,
        ours,
        images(1, 64, 16),
        "ranet",
        [3, 64, 1000],
        "train_imagenet.py: {'state_dict': DynamicNet.state_dict()} of a DDP ranet",
    )


# --- EENets (eksuas/eenets.pytorch) -----------------------------------------------------------
def eenets_fixture(repo: Path) -> None:
    # ``bnpool``'s BatchNorm lives in a plain list: untrained, normalising by each batch also in eval
    # mode, which the harness's ``bnpool_batchstats`` reproduces
    for exit_type, name, exit_pool in (
        ("pool", "eenets_cifar", "pool"),
        ("bnpool", "eenets_cifar_bnpool", "bnpool_batchstats"),
    ):
        eenets_model_fixture(repo, exit_type, name, exit_pool)


def eenets_model_fixture(repo: Path, exit_type: str, name: str, exit_pool: str) -> None:
    # imported as the EENets scripts import it (``from eenet import EENet``), so that the pickle
    # names the classes as a model saved by its main.py does
    with on_path(repo, "eenet", "resnet", "flops_counter"):
        eenet = importlib.import_module("eenet")
        with contextlib.redirect_stdout(io.StringIO()):
            model = eenet.EENet(
                True,
                eenet.BasicBlock,
                8,
                num_ee=2,
                distribution="fine",
                num_classes=10,
                input_shape=(3, 32, 32),
                exit_type=exit_type,
                loss_func="v2",
            )
        randomise(model, 7)
        model.eval()
        pixels = images(3, 32, 17)
        classifier_inputs: list[torch.Tensor] = []
        linears = [e.classifier[0] for e in model.exits] + [model.classifier[0]]
        hooks = [m.register_forward_hook(lambda mod, inp, out: classifier_inputs.append(out)) for m in linears]
        model.training = True  # the network's own forward returns every exit only in training mode;
        with torch.no_grad():  # its modules (batch norm) stay in eval mode
            probabilities, confidences, cost = model(normalised(pixels))
        model.training = False
        for hook in hooks:
            hook.remove()
        model.set_multiple_gpus()  # init.py with --multi-gpu: stages and exits in nn.DataParallel

        def save(path):  # utils.save_model: torch.save(model, ...), with the torch of 2019
            torch.save(model, path, _use_new_zipfile_serialization=False)

        write_fixture(
            name,
            save,
            {
                "pixels": pixels,
                "logits": logits_of(classifier_inputs),
                "probabilities": logits_of(probabilities),
                "confidences": logits_of([c.squeeze(1) for c in confidences]),
                "meta": {
                    "format": "eenets",
                    "family": "ee_resnet",
                    "input": [3, 32, 10],
                    "params": {"depth": 8, "num_exits": 2, "distribution": "fine", "exit_pool": exit_pool},
                    "cost": list(cost),
                    "source": f"eksuas/eenets.pytorch@{commit_of(repo)}",
                    "saved_as": "utils.save_model: torch.save(model) after set_multiple_gpus(), legacy format",
                },
            },
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    for name in ("msdnet", "l2w", "ranet", "eenets", "boostnet"):
        parser.add_argument(f"--{name}", type=Path, help=f"checkout of the {name} reference repository")
    parser.add_argument("--out", type=Path, default=None, help=f"default: {OUT.relative_to(ROOT)}")
    args = parser.parse_args()
    if args.out is not None:
        globals()["OUT"] = args.out
    torch.set_num_threads(1)
    makers = {
        "msdnet": msdnet_fixtures,
        "l2w": l2w_fixture,
        "ranet": ranet_fixture,
        "eenets": eenets_fixture,
        "boostnet": boostnet_fixtures,
    }
    given = {name: getattr(args, name) for name in makers if getattr(args, name) is not None}
    if not given:
        parser.error("give at least one reference checkout (--msdnet, --l2w, --ranet, --eenets, --boostnet)")
    for name, repo in given.items():
        if not repo.is_dir():
            parser.error(f"--{name} {repo}: not a directory")
        makers[name](repo.resolve())


if __name__ == "__main__":
    main()

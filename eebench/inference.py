"""Inference: the device, the network prepared for it, and every exit's outputs on a set of
images (the cache the evaluation reads; the training loop's per-epoch val pass)."""

from __future__ import annotations

import ctypes
from collections.abc import Callable, Iterator
from typing import Any

import torch

from models import MultiExitNetwork
from models.base import fold_batchnorm

from . import imagefolder
from .augment import normalize
from .imagefolder import FolderImages


def pick_device(name: str = "auto") -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def keep_freed_memory() -> None:
    """Stop glibc returning large freed buffers to the OS (M_MMAP_MAX=0, no trimming).

    Without it, every large activation of a big inference batch is mmapped, freed with munmap and
    page-faulted in again on the next batch; on CPU this can halve throughput.
    """
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(-4, 0)  # M_MMAP_MAX
        libc.mallopt(-1, -1)  # M_TRIM_THRESHOLD
    except (OSError, AttributeError):
        pass


def prepare_for_inference(network: MultiExitNetwork, device: torch.device) -> None:
    """Eval mode on ``device``, BatchNorm folded into the convolutions (1.2x) and channels_last on
    CPU too (1.2-1.3x; unlike training, where BatchNorm and cat slow down in it):
    benchmarks/infer_throughput.py."""
    network.to(device)
    network.eval()
    fold_batchnorm(network)
    network.to(memory_format=torch.channels_last)


def eval_batches(images: torch.Tensor | FolderImages, batch_size: int, device: torch.device) -> Iterator[torch.Tensor]:
    if isinstance(images, FolderImages):
        yield from imagefolder.eval_batches(images, batch_size, device)
        return
    for start in range(0, len(images), batch_size):
        yield images[start : start + batch_size].to(device, non_blocking=True)


@torch.inference_mode()
def run_network(
    model: MultiExitNetwork,
    images: torch.Tensor | FolderImages,
    mean: tuple[float, ...],
    std: tuple[float, ...],
    batch_size: int,
    device: torch.device,
    channels_last: bool = False,
    with_features: bool = True,
    transform: Callable | None = None,
) -> dict[str, Any]:
    """All exits on uint8 images (or image files): logits (K, N, C), features, gates (K, N) (if the
    outputs have them: EENets' confidence branches, JEI-DNN's gates)."""
    model.eval()
    mean_t = torch.tensor(mean, device=device)
    std_t = torch.tensor(std, device=device)
    logits, features, gates = [], [], []
    for batch in eval_batches(images, batch_size, device):
        x = normalize(batch, mean_t, std_t)
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        out = model.forward_all(x)
        if transform is not None:
            out = transform(out)
        logits.append(torch.stack([t.float() for t in out.logits]).cpu())
        if with_features:
            features.append([f.float().flatten(1).cpu() for f in out.features])
        if out.gates is not None:
            gates.append(torch.stack([g.float().reshape(-1) for g in out.gates]).cpu())
    result: dict[str, Any] = {"logits": torch.cat(logits, dim=1)}
    if with_features and features and features[0]:
        result["features"] = [torch.cat(parts) for parts in zip(*features)]
    if gates:
        result["gates"] = torch.cat(gates, dim=1)
    return result

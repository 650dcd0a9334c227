"""Batch augmentation on the training device, bit-equal to the per-image torchvision pipeline.

``RandomCrop(size, padding=p)`` (zero fill) + ``RandomHorizontalFlip`` + ``ToTensor`` + ``Normalize``
done for a whole uint8 batch with index arithmetic (airbench's approach): no PIL, no DataLoader,
no copy to the host. The random draws for a whole epoch are made up front from a generator seeded
by (seed, epoch), so a run resumed mid-epoch sees exactly the batches it would have seen.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass
class EpochPlan:
    order: torch.Tensor  # (N,) sample order
    offsets: torch.Tensor  # (N, 2) crop offsets (dy, dx) in the padded image, 0..2p
    flips: torch.Tensor  # (N,) bool


def epoch_seed(seed: int, epoch: int) -> int:
    """The seed of one epoch's random draws (order, crops, flips) in a run seeded by ``seed``."""
    return seed * 100_003 + epoch


def epoch_plan(n: int, padding: int, seed: int, epoch: int) -> EpochPlan:
    g = torch.Generator().manual_seed(epoch_seed(seed, epoch))
    order = torch.randperm(n, generator=g)
    offsets = torch.randint(0, 2 * padding + 1, (n, 2), generator=g)
    flips = torch.rand(n, generator=g) < 0.5
    return EpochPlan(order, offsets, flips)


def crop_flip(images: torch.Tensor, offsets: torch.Tensor, flips: torch.Tensor, padding: int) -> torch.Tensor:
    """Zero-pad by ``padding``, crop back to the input size at ``offsets``, flip where ``flips``."""
    if padding == 0:
        out = images
    else:
        n, c, h, w = images.shape
        padded = F.pad(images, (padding, padding, padding, padding))
        rows = offsets[:, 0, None] + torch.arange(h, device=images.device)  # (N, H)
        cols = offsets[:, 1, None] + torch.arange(w, device=images.device)  # (N, W)
        batch = torch.arange(n, device=images.device)[:, None, None, None]
        chan = torch.arange(c, device=images.device)[None, :, None, None]
        out = padded[batch, chan, rows[:, None, :, None], cols[:, None, None, :]]
    return torch.where(flips[:, None, None, None], out.flip(3), out)


def normalize(images: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """uint8 (N, C, H, W) to normalised float, with ToTensor's and Normalize's exact arithmetic."""
    x = images.float().div(255)
    return x.sub_(mean[None, :, None, None]).div_(std[None, :, None, None])

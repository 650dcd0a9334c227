"""Pieces several training methods share (no method is registered here)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn
from torch.nn import functional as F

from models import ExitOutputs


def sum_of_exit_losses(outputs: ExitOutputs, targets: torch.Tensor) -> torch.Tensor:
    """Unweighted sum over exits of the mean cross-entropy (MSDNet's loss)."""
    return sum(F.cross_entropy(logits, targets) for logits in outputs.logits)


def per_exit_ce(logits: Sequence[torch.Tensor], targets: torch.Tensor) -> torch.Tensor:
    """(N, K) per-sample cross-entropies, in float32."""
    return torch.stack([F.cross_entropy(out.float(), targets, reduction="none") for out in logits], dim=1)


def frozen_batchnorms(model: nn.Module) -> list[nn.Module]:
    """BatchNorm layers none of whose parameters is trained: run in eval mode while training so
    that their running statistics, part of the frozen network, do not change either."""
    return [
        m
        for m in model.modules()
        if isinstance(m, nn.modules.batchnorm._BatchNorm)
        and not any(p.requires_grad for p in m.parameters(recurse=False))
    ]

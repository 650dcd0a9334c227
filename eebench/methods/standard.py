"""Standard multi-exit training: the unweighted sum of every exit's cross-entropy (MSDNet)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from models import ExitOutputs

from . import register_method
from .base import TrainingMethod
from .common import sum_of_exit_losses


@register_method
class Standard(TrainingMethod):
    name = "standard"

    @dataclass
    class Params:
        pass

    def loss(self, outputs: ExitOutputs, targets: torch.Tensor, step: int = 0) -> torch.Tensor:
        return sum_of_exit_losses(outputs, targets)

"""Shared fixtures: a toy multi-exit network that follows the models contract."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
torch.set_num_threads(min(2, os.cpu_count() or 1))

from models import ExitOutputs, MultiExitNetwork  # noqa: E402


class ToyMultiExit(MultiExitNetwork):
    """A stack of linear blocks with one linear head per block; features = block output.
    It implements ``forward_all`` only (no segments), like a family that cannot run exit by exit."""

    segmented = False

    def __init__(self, in_dim: int = 12, width: int = 8, num_exits: int = 3, num_classes: int = 4):
        super().__init__()
        self.num_exits = num_exits
        dims = [in_dim] + [width] * num_exits
        self.blocks = nn.ModuleList(nn.Sequential(nn.Linear(dims[i], dims[i + 1]), nn.ReLU()) for i in range(num_exits))
        self.heads = nn.ModuleList(nn.Linear(width, num_classes) for _ in range(num_exits))

    def forward_all(self, x: torch.Tensor, upto: int | None = None) -> ExitOutputs:
        upto = self._check_upto(upto)
        h = x.flatten(1)
        logits, feats = [], []
        for block, head in list(zip(self.blocks, self.heads))[:upto]:
            h = block(h)
            feats.append(h)
            logits.append(head(h))
        return ExitOutputs(logits, feats)


@pytest.fixture
def toy_network() -> ToyMultiExit:
    torch.manual_seed(0)
    return ToyMultiExit()


@pytest.fixture
def toy_batch() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return torch.randn(16, 12, generator=g), torch.randint(0, 4, (16,), generator=g)

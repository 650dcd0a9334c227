"""The contract every variant is evaluated through: per-exit exit scores and predictions, from a
training method's cache (``eebench.cache.scored_outputs``) or a post-hoc method's ``score``."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class ScoredOutputs:
    """Per-exit scores and predictions.

    ``scores`` is (K, N), or (B, K, N) when the method fits one scorer per budget; then
    ``exit_distributions`` (B, K) gives the share of samples meant to leave at each exit for
    each budget, replacing the geometric budgets of the MSDNet protocol.
    """

    scores: torch.Tensor
    predictions: torch.Tensor
    probabilities: torch.Tensor | None = None  # (K, N, C) if the method produces them
    exit_distributions: torch.Tensor | None = None
    budget_targets: torch.Tensor | None = None  # (B,) FLOPs each budget was fitted for

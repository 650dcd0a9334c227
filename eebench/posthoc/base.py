"""The interface a post-hoc method implements.

A post-hoc method never runs the network: it reads inference caches (``eebench.cache``), dicts
with ``logits`` (K, N, C), ``labels`` (N,), ``features`` (list of K tensors (N, d_k)) and, where
the outputs have them, ``gates`` (K, N): a learned per-exit exit probability in [0, 1] (EENets'
confidence branches, JEI-DNN's gates).

``fit`` sees the val cache (and the training-split cache when ``needs_train_split``); it must not
look at test labels. ``score`` maps any cache to ``ScoredOutputs``: per-exit exit scores and
predictions that the one calibration protocol (``eebench.calibration``) consumes.
``state_dict`` is saved beside the scores (``fitted``); ``load_state_dict`` restores it.

Dynamic early exit (``eebench.dynamic``) scores exit by exit, on the samples still in: a method
that supports it implements ``score_exit``, which must give at exit k what ``score`` gives there,
from exits 1..k alone. A method without it is measured with the simulated protocol instead.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch

from models import ExitHead

from ..scored import ScoredOutputs


class PosthocMethod:
    name: ClassVar[str]
    Params: ClassVar[type]
    test_params: ClassVar[dict[str, Any]] = {}
    needs_train_split: ClassVar[bool] = False

    def __init__(self, params: Any, flops: list[float], seed: int = 0):
        self.params = params
        self.flops = torch.as_tensor(flops, dtype=torch.float64)
        self.seed = seed

    def fit(self, val: dict[str, Any], train: dict[str, Any] | None = None) -> None:
        raise NotImplementedError

    def score(self, cache: dict[str, Any]) -> ScoredOutputs:
        raise NotImplementedError

    def state_dict(self) -> dict[str, Any]:
        """Fitted state (tensors and plain values only), saved beside the scored caches."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what ``state_dict`` returned, so that ``score`` works without ``fit``."""
        raise NotImplementedError(f"post-hoc method {self.name!r} cannot reload its fitted state")

    def score_exit(self, k: int, head: ExitHead, carry: Any, budget: int) -> tuple[torch.Tensor, torch.Tensor, Any]:
        """Exit score (n,) and prediction (n,) at exit k (0-based) of n samples, from exit k's
        head output and ``carry``, what this method returned at exit k-1 for the same samples
        (None at exit 0): nested lists/tuples/dicts of per-sample tensors (first dimension n),
        which the caller subsets with the samples. ``budget`` is the row of the budgeted curve
        (0-based), for methods with one scorer per budget; others ignore it. Returns
        (scores, predictions, carry)."""
        raise NotImplementedError(f"post-hoc method {self.name!r} has no exit-by-exit scoring")

    @classmethod
    def scores_exit_by_exit(cls) -> bool:
        """Whether ``score_exit`` is implemented (dynamic early exit is possible)."""
        return cls.score_exit is not PosthocMethod.score_exit

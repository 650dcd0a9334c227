"""Inference caches: what a trained network produced on one split, read by every later step.

A cache is a dict saved with ``torch.save`` (or an ``.npz`` with the same array keys):
``logits`` (K, N, C) float32, ``labels`` (N,) int64, optionally ``features`` (a list of K (N, d_k)
tensors: each exit head's penultimate features), ``gates`` (K, N: a learned per-exit exit
probability in [0, 1], EENets' confidence branches or JEI-DNN's gates) and ``meta`` (a dict:
what produced it, with its hash). ``scored_outputs`` turns a cache into per-exit exit scores and
predictions; post-hoc methods produce the same thing from their own scoring.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from .io import CorruptFileError, load_tensors
from .scored import ScoredOutputs

# the layout of a cache; a cache of another format is stale (2: the learned gates under "gates")
CACHE_FORMAT = 2


def load_cache(path: str | Path, expect_meta: dict[str, Any] | None = None) -> dict[str, Any]:
    """Load and check a cache; ``expect_meta`` entries must match the cache's ``meta``."""
    cache = load_tensors(path, what="inference cache")
    for key in ("logits", "labels"):
        if key not in cache:
            raise CorruptFileError(f"{path}: inference cache has no {key!r} entry (keys: {sorted(cache)})")
    logits, labels = cache["logits"], cache["labels"]
    if logits.dim() != 3:
        raise CorruptFileError(f"{path}: 'logits' must be (exits, samples, classes), got shape {tuple(logits.shape)}")
    if labels.dim() != 1 or labels.shape[0] != logits.shape[1]:
        raise CorruptFileError(
            f"{path}: 'labels' must be ({logits.shape[1]},) to match 'logits', got {tuple(labels.shape)}"
        )
    cache["labels"] = labels.long()
    cache["logits"] = logits.float()
    if "gates" in cache and cache["gates"].shape != logits.shape[:2]:
        raise CorruptFileError(f"{path}: 'gates' must be {tuple(logits.shape[:2])}")
    check_meta(path, cache, expect_meta)
    return cache


def check_meta(path: str | Path, record: dict[str, Any], expect_meta: dict[str, Any] | None) -> None:
    """Raise StaleCacheError when ``record['meta']`` differs from ``expect_meta``."""
    meta = record.get("meta")
    if expect_meta and not isinstance(meta, dict):
        raise StaleCacheError(
            f"{path}: stale cache: it has no record of what produced it (no 'meta' entry); "
            "delete it and rerun the workflow to rebuild it"
        )
    for key, want in (expect_meta or {}).items():
        have = meta.get(key)
        if have != want:
            raise StaleCacheError(
                f"{path}: stale cache: its {key} is {have!r}, this configuration expects {want!r} (it was "
                "made from other weights, another split, another config or an older cache format); delete "
                "it and rerun the workflow to rebuild it"
            )


class StaleCacheError(CorruptFileError):
    """A cache made by something other than what is asked for (another checkpoint or split)."""


EXIT_SCORES = ("max_softmax", "gate")  # what ``scored_outputs`` can score a cache by


def scored_outputs(cache: dict[str, Any], exit_score: str = "max_softmax") -> ScoredOutputs:
    """Per-exit scores and predictions of a plain cache.

    ``max_softmax`` (MSDNet's confidence) or ``gate`` (a learned per-exit exit probability
    stored in the cache's ``gates``).
    """
    probs = cache["logits"].float().softmax(dim=-1)
    top, predictions = probs.max(dim=-1)
    if exit_score == "max_softmax":
        scores = top
    elif exit_score == "gate":
        if "gates" not in cache:
            raise ValueError("exit_score 'gate' needs a cache with 'gates'")
        scores = cache["gates"].float()
    else:
        raise ValueError(f"unknown exit score {exit_score!r}; allowed: {', '.join(EXIT_SCORES)}")
    return ScoredOutputs(scores=scores, predictions=predictions, probabilities=probs)


def correctness(scored: ScoredOutputs, labels: torch.Tensor) -> torch.Tensor:
    """(K, N) bool: is each exit's prediction right."""
    return scored.predictions == labels[None, :]

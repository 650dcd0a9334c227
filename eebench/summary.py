"""Seed-level summaries with two-level bootstrap intervals, from the cells' per-sample records.

``load_variants`` groups the records of the cells by (dataset, architecture, variant) into
``VariantReplicates``; ``summary_tables`` gives one row per exit (anytime) or budget (budgeted)
of each variant: the seed mean, the standard deviation over seeds and the percentile interval.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import Any

import numpy as np
import pandas as pd
import torch

from . import io
from .bootstrap import ANYTIME_STATS, BootstrapSettings, VariantReplicates, check_samples, interval

VariantKey = tuple[str, str, str]  # dataset, architecture, variant
IDENTITY = ["dataset", "architecture", "variant"]


def load_variants(
    cells: Iterable[Any],
    paths: Iterable[str],
    settings: BootstrapSettings,
    per_exit_costs: Callable[[Any], Sequence[float]] | None = None,
) -> dict[VariantKey, VariantReplicates]:
    """``cells`` (objects with dataset, arch, variant, seed) and their ``samples.pt`` paths, in order.
    ``per_exit_costs(cell)`` replaces the records' per-exit FLOPs by other per-exit costs (measured ms:
    the budgets' costs and their intervals are then in that unit)."""
    records: dict[VariantKey, dict[int, dict[str, Any]]] = {}
    for cell, path in zip(cells, paths):
        record = io.load_tensors(path, what="per-sample record")
        try:
            check_samples(record, str(path))
        except ValueError as err:
            raise io.CorruptFileError(f"{err}; delete it to have it rebuilt") from None
        if per_exit_costs is not None:
            record["flops"] = torch.as_tensor(per_exit_costs(cell), dtype=torch.float64)
        records.setdefault((cell.dataset, cell.arch, cell.variant), {})[cell.seed] = record
    variants = {}
    for key, by_seed in records.items():
        try:
            variants[key] = VariantReplicates.build(by_seed, settings)
        except ValueError as err:
            raise io.CorruptFileError(f"{'/'.join(key)}: {err}") from None
    return variants


def _identity(frame: pd.DataFrame, key: VariantKey, extra: list[str]) -> dict[str, Any]:
    rows = frame[(frame["dataset"] == key[0]) & (frame["architecture"] == key[1]) & (frame["variant"] == key[2])]
    first = rows.iloc[0] if not rows.empty else {}
    return {column: first[column] if column in rows else None for column in extra}


def _stat_columns(variant: VariantReplicates, key: str, name: str) -> dict[str, np.ndarray]:
    point, reps = variant.mean(key)
    low, high = interval(reps, variant.level)
    std = variant.points[key].std(axis=0, ddof=1) if len(variant.seeds) > 1 else np.zeros_like(point)
    return {name: point, f"{name}_std": std, f"{name}_ci_low": low, f"{name}_ci_high": high}


def _common(variant: VariantReplicates) -> dict[str, Any]:
    return {
        "seeds": len(variant.seeds),
        "n_test": variant.n_test,
        "interval": variant.interval_kind,
        "resamples": variant.resamples,
        "level": variant.level,
    }


def summary_tables(
    variants: dict[VariantKey, VariantReplicates], anytime: pd.DataFrame, budgeted: pd.DataFrame
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Per variant: anytime rows per exit, budgeted rows per budget index. ``anytime`` and
    ``budgeted`` are the per-cell aggregates, for the identity columns (method, kind, FLOPs convention)."""
    extra = ["method", "kind", "flops_convention"]
    any_frames, bud_frames = [], []
    for key, variant in variants.items():
        ident = dict(zip(IDENTITY, key))
        k = len(variant.flops_per_exit)
        frame = pd.DataFrame(
            {
                **ident,
                **_identity(anytime, key, extra),
                "exit": np.arange(1, k + 1),
                "flops": variant.flops_per_exit,
                **_common(variant),
            }
        )
        for stat in ANYTIME_STATS:
            for column, values in _stat_columns(variant, f"anytime_{stat}", stat).items():
                frame[column] = values
        any_frames.append(frame)
        b = variant.points["budgeted_accuracy"].shape[1]
        frame = pd.DataFrame(
            {**ident, **_identity(budgeted, key, extra), "budget_id": np.arange(1, b + 1), **_common(variant)}
        )
        for stat in ("flops", "accuracy"):
            for column, values in _stat_columns(variant, f"budgeted_{stat}", stat).items():
                frame[column] = values
        bud_frames.append(frame)
    return (
        pd.concat(any_frames, ignore_index=True) if any_frames else pd.DataFrame(),
        pd.concat(bud_frames, ignore_index=True) if bud_frames else pd.DataFrame(),
    )

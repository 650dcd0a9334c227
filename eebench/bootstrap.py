"""Bootstrap intervals of every curve point, from the per-sample record of a cell (``samples.pt``).

A cell's per-sample record (written by the evaluate job, read by aggregation, Table 1, the
comparisons and the reproduction report) is a dict of tensors:

* ``correct`` (K, N) bool: is exit k's prediction of test sample n right;
* ``exits`` (B, N) uint8/int16: the exit (0-based) test sample n leaves at under budget b, with
  the thresholds calibrated on val (they stay fixed: they do not depend on the test set);
* ``flops`` (K,) float64: cumulative FLOPs of each exit;
* ``log_loss``, ``top5``, ``confidence`` (K, N), when the cell has class probabilities:
  -log p(label), is the label among the 5 most probable classes, the largest probability.

Resamples are count weights W (R, N): row r counts how often each test sample is drawn in
resample r. Row r depends only on (``seed``, N, r), so every cell with the same test set gets the
same resamples, and a difference between two cells computed resample by resample is a paired
bootstrap. Any statistic that is a mean over test samples is then one matrix product,
W @ x / N; integer-valued ones (correct counts) are exact in float32, the others use float64.

Across seeds (``VariantReplicates``), each resample also draws S seeds with replacement (from a
generator seeded by (``seed``, N, S), so two variants with as many seeds draw the same seed
ranks) and averages their statistics on the *same* test resample: the test set is one sample
of the population, shared by every seed; the seeds are the training noise.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from .metrics import label_probabilities, log_loss

TEST_STREAM = 0x7E57  # tags that keep the test-sample and seed draws on different streams
SEED_STREAM = 0x5EED
BLOCK = 128  # resamples per matrix product (bounds memory: BLOCK x N weights at a time)
ECE_BINS = 15  # equal-width bins of the reported ECE, the last one closed at 1.0
ANYTIME_STATS = ("accuracy", "top5", "nll", "ece")
BUDGETED_STATS = ("accuracy", "flops")


@dataclass(frozen=True)
class BootstrapSettings:
    resamples: int = 1000
    seed: int = 0
    level: float = 0.95

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> BootstrapSettings:
        return cls(**config["bootstrap"])


# --- resamples ---------------------------------------------------------------------------------
def resample_indices(n: int, r: int, seed: int) -> np.ndarray:
    """The N test indices drawn (with replacement) in resample ``r``."""
    return np.random.default_rng([TEST_STREAM, seed, n, r]).integers(0, n, n)


def resample_counts(n: int, rows: range, seed: int) -> torch.Tensor:
    """(len(rows), N) float32 count weights: how often each test sample is drawn in each resample."""
    out = torch.empty(len(rows), n, dtype=torch.float32)
    for i, r in enumerate(rows):
        out[i] = torch.from_numpy(np.bincount(resample_indices(n, r, seed), minlength=n))
    return out


def seed_draws(n_test: int, n_seeds: int, resamples: int, seed: int) -> np.ndarray:
    """(R, S) seed ranks drawn with replacement in each resample (all zero for one seed)."""
    if n_seeds == 1:
        return np.zeros((resamples, 1), dtype=np.int64)
    return np.random.default_rng([SEED_STREAM, seed, n_test, n_seeds]).integers(0, n_seeds, (resamples, n_seeds))


def _blocks(resamples: int) -> Iterator[range]:
    for start in range(0, resamples, BLOCK):
        yield range(start, min(resamples, start + BLOCK))


# --- intervals, p-values, interpolation ----------------------------------------------------------
def interval(replicates: np.ndarray, level: float) -> tuple[np.ndarray, np.ndarray]:
    """Percentile interval over the first axis: order statistics (``inverted_cdf``, so +inf stays
    +inf); nan where any replicate is nan."""
    replicates = np.asarray(replicates, dtype=np.float64)
    alpha = (1 - level) / 2
    bad = np.isnan(replicates).any(axis=0)
    low, high = np.quantile(
        np.where(np.isnan(replicates), 0.0, replicates), [alpha, 1 - alpha], axis=0, method="inverted_cdf"
    )
    return np.where(bad, np.nan, low), np.where(bad, np.nan, high)


def p_value(differences: np.ndarray) -> np.ndarray:
    """Two-sided bootstrap p-value of "the difference is 0", over the first axis:
    min(1, 2 min(1 + #{d <= 0}, 1 + #{d >= 0}) / (R + 1)), the smallest 1 - level at which the
    percentile interval would exclude 0 (with the +1 that keeps it above 0); nan where any d is."""
    d = np.asarray(differences, dtype=np.float64)
    r = d.shape[0]
    below = (d <= 0).sum(axis=0) + 1
    above = (d >= 0).sum(axis=0) + 1
    p = np.minimum(1.0, 2 * np.minimum(below, above) / (r + 1))
    return np.where(np.isnan(d).any(axis=0), np.nan, p)


def holm(p_values: np.ndarray) -> np.ndarray:
    """Holm-Bonferroni adjusted p-values (nan entries are left out and stay nan)."""
    p = np.asarray(p_values, dtype=np.float64)
    out = np.full_like(p, np.nan)
    finite = np.flatnonzero(~np.isnan(p))
    order = finite[np.argsort(p[finite], kind="stable")]
    m = len(order)
    adjusted = np.minimum(1.0, np.maximum.accumulate(p[order] * (m - np.arange(m))))
    out[order] = adjusted
    return out


def interpolate_rows(x: np.ndarray, y: np.ndarray, at: np.ndarray) -> np.ndarray:
    """Row by row, ``eebench.calibration.accuracy_at_budget``: y at each of ``at`` by linear
    interpolation of the points (x, y) sorted by x, y averaged over equal x; nan outside
    [min x, max x]. ``x``, ``y``: (..., P); ``at``: (M,); returns (..., M)."""
    x, y = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    at = np.asarray(at, dtype=np.float64)
    lead, points = x.shape[:-1], x.shape[-1]
    x, y = x.reshape(-1, points), y.reshape(-1, points)
    rows = np.arange(len(x))[:, None]
    order = np.argsort(x, axis=1, kind="stable")
    xs, ys = np.take_along_axis(x, order, 1), np.take_along_axis(y, order, 1)
    starts = np.ones_like(xs, dtype=bool)
    starts[:, 1:] = xs[:, 1:] != xs[:, :-1]
    group = np.cumsum(starts, axis=1) - 1  # index of each point's group of equal x
    flat = (group + rows * points).ravel()
    size = len(x) * points
    counts = np.bincount(flat, minlength=size).reshape(-1, points)
    mean_y = np.bincount(flat, weights=ys.ravel(), minlength=size).reshape(-1, points) / np.maximum(counts, 1)
    gx = np.full_like(xs, np.inf)
    gx[rows, group] = xs
    n_groups = group[:, -1] + 1
    j = (gx[:, :, None] <= at[None, None, :]).sum(axis=1)  # groups at or below each budget, (rows, M)
    lo = np.clip(j - 1, 0, points - 1)
    hi = np.minimum(lo + 1, n_groups[:, None] - 1)
    x0, x1, y0, y1 = gx[rows, lo], gx[rows, hi], mean_y[rows, lo], mean_y[rows, hi]
    with np.errstate(invalid="ignore", divide="ignore"):
        slope = np.where(hi > lo, (y1 - y0) / (x1 - x0), 0.0)
        value = np.where(x0 == at, y0, slope * (at - x0) + y0)  # np.interp's formula
    inside = (at >= gx[:, :1]) & (at <= gx[rows[:, 0], n_groups - 1][:, None])
    return np.where(inside, value, np.nan).reshape(*lead, len(at))


# --- one cell ----------------------------------------------------------------------------------
def check_samples(samples: dict[str, Any], where: str) -> None:
    for key in ("correct", "exits", "flops"):
        if key not in samples:
            raise ValueError(f"{where}: per-sample record has no {key!r} entry (keys: {sorted(samples)})")
    k, n = samples["correct"].shape
    if samples["exits"].dim() != 2 or samples["exits"].shape[1] != n or samples["flops"].shape != (k,):
        raise ValueError(
            f"{where}: per-sample record has 'correct' {tuple(samples['correct'].shape)}, 'exits' "
            f"{tuple(samples['exits'].shape)} and 'flops' {tuple(samples['flops'].shape)}; expected "
            "(K, N), (B, N) and (K,)"
        )


def cell_statistics(
    samples: dict[str, Any], settings: BootstrapSettings, ece_bins: int = ECE_BINS
) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """Point values and bootstrap replicates of one cell's curves.

    Keys ``anytime_<stat>`` (K,) / (R, K) for accuracy and top-5 (percent), nll (nats) and ece
    (fraction), and ``budgeted_<stat>`` (B,) / (R, B) for accuracy (percent) and expected FLOPs.
    The calibration statistics are nan when the record has no probabilities. Row r of the
    replicates is resample r, the same for every cell with this N and ``settings.seed``.
    """
    correct = samples["correct"].bool()
    k, n = correct.shape
    exits = samples["exits"].long()
    b = exits.shape[0]
    flops = samples["flops"].double()
    chosen = correct.gather(0, exits)  # (B, N): correctness at the exit each sample leaves at
    has_probs = all(samples.get(key) is not None for key in ("log_loss", "top5", "confidence"))
    counted = [correct, chosen] + ([samples["top5"].bool()] if has_probs else [])
    integer = torch.cat(counted).T.float().contiguous()  # (N, K + B [+ K]) exact under float32 sums
    real = [flops[exits]]  # (B, N) FLOPs each sample pays
    if has_probs:
        real.append(samples["log_loss"].double())
        bins = torch.bucketize(
            samples["confidence"].double(), torch.arange(1, ece_bins, dtype=torch.float64) / ece_bins, right=True
        )
        gap = correct.double() - samples["confidence"].double()  # (K, N)
        ece_columns = torch.zeros(k, ece_bins, n, dtype=torch.float64)
        ece_columns.scatter_(1, bins[:, None, :], gap[:, None, :])
        real.append(ece_columns.reshape(k * ece_bins, n))
    real_t = torch.cat(real).T.contiguous()  # (N, B [+ K + K * bins])

    def statistics(counts: torch.Tensor) -> dict[str, np.ndarray]:
        ints = (counts @ integer).double().numpy() / n
        reals = (counts.double() @ real_t).numpy() / n
        out = {
            "anytime_accuracy": ints[:, :k] * 100,
            "budgeted_accuracy": ints[:, k : k + b] * 100,
            "budgeted_flops": reals[:, :b],
        }
        if has_probs:
            out["anytime_top5"] = ints[:, k + b :] * 100
            out["anytime_nll"] = reals[:, b : b + k]
            out["anytime_ece"] = np.abs(reals[:, b + k :].reshape(-1, k, ece_bins)).sum(axis=2)
        else:
            for stat in ("top5", "nll", "ece"):
                out[f"anytime_{stat}"] = np.full((len(counts), k), np.nan)
        return out

    point = {key: value[0] for key, value in statistics(torch.ones(1, n)).items()}
    parts = [statistics(resample_counts(n, rows, settings.seed)) for rows in _blocks(settings.resamples)]
    replicates = {key: np.concatenate([p[key] for p in parts]) for key in point}
    return point, replicates


def interval_columns(
    point: dict[str, np.ndarray], replicates: dict[str, np.ndarray], curve: str, level: float
) -> dict[str, np.ndarray]:
    """``<stat>`` (calibration statistics only: accuracy and FLOPs are the curve's own columns),
    ``<stat>_ci_low``, ``<stat>_ci_high`` for one curve (``anytime`` or ``budgeted``)."""
    out: dict[str, np.ndarray] = {}
    for stat in ANYTIME_STATS if curve == "anytime" else BUDGETED_STATS:
        key = f"{curve}_{stat}"
        if stat not in ("accuracy", "flops"):
            out[stat] = point[key]
        out[f"{stat}_ci_low"], out[f"{stat}_ci_high"] = interval(replicates[key], level)
    return out


# --- several seeds of one variant --------------------------------------------------------------
@dataclass
class VariantReplicates:
    """One variant's cells (its seeds) on one dataset and architecture, resampled together."""

    seeds: list[int]
    n_test: int
    draws: np.ndarray  # (R, S) seed ranks of each resample
    points: dict[str, np.ndarray]  # statistic -> (S, ...) per seed
    replicates: dict[str, np.ndarray]  # statistic -> (S, R, ...) per seed
    level: float
    resamples: int
    flops_per_exit: np.ndarray  # (K,) cumulative FLOPs of each exit

    @classmethod
    def build(cls, records: dict[int, dict[str, Any]], settings: BootstrapSettings) -> VariantReplicates:
        """``records``: seed -> per-sample record; every seed must have the same test set size."""
        seeds = sorted(records)
        sizes = {seed: records[seed]["correct"].shape[1] for seed in seeds}
        if len(set(sizes.values())) != 1:
            raise ValueError(f"seeds {sizes} of one variant have test sets of different sizes")
        stats = [cell_statistics(records[seed], settings) for seed in seeds]
        n_test = sizes[seeds[0]]
        return cls(
            seeds=seeds,
            n_test=n_test,
            draws=seed_draws(n_test, len(seeds), settings.resamples, settings.seed),
            points={key: np.stack([p[key] for p, _ in stats]) for key in stats[0][0]},
            replicates={key: np.stack([r[key] for _, r in stats]) for key in stats[0][1]},
            level=settings.level,
            resamples=settings.resamples,
            flops_per_exit=records[seeds[0]]["flops"].double().numpy(),
        )

    @property
    def interval_kind(self) -> str:
        return "test-set bootstrap" if len(self.seeds) == 1 else "test-set x seed bootstrap"

    def over_draws(self, per_seed: np.ndarray) -> np.ndarray:
        """(S, R, ...) per-seed replicates -> (R, ...) their mean over each resample's drawn seeds."""
        picked = per_seed[self.draws, np.arange(self.resamples)[:, None]]  # (R, S, ...)
        return picked.mean(axis=1)

    def mean(self, key: str) -> tuple[np.ndarray, np.ndarray]:
        """(point, replicates) of the seed mean of a statistic."""
        return self.points[key].mean(axis=0), self.over_draws(self.replicates[key])

    def at_budgets(self, budgets: np.ndarray, curve: str = "budgeted") -> tuple[np.ndarray, np.ndarray]:
        """Accuracy at fixed FLOPs budgets: each seed's curve interpolated (within each resample for
        the replicates), then averaged over seeds. Returns (point (M,), replicates (R, M))."""
        budgets = np.asarray(budgets, dtype=np.float64)
        if curve == "anytime":  # every seed and resample has the exits' FLOPs
            flops = np.broadcast_to(self.flops_per_exit, self.points["anytime_accuracy"].shape)
            point = interpolate_rows(flops, self.points["anytime_accuracy"], budgets)
            flops_r = np.broadcast_to(self.flops_per_exit, self.replicates["anytime_accuracy"].shape)
            reps = interpolate_rows(flops_r, self.replicates["anytime_accuracy"], budgets)
        else:
            point = interpolate_rows(self.points["budgeted_flops"], self.points["budgeted_accuracy"], budgets)
            reps = interpolate_rows(self.replicates["budgeted_flops"], self.replicates["budgeted_accuracy"], budgets)
        return point.mean(axis=0), self.over_draws(reps)

    def mean_curve(self) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """The seed-averaged budgeted curve: (FLOPs (B,), accuracy (B,), and their (R, B) replicates)."""
        flops, flops_r = self.mean("budgeted_flops")
        acc, acc_r = self.mean("budgeted_accuracy")
        return flops, acc, flops_r, acc_r


# --- the per-sample record ---------------------------------------------------------------------
def per_sample_record(
    correct: torch.Tensor,
    exits: torch.Tensor,
    flops: list[float] | torch.Tensor,
    probabilities: torch.Tensor | None,
    labels: torch.Tensor,
) -> dict[str, Any]:
    """What ``samples.pt`` holds (see the module docstring); ``probabilities`` (K, N, C) or None."""

    record: dict[str, Any] = {
        "correct": correct.bool(),
        "exits": exits.to(torch.uint8 if correct.shape[0] <= 256 else torch.int16),
        "flops": torch.as_tensor(flops, dtype=torch.float64),
    }
    if probabilities is not None:
        probs = probabilities.float()
        top = probs.topk(min(5, probs.shape[-1]), dim=-1).indices
        record["log_loss"] = log_loss(label_probabilities(probs, labels))
        record["top5"] = (top == labels.long()[None, :, None]).any(dim=-1)
        record["confidence"] = probs.max(dim=-1).values
    return record

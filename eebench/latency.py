"""Measured latency of early exit, beside FLOPs, and budgets stated in milliseconds.

``measure_latency`` times, at each batch size, passes over the same test images of

* ``exit k`` (k = 1..K): every sample leaves at exit k (thresholds +inf before it, -inf at it),
  the cumulative latency of exit k, exit heads and scoring of exits 1..k included; ``exit K`` is
  the full network (the simulated protocol's cost) that speedups are measured against;
* each chosen budget: dynamic early exit with that budget's thresholds (``eebench.dynamic``).

One warm-up pass of every configuration, then ``repeats`` rounds, each timing one pass of every
configuration in turn (the order reversed every other round); ``torch.cuda.synchronize`` around
each pass on a GPU; intra-op threads pinned. Reported: the median over rounds of the time per
image, with a distribution-free interval for the median from order statistics
(``median_interval``), and the median over rounds of the per-round speedup.

Every measured configuration is also checked against the simulated protocol: on the timed images
at every batch size, and on every test image at the largest one; a disagreement that is not a tie
at the threshold raises ``ExactnessError``.
"""

from __future__ import annotations

import contextlib
import logging
import math
import statistics
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
import torch

from models import MultiExitNetwork

from .calibration import accuracy_at_budget
from .dynamic import (
    Agreement,
    DynamicResult,
    ExitScorer,
    compare_with_simulation,
    exit_by_exit,
    run_dynamic,
    run_simulated,
)
from .scored import ScoredOutputs

CI_LEVEL = 0.95
_log = logging.getLogger("eebench.latency")


class ExactnessError(RuntimeError):
    """Dynamic execution disagreed with the simulated protocol beyond ties at the threshold."""


# --- statistics ------------------------------------------------------------------------------
def median_interval(values: Sequence[float], level: float = CI_LEVEL) -> tuple[float, float, float, float]:
    """(median, low, high, coverage): the interval [x_(j), x_(n+1-j)] of the sorted values with
    the largest j whose coverage of the true median, 1 - 2 P(Binomial(n, 1/2) < j), reaches
    ``level``; with too few values, (min, max) and its (lower) coverage."""
    ordered = sorted(values)
    n = len(ordered)

    def coverage(j: int) -> float:
        return 1 - 2 * sum(math.comb(n, i) for i in range(j)) / 2**n

    j = 1
    while j + 1 <= (n + 1) // 2 and coverage(j + 1) >= level:
        j += 1
    return statistics.median(ordered), ordered[j - 1], ordered[n - j], max(coverage(j), 0.0)


# --- timing ----------------------------------------------------------------------------------
@contextlib.contextmanager
def pinned_threads(threads: int | None) -> Iterator[int]:
    """torch's intra-op threads set to ``threads`` (None: as they are) for the block."""
    before = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        yield torch.get_num_threads()
    finally:
        torch.set_num_threads(before)


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


Run = Callable[[torch.Tensor], DynamicResult]


def time_interleaved(
    runs: dict[str, Run],
    batches: list[torch.Tensor],
    repeats: int,
    warmup: int,
    device: torch.device,
    before_round: Callable[[int], None] | None = None,
) -> tuple[dict[str, list[float]], dict[str, list[DynamicResult]]]:
    """Seconds per pass over ``batches`` of every run, ``repeats`` interleaved rounds after
    ``warmup`` untimed passes; and each run's results of its last pass, batch by batch.
    ``before_round(r)`` is called before round r (a benchmark waits for a quiet machine there)."""
    results: dict[str, list[DynamicResult]] = {}
    for _ in range(warmup):
        for name, run in runs.items():
            results[name] = [run(b) for b in batches]
    times: dict[str, list[float]] = {name: [] for name in runs}
    names = list(runs)
    for r in range(repeats):
        if before_round is not None:
            before_round(r)
        for name in names if r % 2 == 0 else names[::-1]:
            _synchronize(device)
            start = time.perf_counter()
            out = [runs[name](b) for b in batches]
            _synchronize(device)
            times[name].append(time.perf_counter() - start)
            results[name] = out
    return times, results


def _joined(parts: list[DynamicResult]) -> DynamicResult:
    return DynamicResult(
        torch.cat([p.exits for p in parts]),
        torch.cat([p.predictions for p in parts]),
        [sum(c) for c in zip(*(p.samples_per_segment for p in parts))],
    )


# --- what is measured ------------------------------------------------------------------------
@dataclass
class LatencyTask:
    """One cell's measurement: the prepared network (eval mode, as ``infer_cell`` prepares it),
    its test images (normalised, on the device), labels, per-exit cumulative FLOPs, the
    simulated protocol's scores on those images, and the thresholds of the chosen budgets
    (budget id -> (K,); the budget's row of the curve is id - 1)."""

    network: MultiExitNetwork
    scorer_for: Callable[[int], ExitScorer]  # budget row (0-based) -> its scorer
    images: torch.Tensor
    labels: torch.Tensor
    exit_flops: list[float]
    simulated: ScoredOutputs
    thresholds: dict[int, list[float]]
    device: torch.device


def forced_exit(k: int, num_exits: int) -> list[float]:
    """Thresholds making every sample leave at exit k (0-based)."""
    return [math.inf] * k + [-math.inf] * (num_exits - k)


def _first(scored: ScoredOutputs, n: int) -> ScoredOutputs:
    return ScoredOutputs(
        scores=scored.scores[..., :n],
        predictions=scored.predictions[:, :n],
        probabilities=None if scored.probabilities is None else scored.probabilities[:, :n],
    )


def _runs(task: LatencyTask) -> tuple[dict[str, Run], str]:
    network, num_exits = task.network, task.network.num_exits
    dynamic = exit_by_exit(network, task.scorer_for(0))

    def runner(thresholds: list[float], scorer: ExitScorer) -> Run:
        run = run_dynamic if dynamic else run_simulated
        return lambda batch: run(network, batch, thresholds, scorer)

    def prefix(k: int) -> Run:  # the simulated protocol has no early exit: time the prefix only
        def run(batch: torch.Tensor) -> DynamicResult:
            with torch.inference_mode():
                network.forward_all(batch, upto=k + 1)
            n = batch.shape[0]
            return DynamicResult(torch.full((n,), k), torch.zeros(n, dtype=torch.long), [n] * (k + 1))

        return run

    runs = {
        f"exit{k + 1}": runner(forced_exit(k, num_exits), task.scorer_for(0)) if dynamic else prefix(k)
        for k in range(num_exits)
    }
    runs.update({f"budget{b}": runner(t, task.scorer_for(b - 1)) for b, t in task.thresholds.items()})
    return runs, "dynamic" if dynamic else "simulated"


def _check(agreement: Agreement, what: str) -> Agreement:
    if not agreement.exact:
        raise ExactnessError(
            f"{what}: dynamic execution disagrees with the simulated protocol: "
            f"{agreement.describe()}; first samples: {agreement.mismatches[:10]}"
        )
    return agreement


def measure_latency(
    task: LatencyTask,
    batch_sizes: Sequence[int],
    repeats: int,
    warmup: int = 1,
    images: int | None = None,
    threads: int | None = None,
    log: Callable[[str], None] = lambda _: None,
    before_round: Callable[[int], None] | None = None,
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(budget rows, per-exit rows); see the module docstring. ``images``: test images timed per
    pass (at least one batch; None: all)."""
    num_exits = task.network.num_exits
    flops = np.asarray(task.exit_flops, dtype=float)
    if len(flops) != num_exits:
        raise ValueError(f"{len(flops)} FLOPs values for a network with {num_exits} exits")
    n_test = len(task.labels)
    budget_rows, exit_rows = [], []
    with pinned_threads(threads) as used_threads:
        runs, execution = _runs(task)
        if execution == "simulated":
            _log.warning(
                "%s or its scorer cannot run exit by exit: timing the simulated protocol (every exit "
                "of every sample) instead",
                type(task.network).__name__,
            )
        whole = _whole_test(task, runs, max(batch_sizes), execution)
        for batch_size in batch_sizes:
            n = min(n_test, max(batch_size, images or n_test))
            batches = [task.images[i : min(n, i + batch_size)] for i in range(0, n, batch_size)]
            times, results = time_interleaved(runs, batches, repeats, warmup, task.device, before_round)
            common = {
                "batch_size": batch_size,
                "images": n,
                "repeats": repeats,
                "device": _device_name(task.device),
                "threads": used_threads,
                "execution": execution,
            }
            exit_ms = []
            for k in range(num_exits):
                row = {"exit": k + 1, "flops": flops[k], **_ms(times[f"exit{k + 1}"], n), **common}
                exit_ms.append(row["ms_per_image"])
                exit_rows.append(row)
            full = times[f"exit{num_exits}"]
            for b in task.thresholds:
                result = _joined(results[f"budget{b}"])
                ties = 0
                if execution == "dynamic":
                    ties = _check(
                        compare_with_simulation(result, _first(task.simulated, n), task.thresholds[b], b - 1),
                        f"budget {b}, batch size {batch_size}, {n} timed images",
                    ).ties
                timed_flops = float(flops[result.exits.numpy()].mean())
                per_round = [f / t for f, t in zip(full, times[f"budget{b}"])]
                budget_rows.append(
                    {
                        "budget_id": b,
                        "flops": whole[b]["flops"],
                        "accuracy": whole[b]["accuracy"],
                        **_ms(times[f"budget{b}"], n),
                        "speedup_measured": statistics.median(per_round),
                        "speedup_flops": flops[-1] / timed_flops,
                        "flops_timed": timed_flops,
                        "ms_exit_model": float(np.asarray(exit_ms)[result.exits.numpy()].mean()),
                        "ties": ties + whole[b]["ties"],
                        "checked_images": n + n_test,
                        **common,
                    }
                )
            log(
                f"batch {batch_size}: full network {exit_ms[-1]:.3f} ms/image; "
                + ", ".join(
                    f"budget {r['budget_id']} {r['ms_per_image']:.3f} ms ({r['speedup_measured']:.2f}x "
                    f"measured, {r['speedup_flops']:.2f}x FLOPs)"
                    for r in budget_rows
                    if r["batch_size"] == batch_size
                )
            )
    return pd.DataFrame(budget_rows), pd.DataFrame(exit_rows)


def _whole_test(task: LatencyTask, runs: dict[str, Run], batch_size: int, execution: str) -> dict[int, dict[str, Any]]:
    """Each budget on every test image (untimed): FLOPs, accuracy and the exactness check."""
    flops = np.asarray(task.exit_flops, dtype=float)
    out = {}
    for b, thresholds in task.thresholds.items():
        run = runs[f"budget{b}"]
        result = _joined([run(task.images[i : i + batch_size]) for i in range(0, len(task.labels), batch_size)])
        ties = 0
        if execution == "dynamic":
            ties = _check(
                compare_with_simulation(result, task.simulated, thresholds, b - 1),
                f"budget {b}, batch size {batch_size}, every test image",
            ).ties
        out[b] = {
            "flops": float(flops[result.exits.numpy()].mean()),
            "ties": ties,
            "accuracy": float((result.predictions == task.labels.cpu()).double().mean() * 100),
        }
    return out


def _ms(seconds: list[float], images: int) -> dict[str, float]:
    median, low, high, coverage = median_interval([1000 * s / images for s in seconds])
    return {"ms_per_image": median, "ms_ci_low": low, "ms_ci_high": high, "ci_level": coverage}


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return f"{device} ({torch.cuda.get_device_name(device)})"
    return str(device)


BUDGET_COLUMNS = [
    "budget_id",
    "flops",
    "accuracy",
    "batch_size",
    "ms_per_image",
    "ms_ci_low",
    "ms_ci_high",
    "speedup_measured",
    "speedup_flops",
    "device",
    "threads",
    "ci_level",
    "images",
    "repeats",
    "flops_timed",
    "ms_exit_model",
    "execution",
    "ties",
    "checked_images",
]
EXIT_COLUMNS = [
    "exit",
    "flops",
    "batch_size",
    "ms_per_image",
    "ms_ci_low",
    "ms_ci_high",
    "device",
    "threads",
    "ci_level",
    "images",
    "repeats",
    "execution",
]


def select_budgets(budgeted: pd.DataFrame, count: int) -> list[int]:
    """``count`` budget ids spread evenly over the curve's distinct expected FLOPs, the cheapest
    and the dearest included (fewer when the curve has fewer distinct points)."""
    by_flops = budgeted.sort_values(["flops", "budget_id"]).drop_duplicates("flops")
    positions = np.unique(np.round(np.linspace(0, len(by_flops) - 1, min(count, len(by_flops)))).astype(int))
    return sorted(int(b) for b in by_flops["budget_id"].iloc[positions])


def thresholds_of(budgeted: pd.DataFrame, num_exits: int, path: str = "budgeted curve") -> dict[int, list[float]]:
    """budget id -> thresholds (K,) from a budgeted curve's ``threshold_1..K`` columns."""
    columns = [c for c in budgeted.columns if c.startswith("threshold_")]
    wanted = [f"threshold_{k}" for k in range(1, num_exits + 1)]
    if columns != wanted or "budget_id" not in budgeted:
        raise ValueError(
            f"{path}: expected columns budget_id and threshold_1..threshold_{num_exits} (one per exit "
            f"of the network), got {', '.join(columns) or 'no threshold column'}"
        )
    return {int(row["budget_id"]): [float(row[c]) for c in wanted] for _, row in budgeted.iterrows()}


# --- budgets in milliseconds -----------------------------------------------------------------
def exit_latency(exits: pd.DataFrame, batch_size: int) -> list[float]:
    """Per-exit cumulative ms per image at ``batch_size`` from a per-exit latency table."""
    rows = exits[exits["batch_size"] == batch_size].sort_values("exit")
    if rows.empty:
        raise ValueError(
            f"no per-exit latency measured at batch size {batch_size}; measured: "
            f"{sorted(exits['batch_size'].unique().tolist())}"
        )
    return rows["ms_per_image"].tolist()


def expected_ms(budgeted: pd.DataFrame, exit_ms: Sequence[float]) -> np.ndarray:
    """Expected ms per image of each budget of a budgeted curve: sum_k (share of test samples
    leaving at exit k) x (measured cumulative ms of exit k), as expected FLOPs are computed."""
    fractions = budgeted[[f"exit_fraction_{k}" for k in range(1, len(exit_ms) + 1)]].to_numpy(dtype=float)
    return fractions @ np.asarray(exit_ms, dtype=float)


def accuracy_at_time(budgeted: pd.DataFrame, exit_ms: Sequence[float], budget_ms: float) -> float:
    """Accuracy at a time budget (ms per image): the budgeted curve with its x-axis in expected
    milliseconds, interpolated linearly as at a FLOPs budget (nan outside the curve)."""
    return accuracy_at_budget(expected_ms(budgeted, exit_ms), budgeted["accuracy"].to_numpy(), budget_ms)

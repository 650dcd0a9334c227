"""Bootstrap intervals of one cell: resamples as a matrix dimension against a loop over resamples.

One cell of the CIFAR-100 size: 10,000 test samples x 7 exits x 39 budgets, 100 classes, 1000
resamples. ``eebench.bootstrap.cell_statistics`` draws the count weights W (R, N) and gets every
statistic by matrix products; the loop draws the same resampled indices and computes the same
statistics resample by resample with tensor indexing. Both are run in turn in each round
(interleaved, the order reversed every other round), and the results are compared.

    python benchmarks/bootstrap.py            # --rounds 5 --resamples 1000 --samples 10000
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _bench  # noqa: E402

sys.path.insert(0, str(_bench.ROOT))  # this checkout's eebench, not another installed copy
from calibration import FLOPS, make_probabilities  # noqa: E402  (benchmarks/calibration.py)

from eebench.bootstrap import (
    ECE_BINS,
    BootstrapSettings,
    cell_statistics,
    per_sample_record,  # noqa: E402
    resample_indices,
)
from eebench.calibration import budgeted_curve  # noqa: E402


def make_record(n: int, exits: int, classes: int, seed: int) -> dict:
    val_probs, _ = make_probabilities(exits, n, classes, seed)
    probs, labels = make_probabilities(exits, n, classes, seed + 1)
    scores, predictions = probs.max(-1)
    correct = predictions == labels[None]
    curve = budgeted_curve(val_probs.max(-1).values, scores, correct, FLOPS[:exits])
    return per_sample_record(correct, curve.exits, FLOPS[:exits], probs, labels)


def loop_statistics(record: dict, settings: BootstrapSettings) -> dict[str, np.ndarray]:
    """The same replicates, one resample at a time."""
    correct, exits = record["correct"], record["exits"].long()
    chosen = correct.gather(0, exits).double()
    paid = record["flops"][exits]
    bins = torch.bucketize(
        record["confidence"].double(), torch.arange(1, ECE_BINS, dtype=torch.float64) / ECE_BINS, right=True
    )
    gap = correct.double() - record["confidence"].double()
    k, n = correct.shape
    out: dict[str, list] = {
        key: []
        for key in (
            "anytime_accuracy",
            "anytime_top5",
            "anytime_nll",
            "anytime_ece",
            "budgeted_accuracy",
            "budgeted_flops",
        )
    }
    for r in range(settings.resamples):
        idx = torch.from_numpy(resample_indices(n, r, settings.seed))
        out["anytime_accuracy"].append(correct[:, idx].double().mean(1) * 100)
        out["anytime_top5"].append(record["top5"][:, idx].double().mean(1) * 100)
        out["anytime_nll"].append(record["log_loss"][:, idx].mean(1))
        sums = torch.zeros(k, ECE_BINS, dtype=torch.float64).scatter_add_(1, bins[:, idx], gap[:, idx])
        out["anytime_ece"].append(sums.abs().sum(1) / n)
        out["budgeted_accuracy"].append(chosen[:, idx].mean(1) * 100)
        out["budgeted_flops"].append(paid[:, idx].mean(1))
    return {key: torch.stack(values).numpy() for key, values in out.items()}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--samples", type=int, default=10_000)
    p.add_argument("--exits", type=int, default=7)
    p.add_argument("--classes", type=int, default=100)
    p.add_argument("--resamples", type=int, default=1000)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--loop-rounds", type=int, default=2, help="rounds that also run the (slow) loop")
    opts = p.parse_args()
    record = make_record(opts.samples, opts.exits, opts.classes, seed=0)
    accuracy_only = {key: record[key] for key in ("correct", "exits", "flops")}
    settings = BootstrapSettings(resamples=opts.resamples)
    b = record["exits"].shape[0]
    print(
        f"bootstrap of one cell: {opts.resamples} resamples x {opts.samples} test samples x {opts.exits} exits x "
        f"{b} budgets; {_bench.machine_line()}"
    )
    default_threads = torch.get_num_threads()

    def vectorised(rec: dict, threads: int):
        torch.set_num_threads(threads)
        t0 = time.perf_counter()
        result = cell_statistics(rec, settings)[1]
        elapsed = time.perf_counter() - t0
        torch.set_num_threads(default_threads)
        return elapsed, result

    candidates = {
        "vectorised, all statistics, 1 thread": lambda: vectorised(record, 1),
        "vectorised, accuracy + FLOPs, 1 thread": lambda: vectorised(accuracy_only, 1),
        "vectorised, all statistics, 2 threads": lambda: vectorised(record, 2),
    }
    vectorised(record, 1)  # warm-up
    times: dict[str, list[float]] = {name: [] for name in [*candidates, "loop over resamples, 1 thread"]}
    results = {}
    for r in range(opts.rounds):
        names = list(candidates) if r % 2 == 0 else list(reversed(candidates))
        for name in names:
            elapsed, results[name] = candidates[name]()
            times[name].append(elapsed)
        if r < opts.loop_rounds:
            torch.set_num_threads(1)
            t0 = time.perf_counter()
            results["loop"] = loop_statistics(record, settings)
            times["loop over resamples, 1 thread"].append(time.perf_counter() - t0)
            torch.set_num_threads(default_threads)
        done = "  ".join(f"{k} {v[-1]:.3f}s" for k, v in times.items() if len(v) > r)
        print(f"  round {r + 1}/{opts.rounds}: {done}  ({_bench.load_average()})", flush=True)
    base = statistics.median(times["vectorised, all statistics, 1 thread"])
    print(f"\n{'':<40} {'median s':>9}  {'x vectorised, all, 1 thread':>28}")
    for name, ts in times.items():
        print(f"{name:<40} {statistics.median(ts):>9.3f}  {statistics.median(ts) / base:>27.1f}x")
    vec = results["vectorised, all statistics, 1 thread"]
    worst = max(
        float(np.max(np.abs(vec[key] - results["loop"][key]) / np.maximum(1e-12, np.abs(results["loop"][key]))))
        for key in vec
    )
    exact = all(np.array_equal(vec[key], results["loop"][key]) for key in ("anytime_accuracy", "budgeted_accuracy"))
    print(
        f"\ncheck: vectorised and loop replicates agree to {worst:.1e} (relative); accuracies "
        f"{'identical' if exact else 'DIFFER'}"
    )
    print(_bench.load_average())


if __name__ == "__main__":
    main()

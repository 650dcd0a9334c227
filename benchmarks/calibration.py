#!/usr/bin/env python
"""Budgeted-batch calibration: ``budgeted_curve`` against per-sample loops, same results.

The task is the MSDNet reference's ``dynamic_evaluate``: for each of the 39 budgets, find the
exit thresholds on val (10,000 samples x 7 exits) and apply them to test (10,000 samples),
giving accuracy and expected FLOPs. Timed, in-function, on the same random softmax scores:

* ``vectorised``: ``eebench.calibration.budgeted_curve`` (all budgets at once), at 1 and at 2
  torch threads.
* ``loop (tensor)``: the reference's algorithm written as the plain per-sample loop it is, reading
  scores from tensors element by element (the port in tests/test_calibration.py). Slow: round 1 only.
* ``loop (lists)``: the same loop over Python lists (scores converted with ``tolist()`` inside
  the timing): the fastest straightforward loop, so the hardest baseline.
* ``reference``: the reference's own ``Tester.dynamic_eval_find_threshold`` +
  ``dynamic_eval_with_threshold`` from ``--reference`` (adaptive_inference.py), as
  ``dynamic_evaluate`` calls them for p = 1..39 (optional; about a minute; round 1 only).

Every loop's thresholds must equal the vectorised ones exactly, and its per-exit counts and
correct counts (hence accuracy and expected FLOPs) too.

    python benchmarks/calibration.py --reference /tmp/MSDNet-PyTorch
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _bench  # noqa: E402

from eebench.calibration import NO_EXIT, TAKE_ALL, budgeted_curve, geometric_exit_distributions  # noqa: E402

FLOPS = [6.86e6, 14.35e6, 27.29e6, 48.45e6, 76.43e6, 108.85e6, 137.28e6]  # the 7-exit CIFAR-100 MSDNet


def make_probabilities(k: int, n: int, classes: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Softmax outputs (K, N, C) that grow more confident and more often right with depth."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, classes, (n,), generator=g)
    logits = torch.randn(k, n, classes, generator=g) * 2
    boost = torch.linspace(1.0, 6.0, k)[:, None] * torch.rand(k, n, generator=g)
    logits[:, torch.arange(n), labels] += boost
    return logits.softmax(-1), labels


# --- the loops ----------------------------------------------------------------------------------
def loop_thresholds_tensor(scores: torch.Tensor, pi: list[float]) -> list[float]:
    """The reference threshold search as a plain loop (as in tests/test_calibration.py)."""
    num_exits, n = scores.shape
    exited = [False] * n
    thresholds = [NO_EXIT] * num_exits
    for k in range(num_exits - 1):
        wanted = math.floor(n * pi[k])
        order = sorted(range(n), key=lambda i: -float(scores[k, i]))
        count = 0
        for i in order:
            if not exited[i]:
                count += 1
                if count == wanted:
                    thresholds[k] = float(scores[k, i])
                    break
        for i in range(n):
            if float(scores[k, i]) >= thresholds[k]:
                exited[i] = True
    thresholds[-1] = TAKE_ALL
    return thresholds


def loop_evaluate_tensor(scores, correct, thresholds):
    num_exits, n = scores.shape
    hits, counts = 0, [0] * num_exits
    for i in range(n):
        for k in range(num_exits):
            if float(scores[k, i]) >= thresholds[k]:
                hits += int(correct[k, i])
                counts[k] += 1
                break
    return hits, counts


def loop_thresholds_lists(scores: list[list[float]], pi: list[float]) -> list[float]:
    num_exits, n = len(scores), len(scores[0])
    exited = [False] * n
    thresholds = [NO_EXIT] * num_exits
    for k in range(num_exits - 1):
        row = scores[k]
        wanted = math.floor(n * pi[k])
        count = 0
        for i in sorted(range(n), key=row.__getitem__, reverse=True):
            if not exited[i]:
                count += 1
                if count == wanted:
                    thresholds[k] = row[i]
                    break
        t = thresholds[k]
        for i in range(n):
            if row[i] >= t:
                exited[i] = True
    thresholds[-1] = TAKE_ALL
    return thresholds


def loop_evaluate_lists(scores, correct, thresholds):
    num_exits, n = len(scores), len(scores[0])
    hits, counts = 0, [0] * num_exits
    for i in range(n):
        for k in range(num_exits):
            if scores[k][i] >= thresholds[k]:
                hits += correct[k][i]
                counts[k] += 1
                break
    return hits, counts


def run_loop_tensor(val, test, correct, pis):
    out = []
    for pi in pis:
        t = loop_thresholds_tensor(val, pi)
        out.append((t, *loop_evaluate_tensor(test, correct, t)))
    return out


def run_loop_lists(val, test, correct, pis):
    val_l, test_l, correct_l = val.tolist(), test.tolist(), correct.int().tolist()
    out = []
    for pi in pis:
        t = loop_thresholds_lists(val_l, pi)
        out.append((t, *loop_evaluate_lists(test_l, correct_l, t)))
    return out


def run_reference(tester, val_probs, val_labels, test_probs, test_labels, n_exits):
    """dynamic_evaluate's loop over p = 1..39, minus its file writes and prints."""
    out = []
    for p in range(1, 40):
        _p = torch.FloatTensor(1).fill_(p * 1.0 / 20)
        probs = torch.exp(torch.log(_p) * torch.arange(1, n_exits + 1, dtype=torch.float32))
        probs /= probs.sum()
        _, _, T = tester.dynamic_eval_find_threshold(val_probs, val_labels, probs, FLOPS)
        acc_test, exp_flops = tester.dynamic_eval_with_threshold(test_probs, test_labels, FLOPS, T)
        out.append((T.tolist(), acc_test, float(exp_flops)))
    return out


# --- comparison ---------------------------------------------------------------------------------
def check_loop(name, results, curve, n_test) -> str:
    bad = []
    for b, (t, hits, counts) in enumerate(results):
        if t != curve.thresholds[b].tolist():
            bad.append(f"budget {b + 1} thresholds")
        if counts != [round(f * n_test) for f in curve.exit_fractions[b]]:
            bad.append(f"budget {b + 1} exit counts")
        if hits != round(curve.accuracy[b] * n_test / 100):
            bad.append(f"budget {b + 1} correct count")
    if bad:
        raise SystemExit(f"{name} differs from budgeted_curve: {bad[:5]}")
    return f"{name}: identical thresholds, per-exit counts and correct counts on all {len(results)} budgets"


def check_reference(results, curve) -> str:
    worst_acc = worst_flops = 0.0
    for b, (t, acc, flops) in enumerate(results):
        if t != curve.thresholds[b].tolist():
            raise SystemExit(f"reference thresholds differ at budget {b + 1}: {t} vs {curve.thresholds[b].tolist()}")
        worst_acc = max(worst_acc, abs(acc - curve.accuracy[b]))
        worst_flops = max(worst_flops, abs(flops - curve.flops[b]) / curve.flops[b])
    if worst_acc > 1e-9 or worst_flops > 1e-6:
        raise SystemExit(f"reference differs: accuracy by {worst_acc}, FLOPs by {worst_flops:.2e} (relative)")
    return (
        f"reference Tester: identical thresholds on all 39 budgets; accuracy equal (max |diff| {worst_acc:.1e}),"
        f" expected FLOPs equal to {worst_flops:.1e} relative (the reference sums them in float32)"
    )


def main() -> None:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--reference", help="checkout of kalviny/MSDNet-PyTorch: also time its Tester functions")
    p.add_argument("--samples", type=int, default=10_000, help="val and test samples each")
    p.add_argument("--exits", type=int, default=7)
    p.add_argument("--classes", type=int, default=100)
    p.add_argument("--repeats", type=int, default=3, help="interleaved rounds")
    p.add_argument("--calls", type=int, default=5, help="budgeted_curve calls per round and thread count (median)")
    p.add_argument("--skip-tensor-loop", action="store_true", help="leave out the slow tensor-indexing loop")
    p.add_argument("--seed", type=int, default=0)
    opts = p.parse_args()
    if opts.exits != len(FLOPS):
        FLOPS[:] = [f * (k + 1) for k, f in enumerate([1e6] * opts.exits)]
    tester = None
    if opts.reference:
        ref = _bench.check_reference(opts.reference, ("adaptive_inference.py",))
        sys.path.insert(0, str(ref))
        from adaptive_inference import Tester  # the reference's file, unchanged

        if not torch.cuda.is_available():  # Tester() calls nn.Softmax().cuda()
            torch.nn.Module.cuda = lambda self, *a, **k: self
        tester = Tester(torch.nn.Identity(), argparse.Namespace(nBlocks=opts.exits, print_freq=10**9))
    else:
        print("(no --reference: the reference's own Tester is left out; get it with\n" + _bench.GET_REFERENCE + ")")

    print(
        f"budgeted calibration, {opts.samples} val + {opts.samples} test samples x {opts.exits} exits x 39 "
        f"budgets; {_bench.machine_line()}"
    )
    val_probs, val_labels = make_probabilities(opts.exits, opts.samples, opts.classes, opts.seed)
    test_probs, test_labels = make_probabilities(opts.exits, opts.samples, opts.classes, opts.seed + 1)
    val_scores = val_probs.max(-1).values
    test_scores, test_pred = test_probs.max(-1)
    correct = test_pred == test_labels[None]
    pis = geometric_exit_distributions(opts.exits)[1].tolist()
    default_threads = torch.get_num_threads()

    def vectorised(threads: int) -> tuple[float, object]:
        torch.set_num_threads(threads)
        times, curve = [], None
        for _ in range(opts.calls):
            t0 = time.perf_counter()
            curve = budgeted_curve(val_scores, test_scores, correct, FLOPS)
            times.append(time.perf_counter() - t0)
        torch.set_num_threads(default_threads)
        return statistics.median(times), curve

    vectorised(1)  # warm-up
    times: dict[str, list[float]] = {"vectorised, 1 thread": [], "vectorised, 2 threads": [], "loop (lists)": []}
    if not opts.skip_tensor_loop:
        times["loop (tensor)"] = []
    if tester is not None:
        times["reference Tester"] = []
    checks = []
    for r in range(opts.repeats):
        t1, curve = vectorised(1)
        times["vectorised, 1 thread"].append(t1)
        t0 = time.perf_counter()
        lists = run_loop_lists(val_scores, test_scores, correct, pis)
        times["loop (lists)"].append(time.perf_counter() - t0)
        t2, _ = vectorised(2)
        times["vectorised, 2 threads"].append(t2)
        if not opts.skip_tensor_loop and r == 0:  # slow: once
            t0 = time.perf_counter()
            tensor_loop = run_loop_tensor(val_scores, test_scores, correct, pis)
            times["loop (tensor)"].append(time.perf_counter() - t0)
        if tester is not None and r == 0:  # about a minute: once
            t0 = time.perf_counter()
            reference = run_reference(
                tester, val_probs, val_labels.float(), test_probs, test_labels.float(), opts.exits
            )
            times["reference Tester"].append(time.perf_counter() - t0)
        if r == 0:
            checks.append(check_loop("loop (lists)", lists, curve, opts.samples))
            if "loop (tensor)" in times:
                checks.append(check_loop("loop (tensor)", tensor_loop, curve, opts.samples))
            if tester is not None:
                checks.append(check_reference(reference, curve))
        print(
            f"  round {r + 1}/{opts.repeats}: "
            + "  ".join(f"{k} {v[r]:.3f}s" for k, v in times.items() if len(v) > r)
            + f"  ({_bench.load_average()})",
            flush=True,
        )

    print()
    base = times["vectorised, 1 thread"]
    print(
        f"{'':<24} {'seconds (mean ± sd)':>22}   "
        "speed-up over 'vectorised, 1 thread' = time / its time in the same round"
    )
    for name, ts in times.items():
        sd = statistics.stdev(ts) if len(ts) > 1 else 0.0
        ratios = [t / b for t, b in zip(ts, base)]
        rsd = statistics.stdev(ratios) if len(ratios) > 1 else 0.0
        print(
            f"{name:<24} {statistics.mean(ts):>12.4f} ± {sd:<8.4f}  "
            f"x{statistics.mean(ratios):.1f} ± {rsd:.1f} [{min(ratios):.1f}, {max(ratios):.1f}]"
        )
    print()
    for c in checks:
        print("check: " + c)
    print(_bench.load_average())


if __name__ == "__main__":
    main()

#!/usr/bin/env python
"""Dynamic early exit on CPU at batch 1: measured speedup against the FLOPs speedup, per budget.

Two MSDNets with random weights (the harness initialisation), prepared as ``infer_cell`` prepares
them (eval, BatchNorm folded, channels_last):

* ``digits``: the default config's MSDNet (4 exits, quarter width) on 3x32x32, 10 classes;
* ``c100``: the 7-exit CIFAR-100 budgeted-batch MSDNet.

Thresholds come from a synthetic val cache (the network's own max-softmax scores on random
images, calibrated by ``calibration.exit_thresholds`` for the 39 geometric budgets); the timed test
images are other random images. ``eebench.latency.measure_latency`` does the timing (the code path
of the latency rule): per budget and per forced exit, one pass over the test images each round,
rounds interleaved (the order reversed every other round), medians over rounds, and the check
against the simulated protocol. Before each round the script waits (up to ``--max-wait`` s) for
other processes to use less than ``--quiet-below`` of the CPUs, and logs how busy they were.
The speedup is per round, against the full network (every exit head of every sample) in the
same round; the FLOPs speedup is F_K over the mean FLOPs of the exits the same images took.

``--profile`` adds, for the full network and the cheapest and middle budgets, torch.profiler's
breakdown of the time into the stem, the trunk segments, the exit heads, the exit scoring,
the subset selection (``select_samples``) and the rest (the runner's Python), and each segment's
milliseconds per MFLOP, which shows where time is not proportional to FLOPs.

    python benchmarks/dynamic_latency.py --models digits c100 --repeats 9 --images 200 --profile
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _bench  # noqa: E402

sys.path.insert(0, str(_bench.ROOT))

MODELS = {
    "digits": (
        {
            "n_blocks": 4,
            "step_mode": "lin_grow",
            "step": 1,
            "base": 1,
            "n_channels": 8,
            "growth_rate": 4,
            "gr_factor": [1, 2, 4],
            "bn_factor": [1, 2, 4],
            "n_scales": 3,
        },
        10,
    ),
    "c100": ({"n_blocks": 7}, 100),
}
BUDGET_ROWS = (1, 8, 16, 24, 32, 39)  # budget ids of the 39 geometric budgets


def build(name: str, seed: int = 0):
    import torch

    from eebench.flops import exit_flops
    from eebench.inference import prepare_for_inference
    from models import InputSpec, build_model

    params, classes = MODELS[name]
    torch.manual_seed(seed)
    net = build_model("msdnet", InputSpec(3, 32, classes), **params)
    flops = exit_flops(net, (3, 32, 32))["flops"]
    prepare_for_inference(net, torch.device("cpu"))
    return net, flops


def random_images(n: int, seed: int):
    import torch

    x = torch.randn(n, 3, 32, 32, generator=torch.Generator().manual_seed(seed))
    return x.contiguous(memory_format=torch.channels_last)


def task_of(name: str, opts):
    import torch

    from eebench.calibration import exit_thresholds, geometric_exit_distributions
    from eebench.dynamic import MethodScorer, cache_of
    from eebench.latency import LatencyTask

    net, flops = build(name)
    scorer = MethodScorer()

    def scored(x):
        with torch.inference_mode():
            return scorer.score_cache(cache_of(net.forward_all(x), with_features=False))

    thresholds = exit_thresholds(
        scored(random_images(opts.val, seed=1)).scores, geometric_exit_distributions(net.num_exits)[1]
    )
    test = random_images(opts.images, seed=2)
    chosen = {b: thresholds[b - 1].tolist() for b in BUDGET_ROWS}
    return LatencyTask(
        net,
        lambda _row: scorer,
        test,
        torch.zeros(len(test), dtype=torch.long),
        flops,
        scored(test),
        chosen,
        torch.device("cpu"),
    )


def report(name: str, task, budgets, exits) -> None:
    print(
        f"\n{name}: MSDNet, {task.network.num_exits} exits, {task.exit_flops[-1] / 1e6:.2f} MFLOPs at the last exit, "
        f"batch 1, {int(budgets['images'].iloc[0])} images per pass, {int(budgets['repeats'].iloc[0])} rounds"
    )
    print(f"{'budget':>6}  {'MFLOPs':>7}  {'ms/img [interval]':>24}  {'measured x':>10}  {'FLOPs x':>8}  {'ratio':>6}")
    for row in budgets.itertuples():
        print(
            f"{row.budget_id:>6}  {row.flops_timed / 1e6:>7.2f}  {row.ms_per_image:>8.3f} "
            f"[{row.ms_ci_low:.3f}, {row.ms_ci_high:.3f}]  {row.speedup_measured:>10.2f}  {row.speedup_flops:>8.2f}  "
            f"{row.speedup_measured / row.speedup_flops:>6.2f}"
        )
    ratios = budgets["speedup_measured"] / budgets["speedup_flops"]
    print(
        f"measured / FLOPs speedup: min {ratios.min():.2f}, median {ratios.median():.2f} "
        f"(interval coverage {budgets['ci_level'].min():.1%}); ties {int(budgets['ties'].sum())}"
    )
    ms, flops = exits["ms_per_image"].tolist(), task.exit_flops
    print("per exit: cumulative ms, and ms per MFLOP of each segment (trunk + head + scoring)")
    previous_ms, previous_flops = 0.0, 0.0
    for k, (m, f) in enumerate(zip(ms, flops), start=1):
        print(f"  exit {k}: {m:7.3f} ms  ({(m - previous_ms) / ((f - previous_flops) / 1e6):.4f} ms/MFLOP)")
        previous_ms, previous_flops = m, f


def profile(name: str, task, budget_ids: list[int], rounds: int) -> None:
    """Self time of the runner's parts, from torch.profiler ranges put around them."""
    import torch
    from torch.profiler import ProfilerActivity, record_function

    import eebench.dynamic as dynamic
    from eebench.dynamic import run_dynamic
    from eebench.latency import forced_exit

    net, scorer = task.network, task.scorer_for(0)
    wrapped = {}

    def ranged(label, fn):
        def call(*args):
            with record_function(label(*args)):
                return fn(*args)

        return call

    wrapped["begin"] = ranged(lambda x: "stem", net.begin)
    wrapped["run_segment"] = ranged(lambda k, s: "trunk segments", net.run_segment)
    wrapped["exit_head"] = ranged(lambda k, s: "exit heads", net.exit_head)
    for attr, fn in wrapped.items():
        setattr(net, attr, fn)
    step, select = scorer.step, dynamic.select_samples
    scorer.step = ranged(lambda k, h, c: "exit scoring", step)
    dynamic.select_samples = ranged(lambda s, i: "subset selection", select)
    labels = ["stem", "trunk segments", "exit heads", "exit scoring", "subset selection"]
    configs = {"full network": forced_exit(net.num_exits - 1, net.num_exits)}
    configs.update({f"budget {b}": task.thresholds[b] for b in budget_ids})
    print(f"\n{name}: where the time goes at batch 1 (torch.profiler, {rounds} passes over {len(task.images)} images)")
    print(f"{'':>14}  {'total ms/img':>12}  " + "  ".join(f"{lab:>16}" for lab in labels) + f"  {'rest':>8}")
    try:
        for title, thresholds in configs.items():
            for x in task.images[:8]:
                run_dynamic(net, x[None], thresholds, scorer)
            with torch.profiler.profile(activities=[ProfilerActivity.CPU]) as prof:
                with record_function("all"):
                    for _ in range(rounds):
                        for x in task.images:
                            run_dynamic(net, x[None], thresholds, scorer)
            totals = {e.key: e.cpu_time_total / 1e3 for e in prof.key_averages() if e.key in labels + ["all"]}
            per_image = rounds * len(task.images)
            parts = [totals.get(lab, 0.0) / per_image for lab in labels]
            whole = totals["all"] / per_image
            print(
                f"{title:>14}  {whole:>12.3f}  "
                + "  ".join(f"{p:>9.3f} ({p / whole:>3.0%})" for p in parts)
                + f"  {whole - sum(parts):>8.3f}"
            )
    finally:
        for attr in wrapped:
            delattr(net, attr)
        scorer.step, dynamic.select_samples = step, select


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", choices=list(MODELS), default=list(MODELS))
    parser.add_argument("--repeats", type=int, default=9)
    parser.add_argument("--images", type=int, default=200, help="random test images timed per pass")
    parser.add_argument("--val", type=int, default=2000, help="random val images for the thresholds")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--profile", action="store_true")
    parser.add_argument("--quiet-below", type=float, default=0.25, help="wait for other processes below this CPU share")
    parser.add_argument("--max-wait", type=float, default=30.0, help="seconds to wait for that before each round")
    opts = parser.parse_args()

    import torch

    from eebench.inference import keep_freed_memory
    from eebench.latency import measure_latency, pinned_threads

    keep_freed_memory()  # as the latency rule
    with pinned_threads(opts.threads):
        print(_bench.machine_line())
        for name in opts.models:
            task = task_of(name, opts)

            def quiet(r: int) -> None:  # before each round: wait for the other processes to calm down
                busy = _bench.wait_for_quiet(opts.quiet_below, opts.max_wait)
                print(
                    f"  {name} round {r + 1}/{opts.repeats}: others busy {busy:.0%} before ({_bench.load_average()})",
                    flush=True,
                )

            budgets, exits = measure_latency(
                task, [1], opts.repeats, warmup=1, images=opts.images, threads=opts.threads, before_round=quiet
            )
            report(name, task, budgets, exits)
            if opts.profile:
                with torch.inference_mode():
                    profile(name, task, [BUDGET_ROWS[0], BUDGET_ROWS[len(BUDGET_ROWS) // 2]], rounds=2)
        print(_bench.load_average())


if __name__ == "__main__":
    main()

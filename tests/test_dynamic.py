"""Dynamic early exit against the simulated protocol, on every architecture family, the methods
that change what is scored, and a post-hoc method; the latency measurement and time budgets."""

from __future__ import annotations

import math

import pandas as pd
import pytest
import torch
from torch import nn

from eebench.calibration import exit_thresholds, geometric_exit_distributions
from eebench.dynamic import (
    MethodScorer,
    NotSegmentedError,
    PosthocScorer,
    cache_of,
    compare_with_simulation,
    run_dynamic,
    run_dynamic_batches,
    simulated_exits,
)
from eebench.inference import prepare_for_inference, run_network
from eebench.latency import (
    LatencyTask,
    accuracy_at_time,
    exit_latency,
    expected_ms,
    forced_exit,
    measure_latency,
    median_interval,
    pinned_threads,
    select_budgets,
    thresholds_of,
)
from eebench.methods import METHODS, TrainContext
from eebench.posthoc import POSTHOC
from models import InputSpec, build_model, select_samples

SPEC = InputSpec(3, 32, 10)
FAMILIES = {
    "msdnet": dict(n_blocks=4, n_channels=4, growth_rate=4),
    "ranet": dict(
        n_blocks=2,
        block_step=1,
        step_mode="lg",
        step=2,
        n_channels=4,
        growth_rate=4,
        scale_list=[1, 2, 3],
        gr_factor=[4, 2, 1],
        bn_factor=[4, 2, 1],
    ),
    "ee_resnet": dict(depth=14, num_exits=2, width=4),
}
MEAN, STD = (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)
BUDGETS = (0, 12, 25, 38)  # rows of the 39 geometric budgets


@pytest.fixture(autouse=True)
def one_thread():
    """These networks are small: one intra-op thread is faster, and immune to a busy machine."""
    with pinned_threads(1):
        yield


def prepared_network(family: str, seed: int = 0) -> nn.Module:
    """A random network with trained-looking BatchNorm statistics, prepared as infer_cell does."""
    torch.manual_seed(seed)
    net = build_model(family, SPEC, **FAMILIES[family])
    for m in net.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.2, 0.2)
            m.running_var.uniform_(0.5, 2.0)
    prepare_for_inference(net, torch.device("cpu"))
    return net


def images(n: int, seed: int) -> torch.Tensor:
    return torch.randint(0, 256, (n, 3, 32, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed))


def prepared(x: torch.Tensor) -> torch.Tensor:
    mean, std = torch.tensor(MEAN)[None, :, None, None], torch.tensor(STD)[None, :, None, None]
    return ((x.float() / 255 - mean) / std).contiguous(memory_format=torch.channels_last)


def simulate(net, x, scorer):
    """The simulated protocol's scores, as the workflow gets them: the cache, then its scoring."""
    cache = run_network(
        net,
        x,
        MEAN,
        STD,
        512,
        torch.device("cpu"),
        channels_last=True,
        with_features=scorer.needs_features,
        transform=scorer.transform,
    )
    return scorer.score_cache(cache)


def val_thresholds(net, scorer, n: int = 120) -> torch.Tensor:
    scored = simulate(net, images(n, seed=1), scorer)
    return exit_thresholds(scored.scores, geometric_exit_distributions(net.num_exits)[1])


@pytest.mark.parametrize("family", list(FAMILIES))
def test_dynamic_equals_simulation_on_every_family_at_batch_1_and_large(family):
    net, scorer = prepared_network(family), MethodScorer()
    thresholds = val_thresholds(net, scorer)
    test = images(40, seed=2)
    sim = simulate(net, test, scorer)
    x = prepared(test)
    left_early = 0
    for b in BUDGETS:
        one = run_dynamic_batches(net, x, thresholds[b], scorer, batch_size=1, record_scores=True)
        big = run_dynamic_batches(net, x, thresholds[b], scorer, batch_size=32, record_scores=True)
        for result in (one, big):
            agreement = compare_with_simulation(result, sim, thresholds[b])
            assert agreement.exact and agreement.ties == 0, agreement.describe()
            assert agreement.max_score_difference < 1e-4
        assert torch.equal(one.exits, big.exits) and torch.equal(one.predictions, big.predictions)
        sim_exits, sim_pred = simulated_exits(sim, thresholds[b])
        assert torch.equal(big.exits, sim_exits) and torch.equal(big.predictions, sim_pred)
        left_early += int((big.exits < net.num_exits - 1).sum())
    assert left_early > 0  # the budgets do exercise early exits


def _method(name: str, net, params: dict | None = None):
    ctx = TrainContext(
        exit_costs=torch.linspace(0.25, 1.0, net.num_exits), num_classes=10, epochs=10, steps_per_epoch=1
    )
    return METHODS.get(name)(net, METHODS.make_params(name, params or {}), ctx)


@pytest.mark.parametrize("name", ["boostnet", "jei_dnn"])
def test_methods_that_change_what_is_scored(name):
    """BoostNet's ensemble of earlier exits (eval_outputs) and JEI-DNN's gates (exit_score
    'gate') are scored exit by exit exactly as the cache is."""
    net = prepared_network("msdnet")
    method = _method(name, net, {"warmup_epochs": 0} if name == "jei_dnn" else None)
    scorer = MethodScorer(method)
    assert scorer.exit_score == ("gate" if name == "jei_dnn" else "max_softmax")
    thresholds = val_thresholds(net, scorer)
    test = images(32, seed=3)
    sim = simulate(net, test, scorer)
    for b in BUDGETS:
        result = run_dynamic_batches(net, prepared(test), thresholds[b], scorer, batch_size=8)
        agreement = compare_with_simulation(result, sim, thresholds[b])
        assert agreement.exact and agreement.ties == 0, agreement.describe()


def _posthoc(name: str, net, flops):
    cls = POSTHOC.get(name)
    method = cls(POSTHOC.make_params(name, cls.test_params), flops, seed=0)
    with_features = {"calibrated_dnn": True, "eenet": False}[name]
    val = run_network(
        net, images(160, seed=4), MEAN, STD, 512, torch.device("cpu"), channels_last=True, with_features=True
    )
    val["labels"] = torch.randint(0, 10, (160,), generator=torch.Generator().manual_seed(5))
    train = dict(val) if with_features else None
    method.fit(val, train)
    return method, val


@pytest.mark.parametrize("name", ["calibrated_dnn", "eenet"])
def test_posthoc_methods_score_exit_by_exit_as_on_the_cache(name):
    net = prepared_network("msdnet")
    flops = [1.0, 2.0, 3.0, 4.0]
    fitted, val = _posthoc(name, net, flops)
    method = POSTHOC.get(name)(fitted.params, flops, seed=0)  # reloaded, as the latency rule does
    method.load_state_dict(fitted.state_dict())
    val_scored = method.score(val)
    distributions = val_scored.exit_distributions
    if distributions is None:
        distributions = geometric_exit_distributions(net.num_exits)[1]
    thresholds = exit_thresholds(val_scored.scores, distributions)
    test = images(32, seed=6)
    sim = simulate(net, test, PosthocScorer(method, 0))
    for row in range(0, len(thresholds), max(1, len(thresholds) // 3)):
        scorer = PosthocScorer(method, row)
        for batch_size in (1, 32):
            result = run_dynamic_batches(net, prepared(test), thresholds[row], scorer, batch_size)
            agreement = compare_with_simulation(result, sim, thresholds[row], budget=row)
            assert agreement.exact, agreement.describe()


def test_the_last_exit_takes_everybody_left():
    net, scorer = prepared_network("ranet"), MethodScorer()
    x = prepared(images(12, seed=7))
    result = run_dynamic(net, x, [math.inf] * net.num_exits, scorer)
    assert result.exits.tolist() == [net.num_exits - 1] * 12
    assert result.samples_per_segment == [12] * net.num_exits
    with torch.no_grad():
        last = net.forward_all(x).logits[-1]
    assert torch.equal(result.predictions, last.argmax(dim=1))


def test_when_all_leave_at_exit_1_no_later_segment_runs(monkeypatch):
    net, scorer = prepared_network("msdnet"), MethodScorer()
    calls: list[tuple[int, int]] = []
    run_segment = net.run_segment

    def counted(k, state):
        calls.append((k, state[-1].shape[0]))
        return run_segment(k, state)

    monkeypatch.setattr(net, "run_segment", counted)
    result = run_dynamic(net, prepared(images(10, seed=8)), forced_exit(0, net.num_exits), scorer)
    assert [k for k, _ in calls] == [0]
    assert result.exits.tolist() == [0] * 10 and result.samples_per_segment == [10, 0, 0, 0]
    calls.clear()  # thresholds that keep some: the later segments see only those
    thresholds = [0.0, math.inf, math.inf, -math.inf]
    scores = torch.tensor([0.3] * 10)
    scores[[2, 5]] = -1.0  # two samples stay
    monkeypatch.setattr(
        scorer, "step", lambda k, head, carry: (scores[: head.logits.shape[0]], head.logits.argmax(1), carry)
    )
    result = run_dynamic(net, prepared(images(10, seed=8)), thresholds, scorer)
    assert result.samples_per_segment == [10, 2, 2, 2] and [k for k, _ in calls] == [0, 1, 2, 3]
    assert all(n == 2 for k, n in calls if k)
    assert result.exits.tolist() == [0, 0, 3, 0, 0, 3, 0, 0, 0, 0]


def test_select_samples_keeps_structure_and_channels_last():
    x = torch.randn(5, 4, 6, 6).contiguous(memory_format=torch.channels_last)
    state = {"h": x, "taps": [[x, x[:, :2]]], "pending": (x,), "none": None}
    kept = select_samples(state, torch.tensor([4, 1]))
    assert kept["none"] is None and isinstance(kept["pending"], tuple)
    assert torch.equal(kept["taps"][0][1], x[[4, 1], :2])
    assert kept["h"].is_contiguous(memory_format=torch.channels_last)


def test_bad_thresholds_and_a_network_without_segments(toy_network):
    net, scorer = prepared_network("msdnet"), MethodScorer()
    x = prepared(images(2, seed=9))
    with pytest.raises(ValueError, match="expected 4 thresholds .* got 3"):
        run_dynamic(net, x, [0.5, 0.5, 0.5], scorer)
    with pytest.raises(ValueError, match="with nan"):
        run_dynamic(net, x, [0.5, float("nan"), 0.5, 0.5], scorer)
    with pytest.raises(NotSegmentedError, match="segmented = False"):
        run_dynamic(toy_network.eval(), torch.randn(3, 12), [0.5, 0.5, 0.5], scorer)
    curve = pd.DataFrame({"budget_id": [1], "threshold_1": [0.5], "threshold_2": [0.5]})
    with pytest.raises(ValueError, match="curve.csv: expected columns budget_id and threshold_1..threshold_4"):
        thresholds_of(curve, 4, "curve.csv")


def test_a_network_without_segments_is_measured_with_the_simulated_protocol(toy_network):
    net = toy_network.eval()
    x = torch.randn(20, 12, generator=torch.Generator().manual_seed(0))
    scorer = MethodScorer()
    with torch.no_grad():
        sim = scorer.score_cache(cache_of(net.forward_all(x), with_features=False))
    thresholds = {1: [0.4, 0.4, -1e8], 2: [0.3, 0.3, -1e8]}
    task = LatencyTask(
        net,
        lambda _row: scorer,
        x,
        torch.zeros(20, dtype=torch.long),
        [1.0, 2.0, 3.0],
        sim,
        thresholds,
        torch.device("cpu"),
    )
    budgets, exits = measure_latency(task, [1, 8], repeats=2, images=4)
    assert set(budgets["execution"]) == {"simulated"} and len(budgets) == 4 and len(exits) == 6


def test_measure_latency_rows_checks_and_model(monkeypatch):
    net, scorer = prepared_network("msdnet"), MethodScorer()
    thresholds = val_thresholds(net, scorer)
    test = images(24, seed=10)
    labels = torch.randint(0, 10, (24,), generator=torch.Generator().manual_seed(11))
    sim = simulate(net, test, scorer)
    flops = [1.0, 2.0, 3.0, 4.0]
    task = LatencyTask(
        net,
        lambda _row: scorer,
        prepared(test),
        labels,
        flops,
        sim,
        {1: thresholds[0].tolist(), 39: thresholds[38].tolist()},
        torch.device("cpu"),
    )
    budgets, exits = measure_latency(task, [1, 16], repeats=3, images=6, threads=1)
    assert len(budgets) == 4 and len(exits) == 8
    assert (budgets["ties"] == 0).all() and set(budgets["execution"]) == {"dynamic"}
    assert budgets["images"].tolist() == [6, 6, 16, 16] and (budgets["threads"] == 1).all()
    assert (budgets["ms_ci_low"] <= budgets["ms_per_image"]).all()
    assert (budgets["ms_per_image"] <= budgets["ms_ci_high"]).all()
    for b, row in zip((0, 38), budgets[budgets["batch_size"] == 16].itertuples()):
        exits_b, predictions = simulated_exits(sim, thresholds[b])
        assert row.accuracy == pytest.approx(float((predictions == labels).double().mean() * 100))
        assert row.flops == pytest.approx(sum(flops[e] for e in exits_b.tolist()) / 24)
        assert row.speedup_flops == pytest.approx(4.0 / row.flops_timed)
    # a disagreement with the simulated protocol fails loudly
    wrong = type(sim)(scores=sim.scores, predictions=(sim.predictions + 1) % 10, probabilities=None)
    task.simulated = wrong
    with pytest.raises(RuntimeError, match="disagrees with the simulated protocol"):
        measure_latency(task, [16], repeats=1, images=6)


def test_median_interval_order_statistics():
    median, low, high, coverage = median_interval([5.0, 1.0, 4.0, 2.0, 3.0])
    assert (median, low, high) == (3.0, 1.0, 5.0) and coverage == pytest.approx(1 - 2 / 32)
    median, low, high, coverage = median_interval([float(v) for v in range(9)])
    assert (low, high) == (1.0, 7.0) and coverage == pytest.approx(1 - 2 * 10 / 512)
    assert median_interval([2.0])[:3] == (2.0, 2.0, 2.0)


def test_budgets_in_milliseconds():
    curve = pd.DataFrame(
        {
            "budget_id": [1, 2, 3],
            "flops": [1.5, 2.0, 3.0],
            "accuracy": [50.0, 60.0, 80.0],
            "exit_fraction_1": [0.5, 0.0, 0.0],
            "exit_fraction_2": [0.5, 1.0, 0.0],
            "exit_fraction_3": [0.0, 0.0, 1.0],
        }
    )
    exit_ms = [1.0, 3.0, 4.0]
    assert expected_ms(curve, exit_ms).tolist() == [2.0, 3.0, 4.0]
    assert accuracy_at_time(curve, exit_ms, 3.5) == pytest.approx(70.0)
    assert math.isnan(accuracy_at_time(curve, exit_ms, 1.0))
    measured = pd.DataFrame({"exit": [2, 1, 3, 1], "batch_size": [1, 1, 1, 8], "ms_per_image": [3.0, 1.0, 4.0, 0.1]})
    assert exit_latency(measured, 1) == exit_ms
    with pytest.raises(ValueError, match="batch size 4; measured: \\[1, 8\\]"):
        exit_latency(measured, 4)


def test_select_budgets_spreads_over_flops():
    curve = pd.DataFrame({"budget_id": range(1, 8), "flops": [1.0, 1.0, 2.0, 3.0, 4.0, 5.0, 6.0]})
    assert select_budgets(curve, 3) == [1, 4, 7]
    assert select_budgets(curve, 10) == [1, 3, 4, 5, 6, 7]  # distinct FLOPs only

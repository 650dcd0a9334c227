"""Bootstrap intervals: coverage on synthetic test sets, paired tests, interpolation within
resamples, agreement with the point metrics, determinism."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from eebench import metrics
from eebench.bootstrap import (
    BootstrapSettings,
    VariantReplicates,
    cell_statistics,
    holm,
    interpolate_rows,
    interval,
    p_value,
    per_sample_record,
    resample_counts,
    resample_indices,
)
from eebench.calibration import accuracy_at_budget, budgeted_curve
from eebench.comparisons import comparisons

SETTINGS = BootstrapSettings(resamples=1000, seed=0, level=0.95)


def bernoulli_record(correct: torch.Tensor) -> dict:
    """A per-sample record whose exits are independent test sets (rows of ``correct``)."""
    k, n = correct.shape
    return {
        "correct": correct,
        "exits": torch.zeros(1, n, dtype=torch.uint8),
        "flops": torch.arange(1, k + 1, dtype=torch.float64),
    }


def random_cell(k: int = 4, n: int = 300, classes: int = 10, seed: int = 0, b: int = 39):
    """A realistic cell: probabilities, labels, val-calibrated exits on test."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, classes, (n,), generator=g)
    logits = torch.randn(k, n, classes, generator=g) * 2
    logits[:, torch.arange(n), labels] += torch.linspace(0.5, 3.0, k)[:, None]
    probs = logits.softmax(-1)
    val = torch.rand(k, 200, generator=g)
    scores, predictions = probs.max(-1)
    correct = predictions == labels[None]
    flops = [1e6 * (i + 1) for i in range(k)]
    curve = budgeted_curve(val, scores, correct, flops)
    return per_sample_record(correct, curve.exits, flops, probs, labels), probs, labels, curve


def test_anytime_interval_covers_the_true_accuracy_in_95_percent_of_test_sets():
    # 200 independent test sets of 500 samples with a true accuracy of 80%, one per "exit"
    g = torch.Generator().manual_seed(1)
    correct = torch.rand(200, 500, generator=g) < 0.8
    _, reps = cell_statistics(bernoulli_record(correct), SETTINGS)
    low, high = interval(reps["anytime_accuracy"], SETTINGS.level)
    coverage = float(np.mean((low <= 80.0) & (80.0 <= high)))
    assert 0.92 <= coverage <= 0.98, coverage


def _variants(correct_a: torch.Tensor, correct_b: torch.Tensor, settings=SETTINGS) -> dict:
    return {
        ("d", "a", name): VariantReplicates.build({0: bernoulli_record(c)}, settings)
        for name, c in (("ours", correct_a), ("standard", correct_b))
    }


COMPARE = {
    "figures": {"fig": {"kind": "anytime", "reference": "standard"}},
    "budgets": [],
    "table1": None,
    "labels": {"standard": "Standard", "ours": "Ours"},
}


def test_planted_two_point_difference_is_detected():
    g = torch.Generator().manual_seed(2)
    n = 10_000
    u = torch.rand(n, generator=g)
    v = torch.where(torch.rand(n, generator=g) < 0.7, u, torch.rand(n, generator=g))  # correlated variants
    table = comparisons(_variants((u < 0.80)[None], (v < 0.78)[None]), COMPARE)
    row = table.iloc[0]
    assert row["variant"] == "ours" and row["reference"] == "standard" and row["n_test"] == n
    assert row["p_value"] < 0.01 and row["ci_low"] > 0
    observed = float((u < 0.8).double().mean()) - float((v < 0.78).double().mean())
    assert row["difference"] == pytest.approx(100 * observed)


def test_equal_variants_give_an_interval_containing_zero_95_percent_of_the_time():
    # 200 repetitions at once: each "exit" is an independent pair of test-set outcomes
    g = torch.Generator().manual_seed(3)
    u = torch.rand(200, 2000, generator=g)
    v = torch.where(torch.rand(200, 2000, generator=g) < 0.5, u, torch.rand(200, 2000, generator=g))
    table = comparisons(_variants(u < 0.75, v < 0.75), COMPARE)
    assert len(table) == 200
    contains = float(((table["ci_low"] <= 0) & (table["ci_high"] >= 0)).mean())
    assert 0.92 <= contains <= 0.98, contains
    assert ((table["p_value"] >= 0.05) == ((table["ci_low"] < 0) & (table["ci_high"] > 0))).mean() > 0.97


def test_identical_variants_differ_by_zero_in_every_resample():
    correct = torch.rand(1, 400, generator=torch.Generator().manual_seed(4)) < 0.6
    row = comparisons(_variants(correct, correct.clone()), COMPARE).iloc[0]
    assert (row["difference"], row["ci_low"], row["ci_high"], row["p_value"]) == (0.0, 0.0, 0.0, 1.0)


def test_interval_of_an_interpolated_budget_on_a_hand_made_curve():
    # two exits (1 and 3 MFLOPs), two budgets: everybody leaves at exit 1 / everybody at exit 2.
    # Exit 1 is right on samples 0 and 1 of 4, exit 2 on all: in resample r the budgeted curve is
    # (1 MFLOPs, a_r) and (3 MFLOPs, 100), so at 2 MFLOPs it reads (a_r + 100) / 2 exactly.
    record = {
        "correct": torch.tensor([[True, True, False, False], [True, True, True, True]]),
        "exits": torch.tensor([[0, 0, 0, 0], [1, 1, 1, 1]], dtype=torch.uint8),
        "flops": torch.tensor([1e6, 3e6], dtype=torch.float64),
    }
    variant = VariantReplicates.build({0: record}, SETTINGS)
    point, reps = variant.at_budgets([2e6, 1e6, 0.5e6])
    a_r = variant.replicates["anytime_accuracy"][0][:, 0]
    assert point[:2].tolist() == [75.0, 50.0] and np.isnan(point[2])
    np.testing.assert_array_equal(reps[:, 0], (a_r + 100) / 2)
    np.testing.assert_array_equal(reps[:, 1], a_r)
    low, high = interval(reps, 0.95)
    a_low, a_high = interval(a_r[:, None], 0.95)
    assert (low[0], high[0]) == ((a_low[0] + 100) / 2, (a_high[0] + 100) / 2)
    assert low[0] < 75 < high[0] and np.isnan(low[2])
    # the resampled counts of samples 0-1 decide a_r: check one resample by hand
    idx = resample_indices(4, 7, SETTINGS.seed)
    assert a_r[7] == 100 * np.isin(idx, [0, 1]).mean()


def test_vectorised_interpolation_is_accuracy_at_budget_row_by_row():
    rng = np.random.default_rng(0)
    x = np.round(rng.uniform(1, 5, (50, 12)), 1)  # rounded: ties within rows
    y = rng.uniform(0, 100, (50, 12))
    at = np.array([0.5, 1.0, 1.7, 2.5, 3.33, 5.0, 6.0])
    got = interpolate_rows(x, y, at)
    want = np.array([[accuracy_at_budget(x[r], y[r], a) for a in at] for r in range(50)])
    np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-12)
    assert np.array_equal(np.isnan(got), np.isnan(want))
    # a hand-made curve with a tie: points (1, 10), (2, 20), (2, 30), (4, 45)
    hand = interpolate_rows(
        np.array([[4.0, 2.0, 1.0, 2.0]]), np.array([[45.0, 20.0, 10.0, 30.0]]), np.array([1.5, 2.0, 3.0, 4.5])
    )
    np.testing.assert_allclose(hand[0, :3], [17.5, 25.0, 35.0])
    assert np.isnan(hand[0, 3])


def test_point_values_are_the_metrics_and_resamples_are_the_metrics_of_resampled_data():
    record, probs, labels, curve = random_cell()
    settings = BootstrapSettings(resamples=20, seed=5)
    point, reps = cell_statistics(record, settings)
    k = probs.shape[0]
    for e in range(k):
        assert point["anytime_nll"][e] == pytest.approx(metrics.nll(probs[e], labels), rel=1e-12)
        assert point["anytime_ece"][e] == pytest.approx(metrics.ece(probs[e], labels, n_bins=15), rel=1e-9, abs=1e-12)
        assert point["anytime_top5"][e] == pytest.approx(100 * metrics.top5(probs[e], labels))
    np.testing.assert_array_equal(point["budgeted_accuracy"], curve.accuracy)
    np.testing.assert_allclose(point["budgeted_flops"], curve.flops, rtol=1e-12)
    for r in (0, 13):  # resample r, recomputed from its indices with the point functions
        idx = torch.from_numpy(resample_indices(probs.shape[1], r, settings.seed))
        for e in range(k):
            assert reps["anytime_nll"][r, e] == pytest.approx(metrics.nll(probs[e, idx], labels[idx]), rel=1e-10)
            assert reps["anytime_ece"][r, e] == pytest.approx(metrics.ece(probs[e, idx], labels[idx], 15), abs=1e-10)
            assert reps["anytime_accuracy"][r, e] == pytest.approx(100 * metrics.top1(probs[e, idx], labels[idx]))
        chosen = record["correct"].gather(0, record["exits"].long())[:, idx]
        np.testing.assert_allclose(reps["budgeted_accuracy"][r], chosen.double().mean(1).numpy() * 100)
        paid = record["flops"][record["exits"].long()][:, idx].mean(1)
        np.testing.assert_allclose(reps["budgeted_flops"][r], paid.numpy(), rtol=1e-12)


def test_same_seed_gives_bit_identical_intervals_and_resamples_do_not_depend_on_their_count():
    record, *_ = random_cell(seed=1)
    a = cell_statistics(record, BootstrapSettings(resamples=300, seed=3))[1]
    b = cell_statistics(record, BootstrapSettings(resamples=300, seed=3))[1]
    c = cell_statistics(record, BootstrapSettings(resamples=300, seed=4))[1]
    first = cell_statistics(record, BootstrapSettings(resamples=50, seed=3))[1]
    for key in a:
        assert a[key].tobytes() == b[key].tobytes(), key
        # the first 50 resamples are the same resamples; sums over other block shapes round alike
        # for the counts, and to the last bits for NLL, ECE and FLOPs
        np.testing.assert_allclose(a[key][:50], first[key], rtol=1e-12, atol=0)
        if key in ("anytime_accuracy", "anytime_top5", "budgeted_accuracy"):
            assert a[key][:50].tobytes() == first[key].tobytes(), key
    assert not np.array_equal(a["anytime_accuracy"], c["anytime_accuracy"])
    counts = resample_counts(300, range(3), seed=3)
    assert counts.sum(1).tolist() == [300.0] * 3


def test_seeds_are_resampled_with_the_same_test_resample():
    records = {s: random_cell(seed=s)[0] for s in (0, 1, 2)}
    variant = VariantReplicates.build(records, SETTINGS)
    assert variant.draws.shape == (1000, 3) and variant.interval_kind == "test-set x seed bootstrap"
    per_seed = variant.replicates["anytime_accuracy"]  # (S, R, K)
    point, reps = variant.mean("anytime_accuracy")
    r = 17
    np.testing.assert_allclose(reps[r], per_seed[variant.draws[r], r].mean(axis=0))
    np.testing.assert_allclose(point, variant.points["anytime_accuracy"].mean(axis=0))
    single = VariantReplicates.build({0: records[0]}, SETTINGS)
    np.testing.assert_array_equal(single.mean("anytime_accuracy")[1], per_seed[0])  # one seed: the cell's own
    # seeds far apart (training noise) widen the interval beyond the test-set bootstrap of one seed
    shifted = {
        s: {**records[0], "correct": records[0]["correct"] if s == 0 else torch.ones_like(records[0]["correct"])}
        for s in (0, 1)
    }
    wide = VariantReplicates.build(shifted, SETTINGS)
    low, high = interval(wide.mean("anytime_accuracy")[1], 0.95)
    s_low, s_high = interval(single.mean("anytime_accuracy")[1], 0.95)
    assert ((high - low) > 3 * (s_high - s_low)).all()


def test_p_value_and_holm_on_hand_cases():
    d = np.array([[-1.0], [0.0], [1.0], [2.0], [3.0]])  # 2 of 5 at or below 0, 4 at or above
    assert p_value(d)[0] == pytest.approx(2 * 3 / 6)
    assert p_value(np.ones((999, 1)))[0] == pytest.approx(2 / 1000)
    assert np.isnan(p_value(np.array([[np.nan], [1.0]]))[0])
    np.testing.assert_allclose(holm(np.array([0.01, 0.04, np.nan, 0.03])), [0.03, 0.06, np.nan, 0.06])


def test_budgeted_cli_adds_interval_columns(tmp_path):
    import json

    import pandas as pd

    from eebench import cli, io

    g = torch.Generator().manual_seed(6)
    for part, n in (("val", 200), ("test", 300)):
        labels = torch.randint(0, 10, (n,), generator=g)
        logits = torch.randn(3, n, 10, generator=g)
        logits[:, torch.arange(n), labels] += torch.tensor([0.5, 1.5, 3.0])[:, None]
        io.save_tensors(tmp_path / f"{part}.pt", {"logits": logits, "labels": labels})
    (tmp_path / "flops.json").write_text(json.dumps({"flops": [1e6, 2e6, 3e6]}))
    common = [
        "budgeted",
        "--val",
        str(tmp_path / "val.pt"),
        "--test",
        str(tmp_path / "test.pt"),
        "--flops",
        str(tmp_path / "flops.json"),
    ]
    cli.main(common + ["--out", str(tmp_path / "plain.csv")])
    cli.main(common + ["--out", str(tmp_path / "ci.csv"), "--bootstrap", "200", "--level", "0.9"])
    plain, with_ci = pd.read_csv(tmp_path / "plain.csv"), pd.read_csv(tmp_path / "ci.csv")
    assert list(with_ci.columns) == list(plain.columns) + [
        "accuracy_ci_low",
        "accuracy_ci_high",
        "flops_ci_low",
        "flops_ci_high",
    ]
    pd.testing.assert_frame_equal(with_ci[plain.columns], plain)
    assert (with_ci["accuracy_ci_low"] <= with_ci["accuracy"]).all()
    assert (with_ci["accuracy"] <= with_ci["accuracy_ci_high"]).all()
    assert (with_ci["accuracy_ci_high"] - with_ci["accuracy_ci_low"]).between(1, 20).all()
    with pytest.raises(SystemExit, match="--level between 0 and 1"):
        cli.main(common + ["--out", str(tmp_path / "x.csv"), "--bootstrap", "10", "--level", "95"])

"""The budgeted-batch protocol: hand-made cases and a plain per-sample loop on random data."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from eebench.calibration import (
    NO_EXIT,
    TAKE_ALL,
    accuracy_at_budget,
    anytime_curve,
    budgeted_curve,
    confidence_exit,
    exit_thresholds,
    geometric_exit_distributions,
)


def loop_thresholds(scores: torch.Tensor, pi: list[float]) -> list[float]:
    """The reference threshold search written as the plain loop it is in adaptive_inference.py."""
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


def loop_evaluate(scores, correct, thresholds, flops):
    num_exits, n = scores.shape
    hits, counts = 0, [0] * num_exits
    for i in range(n):
        for k in range(num_exits):
            if float(scores[k, i]) >= thresholds[k]:
                hits += int(correct[k, i])
                counts[k] += 1
                break
    return hits * 100.0 / n, sum(c / n * f for c, f in zip(counts, flops))


def test_geometric_distributions_are_the_reference_budgets():
    q, pi = geometric_exit_distributions(4)
    assert len(q) == 39 and q[0] == pytest.approx(0.05) and q[-1] == pytest.approx(1.95)
    assert torch.allclose(pi.sum(1), torch.ones(39, dtype=torch.float64))
    assert pi[19].tolist() == pytest.approx([0.25] * 4)  # q = 1: uniform
    assert pi[0, 0] == pytest.approx(0.05 / (0.05 + 0.05**2 + 0.05**3 + 0.05**4))


def test_hand_made_thresholds_and_fractions():
    # 3 exits, 10 samples; exit 1 should take 5 (the 5 highest), exit 2 takes 2 of the rest
    s1 = torch.tensor([0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3, 0.2, 0.1, 0.05])
    s2 = torch.tensor([0.0, 0.0, 0.0, 0.0, 0.0, 0.9, 0.1, 0.8, 0.2, 0.3])
    s3 = torch.zeros(10)
    scores = torch.stack([s1, s2, s3])
    pi = torch.tensor([[0.5, 0.2, 0.3]], dtype=torch.float64)
    t = exit_thresholds(scores, pi)
    assert t[0, 0] == pytest.approx(0.5)
    assert t[0, 1] == pytest.approx(0.8)  # 2nd highest among samples 5..9
    assert t[0, 2] == TAKE_ALL
    correct = torch.ones(3, 10, dtype=torch.bool)
    curve = budgeted_curve(scores, scores, correct, [1.0, 2.0, 4.0], pi)
    assert curve.exit_fractions[0].tolist() == pytest.approx([0.5, 0.2, 0.3])
    assert curve.flops[0] == pytest.approx(0.5 * 1 + 0.2 * 2 + 0.3 * 4)
    assert curve.accuracy[0] == pytest.approx(100.0)


def test_zero_share_and_too_few_remaining_mean_nobody_leaves():
    scores = torch.tensor([[0.9, 0.8, 0.7, 0.6], [0.5, 0.4, 0.3, 0.2], [0.1, 0.1, 0.1, 0.1]])
    # exit 1 wants floor(4*0.1) = 0 samples; exit 2 wants 4 but only 4 remain -> found
    t = exit_thresholds(scores, torch.tensor([[0.1, 1.0, 0.0]], dtype=torch.float64))
    assert t[0, 0] == NO_EXIT
    assert t[0, 1] == pytest.approx(0.2)
    # exit 1 takes 3, exit 2 wants 2 but only 1 remains -> nobody leaves at exit 2
    t = exit_thresholds(scores, torch.tensor([[0.75, 0.5, 0.0]], dtype=torch.float64))
    assert t[0, 0] == pytest.approx(0.7)
    assert t[0, 1] == NO_EXIT


def test_last_exit_takes_the_rest():
    scores = torch.rand(3, 50, generator=torch.Generator().manual_seed(0))
    correct = torch.zeros(3, 50, dtype=torch.bool)
    curve = budgeted_curve(scores, scores, correct, [1.0, 2.0, 3.0])
    assert np.allclose(curve.exit_fractions.sum(1), 1.0)
    assert (curve.thresholds[:, -1] == TAKE_ALL).all()


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_vectorised_equals_plain_loop_on_random_data(seed):
    g = torch.Generator().manual_seed(seed)
    k, n_val, n_test, c = 5, 300, 200, 10
    val = torch.randn(k, n_val, c, generator=g).softmax(-1).max(-1).values
    # quantised scores make ties common, which the loop and the vectorised code must treat alike
    val = (val * 50).round() / 50
    test_probs = torch.randn(k, n_test, c, generator=g).softmax(-1)
    test_scores, pred = test_probs.max(-1)
    labels = torch.randint(0, c, (n_test,), generator=g)
    correct = pred == labels[None]
    flops = [1.0, 2.5, 4.0, 7.0, 9.0]
    curve = budgeted_curve(val, test_scores, correct, flops)
    _, pis = geometric_exit_distributions(k)
    for b in range(39):
        expected_t = loop_thresholds(val, pis[b].tolist())
        assert curve.thresholds[b].tolist() == pytest.approx(expected_t)
        acc, exp_flops = loop_evaluate(test_scores, correct, expected_t, flops)
        assert curve.accuracy[b] == pytest.approx(acc)
        assert curve.flops[b] == pytest.approx(exp_flops)


def test_per_budget_scores_and_distributions():
    g = torch.Generator().manual_seed(3)
    scores = torch.rand(4, 3, 40, generator=g)  # (B, K, N)
    pis = torch.tensor([[0.5, 0.3, 0.2], [0.1, 0.1, 0.8], [0.0, 0.0, 1.0], [0.9, 0.1, 0.0]], dtype=torch.float64)
    t = exit_thresholds(scores, pis)
    for b in range(4):
        assert t[b].tolist() == pytest.approx(loop_thresholds(scores[b], pis[b].tolist()))


def test_anytime_curve():
    correct = torch.tensor([[1, 0, 0, 0], [1, 1, 0, 0], [1, 1, 1, 1]], dtype=torch.bool)
    rows = anytime_curve(correct, [10.0, 20.0, 30.0])
    assert [r["accuracy"] for r in rows] == [25.0, 50.0, 100.0]
    assert [r["flops"] for r in rows] == [10.0, 20.0, 30.0]


def test_accuracy_at_budget_interpolates_linearly():
    flops = np.array([30.0, 10.0, 20.0, 20.0])
    acc = np.array([90.0, 70.0, 78.0, 82.0])  # ties at 20 average to 80
    assert accuracy_at_budget(flops, acc, 15.0) == pytest.approx(75.0)
    assert accuracy_at_budget(flops, acc, 25.0) == pytest.approx(85.0)
    assert accuracy_at_budget(flops, acc, 10.0) == pytest.approx(70.0)
    assert math.isnan(accuracy_at_budget(flops, acc, 5.0))
    assert math.isnan(accuracy_at_budget(flops, acc, 31.0))


def test_confidence_exit_leaves_at_first_confidence_above_half():
    conf = torch.tensor([[0.6, 0.2, 0.5], [0.9, 0.7, 0.1], [0.0, 0.0, 0.0]])
    correct = torch.tensor([[1, 0, 0], [0, 1, 0], [1, 1, 1]], dtype=torch.bool)
    point = confidence_exit(conf, correct, [0.2, 0.5, 1.0])
    # sample 0 leaves at exit 1 (right), sample 1 at exit 2 (right), sample 2 at the last (0.5 is not > 0.5)
    assert point["accuracy"] == pytest.approx(100.0)
    assert point["cost_ratio"] == pytest.approx((0.2 + 0.5 + 1.0) / 3)
    assert point["exit_fractions"] == pytest.approx([1 / 3, 1 / 3, 1 / 3])

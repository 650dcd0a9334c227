"""Metrics on hand-made cases: ECE counts a confidence of exactly 1.0, NLL, top-k."""

from __future__ import annotations

import math

import pytest
import torch

from eebench import metrics


def test_ece_counts_confidence_one():
    # confidences 1.0, 0.95 (bin [0.9, 1]), 0.55 (bin 5), 0.35 (bin 3); correct, wrong, correct, wrong
    probs = torch.tensor(
        [
            [1.0, 0.0, 0.0],
            [0.95, 0.05, 0.0],
            [0.55, 0.25, 0.20],
            [0.35, 0.33, 0.32],
        ]
    )
    labels = torch.tensor([0, 1, 0, 2])
    want = 2 / 4 * abs(0.5 - 0.975) + 1 / 4 * abs(1 - 0.55) + 1 / 4 * abs(0 - 0.35)
    assert metrics.ece(probs, labels) == pytest.approx(want, abs=1e-6)
    # the reference drops the 1.0 sample and renormalises over the 3 it keeps: a different number
    assert want != pytest.approx((0.95 + 0.45 + 0.35) / 3, abs=1e-3)


def test_ece_saturated_float32_softmax():
    probs = torch.tensor([[0.0, 200.0], [0.0, 200.0]]).softmax(dim=1)
    assert float(probs.max()) == 1.0
    assert metrics.ece(probs, torch.tensor([1, 0])) == pytest.approx(0.5)


def test_ece_bin_edges_follow_reference_digitize():
    # np.digitize(conf, np.linspace(0.1, 1, 10)) gives the same bins, except 10 for 1.0 (dropped)
    conf = torch.tensor([0.05, 0.1, 0.5, 0.899, 0.9, 0.95, 1.0], dtype=torch.float64)
    assert metrics.ece_bin_index(conf).tolist() == [0, 1, 5, 8, 9, 9, 9]


def test_nll():
    probs = torch.tensor([[0.5, 0.25, 0.25], [0.1, 0.8, 0.1]])
    labels = torch.tensor([1, 1])
    assert metrics.nll(probs, labels) == pytest.approx(-(math.log(0.25) + math.log(0.8)) / 2)


def test_nll_zero_probability_is_finite():
    assert math.isfinite(metrics.nll(torch.tensor([[1.0, 0.0]]), torch.tensor([1])))


def test_top1_top5():
    probs = torch.tensor(
        [
            [0.30, 0.20, 0.15, 0.12, 0.10, 0.08, 0.05],
            [0.30, 0.20, 0.15, 0.12, 0.10, 0.08, 0.05],
            [0.30, 0.20, 0.15, 0.12, 0.10, 0.08, 0.05],
        ]
    )
    labels = torch.tensor([0, 4, 5])  # ranks 1, 5, 6
    assert metrics.top1(probs, labels) == pytest.approx(1 / 3)
    assert metrics.top5(probs, labels) == pytest.approx(2 / 3)
    assert metrics.topk_accuracy(probs[:, :3], torch.tensor([0, 1, 2]), 5) == 1.0

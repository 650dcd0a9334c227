"""EENet scheduler: inputs, heads and loss by hand, budgets met, label use, determinism."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from eebench.calibration import budgeted_curve
from eebench.posthoc import POSTHOC
from eebench.posthoc.eenet import SchedulerBank, exit_features, reachable_cost_range, scheduler_loss
from eebench.registry import build_params

CLS = POSTHOC.get("eenet")
FLOPS = [1e6, 2e6, 3e6]


class NoLabels(dict):
    def __getitem__(self, key):
        if key == "labels":
            raise AssertionError("labels were read")
        return super().__getitem__(key)

    def get(self, key, default=None):
        if key == "labels":
            raise AssertionError("labels were read")
        return super().get(key, default)


def make_method(seed: int = 0, **params) -> object:
    return CLS(build_params(CLS.Params, {**CLS.test_params, **params}, "test"), FLOPS, seed=seed)


def synthetic(n: int, seed: int, c: int = 5) -> dict:
    """Three exits of rising accuracy; confident predictions are more often right."""
    gen = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, c, (n,), generator=gen)
    logits = torch.randn(3, n, c, generator=gen)
    for k in range(3):
        signal = torch.rand(n, generator=gen) * (1.5 + 1.5 * k)
        logits[k, torch.arange(n), labels] += signal
    return {"logits": logits, "labels": labels}


# --- inputs and heads ----------------------------------------------------------------------------
def test_exit_features_by_hand():
    logits = torch.tensor([[[0.0, 0.0], [0.0, -200.0]]])  # uniform, and one-hot in float32
    feats = exit_features(logits)
    assert feats[0, 0].tolist() == pytest.approx([0.5, 0.5, 0.5, 0.0])  # entropy log 2 -> 1 - 1
    assert feats[0, 1].tolist() == pytest.approx([1.0, 0.0, 1.0, 1.0])  # 0 log 0 = 0, not NaN


def test_heads_use_each_samples_own_inputs():
    bank = SchedulerBank(2, 3, 0.5, seeds=[7])
    p = {k: v.detach()[0] for k, v in bank.params.items()}
    logits = torch.randn(2, 4, 3)
    feats = exit_features(logits)
    raw, clamped, r = (t[0] for t in bank.forward(feats))
    for n in range(4):
        x0 = feats[0, n]
        s0 = float(p["a"][0] @ x0)
        s1 = float(p["a"][1] @ feats[1, n] + p["b"][1, 0] * min(max(s0, 0.0), 1.0))
        assert raw[0, n].item() == pytest.approx(s0, abs=1e-6)
        assert raw[1, n].item() == pytest.approx(s1, abs=1e-6)
        assert clamped[1, n].item() == pytest.approx(min(max(s1, 0.0), 1.0), abs=1e-6)
        # assignment heads: in 5 -> floor(2.5) = 2 hidden units; in 6 -> 3
        x1 = torch.cat([feats[1, n], torch.tensor([min(max(s0, 0.0), 1.0)])])
        for k, x, h in ((0, x0, 2), (1, x1, 3)):
            hid = torch.sigmoid(p["w1"][k, :h, : len(x)] @ x + p["c1"][k, :h])
            want = torch.sigmoid(p["w2"][k, :h] @ hid + p["c2"][k])
            assert r[k, n].item() == pytest.approx(float(want), abs=1e-6)


def test_reachable_cost_range_matches_brute_force():
    costs = torch.tensor(FLOPS)
    values = []
    for r in itertools.product([0.0, 1.0], repeat=3):
        q = torch.tensor(r).softmax(0)
        values.append(float(q @ costs))
    low, high = reachable_cost_range(costs)
    assert low == pytest.approx(min(values)) and high == pytest.approx(max(values))


# --- loss ----------------------------------------------------------------------------------------
def test_loss_by_hand():
    scores = torch.tensor([[[0.9, 0.2, 0.6], [0.5, 0.7, 0.1]]])  # (M=1, K=2, n=3)
    r = torch.tensor([[[0.8, 0.3, 0.5], [0.1, 0.6, 0.9]]])
    correct = torch.tensor([[1.0, 0.0, 1.0], [0.0, 1.0, 1.0]])
    costs, budget = [2.0, 5.0], 3.0
    terms = scheduler_loss(scores, r, correct, torch.tensor(costs), torch.tensor([budget]))

    q = [[math.exp(r[0, k, n]) / sum(math.exp(r[0, j, n]) for j in range(2)) for k in range(2)] for n in range(3)]
    bce = 0.0
    for k in range(2):
        total_q = sum(q[n][k] for n in range(3))
        for n in range(3):
            s, y = float(scores[0, k, n]), float(correct[k, n])
            bce += q[n][k] / total_q * -(y * math.log(s) + (1 - y) * math.log(1 - s))
    bce /= 2
    kl = 0.0
    for n in range(3):
        z = sum(float(scores[0, j, n]) for j in range(2))
        for k in range(2):
            t = float(scores[0, k, n]) / z
            kl += t * (math.log(t) - math.log(q[n][k]))
    kl /= 6  # nn.KLDivLoss() default: mean over all elements
    expected = sum(sum(q[n][k] * costs[k] for k in range(2)) for n in range(3)) / 3
    assert terms.bce.item() == pytest.approx(bce, rel=1e-5)
    assert terms.kl.item() == pytest.approx(kl, rel=1e-5)
    assert terms.cost.item() == pytest.approx(abs(expected - budget) / budget, rel=1e-5)


def test_all_zero_scores_give_a_finite_kl():
    terms = scheduler_loss(
        torch.zeros(1, 2, 3), torch.zeros(1, 2, 3), torch.zeros(2, 3), torch.tensor([1.0, 2.0]), torch.tensor([1.5])
    )
    assert torch.isfinite(terms.kl).all() and torch.isfinite(terms.bce).all()


# --- fitting -------------------------------------------------------------------------------------
def threshold_rule_cost(scores: torch.Tensor, pi: torch.Tensor) -> float:
    """Expected FLOPs with n_k = floor(pi_k N) top remaining samples leaving at k, the last the rest."""
    n = scores.shape[1]
    remaining = set(range(n))
    exits = {}
    for k in range(len(pi) - 1):
        count = math.floor(float(pi[k]) * n)
        ranked = sorted(remaining, key=lambda i: -float(scores[k, i]))[:count]
        for i in ranked:
            exits[i] = k
        remaining -= set(ranked)
    for i in remaining:
        exits[i] = len(pi) - 1
    return sum(FLOPS[k] for k in exits.values()) / n


@pytest.fixture(scope="module")
def fitted():
    val, test = synthetic(1200, 0), synthetic(600, 1)
    m = make_method(budgets=[1.8e6, 2.3e6])
    m.fit(val)
    return m, val, test


def test_fitted_scheduler_meets_its_budgets(fitted):
    m, val, _ = fitted
    out = m.score(val)
    assert out.scores.shape == (2, 3, 1200) and out.predictions.shape == (3, 1200)
    assert out.exit_distributions.shape == (2, 3)
    torch.testing.assert_close(out.exit_distributions.sum(1), torch.ones(2, dtype=torch.float64))
    for b, budget in enumerate(out.budget_targets.tolist()):
        cost = threshold_rule_cost(out.scores[b], out.exit_distributions[b])
        assert abs(cost - budget) / budget < 0.1, (b, cost, budget)


def test_outputs_feed_the_calibration(fitted):
    m, val, test = fitted
    sv, st = m.score(val), m.score(test)
    curve = budgeted_curve(sv.scores, st.scores, st.predictions == test["labels"][None], FLOPS, sv.exit_distributions)
    assert curve.flops.shape == (2,) and (curve.flops >= FLOPS[0]).all()


def test_fit_and_score_never_read_test_labels(fitted):
    m, _, test = fitted
    unlabelled = NoLabels({"logits": test["logits"]})
    assert m.score(unlabelled).scores.shape == (2, 3, 600)
    fresh = make_method(budgets=[2.0e6], epochs=3)
    fresh.fit(synthetic(300, 2), train=NoLabels({}))


def test_fit_is_deterministic_and_budgets_are_independent():
    val = synthetic(400, 3)
    one = make_method(seed=5, budgets=[2.0e6], epochs=15, trials=2)
    two = make_method(seed=5, budgets=[2.0e6, 2.5e6], epochs=15, trials=2)
    one.fit(val)
    two.fit(val)
    torch.testing.assert_close(one.score(val).scores[0], two.score(val).scores[0], atol=1e-5, rtol=0)
    again = make_method(seed=5, budgets=[2.0e6], epochs=15, trials=2)
    again.fit(val)
    assert torch.equal(one.score(val).scores, again.score(val).scores)


def test_default_budgets_lie_inside_the_reachable_range():
    m = CLS(build_params(CLS.Params, {}, "x"), FLOPS, seed=0)
    low, high = reachable_cost_range(torch.tensor(FLOPS))
    assert len(m.budgets) == 8 and low < float(m.budgets.min()) and float(m.budgets.max()) < high


def test_params_validation():
    with pytest.raises(ValueError):
        build_params(CLS.Params, {"budgets": []}, "x")
    with pytest.raises(ValueError):
        build_params(CLS.Params, {"trials": 0}, "x")

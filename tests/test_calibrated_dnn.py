"""Calibrated-DNN: KFAC factors against hand loops, the predictive's limits, MIE, tuning, label use."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from eebench import metrics
from eebench.posthoc import POSTHOC
from eebench.posthoc.calibrated_dnn import ensemble, kfac_factors, running_average_weights, select_grid
from eebench.registry import build_params

CLS = POSTHOC.get("calibrated_dnn")


class NoLabels(dict):
    """A cache whose labels must not be read."""

    def __getitem__(self, key):
        if key == "labels":
            raise AssertionError("labels were read")
        return super().__getitem__(key)

    def get(self, key, default=None):
        if key == "labels":
            raise AssertionError("labels were read")
        return super().get(key, default)


def make_method(flops: list[float], seed: int = 0, **params) -> object:
    return CLS(build_params(CLS.Params, {**CLS.test_params, **params}, "test"), flops, seed=seed)


def linear_cache(n: int, weights: list[torch.Tensor], gen: torch.Generator, sharpen: float = 1.0) -> dict:
    """Exits k: features (n, d), logits = W_k [phi; 1]; labels drawn from softmax(logits / sharpen)."""
    d = weights[0].shape[1] - 1
    feats = [torch.randn(n, d, generator=gen) for _ in weights]
    logits = torch.stack([torch.cat([f, torch.ones(n, 1)], 1) @ w.T for f, w in zip(feats, weights)])
    labels = torch.multinomial((logits[-1] / sharpen).softmax(-1), 1, generator=gen)[:, 0]
    return {"logits": logits.float(), "labels": labels, "features": feats}


# --- KFAC factors --------------------------------------------------------------------------------
def hand_factors(logits: np.ndarray, feats: np.ndarray, batch: int, sampled: np.ndarray | None):
    """The reference's loop: per-batch means of the loss Hessian factor and phi~ phi~^T, running average."""
    n, c = logits.shape
    u_run, v_run = np.zeros((c, c)), np.zeros((feats.shape[1] + 1,) * 2)
    for i, start in enumerate(range(0, n, batch)):
        u_b, v_b = np.zeros_like(u_run), np.zeros_like(v_run)
        rows = range(start, min(n, start + batch))
        for r in rows:
            e = np.exp(logits[r] - logits[r].max())
            p = e / e.sum()
            if sampled is None:
                h = np.diag(p) - np.outer(p, p)
            else:
                g = p.copy()
                g[sampled[r]] -= 1
                h = np.outer(g, g)
            phi = np.append(feats[r], 1.0)
            u_b += h / len(rows)
            v_b += np.outer(phi, phi) / len(rows)
        rho = min(1 - 1 / (i + 1), 0.95)
        u_run, v_run = rho * u_run + (1 - rho) * u_b, rho * v_run + (1 - rho) * v_b
    return u_run, v_run


def test_running_average_weights_match_the_recursion():
    w = running_average_weights(7, 3)  # batches of 3, 3, 1
    # rho = 0, 1/2, 2/3: batch weights (1)(1/2)(2/3), (1/2)(2/3), 1/3
    want = [1 / 3 / 3] * 3 + [1 / 3 / 3] * 3 + [1 / 3]
    assert w.tolist() == pytest.approx(want)
    assert float(w.sum()) == pytest.approx(1.0)
    # 30 batches of one: past batch 20 rho is capped at 0.95, so the last batch weighs 0.05
    run = np.zeros(30)
    for i in range(30):
        rho = min(1 - 1 / (i + 1), 0.95)
        run = rho * run + (1 - rho) * np.eye(30)[i]
    np.testing.assert_allclose(running_average_weights(30, 1).numpy(), run, atol=1e-12)
    assert run[-1] == pytest.approx(0.05)


@pytest.mark.parametrize("batch", [8, 3])
def test_exact_curvature_factors_equal_hand_computation(batch):
    gen = torch.Generator().manual_seed(0)
    logits, feats = torch.randn(8, 3, generator=gen) * 2, torch.randn(8, 2, generator=gen)
    u, v = kfac_factors(logits, feats, batch, "kflr")
    hu, hv = hand_factors(logits.double().numpy(), feats.double().numpy(), batch, None)
    np.testing.assert_allclose(u.numpy(), hu, atol=1e-12)
    np.testing.assert_allclose(v.numpy(), hv, atol=1e-12)


def test_mc_kfac_uses_one_sampled_label_per_sample():
    logits, feats = torch.randn(5, 3) * 2, torch.randn(5, 2)
    u, v = kfac_factors(logits, feats, 2, "kfac", torch.Generator().manual_seed(3))
    sampled = torch.multinomial(logits.double().softmax(1), 1, generator=torch.Generator().manual_seed(3))[:, 0]
    hu, hv = hand_factors(logits.double().numpy(), feats.double().numpy(), 2, sampled.numpy())
    np.testing.assert_allclose(u.numpy(), hu, atol=1e-12)
    np.testing.assert_allclose(v.numpy(), hv, atol=1e-12)


def test_mc_kfac_is_unbiased_for_the_exact_factor():
    # one batch of 20000 copies of two samples: the mean of g g^T over the draws -> diag(p) - p p^T
    logits, feats = torch.tensor([[2.0, 0.0, -1.0], [0.5, 0.5, 0.0]]), torch.randn(2, 2)
    reps = 10000
    mc = kfac_factors(
        logits.repeat(reps, 1), feats.repeat(reps, 1), 2 * reps, "kfac", torch.Generator().manual_seed(0)
    )[0]
    exact = kfac_factors(logits, feats, 2, "kflr")[0]
    np.testing.assert_allclose(mc.numpy(), exact.numpy(), atol=0.01)


def test_fit_scales_factors_by_sqrt_of_training_size():
    gen = torch.Generator().manual_seed(0)
    train = linear_cache(10, [torch.randn(3, 3, generator=gen)], gen)
    m = make_method([1.0], curvature="kflr", shuffle=False, batch_size=4)
    m.fit_factors(train)
    hu, hv = hand_factors(train["logits"][0].double().numpy(), train["features"][0].double().numpy(), 4, None)
    np.testing.assert_allclose(m.u[0].numpy(), math.sqrt(10) * hu, atol=1e-10)
    np.testing.assert_allclose(m.v[0].numpy(), math.sqrt(10) * hv, atol=1e-10)
    m_ref = make_method([1.0], curvature="kflr", shuffle=False, batch_size=4, n_data=40)
    m_ref.fit_factors(train)
    np.testing.assert_allclose(m_ref.u[0].numpy(), 2 * m.u[0].numpy(), atol=1e-10)


def test_subsampled_training_cache_is_scaled_by_the_whole_split():
    """train_cache_samples keeps a subsample of the training split; sqrt(N) is of the whole split."""
    gen = torch.Generator().manual_seed(0)
    train = linear_cache(10, [torch.randn(3, 3, generator=gen)], gen)
    whole = make_method([1.0], curvature="kflr", shuffle=False, batch_size=4)
    whole.fit_factors(train)
    subsampled = make_method([1.0], curvature="kflr", shuffle=False, batch_size=4)
    subsampled.fit_factors({**train, "split_size": 90})
    np.testing.assert_allclose(subsampled.u[0].numpy(), 3 * whole.u[0].numpy(), atol=1e-10)


# --- predictive and MIE --------------------------------------------------------------------------
def toy_problem(seed: int = 0, k: int = 2, c: int = 3, d: int = 2, sharpen: float = 1.0):
    gen = torch.Generator().manual_seed(seed)
    weights = [torch.randn(c, d + 1, generator=gen) * 2 for _ in range(k)]
    return (linear_cache(200, weights, gen), linear_cache(300, weights, gen, sharpen), linear_cache(100, weights, gen))


def test_strong_prior_gives_the_map_softmax():
    train, val, test = toy_problem()
    m = make_method([1.0, 3.0], optimize=False, var0=1e-12, temperature=1.0, mie=False)
    m.fit(val, train)
    out = m.score(test)
    torch.testing.assert_close(out.probabilities, test["logits"].softmax(-1), atol=1e-5, rtol=0)
    assert torch.equal(out.scores, out.probabilities.max(-1).values)
    assert torch.equal(out.predictions, out.probabilities.argmax(-1))


def test_weak_prior_spreads_the_predictive():
    train, val, test = toy_problem()
    m = make_method([1.0, 3.0], optimize=False, var0=1e6, mie=False)
    m.fit(val, train)
    assert float(m.score(test).scores.mean()) < float(test["logits"].softmax(-1).max(-1).values.mean())


def test_mie_mixes_exits_with_flops_weights():
    train, val, test = toy_problem()
    m = make_method([1.0, 3.0], optimize=False, var0=1e-12, temperature=1.0, mie=True)
    m.fit(val, train)
    p = test["logits"].softmax(-1)
    out = m.score(test).probabilities
    torch.testing.assert_close(out[0], p[0], atol=1e-5, rtol=0)
    torch.testing.assert_close(out[1], (1 / 3 * p[0] + 1 * p[1]) / (4 / 3), atol=1e-5, rtol=0)
    torch.testing.assert_close(out.sum(-1), torch.ones(2, 100), atol=1e-5, rtol=0)


def test_ensemble_by_hand():
    p = torch.tensor([[[0.2, 0.8]], [[0.6, 0.4]], [[1.0, 0.0]]])
    out = ensemble(p, torch.tensor([0.25, 0.5, 1.0]))
    torch.testing.assert_close(out[1, 0], torch.tensor([(0.05 + 0.3) / 0.75, (0.2 + 0.2) / 0.75]))
    torch.testing.assert_close(out[2, 0], torch.tensor([(0.05 + 0.3 + 1.0) / 1.75, (0.2 + 0.2) / 1.75]))


# --- tuning --------------------------------------------------------------------------------------
def test_select_grid_per_exit_and_sequential():
    # 2 exits, 2 temperatures x 1 var0, 2 samples: probability of the true label
    table = torch.tensor(
        [
            [[[0.9, 0.9]], [[0.5, 0.5]]],  # exit 1 alone prefers T index 0
            [[[0.2, 0.2]], [[0.3, 0.3]]],  # exit 2 alone prefers T index 1
        ]
    )
    assert select_grid(table, torch.tensor([1.0, 1.0]), mie=False) == [(0, 0), (1, 0)]
    # with MIE, exit 2 is judged on (0.9 + p) / 2: still index 1 (0.6 > 0.55)
    assert select_grid(table, torch.tensor([1.0, 1.0]), mie=True) == [(0, 0), (1, 0)]
    # ties: the first grid point in temperature-major order
    assert select_grid(torch.full((1, 2, 2, 3), 0.5), torch.tensor([1.0]), mie=False) == [(0, 0)]


def _val_nll(m, val: dict) -> list[float]:
    probs = m.score(val).probabilities
    return [metrics.nll(probs[k], val["labels"]) for k in range(len(probs))]


@pytest.mark.parametrize("mie", [False, True])
def test_tuning_picks_lowest_val_nll(mie):
    # labels drawn from softmax(logits / 2): the MAP logits are overconfident, T near 2 fits best
    train, val, _ = toy_problem(seed=1, sharpen=2.0)
    temps, var0s = [0.5, 1.0, 2.0], [1e-3, 3.0]
    m = make_method([1.0, 2.0], temperature_grid=temps, var0_grid=var0s, mie=mie)
    m.fit(val, train)
    other = make_method([1.0, 2.0], temperature_grid=temps, var0_grid=var0s, mie=mie)
    other.fit_factors(train)
    other.z = m.z
    nll = {}
    for t in temps:
        for v in var0s:
            if mie:  # exit 2 judged on the ensemble, exit 1 fixed at its chosen point
                other.temperatures, other.var0s = [m.temperatures[0], t], [m.var0s[0], v]
            else:
                other.temperatures, other.var0s = [t, t], [v, v]
            nll[t, v] = _val_nll(other, val)
    for k in range(2):
        best = min(nll, key=lambda key: nll[key][k])
        if not mie or k == 1:
            assert (m.temperatures[k], m.var0s[k]) == best
    assert m.temperatures[-1] == 2.0


# --- label use and state -------------------------------------------------------------------------
def test_fit_and_score_never_read_train_or_test_labels():
    train, val, test = toy_problem()
    m = make_method([1.0, 2.0])
    m.fit(val, NoLabels(train))
    unlabelled = {k: v for k, v in test.items() if k != "labels"}
    out = m.score(NoLabels(unlabelled))
    assert out.scores.shape == (2, 100)
    state = m.state_dict()
    assert len(state["temperatures"]) == 2 and len(state["kfac_u"]) == 2
    assert state["kfac_v"][0].shape == (3, 3)


def test_needs_train_split_and_is_deterministic():
    train, val, test = toy_problem()
    with pytest.raises(ValueError, match="training-split"):
        make_method([1.0, 2.0]).fit(val, None)
    a, b = make_method([1.0, 2.0], seed=4), make_method([1.0, 2.0], seed=4)
    a.fit(val, train)
    b.fit(val, train)
    assert torch.equal(a.score(test).probabilities, b.score(test).probabilities)


def test_params_validation():
    with pytest.raises(ValueError):
        build_params(CLS.Params, {"var0_grid": []}, "x")
    with pytest.raises(ValueError):
        build_params(CLS.Params, {"curvature": "diag"}, "x")

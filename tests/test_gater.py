"""The budget-aware gater: losses against hand computations, what each step updates, params."""

from __future__ import annotations

import copy
import io
import itertools
import math

import pytest
import torch
from torch import nn

from eebench.methods import METHODS, TrainContext
from eebench.methods.gater import FEATURES, Gater, GaterParams
from models import ExitOutputs, MultiExitNetwork

# --- a hand-made case: 2 samples, 3 exits, 3 classes ------------------------------------------
LOGITS = [  # LOGITS[k][i]: exit k, sample i
    [[2.0, 0.5, -1.0], [0.0, 0.3, 0.1]],
    [[1.0, 1.5, 0.0], [-0.5, 2.0, 0.4]],
    [[0.2, 0.1, 3.0], [1.2, -0.3, 0.8]],
]
TARGETS = [0, 2]
COSTS = [0.25, 0.6, 1.0]
LAM, TEMP = 0.5, 0.5
W1 = [[1.0, -0.5], [0.3, 2.0]]  # gater MLP on (confidence, entropy), hidden 2
B1 = [0.1, -0.2]
W2 = [[1.5, -0.7]]
B2 = [0.05]


def softmax(v: list[float]) -> list[float]:
    m = max(v)
    e = [math.exp(x - m) for x in v]
    return [x / sum(e) for x in e]


def hand_features(v: list[float]) -> dict[str, float]:
    p = sorted(softmax(v), reverse=True)
    return {"confidence": p[0], "margin": p[0] - p[1], "entropy": sum(q * math.log(q) for q in p)}


def hand_mlp(s: list[float], w1, b1, w2, b2) -> float:
    h = [max(0.0, sum(w * x for w, x in zip(row, s)) + b) for row, b in zip(w1, b1)]
    return sum(w * x for w, x in zip(w2[0], h)) + b2[0]


def hand_losses(logits=LOGITS, w1=W1, b1=B1, w2=W2, b2=B2) -> tuple[float, float]:
    """Inner and outer loss of eq. 10, in plain Python."""
    inner = outer = 0.0
    for i, y in enumerate(TARGETS):
        sig = lambda z: 1 / (1 + math.exp(-z))  # noqa: E731
        P = []
        for k in range(2):
            f = hand_features(logits[k][i])
            P.append(sig(hand_mlp([f["confidence"], f["entropy"]], w1, b1, w2, b2)))
        pr = [P[0], P[1] * (1 - P[0]), (1 - P[0]) * (1 - P[1])]
        powered = [x ** (1 / TEMP) for x in pr]
        A = [x / sum(powered) for x in powered]
        for k in range(3):
            ce = -math.log(softmax(logits[k][i])[y])
            inner += (A[k] + 1) * (ce + LAM * COSTS[k])
            outer += A[k] * (ce + LAM * COSTS[k])
    return inner / 2, outer / 2


def make_ctx(costs, epochs: int = 2, steps_per_epoch: int = 10) -> TrainContext:
    return TrainContext(exit_costs=torch.tensor(costs), num_classes=4, epochs=epochs, steps_per_epoch=steps_per_epoch)


def make_gater(model: MultiExitNetwork, costs=(1 / 3, 2 / 3, 1.0), **params) -> Gater:
    merged = {**Gater.test_params, **params}
    return Gater(model, METHODS.make_params("gater", merged), make_ctx(list(costs)))


def hand_gater(toy_network) -> Gater:
    g = make_gater(toy_network, costs=COSTS, features=["confidence", "entropy"], hidden=2, lam=LAM, temperature=TEMP)
    with torch.no_grad():
        g.mlp[0].weight.copy_(torch.tensor(W1))
        g.mlp[0].bias.copy_(torch.tensor(B1))
        g.mlp[2].weight.copy_(torch.tensor(W2))
        g.mlp[2].bias.copy_(torch.tensor(B2))
    return g


def hand_outputs() -> ExitOutputs:
    return ExitOutputs([torch.tensor(z, requires_grad=True) for z in LOGITS])


def snapshot(module: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# --- losses ------------------------------------------------------------------------------------


def test_losses_match_hand_computation(toy_network):
    inner, outer = hand_gater(toy_network).losses(hand_outputs(), torch.tensor(TARGETS))
    want_inner, want_outer = hand_losses()
    assert inner.item() == pytest.approx(want_inner, rel=1e-5)
    assert outer.item() == pytest.approx(want_outer, rel=1e-5)


def test_exit_weights_sum_to_one_and_follow_eq5(toy_network):
    g = hand_gater(toy_network)
    scores = g.scores(hand_outputs())
    P = torch.sigmoid(g.mlp(scores).squeeze(-1))
    pr = torch.stack([P[:, 0], P[:, 1] * (1 - P[:, 0]), (1 - P[:, 0]) * (1 - P[:, 1])], dim=1)
    want = pr**2 / (pr**2).sum(1, keepdim=True)  # T = 0.5
    got = g.weights(scores)
    torch.testing.assert_close(got, want)
    torch.testing.assert_close(got.sum(1), torch.ones(2))


def test_weights_stable_for_extreme_gate_logits():
    from eebench.methods.gater import exit_weights

    a = exit_weights(torch.tensor([[200.0, -200.0], [-200.0, -200.0]]), 0.1)
    assert torch.isfinite(a).all()
    torch.testing.assert_close(a, torch.tensor([[1.0, 0.0, 0.0], [0.0, 0.0, 1.0]]))


def test_phi_gradient_matches_finite_differences(toy_network):
    g = hand_gater(toy_network)
    _, outer = g.losses(hand_outputs(), torch.tensor(TARGETS))
    grads = torch.autograd.grad(outer, list(g.mlp.parameters()))
    base = {"w1": W1, "b1": B1, "w2": W2, "b2": B2}
    eps = 1e-6
    for (name, value), grad in zip(base.items(), grads):
        flat = grad.reshape(-1).tolist()
        shape = [len(value), len(value[0])] if isinstance(value[0], list) else [len(value)]
        for idx, index in enumerate(itertools.product(*map(range, shape))):

            def shifted(delta):
                w = copy.deepcopy(base)
                if len(index) == 2:
                    w[name][index[0]][index[1]] += delta
                else:
                    w[name][index[0]] += delta
                return hand_losses(w1=w["w1"], b1=w["b1"], w2=w["w2"], b2=w["b2"])[1]

            fd = (shifted(eps) - shifted(-eps)) / (2 * eps)
            assert flat[idx] == pytest.approx(fd, abs=1e-4), (name, index)


def test_theta_gradient_flows_through_A(toy_network):
    """Eq. 11: d inner / d logits includes the term through A (finite differences of the hand
    formula), and differs from the gradient with A held fixed."""
    g = hand_gater(toy_network)
    outputs = hand_outputs()
    inner, _ = g.losses(outputs, torch.tensor(TARGETS))
    grads = torch.autograd.grad(inner, outputs.logits)
    eps = 1e-6
    for k, i, c in [(0, 0, 0), (0, 1, 2), (1, 0, 1), (2, 1, 0)]:

        def shifted(delta):
            logits = copy.deepcopy(LOGITS)
            logits[k][i][c] += delta
            return hand_losses(logits=logits)[0]

        fd = (shifted(eps) - shifted(-eps)) / (2 * eps)
        assert grads[k][i, c].item() == pytest.approx(fd, abs=1e-4)
    # The early exits' logits reach the loss through A: with A detached the gradient differs.
    detached = g.weights(g.scores(outputs)).detach()
    from eebench.methods.common import per_exit_ce
    from eebench.methods.gater import inner_loss

    ce = per_exit_ce(outputs.logits, torch.tensor(TARGETS))
    alt = torch.autograd.grad(inner_loss(detached, ce, torch.tensor(COSTS), LAM), outputs.logits)
    assert not torch.allclose(alt[0], grads[0], atol=1e-4)


def test_entropy_feature_is_negative_entropy(toy_network):
    g = make_gater(toy_network, features=["entropy"])
    scores = g.scores(hand_outputs())
    assert (scores <= 0).all()
    assert scores[0, 0, 0].item() == pytest.approx(hand_features(LOGITS[0][0])["entropy"], rel=1e-5)


# --- features and params -----------------------------------------------------------------------

SUBSETS = [list(c) for r in (1, 2, 3) for c in itertools.combinations(FEATURES, r)]


@pytest.mark.parametrize("subset", SUBSETS, ids=["+".join(s) for s in SUBSETS])
def test_every_feature_subset_gives_its_input_dimension(toy_network, subset):
    g = make_gater(toy_network, features=list(reversed(subset)))
    assert g.mlp[0].in_features == len(subset)
    scores = g.scores(hand_outputs())
    assert scores.shape == (2, 2, len(subset))
    for col, name in enumerate(subset):  # canonical order whatever the config order
        for k, i in itertools.product(range(2), range(2)):
            want = hand_features(LOGITS[k][i])[name]
            assert scores[i, k, col].item() == pytest.approx(want, rel=1e-5, abs=1e-6)


def test_seven_subsets():
    assert len(SUBSETS) == 7


def test_unknown_feature_is_named():
    with pytest.raises(ValueError) as err:
        METHODS.make_params("gater", {"features": ["confidence", "varentropy"]})
    assert "varentropy" in str(err.value)
    assert "confidence, margin, entropy" in str(err.value)


@pytest.mark.parametrize(
    "bad",
    [
        {"features": []},
        {"features": ["margin", "margin"]},
        {"temperature": 0.0},
        {"update_every": 0},
        {"hidden": 0},
        {"lam": -1.0},
        {"gater_lr": 1e-5, "gater_lr_min": 1e-3},
    ],
)
def test_invalid_params(bad):
    with pytest.raises(ValueError):
        METHODS.make_params("gater", bad)


def test_defaults_are_the_paper_cifar_setting():
    p = METHODS.make_params("gater", {})
    assert (p.ordered_features(), p.lam, p.temperature, p.hidden, p.update_every) == (
        ["confidence", "entropy"],
        2.0,
        0.5,
        500,
        10,
    )
    assert (p.gater_lr, p.gater_lr_min, p.frozen) == (1e-3, 1e-5, False)
    assert GaterParams(features=["entropy", "confidence"]).ordered_features() == ["confidence", "entropy"]


# --- what one step changes ---------------------------------------------------------------------


def sgd(method: Gater) -> torch.optim.Optimizer | None:
    params = list(method.trainable_parameters())
    return torch.optim.SGD(params, lr=0.1, momentum=0.9, weight_decay=1e-4) if params else None


def test_theta_step_leaves_gater_unchanged(toy_network, toy_batch):
    g = make_gater(toy_network, update_every=2)
    net, mlp = snapshot(g.model), snapshot(g.mlp)
    g.train_step(*toy_batch, sgd(g), step=1)
    assert not same(net, snapshot(g.model))
    assert same(mlp, snapshot(g.mlp))
    assert all(p.grad is None for p in g.mlp.parameters())


def test_phi_step_uses_outer_gradient_only(toy_network, toy_batch):
    g = make_gater(toy_network, update_every=1)
    ref = copy.deepcopy(g)
    _, outer = ref.losses(ref.model.forward_all(toy_batch[0]), toy_batch[1])
    want = torch.autograd.grad(outer, list(ref.mlp.parameters()))
    mlp = snapshot(g.mlp)
    g.train_step(*toy_batch, sgd(g), step=0)
    assert not same(mlp, snapshot(g.mlp))
    for p, w in zip(g.mlp.parameters(), want):
        torch.testing.assert_close(p.grad, w)


def test_phi_updated_only_every_update_every(toy_network, toy_batch):
    g = make_gater(toy_network, update_every=3)
    opt = sgd(g)
    changed = []
    for step in range(7):
        before = snapshot(g.mlp)
        g.train_step(*toy_batch, opt, step)
        changed.append(not same(before, snapshot(g.mlp)))
    assert changed == [True, False, False, True, False, False, True]


def test_gater_lr_is_cosine_over_the_run(toy_network, toy_batch):
    g = make_gater(toy_network, update_every=1, gater_lr=1e-3, gater_lr_min=1e-5)
    opt = sgd(g)
    total = g.ctx.total_steps
    for step, want in [(0, 1e-3), (total // 2, 1e-5 + 0.5 * (1e-3 - 1e-5)), (total, 1e-5)]:
        g.train_step(*toy_batch, opt, step)
        assert g.gater_optimizer.param_groups[0]["lr"] == pytest.approx(want)


def test_train_step_returns_detached_inner_loss(toy_network, toy_batch):
    g = make_gater(toy_network, update_every=5)
    ref = copy.deepcopy(g)
    inner, _ = ref.losses(ref.model.forward_all(toy_batch[0]), toy_batch[1])
    loss = g.train_step(*toy_batch, sgd(g), step=1)
    assert not loss.requires_grad
    torch.testing.assert_close(loss, inner.detach())


class ToyBN(MultiExitNetwork):
    """Like the toy network, with BatchNorm so running statistics can be checked."""

    def __init__(self, num_exits: int = 3):
        super().__init__()
        self.num_exits = num_exits
        self.blocks = nn.ModuleList(
            nn.Sequential(nn.Linear(12 if i == 0 else 8, 8), nn.BatchNorm1d(8), nn.ReLU()) for i in range(num_exits)
        )
        self.heads = nn.ModuleList(nn.Linear(8, 4) for _ in range(num_exits))

    def forward_all(self, x: torch.Tensor, upto: int | None = None) -> ExitOutputs:
        h, logits = x, []
        for block, head in list(zip(self.blocks, self.heads))[: self._check_upto(upto)]:
            h = block(h)
            logits.append(head(h))
        return ExitOutputs(logits, [])


def test_frozen_keeps_network_bit_identical(toy_batch):
    torch.manual_seed(0)
    model = ToyBN().train()
    g = make_gater(model, frozen=True, update_every=1)
    assert list(g.trainable_parameters()) == []
    net, mlp = snapshot(model), snapshot(g.mlp)
    for step in range(3):
        g.train_step(*toy_batch, None, step)
    assert same(net, snapshot(model))  # parameters and BN running statistics
    assert not same(mlp, snapshot(g.mlp))


def test_not_frozen_trains_network_and_bn_statistics(toy_batch):
    torch.manual_seed(0)
    model = ToyBN().train()
    g = make_gater(model)
    before = snapshot(model)
    g.train_step(*toy_batch, sgd(g), 0)
    after = snapshot(model)
    assert not torch.equal(before["blocks.0.0.weight"], after["blocks.0.0.weight"])
    assert not torch.equal(before["blocks.0.1.running_mean"], after["blocks.0.1.running_mean"])


# --- checkpointing and evaluation --------------------------------------------------------------


def test_state_dict_round_trip_weights_only(toy_network, toy_batch):
    g = make_gater(toy_network, update_every=1)
    opt = sgd(g)
    g.train_step(*toy_batch, opt, 0)
    buffer = io.BytesIO()
    torch.save(g.state_dict(), buffer)
    buffer.seek(0)
    state = torch.load(buffer, weights_only=True)
    assert "gater_optimizer" in state

    twin = make_gater(copy.deepcopy(toy_network), update_every=1)
    twin.model.load_state_dict(g.model.state_dict())
    twin.load_state_dict(state)
    assert same(snapshot(g.mlp), snapshot(twin.mlp))
    twin_opt = sgd(twin)
    twin_opt.load_state_dict(opt.state_dict())
    g.train_step(*toy_batch, opt, 1)
    twin.train_step(*toy_batch, twin_opt, 1)
    assert same(snapshot(g.mlp), snapshot(twin.mlp))
    assert g.extra_modules() == {"gater": g.mlp}


def test_eval_outputs_is_identity(toy_network, toy_batch):
    g = make_gater(toy_network)
    out = toy_network.forward_all(toy_batch[0])
    assert g.eval_outputs(out) is out
    assert Gater.exit_score == "max_softmax"

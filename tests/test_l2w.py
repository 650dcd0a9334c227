"""L2W: the weight formula, the exit assignment, the virtual step, and one train_step."""

from __future__ import annotations

import io

import pytest
import torch
from torch import nn

from eebench.methods import METHODS, TrainContext
from eebench.methods.l2w import (
    L2W,
    assign_exits,
    assigned_loss,
    loss_weights,
    target_probs,
    virtual_sgd_step,
)


def make_method(network, steps_per_epoch: int = 4, **params) -> L2W:
    ctx = TrainContext(
        exit_costs=torch.tensor([0.3, 0.6, 1.0]), num_classes=4, epochs=2, steps_per_epoch=steps_per_epoch
    )
    return L2W(network, METHODS.make_params("l2w", {**L2W.test_params, **params}), ctx)


class CountingSGD(torch.optim.SGD):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.steps = 0

    def step(self, closure=None):
        self.steps += 1
        return super().step(closure)


def test_weights_col_and_mat():
    g = torch.tensor([[0.5, -0.5, 0.0], [1.0, 1.0, -0.5]])
    # col: row means 0 and 0.5; mat: global mean 0.25
    col = torch.tensor([[1 + 0.8 * 0.5, 1 - 0.8 * 0.5, 1.0], [1 + 0.8 * 0.5, 1 + 0.8 * 0.5, 1 - 0.8 * 1.0]])
    mat = torch.tensor(
        [[1 + 0.3 * 0.25, 1 - 0.3 * 0.75, 1 - 0.3 * 0.25], [1 + 0.3 * 0.75, 1 + 0.3 * 0.75, 1 - 0.3 * 0.75]]
    )
    torch.testing.assert_close(loss_weights(g, 0.8, "col"), col)
    torch.testing.assert_close(loss_weights(g, 0.3, "mat"), mat)


def test_target_probs_geometric():
    probs = target_probs(3, 15)  # q = 0.75
    raw = [0.75, 0.75**2, 0.75**3]
    assert probs == pytest.approx([r / sum(raw) for r in raw])


def test_assign_exits_on_hand_made_confidences():
    # 10 samples, probs 0.5/0.3/0.2 -> exit 0 takes 5, exit 1 takes 3, exit 2 the remaining 2
    conf = torch.tensor(
        [
            [0.90, 0.10, 0.0],
            [0.80, 0.99, 0.0],  # most confident at exit 1 too, but exit 0 takes it first
            [0.10, 0.50, 0.0],
            [0.70, 0.20, 0.0],
            [0.60, 0.95, 0.0],
            [0.50, 0.30, 0.0],
            [0.05, 0.40, 0.0],
            [0.20, 0.90, 0.0],
            [0.30, 0.05, 0.0],
            [0.40, 0.60, 0.0],
        ]
    )
    exit_of = assign_exits(conf, [0.5, 0.3, 0.2])
    # exit 0: top 5 by column 0 -> samples 0, 1, 3, 4, 5
    # exit 1: top 3 of the rest {2, 6, 7, 8, 9} by column 1 -> 7 (0.9), 9 (0.6), 2 (0.5)
    # exit 2: 6 and 8
    assert exit_of.tolist() == [0, 0, 1, 0, 0, 0, 2, 1, 2, 1]


def test_assigned_loss_is_sum_of_per_exit_means():
    logits = [torch.randn(4, 3, generator=torch.Generator().manual_seed(i)) for i in range(2)]
    y = torch.tensor([0, 1, 2, 0])
    exit_of = torch.tensor([0, 1, 1, 1])
    ce = nn.functional.cross_entropy
    expected = ce(logits[0][:1], y[:1]) + ce(logits[1][1:], y[1:])
    torch.testing.assert_close(assigned_loss(logits, y, exit_of), expected)


def test_virtual_step_matches_hand_computation_and_sgd():
    p = nn.Parameter(torch.tensor([1.0, -2.0]))
    opt = torch.optim.SGD([p], lr=0.5, momentum=0.9, weight_decay=0.1)
    opt.state[p]["momentum_buffer"] = torch.tensor([0.2, 0.4])
    g = torch.tensor([0.5, 0.25])
    theta_hat = virtual_sgd_step([("p", p)], [g], opt)["p"]
    # d = g + wd p = (0.6, 0.05); direction = 0.9 buf + d = (0.78, 0.41); theta - 0.5 direction
    torch.testing.assert_close(theta_hat, torch.tensor([0.61, -2.205]))
    p.grad = g.clone()
    opt.step()
    torch.testing.assert_close(theta_hat, p.detach())


def test_virtual_step_without_buffer_is_plain_sgd():
    p = nn.Parameter(torch.tensor([1.0]))
    opt = torch.optim.SGD([p], lr=0.1, momentum=0.9, weight_decay=0.5)
    theta_hat = virtual_sgd_step([("p", p)], [torch.tensor([2.0])], opt)["p"]
    torch.testing.assert_close(theta_hat, torch.tensor([1.0 - 0.1 * (2.0 + 0.5)]))


def test_meta_update_reaches_wpn_and_leaves_network(toy_network, toy_batch):
    x, y = toy_batch
    method = make_method(toy_network)
    opt = torch.optim.SGD(toy_network.parameters(), lr=0.5, momentum=0.9, weight_decay=1e-4)
    before = {n: p.detach().clone() for n, p in toy_network.named_parameters()}
    meta_loss = method.meta_update(x[:8], y[:8], x[8:], y[8:], opt)
    assert torch.isfinite(meta_loss)
    grads = [p.grad for p in method.wpn.parameters()]
    assert all(g is not None for g in grads)
    assert sum(g.abs().sum() for g in grads) > 0
    for n, p in toy_network.named_parameters():
        assert p.grad is None
        assert torch.equal(p, before[n])


def test_train_step_two_optimizer_steps_and_changes(toy_network, toy_batch):
    x, y = toy_batch
    method = make_method(toy_network)
    opt = CountingSGD(method.trainable_parameters(), lr=0.1, momentum=0.9, weight_decay=1e-4)
    net_before = [p.detach().clone() for p in toy_network.parameters()]
    wpn_before = [p.detach().clone() for p in method.wpn.parameters()]
    loss = method.train_step(x, y, opt, step=0)
    assert opt.steps == 2
    assert loss.shape == () and torch.isfinite(loss) and not loss.requires_grad
    assert any(not torch.equal(a, b) for a, b in zip(net_before, toy_network.parameters()))
    assert any(not torch.equal(a, b) for a, b in zip(wpn_before, method.wpn.parameters()))
    assert method.meta_optimizer.state  # Adam has stepped


def test_meta_interval_skips_wpn_update(toy_network, toy_batch):
    x, y = toy_batch
    method = make_method(toy_network, meta_interval=2)
    opt = CountingSGD(toy_network.parameters(), lr=0.1)
    wpn_before = [p.detach().clone() for p in method.wpn.parameters()]
    method.train_step(x, y, opt, step=1)
    assert opt.steps == 2
    assert all(torch.equal(a, b) for a, b in zip(wpn_before, method.wpn.parameters()))


def test_meta_lr_cosine(toy_network):
    method = make_method(toy_network, meta_lr=1e-3)  # total_steps = 8
    assert method.meta_lr(0) == pytest.approx(1e-3)
    assert method.meta_lr(4) == pytest.approx(5e-4)
    assert method.meta_lr(8) == pytest.approx(0.0)


def test_state_dict_round_trip_weights_only(toy_network, toy_batch):
    x, y = toy_batch
    method = make_method(toy_network)
    method.train_step(x, y, torch.optim.SGD(toy_network.parameters(), lr=0.1), step=0)
    buffer = io.BytesIO()
    torch.save(method.state_dict(), buffer)
    buffer.seek(0)
    state = torch.load(buffer, weights_only=True)
    fresh = make_method(toy_network)
    fresh.load_state_dict(state)
    for a, b in zip(method.wpn.parameters(), fresh.wpn.parameters()):
        assert torch.equal(a, b)
    saved = state["meta_optimizer"]["state"]
    assert fresh.meta_optimizer.state_dict()["state"].keys() == saved.keys()


@pytest.mark.parametrize(
    "bad", [{"constraint": "row"}, {"target_p_index": 0}, {"epsilon": -1.0}, {"meta_interval": 0}, {"hidden": 0}]
)
def test_params_rejected(bad):
    with pytest.raises(ValueError):
        METHODS.make_params("l2w", bad)

"""BoostNet: the boosting loss by hand, the stop-gradient, eval ensembling, gradient rescaling."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from eebench.methods import METHODS, TrainContext
from eebench.methods.boostnet import BoostNet, boosting_loss
from models import ExitOutputs, MultiExitNetwork
from models.base import GRADIENT_RESCALING, gradient_equilibrium, scale_gradient


def ctx() -> TrainContext:
    return TrainContext(exit_costs=torch.tensor([0.3, 0.6, 1.0]), num_classes=4, epochs=1, steps_per_epoch=1)


def make_method(network, **params) -> BoostNet:
    return BoostNet(network, METHODS.make_params("boostnet", {**BoostNet.test_params, **params}), ctx())


def hand_ce(logits: list[float], label: int) -> float:
    return math.log(sum(math.exp(v) for v in logits)) - logits[label]


def test_loss_by_hand():
    o1, o2, o3 = [1.0, 0.0], [0.0, 2.0], [-1.0, 0.5]
    gamma, y = 0.5, 1
    e1 = o1
    e2 = [a + gamma * b for a, b in zip(o2, e1)]
    expected = (
        hand_ce(o1, y)
        + hand_ce([a + gamma * b for a, b in zip(o2, e1)], y)
        + hand_ce([a + gamma * b for a, b in zip(o3, e2)], y)
    )
    logits = [torch.tensor([o]) for o in (o1, o2, o3)]
    assert boosting_loss(logits, torch.tensor([y]), gamma).item() == pytest.approx(expected)


def test_stop_gradient_into_earlier_exit():
    o1 = torch.tensor([[1.0, -0.5, 0.2]], requires_grad=True)
    o2 = torch.tensor([[0.3, 0.1, -1.0]], requires_grad=True)
    y = torch.tensor([2])
    boosting_loss([o1, o2], y, 0.5).backward()
    # only exit 1's own CE reaches o1: softmax(o1) - onehot(y)
    expected = o1.detach().softmax(1) - nn.functional.one_hot(y, 3)
    torch.testing.assert_close(o1.grad, expected)
    expected2 = (o2.detach() + 0.5 * o1.detach()).softmax(1) - nn.functional.one_hot(y, 3)
    torch.testing.assert_close(o2.grad, expected2)


def test_eval_outputs_ensembles_and_passes_through(toy_network):
    method = make_method(toy_network, ensemble_reweight=0.5)
    o = [torch.tensor([[1.0, 2.0]]), torch.tensor([[0.0, -2.0]]), torch.tensor([[4.0, 0.0]])]
    feats = [torch.zeros(1, 3)] * 3
    gates = [torch.ones(1)] * 3
    out = method.eval_outputs(ExitOutputs(o, feats, gates))
    expected = [[1.0, 2.0], [0.5, -1.0], [4.25, -0.5]]
    for got, want in zip(out.logits, expected):
        torch.testing.assert_close(got, torch.tensor([want]))
    assert out.features is feats and out.gates is gates


def test_scale_gradient():
    x = torch.tensor([1.0, -2.0], requires_grad=True)
    y = scale_gradient(x, 0.25)
    torch.testing.assert_close(y, x.detach())
    (y * torch.tensor([4.0, 8.0])).sum().backward()
    torch.testing.assert_close(x.grad, torch.tensor([1.0, 2.0]))
    with torch.no_grad():
        assert scale_gradient(x, 0.25) is x


class ToyGE(MultiExitNetwork):
    """Linear trunk blocks and heads, with the gradient-rescaling hook."""

    capabilities = frozenset({GRADIENT_RESCALING})

    def __init__(self, num_exits: int = 3, width: int = 5):
        super().__init__()
        self.num_exits = num_exits
        self.rescale = False
        self.blocks = nn.ModuleList(nn.Linear(width, width) for _ in range(num_exits))
        self.heads = nn.ModuleList(nn.Linear(width, 4) for _ in range(num_exits))

    def set_gradient_rescaling(self, enabled: bool) -> None:
        self.rescale = enabled

    def forward_all(self, x: torch.Tensor, upto: int | None = None) -> ExitOutputs:
        logits = []
        h = x
        for k, (block, head) in enumerate(zip(self.blocks, self.heads)):
            h = block(h)
            head_in = h
            if self.rescale:
                head_in, h = gradient_equilibrium(h, k, self.num_exits)
            logits.append(head(head_in))
        return ExitOutputs(logits)


def block_grads(net: ToyGE, x: torch.Tensor, exits: list[int]) -> list[torch.Tensor]:
    net.zero_grad()
    outs = net.forward_all(x).logits
    sum((outs[j] ** 2).sum() for j in exits).backward()
    return [torch.zeros_like(b.weight) if b.weight.grad is None else b.weight.grad.clone() for b in net.blocks]


def test_gradient_equilibrium_gives_each_block_the_mean_over_its_heads():
    torch.manual_seed(0)
    net, x = ToyGE(), torch.randn(6, 5)
    per_head = [block_grads(net, x, [j]) for j in range(3)]
    net.set_gradient_rescaling(True)
    rescaled = block_grads(net, x, [0, 1, 2])
    for k in range(3):
        mean = sum(per_head[j][k] for j in range(k, 3)) / (3 - k)
        torch.testing.assert_close(rescaled[k], mean)
    # the heads themselves keep their full gradient
    net.zero_grad()
    outs = net.forward_all(x).logits
    (outs[0] ** 2).sum().backward()
    assert net.heads[0].weight.grad.abs().sum() > 0


def test_rescaling_option_resolution(toy_network):
    assert make_method(toy_network).gradient_rescaling is False  # auto, no hook
    assert make_method(toy_network, gradient_rescaling=False).gradient_rescaling is False
    with pytest.raises(ValueError, match="does not offer gradient rescaling"):
        make_method(toy_network, gradient_rescaling=True)
    ge = ToyGE()
    assert make_method(ge).gradient_rescaling is True and ge.rescale is True
    ge_off = ToyGE()
    make_method(ge_off, gradient_rescaling=False)
    assert ge_off.rescale is False


def test_train_step_runs(toy_network, toy_batch):
    x, y = toy_batch
    method = make_method(toy_network)
    opt = torch.optim.SGD(method.trainable_parameters(), lr=0.1)
    before = [p.detach().clone() for p in toy_network.parameters()]
    loss = method.train_step(x, y, opt, step=0)
    assert torch.isfinite(loss)
    assert any(not torch.equal(a, b) for a, b in zip(before, toy_network.parameters()))


def test_params_rejected():
    with pytest.raises(ValueError):
        METHODS.make_params("boostnet", {"ensemble_reweight": -0.1})
    with pytest.raises(ValueError):
        METHODS.make_params("boostnet", {"gradient_rescaling": "yes"})


def test_msdnet_gradient_equilibrium_averages_head_gradients():
    """With the hook on, block 1's coarsest scale in a 3-exit MSDNet gets the mean (not the sum)
    of the gradients of the heads that depend on it (finer scales pass unscaled, as in the
    official code): check against three separate backward passes."""
    from models import InputSpec, build_model

    torch.manual_seed(0)
    net = build_model("msdnet", InputSpec(3, 32, 10), n_blocks=3, n_channels=4, growth_rate=4)
    net.train()
    x = torch.randn(4, 3, 32, 32)
    first_block = list(net.blocks[0].parameters())[-1]  # a coarsest-scale parameter

    def grad_of(losses_of) -> torch.Tensor:
        net.zero_grad()
        losses_of(net.forward_all(x).logits).backward()
        return first_block.grad.clone()

    net.set_gradient_rescaling(False)
    per_head = [grad_of(lambda out, k=k: out[k].sum()) for k in range(3)]
    net.set_gradient_rescaling(True)
    rescaled = grad_of(lambda out: sum(o.sum() for o in out))
    # BN in train mode couples the batch, but each head's gradient path is linear in its loss
    assert torch.allclose(rescaled, sum(per_head) / 3, atol=1e-5, rtol=1e-4)

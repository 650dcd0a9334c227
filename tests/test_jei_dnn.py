"""JEI-DNN: gate features, targets and loss by hand, the phase schedule, what each phase trains."""

from __future__ import annotations

import copy
import io
import math

import pytest
import torch
from torch import nn

from eebench.methods import METHODS, TrainContext
from eebench.methods.jei_dnn import (
    JEIDNN,
    gate_labels,
    gate_loss,
    gate_targets,
    im_loss,
    pos_weights,
    private_exit_parameters,
    training_phase,
    uncertainty_features,
    warmup_loss,
)
from models import ExitOutputs, MultiExitNetwork


class ToyBN(MultiExitNetwork):
    """The toy network with BatchNorm in the trunk, so running statistics can be checked."""

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


def snapshot(module: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def make_ctx(epochs: int = 3, steps_per_epoch: int = 4) -> TrainContext:
    return TrainContext(
        exit_costs=torch.tensor([1 / 3, 2 / 3, 1.0]), num_classes=4, epochs=epochs, steps_per_epoch=steps_per_epoch
    )


def make_jei(model, epochs: int = 3, steps_per_epoch: int = 4, **params) -> JEIDNN:
    merged = {**JEIDNN.test_params, **params}
    return JEIDNN(model, METHODS.make_params("jei_dnn", merged), make_ctx(epochs, steps_per_epoch))


def sgd(method: JEIDNN) -> torch.optim.Optimizer:
    return torch.optim.SGD(list(method.trainable_parameters()), lr=0.1, momentum=0.9, weight_decay=5e-4)


# --- pieces by hand ----------------------------------------------------------------------------


def test_uncertainty_features_by_hand():
    logits = [1.0, 0.0, -1.0]
    e = [math.exp(v) for v in logits]
    p = [v / sum(e) for v in e]
    q = [v * v / sum(w * w for w in p) for v in p]
    want = [p[0], -sum(v * math.log(v) for v in p), p[0] - p[1], -sum(v * math.log(v) for v in q)]
    z = torch.tensor([logits], requires_grad=True)
    got = uncertainty_features(z)
    assert got.shape == (1, 4) and not got.requires_grad
    assert got[0].tolist() == pytest.approx(want, rel=1e-5)


def test_gate_targets_by_hand():
    ce = torch.tensor(
        [
            [0.9, 0.5, 0.1],  # + 0.7 cost -> 1.1333, 0.9667, 0.8: last
            [0.2, 0.4, 0.3],  # 0.4333, 0.8667, 1.0: first
            [1.0, 0.1, 0.0],
        ]
    )  # 1.2333, 0.5667, 0.7: second
    costs = torch.tensor([1 / 3, 2 / 3, 1.0])
    assert gate_targets(ce, costs, 0.7).tolist() == [2, 0, 1]
    assert gate_targets(ce, costs, 0.0).tolist() == [2, 0, 2]


def test_gate_labels_are_exit_at_or_after_the_target():
    labels = gate_labels(torch.tensor([0, 1, 2]), 2)
    assert labels.tolist() == [[1, 1], [0, 1], [0, 0]]


def test_gate_loss_by_hand():
    z = [[0.3, -1.2], [2.0, 0.5]]
    targets = [0, 2]  # labels [[1, 1], [0, 0]]
    w = [2.0, 0.5]
    sig = lambda v: 1 / (1 + math.exp(-v))  # noqa: E731
    terms = [
        w[0] * -math.log(sig(z[0][0])),
        w[1] * -math.log(sig(z[0][1])),
        -math.log(1 - sig(z[1][0])),
        -math.log(1 - sig(z[1][1])),
    ]
    got = gate_loss(torch.tensor(z), torch.tensor(targets), torch.tensor(w))
    assert got.item() == pytest.approx(sum(terms) / 4, rel=1e-6)


def test_pos_weights_by_hand():
    got = pos_weights(torch.tensor([3.0, 0.0, 7.0]))
    assert got.tolist() == pytest.approx([7 / 3, 5.0])  # (10 - 0.1) / 0.1 = 99 clipped to 5
    assert pos_weights(torch.tensor([8.0, 1.0, 1.0])).tolist() == pytest.approx([0.25, 5.0])


def test_warmup_loss_by_hand():
    ce = torch.tensor([[1.0, 2.0, 3.0], [3.0, 0.0, 1.0]])  # per-exit means 2, 1, 2
    assert warmup_loss(ce).item() == pytest.approx(3 * 2 + 2 * 1 + 2)


def test_im_loss_equals_the_reference_weighted_loss():
    """The official loss mean(P*L*r), r = sum L / sum P*L not detached, with
    P_l = max(0, min(g_l, 1 - sum_{j<l} g_j)): same value and gradient as mean of L."""
    torch.manual_seed(0)
    logits = [torch.randn(5, 4, requires_grad=True) for _ in range(3)]
    targets = torch.randint(0, 4, (5,))
    g = torch.rand(5, 2)
    L = torch.stack([nn.functional.cross_entropy(z, targets, reduction="none") for z in logits[:2]], 1)
    P = torch.stack([g[:, 0].clamp(0, 1), torch.clamp(torch.minimum(g[:, 1], 1 - g[:, 0]), min=0)], 1)
    ratio = L.sum(1, keepdim=True) / (P * L).sum(1, keepdim=True)
    reference = (P * L * ratio).mean()
    ce = torch.stack([nn.functional.cross_entropy(z, targets, reduction="none") for z in logits], 1)
    ours = im_loss(ce)
    torch.testing.assert_close(ours, reference)
    for a, b in zip(
        torch.autograd.grad(ours, logits[:2], retain_graph=True), torch.autograd.grad(reference, logits[:2])
    ):
        torch.testing.assert_close(a, b)


def test_phase_schedule():
    phases = [training_phase(s, steps_per_epoch=5, warmup_epochs=1, switch_every=2) for s in range(15)]
    short = "".join(p[0] for p in phases)
    assert short == "wwwwwggccgggccg"  # every epoch restarts in the gate phase
    assert training_phase(0, 5, 0, 200) == "gate"


# --- params --------------------------------------------------------------------------------------


def test_defaults_from_reference():
    p = METHODS.make_params("jei_dnn", {})
    assert (p.ce_ic_tradeoff, p.switch_every, p.warmup_epochs) == (0.7, 200, 6)


@pytest.mark.parametrize("bad", [{"ce_ic_tradeoff": -0.1}, {"switch_every": 0}, {"warmup_epochs": -1}])
def test_invalid_params(bad):
    with pytest.raises(ValueError):
        METHODS.make_params("jei_dnn", bad)


def test_warmup_must_leave_gated_epochs(toy_network):
    with pytest.raises(ValueError, match="warmup_epochs"):
        make_jei(toy_network, epochs=2, warmup_epochs=2)


# --- what is trained ---------------------------------------------------------------------------


def test_private_parameters_are_the_exit_heads(toy_network, toy_batch):
    private = private_exit_parameters(toy_network, toy_batch[0][:2])
    ids = lambda *modules: {id(p) for m in modules for p in m.parameters()}  # noqa: E731
    for k in range(2):
        assert {id(p) for p in private[k]} == ids(toy_network.heads[k])
    # the last block serves the last exit only; it is frozen with it
    assert {id(p) for p in private[2]} == ids(toy_network.blocks[2], toy_network.heads[2])
    assert toy_network.training


def test_first_step_freezes_trunk_and_last_exit(toy_network, toy_batch):
    j = make_jei(toy_network)
    j.train_step(*toy_batch, sgd(j), step=0)
    trainable = {n for n, p in toy_network.named_parameters() if p.requires_grad}
    assert trainable == {"heads.0.weight", "heads.0.bias", "heads.1.weight", "heads.1.bias"}


def split(j: JEIDNN) -> tuple[dict, dict, dict]:
    state = snapshot(j.model)
    ims = {k: v for k, v in state.items() if k.startswith(("heads.0.", "heads.1."))}
    frozen = {k: v for k, v in state.items() if k not in ims}
    return ims, frozen, snapshot(j.gates)


@pytest.mark.parametrize(
    "phase_step,trains",
    [
        (0, "ims"),  # warm-up epoch
        (4, "gates"),  # first batch of the first gated epoch
        (5, "ims"),  # switch_every = 1: second batch trains the IMs
    ],
)
def test_each_phase_trains_only_its_part(toy_batch, phase_step, trains):
    torch.manual_seed(0)
    model = ToyBN().train()
    j = make_jei(model, warmup_epochs=1)
    opt = sgd(j)
    j.freeze_trunk(toy_batch[0])
    ims, frozen, gates = split(j)
    assert j.phase(phase_step) == {"ims": "warmup" if phase_step == 0 else "classifier"}.get(trains, "gate")
    j.train_step(*toy_batch, opt, phase_step)
    ims2, frozen2, gates2 = split(j)
    assert same(frozen, frozen2)  # trunk, last exit, BN running statistics
    assert same(ims, ims2) == (trains == "gates")
    assert same(gates, gates2) == (trains == "ims")


def test_frozen_trunk_bit_identical_over_many_steps(toy_batch):
    torch.manual_seed(0)
    model = ToyBN().train()
    j = make_jei(model, warmup_epochs=1)
    opt = sgd(j)
    j.freeze_trunk(toy_batch[0])
    _, frozen, _ = split(j)
    for step in range(12):
        j.train_step(*toy_batch, opt, step)
    assert same(frozen, split(j)[1])


def test_pos_weight_updated_at_epoch_start_from_last_epoch_targets(toy_network, toy_batch):
    j = make_jei(toy_network, warmup_epochs=1, steps_per_epoch=4)
    opt = sgd(j)
    for step in range(8):
        j.train_step(*toy_batch, opt, step)
    assert j.pos_weight.tolist() == [1.0, 1.0]  # no update during the first gated epoch
    counts = j.exit_counts.clone()
    assert counts.sum().item() == 4 * len(toy_batch[1])
    j.train_step(*toy_batch, opt, 8)
    torch.testing.assert_close(j.pos_weight, pos_weights(counts))
    assert j.exit_counts.sum().item() == len(toy_batch[1])


# --- evaluation and checkpointing --------------------------------------------------------------


def test_eval_outputs_gives_gate_probabilities(toy_network, toy_batch):
    j = make_jei(toy_network)
    out = toy_network.forward_all(toy_batch[0])
    scored = j.eval_outputs(out)
    assert JEIDNN.exit_score == "gate"
    assert len(scored.gates) == 3
    for k in range(2):
        want = torch.sigmoid(j.gates[k](uncertainty_features(out.logits[k]))).squeeze(1)
        torch.testing.assert_close(scored.gates[k], want)
    assert torch.equal(scored.gates[2], torch.ones(len(toy_batch[1])))
    assert scored.logits is out.logits


def test_state_dict_round_trip_weights_only(toy_network, toy_batch):
    j = make_jei(toy_network)
    opt = sgd(j)
    for step in range(3):
        j.train_step(*toy_batch, opt, step)
    buffer = io.BytesIO()
    torch.save(j.state_dict(), buffer)
    buffer.seek(0)
    twin = make_jei(copy.deepcopy(toy_network))
    twin.load_state_dict(torch.load(buffer, weights_only=True))
    assert same(snapshot(j.gates), snapshot(twin.gates))
    assert torch.equal(j.exit_counts, twin.exit_counts)
    assert torch.equal(j.pos_weight, twin.pos_weight)

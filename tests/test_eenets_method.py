"""EENets training method: the loss versions by hand, the two-stage switch, v4 tags, a real step."""

from __future__ import annotations

import math

import pytest
import torch

from eebench.flops import exit_flops
from eebench.io import load_tensors, save_tensors
from eebench.methods import METHODS, TrainContext
from eebench.methods.eenets import EENets, inference_threshold
from models import ExitOutputs, InputSpec, build_model
from models.base import CONFIDENCE_BRANCHES

# 3 exits, 2 samples, 3 classes
LOGITS = [
    [[1.0, 0.0, -1.0], [0.5, 0.5, 0.0]],
    [[0.2, 1.5, -0.3], [0.0, -1.0, 2.0]],
    [[2.0, 1.0, 0.0], [-0.5, 0.3, 1.2]],
]
CONF = [[0.7, 0.2], [0.4, 0.9], [0.5, 0.6]]
TARGETS = [0, 2]
COSTS = [0.3, 0.6, 1.0]
LAM = 0.5


class _Net(torch.nn.Module):
    """Stands in for the network where only ``num_exits`` and ``capabilities`` are read."""

    capabilities = frozenset({CONFIDENCE_BRANCHES})

    def __init__(self, num_exits: int):
        super().__init__()
        self.num_exits = num_exits


def make_method(
    num_exits: int = 3, costs=COSTS, epochs: int = 3, steps_per_epoch: int = 4, model=None, **params
) -> EENets:
    ctx = TrainContext(exit_costs=torch.tensor(costs), num_classes=3, epochs=epochs, steps_per_epoch=steps_per_epoch)
    merged = {**EENets.test_params, "lam": LAM, **params}
    return EENets(model or _Net(num_exits), METHODS.make_params("eenets", merged), ctx)


def outputs(logits=LOGITS, conf=CONF, requires_grad: bool = False) -> ExitOutputs:
    gates = [torch.tensor(c, dtype=torch.float64, requires_grad=requires_grad) for c in conf]
    return ExitOutputs([torch.tensor(exit_logits) for exit_logits in logits], [], gates)


TARGETS_T = torch.tensor(TARGETS)


# --- plain-Python references -------------------------------------------------------------------


def softmax(v: list[float]) -> list[float]:
    e = [math.exp(x) for x in v]
    return [x / sum(e) for x in e]


def ce(logits, n: int) -> float:
    return -math.log(softmax(logits[n])[TARGETS[n]])


def hand_mixtures(conf=CONF, costs=COSTS):
    """Per exit i, per sample: the full mixed distribution P~_i and the mixed cost C~_i."""
    k, n_samples = len(LOGITS), len(TARGETS)
    p = [[softmax(LOGITS[i][n]) for n in range(n_samples)] for i in range(k)]
    p_mix = [None] * k
    c_mix = [None] * k
    p_mix[k - 1] = p[k - 1]
    c_mix[k - 1] = [costs[k - 1]] * n_samples
    for i in range(k - 2, -1, -1):
        p_mix[i] = [
            [conf[i][n] * p[i][n][c] + (1 - conf[i][n]) * p_mix[i + 1][n][c] for c in range(3)]
            for n in range(n_samples)
        ]
        c_mix[i] = [conf[i][n] * costs[i] + (1 - conf[i][n]) * c_mix[i + 1][n] for n in range(n_samples)]
    return p_mix, c_mix


def hand_term(p_mix, c_mix, i: int) -> float:
    nll = -sum(math.log(p_mix[i][n][TARGETS[n]]) for n in range(2)) / 2
    return nll + LAM * sum(c_mix[i]) / 2


def hand_v2(conf=CONF) -> float:
    p_mix, c_mix = hand_mixtures(conf)
    return sum(hand_term(p_mix, c_mix, i) for i in range(3))


def hand_v1(conf=CONF) -> float:
    p_mix, c_mix = hand_mixtures(conf)
    return hand_term(p_mix, c_mix, 0)


def hand_v0() -> float:
    return sum((ce(LOGITS[i], 0) + ce(LOGITS[i], 1)) / 2 for i in range(3))


# --- the losses by hand --------------------------------------------------------------------------


def test_v2_by_hand():
    p_mix, c_mix = hand_mixtures()
    # sample 0, exit 2: 0.4 * p_2 + 0.6 * p_3 on class 0; cost of exit 1: 0.7*0.3 + 0.3*(0.4*0.6 + 0.6)
    assert c_mix[0][0] == pytest.approx(0.7 * 0.3 + 0.3 * (0.4 * 0.6 + 0.6 * 1.0))
    expected = hand_v2()
    assert expected == pytest.approx(2.4578557, abs=1e-6)  # pinned: catches a change of the formula
    value = make_method(loss="v2").loss(outputs(), TARGETS_T)
    assert value.dtype == torch.float32
    assert float(value) == pytest.approx(expected, rel=1e-6)


def test_v2_sums_every_exit_including_the_final_one():
    # the final term is CE of the last exit + lambda * 1: v2 - (terms 1..K-1) equals it exactly
    p_mix, c_mix = hand_mixtures()
    last = (ce(LOGITS[2], 0) + ce(LOGITS[2], 1)) / 2 + LAM * 1.0
    assert hand_term(p_mix, c_mix, 2) == pytest.approx(last)
    value = float(make_method(loss="v2").loss(outputs(), TARGETS_T))
    assert value == pytest.approx(hand_term(p_mix, c_mix, 0) + hand_term(p_mix, c_mix, 1) + last, rel=1e-6)


@pytest.mark.parametrize("i, n", [(0, 0), (0, 1), (1, 1)])
def test_v2_gradient_wrt_a_confidence(i: int, n: int):
    out = outputs(requires_grad=True)
    make_method(loss="v2").loss(out, TARGETS_T).backward()
    autograd = float(out.gates[i].grad[n])
    eps = 1e-6
    up = [row[:] for row in CONF]
    down = [row[:] for row in CONF]
    up[i][n] += eps
    down[i][n] -= eps
    numeric = (hand_v2(up) - hand_v2(down)) / (2 * eps)
    assert abs(numeric) > 1e-2  # the confidence matters
    assert autograd == pytest.approx(numeric, rel=1e-4)


def test_final_confidence_gets_no_gradient_in_v2():
    out = outputs(requires_grad=True)
    make_method(loss="v2").loss(out, TARGETS_T).backward()
    assert out.gates[2].grad is None or float(out.gates[2].grad.abs().sum()) == 0


def test_v1_by_hand():
    expected = hand_v1()

    # written out: p(i, n) = exit i's probability of sample n's target
    def p(i: int, n: int) -> float:
        return softmax(LOGITS[i][n])[TARGETS[n]]

    mix0 = 0.7 * p(0, 0) + 0.3 * (0.4 * p(1, 0) + 0.6 * p(2, 0))
    mix1 = 0.2 * p(0, 1) + 0.8 * (0.9 * p(1, 1) + 0.1 * p(2, 1))
    cost0 = 0.7 * 0.3 + 0.3 * (0.4 * 0.6 + 0.6 * 1.0)
    cost1 = 0.2 * 0.3 + 0.8 * (0.9 * 0.6 + 0.1 * 1.0)
    assert expected == pytest.approx(-(math.log(mix0) + math.log(mix1)) / 2 + LAM * (cost0 + cost1) / 2)
    value = make_method(loss="v1", two_stage_epochs=0).loss(outputs(), TARGETS_T)
    assert float(value) == pytest.approx(expected, rel=1e-6)


def test_v0_by_hand():
    value = make_method(loss="v0", two_stage_epochs=2).loss(outputs(), TARGETS_T, step=0)
    assert float(value) == pytest.approx(hand_v0(), rel=1e-6)
    assert hand_v0() == pytest.approx(
        sum(
            -math.log(math.exp(LOGITS[i][n][TARGETS[n]]) / sum(math.exp(x) for x in LOGITS[i][n])) / 2
            for i in range(3)
            for n in range(2)
        )
    )


def test_two_stage_switches_from_v0_to_v1():
    method = make_method(loss="v0", two_stage_epochs=2, steps_per_epoch=4, epochs=5)
    assert [method.loss_version(s) for s in (0, 7, 8, 19)] == ["v0", "v0", "v1", "v1"]
    assert float(method.loss(outputs(), TARGETS_T, step=7)) == pytest.approx(hand_v0(), rel=1e-6)
    assert float(method.loss(outputs(), TARGETS_T, step=8)) == pytest.approx(hand_v1(), rel=1e-6)
    # the switch epoch is configurable; 0 is v1 from the start
    assert make_method(loss="v0", two_stage_epochs=0).loss_version(0) == "v1"
    # other versions never switch
    assert make_method(loss="v2", two_stage_epochs=0).loss_version(100) == "v2"


def test_v3_by_hand():
    means = [sum(c) / 2 for c in CONF]
    expected = sum(
        means[i] / sum(means) * ((ce(LOGITS[i], 0) + ce(LOGITS[i], 1)) / 2 + LAM * COSTS[i]) for i in range(3)
    )
    out = outputs(requires_grad=True)
    value = make_method(loss="v3").loss(out, TARGETS_T)
    assert float(value.detach()) == pytest.approx(expected, rel=1e-6)
    value.backward()  # the normalised confidences are not detached
    assert all(float(c.grad.abs().sum()) > 0 for c in out.gates)


def test_inference_threshold():
    params = METHODS.make_params("eenets", {"loss": "v3"})
    assert inference_threshold(params, 5) == pytest.approx(0.25)  # 1 / (4 early exits)
    assert inference_threshold(METHODS.make_params("eenets", {}), 5) == 0.5


def hand_v4(tags: list[int]) -> float:
    """Tagged exit's CE + lambda cost + sum over exits of the rate-weighted BCE on h."""
    pred = sum(ce(LOGITS[tags[n]], n) for n in range(2)) / 2
    cost = sum(COSTS[tags[n]] for n in range(2)) / 2
    conf_loss = 0.0
    for i in range(3):
        e = [1.0 if tags[n] == i else 0.0 for n in range(2)]
        rate = sum(e) / 2
        terms = []
        for n in range(2):
            w = (1 - rate) if e[n] else rate
            h = CONF[i][n]
            terms.append(-w * (e[n] * math.log(h) + (1 - e[n]) * math.log(1 - h)))
        conf_loss += sum(terms) / 2
    return pred + LAM * cost + conf_loss


def hand_tags() -> list[int]:
    return [min(range(3), key=lambda i: (ce(LOGITS[i], n) + LAM * COSTS[i], i)) for n in range(2)]


def test_v4_batch_tags_by_hand():
    tags = hand_tags()
    assert tags == [0, 1]  # sample 0 is best off at exit 1, sample 1 at exit 2
    value = make_method(loss="v4", v4_tags="batch").loss(outputs(), TARGETS_T)
    assert float(value) == pytest.approx(hand_v4(tags), rel=1e-6)


def test_v4_reference_tags_come_from_the_same_batch_index_one_epoch_earlier():
    torch.manual_seed(0)
    method = make_method(loss="v4", steps_per_epoch=2)
    first = float(method.loss(outputs(), TARGETS_T, step=0))  # random tags at first
    assert any(first == pytest.approx(hand_v4([a, b]), rel=1e-6) for a in range(3) for b in range(3))
    # step 1 (batch index 1): uniform logits, whose own tags are [0, 0] (the cheapest exit)
    uniform = [[[0.0, 0.0, 0.0]] * 2] * 3
    method.loss(outputs(logits=uniform), TARGETS_T, step=1)
    # next epoch: index 0 uses the tags computed at step 0, [0, 1], index 1 those of step 1
    assert float(method.loss(outputs(), TARGETS_T, step=2)) == pytest.approx(hand_v4([0, 1]), rel=1e-6)
    assert float(method.loss(outputs(), TARGETS_T, step=3)) == pytest.approx(hand_v4([0, 0]), rel=1e-6)
    assert hand_v4([0, 0]) != pytest.approx(hand_v4([0, 1]))
    assert sorted(method.state_dict()["tag_table"]) == [0, 1]


def test_v4_tag_table_checkpoint_round_trip(tmp_path):
    method = make_method(loss="v4", steps_per_epoch=2)
    method.loss(outputs(), TARGETS_T, step=0)
    save_tensors(tmp_path / "state.pt", {"method": method.state_dict()})
    fresh = make_method(loss="v4", steps_per_epoch=2)
    fresh.load_state_dict(load_tensors(tmp_path / "state.pt")["method"])
    assert float(fresh.loss(outputs(), TARGETS_T, step=2)) == pytest.approx(hand_v4(hand_tags()), rel=1e-6)


def test_single_exit_network():
    """num_exits 0 (the plain ResNet): v2 = CE of the only exit + lambda."""
    out = ExitOutputs([torch.tensor(LOGITS[2])], [], [torch.tensor(CONF[2])])
    expected = (ce(LOGITS[2], 0) + ce(LOGITS[2], 1)) / 2 + LAM
    for loss in ("v1", "v2"):
        value = make_method(num_exits=1, costs=[1.0], loss=loss, two_stage_epochs=0).loss(out, TARGETS_T)
        assert float(value) == pytest.approx(expected, rel=1e-6)


# --- errors and params ---------------------------------------------------------------------------


def test_network_without_confidence_branches_is_a_clear_error(toy_network):
    ctx = TrainContext(exit_costs=torch.tensor([1 / 3, 2 / 3, 1.0]), num_classes=4, epochs=1, steps_per_epoch=1)
    message = r"eenets needs an architecture with confidence branches \(ee_resnet\); ToyMultiExit has none"
    with pytest.raises(ValueError, match=message):
        EENets(toy_network, METHODS.make_params("eenets", {}), ctx)


def test_v3_is_evaluated_with_the_reference_threshold():
    """The reference exits at h > 1/(number of early exits) for v3, at h > 0.5 otherwise."""
    for loss, exits, expected in (("v3", 4, 1 / 3), ("v3", 2, 1.0), ("v2", 4, 0.5), ("v0", 3, 0.5)):
        params = METHODS.make_params("eenets", {"loss": loss})
        assert EENets.confidence_exit_threshold(params, exits) == pytest.approx(expected)


def test_cost_count_must_match_exits():
    with pytest.raises(ValueError, match="2 exit costs for a network with 3 exits"):
        make_method(num_exits=3, costs=[0.5, 1.0])


@pytest.mark.parametrize(
    "bad, message",
    [
        ({"loss": "v5"}, "loss"),
        ({"lam": -1.0}, "lam must be >= 0"),
        ({"two_stage_epochs": -1}, "two_stage_epochs must be >= 0"),
        ({"v4_tags": "shuffled"}, "v4_tags"),
        ({"lambda": 1.0}, "unknown parameter"),
    ],
)
def test_params_rejected(bad: dict, message: str):
    with pytest.raises(ValueError, match=message):
        METHODS.make_params("eenets", bad)


def test_defaults_are_the_reference_defaults():
    p = METHODS.make_params("eenets", {})
    assert (p.loss, p.lam, p.two_stage_epochs) == ("v2", 1.0, 25)
    assert EENets.exit_score == "max_softmax"


# --- one real step on a tiny EE-ResNet -----------------------------------------------------------


@pytest.mark.parametrize("loss", ["v0", "v1", "v2", "v3", "v4"])
def test_train_step_on_ee_resnet_changes_parameters(loss: str):
    torch.manual_seed(0)
    spec = InputSpec(3, 16, 10)
    net = build_model("ee_resnet", spec, depth=8, num_exits=2, width=4).train()
    flops = exit_flops(net, (3, 16, 16), "reference")["flops"]
    ctx = TrainContext(
        exit_costs=torch.tensor([f / flops[-1] for f in flops]), num_classes=10, epochs=2, steps_per_epoch=1
    )
    method = EENets(net, METHODS.make_params("eenets", {**EENets.test_params, "loss": loss}), ctx)
    optimizer = torch.optim.Adam(list(method.trainable_parameters()), lr=1e-3)
    before = {k: v.detach().clone() for k, v in net.named_parameters()}
    x, y = torch.randn(8, 3, 16, 16), torch.randint(0, 10, (8,))
    value = method.train_step(x, y, optimizer, step=0)
    assert value.shape == () and torch.isfinite(value) and not value.requires_grad
    changed = {k for k, v in net.named_parameters() if not torch.equal(v, before[k])}
    assert "stem.0.weight" in changed and "exits.0.classifier.weight" in changed
    # v0 (the first stage) is plain CE: the confidence branches only learn from v1..v4
    assert ("exits.0.confidence.weight" in changed) == (loss != "v0")
    if loss == "v0":  # epoch 1 (two_stage_epochs 1 in test_params): v1 trains them
        method.train_step(x, y, optimizer, step=1)
        assert not torch.equal(net.exits[0].confidence.weight, before["exits.0.confidence.weight"])

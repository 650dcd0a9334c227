"""EENets early-exit ResNets: plain-counterpart sizes, exit placement, outputs, costs, config errors."""

from __future__ import annotations

import pytest
import torch

from eebench.flops import baseline_cost, exit_flops
from models import InputSpec, build_model, make_config
from models.ee_resnet import (
    EEBENCH_RULES,
    EENETS_RULES,
    EEResNet,
    EEResNetConfig,
    exit_thresholds,
    place_exits,
    resnet_plan,
)

CIFAR10 = InputSpec(3, 32, 10)
MNIST = InputSpec(1, 28, 10)
TINY = InputSpec(3, 64, 200)


def _params(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def _net(spec: InputSpec = CIFAR10, **params) -> EEResNet:
    return build_model("ee_resnet", spec, **params)


# ---- Plain counterparts -------------------------------------------------------------------------


# He et al.'s CIFAR ResNets (0.27M, 0.46M, 0.66M, 0.85M, 1.7M) use zero-padding shortcuts; the
# EENets code uses 1x1 projections at the two stage transitions: 16*32 + 32*64 weights + 2*(32+64)
# BN parameters = 2,752 more.
@pytest.mark.parametrize(
    "depth, params",
    [(20, 272_474), (32, 466_906), (44, 661_338), (56, 855_770), (110, 1_730_714)],
)
def test_plain_cifar_resnet_params(depth: int, params: int) -> None:
    plain = _net(depth=depth, num_exits=1).plain_counterpart()
    assert _params(plain) == params
    he_et_al = {20: 269_722, 32: 464_154, 44: 658_586, 56: 853_018, 110: 1_727_962}
    assert _params(plain) - 2_752 == he_et_al[depth]


@pytest.mark.parametrize("depth, params", [(18, 11_689_512), (50, 25_557_032)])
def test_plain_imagenet_resnet_params_match_torchvision(depth: int, params: int) -> None:
    plain = _net(InputSpec(3, 224, 1000), depth=depth, num_exits=1).plain_counterpart()
    assert _params(plain) == params


def test_plain_resnet20_flops() -> None:
    net = _net(depth=20, num_exits=2)
    # "reference" convention: 40,813,194 conv + linear multiply-adds (the usual ~40.8M with
    # projection shortcuts), 188,416 ReLU and 4,096 average-pool operations
    assert baseline_cost(net, (3, 32, 32), "reference") == 41_005_706 == net.total_flops
    assert baseline_cost(net, (3, 32, 32), "fvcore") == 41_218_688


def test_plain_resnet18_imagenet_flops() -> None:
    net = _net(InputSpec(3, 224, 1000), depth=18, num_exits=1)
    assert net.plan.style == "imagenet"
    assert baseline_cost(net, (3, 224, 224), "reference") == 1_818_213_864 == net.total_flops
    assert baseline_cost(net, (3, 224, 224), "fvcore") == 1_819_065_856  # the usual "1.82 GFLOPs"


@pytest.mark.parametrize("depth, spec", [(56, CIFAR10), (50, TINY), (34, MNIST)])
def test_analytic_flops_equal_counter(depth: int, spec: InputSpec) -> None:
    net = _net(spec, depth=depth, num_exits=1)
    shape = (spec.channels, spec.size, spec.size)
    assert baseline_cost(net, shape, "reference") == net.total_flops


# ---- Placement ----------------------------------------------------------------------------------

# Block indices (0-based) checked against the reference code (eksuas/eenets.pytorch, eenet.py with
# its flops_counter.py), CIFAR-10 input.
PLACEMENTS = [
    (20, 2, "pareto", [1, 2]),
    (20, 2, "fine", [0, 1]),
    (20, 2, "linear", [2, 5]),
    (20, 2, "gold_ratio", [3, 5]),
    (20, 4, "pareto", [1, 2, 4, 5]),
    (20, 4, "fine", [0, 1, 2, 3]),
    (20, 4, "linear", [1, 3, 5, 7]),
    (20, 4, "gold_ratio", [1, 2, 3, 5]),
    (20, 8, "linear", [0, 1, 2, 3, 4, 5, 7, 8]),
    (110, 2, "pareto", [10, 19]),
    (110, 2, "fine", [2, 5]),
    (110, 2, "linear", [17, 35]),
    (110, 2, "gold_ratio", [20, 33]),
    (110, 8, "pareto", [10, 19, 26, 31, 36, 39, 42, 44]),
    (110, 8, "fine", [2, 5, 7, 9, 11, 13, 15, 17]),
    (110, 8, "linear", [5, 11, 17, 23, 29, 35, 41, 47]),
    (110, 8, "gold_ratio", [1, 2, 3, 4, 7, 12, 20, 33]),
]


@pytest.mark.parametrize("depth, num_exits, distribution, blocks", PLACEMENTS)
def test_exit_placement(depth: int, num_exits: int, distribution: str, blocks: list[int]) -> None:
    config = EEResNetConfig(depth=depth, num_exits=num_exits, distribution=distribution)
    plan = resnet_plan(config, CIFAR10)
    cumulative, total = plan.cumulative_flops(EENETS_RULES), plan.total_flops(EENETS_RULES)
    targets = exit_thresholds(distribution, num_exits, total)
    assert place_exits(cumulative, targets) == blocks
    for target, block in zip(targets, blocks):
        assert cumulative[block] >= target  # each exit's target is reached where it sits


def test_placement_on_imagenet_style() -> None:
    assert _net(TINY, depth=18, num_exits=2, distribution="linear").exit_blocks == [2, 5]
    assert _net(TINY, depth=50, num_exits=2, distribution="gold_ratio").exit_blocks == [5, 9]


def test_hand_computed_targets_resnet20() -> None:
    # cumulative backbone FLOPs / F_tot after each of ResNet-20's 9 blocks (EENets counter)
    plan = resnet_plan(EEResNetConfig(depth=20), CIFAR10)
    total = plan.total_flops(EENETS_RULES)
    ratios = [round(c / total, 4) for c in plan.cumulative_flops(EENETS_RULES)]
    assert ratios == [0.1282, 0.2445, 0.3609, 0.4511, 0.5662, 0.6814, 0.7708, 0.8853, 0.9999]
    # targets as fractions of F_tot, i = 0, 1
    fractions = {
        d: [t / total for t in exit_thresholds(d, 2, total)] for d in ("pareto", "fine", "linear", "gold_ratio")
    }
    assert fractions["pareto"] == pytest.approx([0.2, 0.36])
    assert fractions["fine"] == pytest.approx([0.05, 0.0975])
    assert fractions["linear"] == pytest.approx([1 / 3, 2 / 3])
    assert fractions["gold_ratio"] == pytest.approx([0.381966, 0.618034])


def test_targets_reached_at_the_same_block_move_on() -> None:
    # fine, 2 exits: both 5% and 9.75% are reached after block 0; one exit per block, so the
    # second goes after block 1 (as in the reference)
    assert place_exits([10, 20, 30], [5, 9.75]) == [0, 1]
    assert place_exits([10, 20, 30], [5, 6, 7]) == [0, 1, 2]
    assert place_exits([10, 20], [5, 6, 7]) is None


def test_too_many_exits_is_rejected() -> None:
    with pytest.raises(ValueError, match=r"num_exits=8 .* at most 7 early exits"):
        _net(depth=20, num_exits=8, distribution="pareto")


def test_harness_convention_flops_differ_from_eenets_counter() -> None:
    plan = resnet_plan(EEResNetConfig(depth=20), CIFAR10)
    assert plan.total_flops(EEBENCH_RULES) == 41_005_706
    assert plan.total_flops(EENETS_RULES) == 41_407_104  # what the EENets code reports


# ---- Outputs ------------------------------------------------------------------------------------


def test_bnpool_batchstats_is_the_reference_untracked_batchnorm() -> None:
    """Not trained, not in the state dict, batch statistics in eval mode too (the reference bnpool)."""
    torch.manual_seed(0)
    tracked = _net(MNIST, depth=20, num_exits=2, exit_pool="bnpool")
    untracked = _net(MNIST, depth=20, num_exits=2, exit_pool="bnpool_batchstats")
    extra = set(tracked.state_dict()) - set(untracked.state_dict())
    assert extra and all(".pool.0." in key for key in extra)  # only the exits' BatchNorms are gone
    assert not set(untracked.state_dict()) - set(tracked.state_dict())
    untracked.load_state_dict({k: v for k, v in tracked.state_dict().items() if k not in extra})
    tracked.eval()
    for name, module in tracked.named_modules():  # a fresh BatchNorm (weight 1, bias 0) in train mode
        if name.endswith(".pool.0"):
            module.train()
    untracked.eval()  # ... is what the untracked one does in eval mode
    x = torch.randn(4, 1, 28, 28)
    with torch.no_grad():
        torch.testing.assert_close(untracked.forward_all(x).logits[0], tracked.forward_all(x).logits[0])
        alone = untracked.forward_all(x[:2]).logits[0]
    assert not torch.allclose(alone, untracked.forward_all(x).logits[0][:2])  # depends on the batch


@pytest.mark.parametrize(
    "spec, params",
    [
        (CIFAR10, dict(depth=20, num_exits=3, exit_pool="pool")),
        (CIFAR10, dict(depth=20, num_exits=3, exit_pool="plain", distribution="linear")),
        (MNIST, dict(depth=20, num_exits=2, exit_pool="bnpool")),
        (MNIST, dict(depth=20, num_exits=2, exit_pool="bnpool_batchstats")),
        (TINY, dict(depth=18, num_exits=2, exit_pool="plain", distribution="pareto")),
        (CIFAR10, dict(depth=50, num_exits=2, style="cifar")),
    ],
)
def test_output_shapes_and_gates(spec: InputSpec, params: dict) -> None:
    torch.manual_seed(0)
    net = _net(spec, **params).eval()
    with torch.no_grad():
        out = net.forward_all(torch.randn(3, spec.channels, spec.size, spec.size))
    assert net.num_exits == params["num_exits"] + 1 == len(out.logits) == len(out.features)
    assert len(out.gates) == net.num_exits
    for logits, features, conf in zip(out.logits, out.features, out.gates):
        assert logits.shape == (3, spec.num_classes)
        assert features.ndim == 2 and features.shape[0] == 3
        assert conf.shape == (3,)
        assert ((conf >= 0) & (conf <= 1)).all()
    assert out.features[-1].shape[1] == net.plan.final_channels


def test_plain_exit_uses_feature_map_size() -> None:
    net = _net(depth=20, num_exits=2, exit_pool="plain", distribution="linear")  # blocks 2 and 5
    assert net.exits[0].classifier.in_features == 16 * 32 * 32
    assert net.exits[1].classifier.in_features == 32 * 16 * 16


def test_upto_runs_only_what_it_needs() -> None:
    torch.manual_seed(0)
    net = _net(depth=20, num_exits=3, distribution="linear").eval()  # exits after blocks 2, 4, 6
    ran: list[int] = []
    for i, block in enumerate(net.blocks):
        block.register_forward_hook(lambda *_args, i=i: ran.append(i))
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        full = net.forward_all(x)
        ran.clear()
        part = net.forward_all(x, upto=2)
    assert ran == [0, 1, 2, 3, 4]
    assert len(part.logits) == 2
    for a, b in zip(part.logits + part.gates, full.logits[:2] + full.gates[:2]):
        torch.testing.assert_close(a, b)
    with pytest.raises(ValueError):
        net.forward_all(x, upto=5)


def test_forward_backward() -> None:
    torch.manual_seed(0)
    net = _net(depth=20, num_exits=2).train()
    out = net.forward_all(torch.randn(2, 3, 32, 32))
    loss = sum(torch.nn.functional.cross_entropy(logits, torch.tensor([0, 1])) for logits in out.logits)
    loss = loss + sum(c.mean() for c in out.gates)
    loss.backward()
    assert all(p.grad is not None for p in net.parameters())
    assert net(torch.randn(2, 3, 32, 32))[-1].shape == (2, 10)


# ---- Costs --------------------------------------------------------------------------------------


def test_cost_ratios_increase_to_one() -> None:
    net = _net(depth=20, num_exits=3, distribution="linear")
    costs = exit_flops(net, (3, 32, 32), "reference")
    baseline = baseline_cost(net, (3, 32, 32), "reference")
    ratios = [f / baseline for f in costs["flops"]]
    assert all(a < b for a, b in zip(ratios, ratios[1:]))
    # the final exit also pays for the early heads and its confidence head: just over 1
    assert 1 <= ratios[-1] < 1.001
    # exit 1 = backbone up to its block + its head (16*32*32 pool + 17 + 170 linear)
    assert costs["flops"][0] == net.backbone_flops[net.exit_blocks[0]] + 16 * 32 * 32 + 17 + 170
    assert costs["params"] == sorted(costs["params"])


@pytest.mark.slow
def test_cost_ratios_resnet110() -> None:
    net = _net(depth=110, num_exits=8)
    ratios = [f / baseline_cost(net, (3, 32, 32)) for f in exit_flops(net, (3, 32, 32))["flops"]]
    assert all(a < b for a, b in zip(ratios, ratios[1:]))
    assert 1 <= ratios[-1] < 1.001


# ---- Config -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "params, message",
    [
        (dict(depth=21), "depth=21"),
        (dict(depth=21), "6n+2"),
        (dict(depth=20, style="imagenet"), "18, 34, 50, 101, 152"),
        (dict(depth=18, style="cifar"), "depth=18"),
        (dict(num_exits=-1), "num_exits=-1"),
        (dict(distribution="quadratic"), "pareto, fine, linear, gold_ratio"),
        (dict(exit_pool="max"), "exit_pool='max'; allowed: pool, bnpool, bnpool_batchstats, plain"),
        (dict(style="resnet"), "style='resnet'; allowed: auto, cifar, imagenet"),
        (dict(width=0), "width=0"),
    ],
)
def test_validate_errors(params: dict, message: str) -> None:
    with pytest.raises(ValueError, match="ee_resnet: invalid") as err:
        EEResNetConfig(**params).validate()
    assert message in str(err.value)


def test_style_rule() -> None:
    assert EEResNetConfig(depth=50).resolved_style() == "imagenet"
    assert EEResNetConfig(depth=50, style="cifar").resolved_style() == "cifar"
    assert EEResNetConfig(depth=110).resolved_style() == "cifar"
    assert EEResNetConfig(depth=110).resolved_width() == 16
    assert EEResNetConfig(depth=18).resolved_width() == 64


def test_registry() -> None:
    config = make_config("ee_resnet", {"depth": 32, "num_exits": 2})
    assert isinstance(config, EEResNetConfig)
    with pytest.raises(ValueError, match="num_ee"):
        make_config("ee_resnet", {"num_ee": 2})


# ---- num_exits 0: the plain ResNet as a one-exit network ------------------------------------------


def test_zero_early_exits_is_the_plain_resnet() -> None:
    torch.manual_seed(0)
    net = _net(depth=20, num_exits=0)
    assert net.num_exits == 1 and net.exit_blocks == [] and len(net.exits) == 1
    out = net.forward_all(torch.randn(2, 3, 32, 32))
    assert [logits.shape for logits in out.logits] == [(2, 10)]
    assert len(out.gates) == 1 and out.gates[0].shape == (2,)
    # the plain ResNet's FLOPs plus the final confidence head (64 weights + 1 bias)
    costs = exit_flops(net, (3, 32, 32), "reference")
    assert costs["flops"] == [41_005_706 + 65] == [net.total_flops + 65]
    assert baseline_cost(net, (3, 32, 32), "reference") == 41_005_706
    # same parameters as the plain counterpart, plus the confidence head
    assert _params(net) == _params(net.plain_counterpart()) + 65 == 272_474 + 65

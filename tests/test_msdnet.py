"""MSDNet: per-exit FLOPs and parameters against the reference table, shapes, and config checks."""

from __future__ import annotations

import functools

import pytest
import torch
from torch import nn

from eebench.flops import exit_flops
from models import ARCHITECTURES, InputSpec, build_model, list_architectures
from models.msdnet import MSDNet, MSDNetConfig, Transition

CIFAR10 = InputSpec(3, 32, 10)
CIFAR100 = InputSpec(3, 32, 100)
IMAGENET = InputSpec(3, 224, 1000)
IMAGENET_PARAMS = dict(
    n_blocks=5,
    step_mode="even",
    step=4,
    base=4,
    n_channels=32,
    growth_rate=16,
    gr_factor=[1, 2, 4, 4],
    bn_factor=[1, 2, 4, 4],
    n_scales=4,
)
TINY = dict(n_blocks=4, n_channels=8, growth_rate=4, step_mode="lin_grow", step=1, base=1)

# (id, config, input, cumulative M FLOPs per exit, params at the last exit, slow to count)
# from running the reference op_counter.py. Counting takes
# several seconds per row, so by default only the smallest row and the default (7-exit) config run.
REFERENCE_ROWS = [
    ("nB5-c10", dict(n_blocks=5), CIFAR10, [6.85, 14.33, 27.50, 41.67, 58.42], 2.02e6, True),
    ("nB5-c100", dict(n_blocks=5), CIFAR100, [6.86, 14.35, 27.54, 41.71, 58.48], 2.08e6, True),
    ("nB7-c10", dict(n_blocks=7), CIFAR10, [6.85, 14.33, 27.26, 48.40, 76.37, 108.78, 137.20], 3.89e6, True),
    ("nB7-c100", dict(n_blocks=7), CIFAR100, [6.86, 14.35, 27.29, 48.45, 76.43, 108.85, 137.28], 3_966_664, False),
    ("nB4-c100", dict(n_blocks=4), CIFAR100, [6.86, 14.35, 26.13, 38.04], 1.42e6, False),
    ("nB6-c100", dict(n_blocks=6), CIFAR100, [6.86, 14.35, 27.29, 46.56, 67.43, 89.09], 2.85e6, True),
    (
        "nB7-even-s2-b4-c100",
        dict(n_blocks=7, step_mode="even", step=2, base=4),
        CIFAR100,
        [15.14, 25.51, 37.10, 46.33, 57.34, 66.96, 75.94],
        3.07e6,
        True,
    ),
    ("imagenet-step4", IMAGENET_PARAMS, IMAGENET, [339.90, 685.46, 1008.16, 1254.47, 1360.53], 23.96e6, True),
]


def _row_params(slow_marked: bool):
    return [
        pytest.param(cfg, spec, flops, params, id=name, marks=[pytest.mark.slow] if slow and slow_marked else [])
        for name, cfg, spec, flops, params, slow in REFERENCE_ROWS
    ]


@functools.cache
def _costs(cfg_items: tuple, spec: InputSpec) -> dict[str, list[int]]:
    model = build_model("msdnet", spec, **dict(cfg_items))
    return exit_flops(model, (spec.channels, spec.size, spec.size), "reference")


def _freeze(cfg: dict) -> tuple:
    return tuple((k, tuple(v) if isinstance(v, list) else v) for k, v in sorted(cfg.items()))


@pytest.mark.parametrize("cfg, spec, ref_flops, ref_params", _row_params(slow_marked=True))
def test_per_exit_flops_and_params_match_reference(cfg, spec, ref_flops, ref_params):
    costs = _costs(_freeze(cfg), spec)
    assert len(costs["flops"]) == len(ref_flops)
    for k, (got, want) in enumerate(zip(costs["flops"], ref_flops), start=1):
        assert got / 1e6 == pytest.approx(want, rel=5e-3), f"exit {k}"
    assert costs["params"][-1] == pytest.approx(ref_params, rel=1e-2)
    assert costs["flops"] == sorted(costs["flops"])


@pytest.mark.parametrize("cfg, spec, ref_flops, ref_params", _row_params(slow_marked=False))
def test_exit_count_and_total_params_match_reference(cfg, spec, ref_flops, ref_params):
    model = build_model("msdnet", spec, **cfg)
    assert model.num_exits == len(ref_flops)
    assert sum(p.numel() for p in model.parameters()) == pytest.approx(ref_params, rel=1e-2)


def test_default_config_is_the_7_exit_cifar_model():
    model = MSDNet(MSDNetConfig(), CIFAR100)
    assert model.num_exits == 7
    assert sum(p.numel() for p in model.parameters()) == 3_966_664


@pytest.mark.parametrize(
    "params, spec, feature_dim",
    [
        pytest.param(TINY, InputSpec(3, 32, 10), 128, id="tiny-digits"),
        pytest.param(dict(TINY, prune="min"), InputSpec(3, 32, 10), 128, id="prune-min"),
        pytest.param(
            dict(TINY, bottleneck=False, reduction=0.0), InputSpec(3, 32, 7), 128, id="no-bottleneck-no-reduction"
        ),
        pytest.param(dict(TINY, step_mode="even", step=2, base=3), InputSpec(1, 28, 10), 128, id="even-grey-28px"),
        # ImageNet layout at 64 px: 2 scales (16x16 and 8x8), heads as wide as their input
        pytest.param(
            dict(n_blocks=2, n_channels=8, growth_rate=4, n_scales=2, gr_factor=(1, 2), bn_factor=(1, 2)),
            InputSpec(3, 64, 5),
            None,
            id="imagenet-layout",
        ),
    ],
)
def test_shapes_and_backward(params, spec, feature_dim):
    model = build_model("msdnet", spec, **params)
    x = torch.randn(2, spec.channels, spec.size, spec.size)
    out = model.forward_all(x)
    assert out.gates is None
    assert len(out.logits) == len(out.features) == model.num_exits
    for head, logits, feats in zip(model.heads, out.logits, out.features):
        assert logits.shape == (2, spec.num_classes)
        assert feats.shape == (2, feature_dim or head.linear.in_features)
        assert head.linear.in_features == feats.shape[1]
    sum(nn.functional.cross_entropy(z, torch.tensor([0, 1])) for z in out.logits).backward()
    assert all(p.grad is not None for p in model.parameters())


def test_upto_computes_only_a_prefix():
    model = build_model("msdnet", CIFAR10, **TINY).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        full = model.forward_all(x)
        prefix = model.forward_all(x, upto=2)
    assert len(prefix.logits) == len(prefix.features) == 2
    for a, b in zip(prefix.logits, full.logits[:2]):
        torch.testing.assert_close(a, b)
    assert len(model(x, upto=1)) == 1
    with pytest.raises(ValueError, match="upto"):
        model.forward_all(x, upto=model.num_exits + 1)


@pytest.mark.parametrize("prune, transitions", [("max", 2), ("min", 2)])
def test_transitions_follow_the_prune_mode(prune, transitions):
    model = build_model("msdnet", CIFAR10, **dict(TINY, prune=prune))
    assert sum(isinstance(m, Transition) for m in model.modules()) == transitions
    no_reduction = build_model("msdnet", CIFAR10, **dict(TINY, prune=prune, reduction=0))
    assert not any(isinstance(m, Transition) for m in no_reduction.modules())


def test_reference_initialisation():
    model = build_model("msdnet", CIFAR10, **TINY)
    conv = model.heads[0].body[1][0]  # 128 -> 128, 3x3: large enough to check the spread
    fan_out = conv.kernel_size[0] * conv.kernel_size[1] * conv.out_channels
    assert conv.weight.std().item() == pytest.approx((2 / fan_out) ** 0.5, rel=0.05)
    assert abs(conv.weight.mean().item()) < 0.01 * (2 / fan_out) ** 0.5 * 10
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            assert torch.all(m.weight == 1) and torch.all(m.bias == 0)
        if isinstance(m, nn.Linear):
            assert torch.all(m.bias == 0)


def test_registered():
    assert "msdnet" in list_architectures()
    arch = ARCHITECTURES["msdnet"]
    assert arch.config_class is MSDNetConfig and arch.network_class is MSDNet


def test_tuples_are_accepted():
    MSDNetConfig(gr_factor=(1, 2, 4), bn_factor=(1, 2, 4)).validate(32)


@pytest.mark.parametrize(
    "params, fragments",
    [
        (dict(gr_factor=[1, 2]), ["gr_factor=[1, 2]", "length n_scales=3"]),
        (dict(bn_factor=(1, 2, 4, 4)), ["bn_factor", "length n_scales=3"]),
        (dict(gr_factor=[1, 0, 4]), ["gr_factor", "positive integers"]),
        (dict(step_mode="linear"), ["step_mode='linear'", "even, lin_grow"]),
        (dict(prune="avg"), ["prune='avg'", "min, max"]),
        (dict(n_blocks=0), ["n_blocks=0", "positive integer"]),
        (dict(step=1.5), ["step=1.5", "positive integer"]),
        (dict(reduction=1.5), ["reduction=1.5", "[0, 1]"]),
        (dict(reduction=0.01), ["reduction=0.01", "at least one channel"]),
        (dict(growth_rate=5, gr_factor=[1, 1, 1], bn_factor=[1, 1, 1]), ["growth_rate=5", "even"]),
        (dict(bottleneck="yes"), ["bottleneck='yes'", "true or false"]),
    ],
)
def test_validate_rejects_bad_values(params, fragments):
    with pytest.raises(ValueError) as err:
        MSDNetConfig(**params).validate()
    for fragment in fragments:
        assert fragment in str(err.value)


def test_validate_checks_scales_fit_the_input():
    config = MSDNetConfig(n_scales=4, gr_factor=[1, 2, 4, 4], bn_factor=[1, 2, 4, 4])
    config.validate()  # fine without an input size
    with pytest.raises(ValueError, match=r"n_scales=4.*input size 32.*4x4"):
        config.validate(32)
    with pytest.raises(ValueError, match="n_scales=4"):
        MSDNet(config, CIFAR10)
    with pytest.raises(ValueError, match="n_scales=4"):
        build_model("msdnet", InputSpec(3, 64, 10), n_scales=4, gr_factor=[1, 2, 4, 4], bn_factor=[1, 2, 4, 4])


def test_build_model_validates():
    with pytest.raises(ValueError, match="step_mode"):
        build_model("msdnet", CIFAR10, step_mode="grow")


def test_fold_batchnorm_keeps_the_outputs_and_folds_every_msdnet_batchnorm():
    from torch import nn

    from models.base import fold_batchnorm

    torch.manual_seed(0)
    net = build_model("msdnet", InputSpec(3, 32, 10), n_blocks=3, n_channels=6, growth_rate=4)
    for m in net.modules():  # statistics as after training, not the identity of a fresh BN
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.uniform_(-0.5, 0.5)
    x = torch.randn(8, 3, 32, 32)
    with pytest.raises(ValueError, match="eval mode"):
        fold_batchnorm(net)
    net.eval()
    with torch.no_grad():
        before = net.forward_all(x)
    n_bn = sum(isinstance(m, nn.BatchNorm2d) for m in net.modules())
    assert fold_batchnorm(net) == n_bn and not any(isinstance(m, nn.BatchNorm2d) for m in net.modules())
    with torch.no_grad():
        after = net.forward_all(x)
    for a, b in zip(before.logits + before.features, after.logits + after.features):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-4 * float(a.abs().max()))

"""RANet: per-exit FLOPs and params against the reference counter, shapes, upto, validation."""

from __future__ import annotations

import pytest
import torch

from eebench.flops import exit_flops
from models import InputSpec, build_model, make_config
from models.ranet import RANet, RANetConfig

# Reference per-exit FLOPs (M, measured with the reference op_counter.py) and final params (M).
CIFAR8 = {}  # train_cifar.sh: the config defaults
MODEL1 = dict(step=2, step_mode="lg", scale_list=[1, 2, 3], gr_factor=[4, 2, 1], bn_factor=[4, 2, 1])
IMAGENET8 = dict(
    step=8, growth_rate=16, n_channels=16, scale_list=[1, 2, 3, 4], gr_factor=[4, 2, 1, 1], bn_factor=[4, 2, 1, 1]
)
TINY = dict(
    n_channels=8,
    growth_rate=4,
    step=2,
    n_blocks=1,
    block_step=1,
    scale_list=[1, 2, 3],
    gr_factor=[4, 2, 1],
    bn_factor=[4, 2, 1],
)

ROWS = [
    pytest.param(CIFAR8, 32, 100, [15.83, 31.31, 44.69, 50.40, 60.71, 63.72, 90.26, 95.00], 3.36, id="cifar8-c100"),
    pytest.param(CIFAR8, 32, 10, [15.81, 31.28, 44.66, 50.36, 60.65, 63.65, 90.17, 94.90], None, id="cifar8-c10"),
    pytest.param(MODEL1, 32, 100, [8.37, 21.79, 32.88, 41.57, 53.28, 58.99], 2.62, id="model1-c100"),
    pytest.param(MODEL1, 32, 10, [8.36, 21.77, 32.84, 41.52, 53.23, 58.92], None, id="model1-c10"),
    pytest.param(
        IMAGENET8,
        224,
        1000,
        [168.07, 520.47, 731.89, 903.79, 1052.25, 1118.80, 1589.01, 1680.98],
        87.97,
        id="imagenet8",
        marks=pytest.mark.slow,
    ),
]


def _build(params: dict, size: int, classes: int, channels: int = 3) -> RANet:
    torch.manual_seed(0)
    return build_model("ranet", InputSpec(channels, size, classes), **params)


@pytest.mark.parametrize("params,size,classes,ref_flops,ref_params", ROWS)
def test_reference_flops_and_params(params, size, classes, ref_flops, ref_params):
    net = _build(params, size, classes)
    assert net.num_exits == len(ref_flops)
    costs = exit_flops(net, (3, size, size), "reference")
    for k, (got, ref) in enumerate(zip(costs["flops"], ref_flops), start=1):
        assert got / 1e6 == pytest.approx(ref, rel=0.005), f"exit {k}"
    assert costs["flops"] == sorted(costs["flops"])
    if ref_params is not None:
        assert costs["params"][-1] / 1e6 == pytest.approx(ref_params, rel=0.01)


def test_imagenet_row_params_fast():
    """The slow FLOPs row's architecture, checked cheaply: exit count and total parameters."""
    net = _build(IMAGENET8, 224, 1000)
    assert net.num_exits == 8
    assert sum(p.numel() for p in net.parameters()) / 1e6 == pytest.approx(87.97, rel=0.01)


def test_exits_ordered_flow_by_flow():
    net = _build(CIFAR8, 32, 10)
    assert net.exit_blocks == [(0, 0), (0, 1), (1, 2), (1, 3), (2, 4), (2, 5), (3, 6), (3, 7)]
    lg = RANetConfig(**MODEL1)
    assert [lg.layers_in_block(b) for b in range(1, 7)] == [2, 4, 6, 8, 10, 12]


@pytest.mark.parametrize(
    "params,size,classes,channels,feat",
    [
        (TINY, 32, 10, 3, 128),
        (TINY, 28, 7, 1, 128),
        (dict(TINY, n_channels=4), 64, 5, 3, None),  # ImageNet stem and heads
        (dict(TINY, step_mode="lg", bottleneck=False), 32, 10, 3, 128),
    ],
)
def test_output_shapes(params, size, classes, channels, feat):
    net = _build(params, size, classes, channels).eval()
    with torch.no_grad():
        out = net.forward_all(torch.randn(2, channels, size, size))
    assert len(out.logits) == len(out.features) == net.num_exits == 3
    assert out.gates is None
    for head, logits, features in zip(net.heads, out.logits, out.features):
        assert logits.shape == (2, classes)
        assert features.shape == (2, head.linear.in_features)
        if feat is not None:
            assert features.shape[1] == feat


def test_forward_backward_small():
    net = _build(TINY, 32, 10).train()
    x, y = torch.randn(2, 3, 32, 32), torch.tensor([1, 7])
    loss = sum(torch.nn.functional.cross_entropy(logits, y) for logits in net(x))
    loss.backward()
    grads = [p.grad for p in net.parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    assert any(g.abs().sum() > 0 for g in net.heads[-1].parameters())


def test_upto_runs_only_the_prefix():
    net = _build(dict(TINY, n_blocks=2), 32, 10).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        full = net.forward_all(x)
    heads_ran: set[int] = set()
    blocks_ran: set[tuple[int, int]] = set()
    hooks = [h.register_forward_hook(lambda mod, i, o, k=k: heads_ran.add(k)) for k, h in enumerate(net.heads)]
    hooks += [
        block.register_forward_hook(lambda mod, i, o, pos=(f, b): blocks_ran.add(pos))
        for f, flow in enumerate(net.flows)
        for b, block in enumerate(flow)
    ]
    for k in range(1, net.num_exits + 1):
        heads_ran.clear()
        blocks_ran.clear()
        with torch.no_grad():
            out = net.forward_all(x, upto=k)
        assert len(out.logits) == len(out.features) == k
        for a, b in zip(out.logits, full.logits[:k]):
            torch.testing.assert_close(a, b)
        assert heads_ran == set(range(k))
        assert max(blocks_ran) == net.exit_blocks[k - 1]  # no block beyond exit k's
    for h in hooks:
        h.remove()
    for bad in (0, net.num_exits + 1):
        with pytest.raises(ValueError, match="upto"):
            net.forward_all(x, upto=bad)


def test_tuples_accepted_and_registered():
    params = dict(scale_list=(1, 2, 3), gr_factor=(4, 2, 1), bn_factor=(4, 2, 1))
    config = make_config("ranet", params)
    assert isinstance(config, RANetConfig)
    net = RANet(config, InputSpec(3, 32, 10))
    assert net.num_exits == 6


@pytest.mark.parametrize(
    "params,size,match",
    [
        (dict(step_mode="lin_grow"), None, r"step_mode='lin_grow'.*allowed: 'even', 'lg'"),
        (dict(gr_factor=[4, 2, 1]), None, r"gr_factor=\[4, 2, 1\] has 3 entries but scale_list"),
        (dict(bn_factor=[4, 2]), None, r"bn_factor=\[4, 2\] has 2 entries"),
        (dict(scale_list=[1, 3, 3, 3]), None, r"scale_list=\[1, 3, 3, 3\].*raise it by 1"),
        (dict(scale_list=[2, 2, 3, 3]), None, r"scale_list=\[2, 2, 3, 3\].*start at 1"),
        (dict(scale_list="1-2-3-3"), None, r"scale_list='1-2-3-3'.*list of integers"),
        (dict(gr_factor=[4, 0, 1, 1]), None, r"gr_factor=\[4, 0, 1, 1\].*integers >= 1"),
        (dict(n_blocks=0), None, r"n_blocks=0.*integer >= 1"),
        (dict(step=2.5), None, r"step=2.5.*integer >= 1"),
        (dict(compress_factor=1.0), None, r"compress_factor=1.0.*between 0 and 1"),
        (dict(reduction=0.0), None, r"reduction=0.0.*\(0, 1\]"),
        (dict(growth_rate=1), None, r"growth_rate=1 with gr_factor\[1\]=2"),
        (dict(bottleneck="yes"), None, r"bottleneck='yes'"),
        (dict(), 30, r"scale_list=\[1, 2, 3, 3\] does not fit input size 30.*multiple of 4"),
        (
            dict(scale_list=[1, 2, 3, 4, 5, 6, 7], gr_factor=[1] * 7, bn_factor=[1] * 7),
            32,
            r"does not fit input size 32.*multiple of 64",
        ),
        (
            dict(scale_list=[1, 2, 3, 4], gr_factor=[4, 2, 1, 1], bn_factor=[4, 2, 1, 1]),
            80,
            r"does not fit input size 80.*halves the input 5 times",
        ),
    ],
)
def test_validate_errors(params, size, match):
    with pytest.raises(ValueError, match=match):
        RANetConfig(**params).validate(size)
    if size is not None:
        with pytest.raises(ValueError, match=match):
            RANet(RANetConfig(**params), InputSpec(3, size, 10))


def test_defaults_are_valid():
    RANetConfig().validate(32)
    RANetConfig(**IMAGENET8).validate(224)

"""MSDNet: Multi-Scale Dense Networks (Huang et al., ICLR 2018).

The network keeps a feature map at ``n_scales`` resolutions. Every layer is a dense layer at each
scale: scale s receives a regular 3x3 conv of its own map and, on coarser scales, a strided 3x3
conv of the finer map s-1; both are concatenated onto the input (DenseNet style). Layers are
grouped into ``n_blocks`` blocks, and an exit head on the coarsest scale follows each block. As
depth grows, the finest scales are dropped (``prune``) and 1x1 transitions halve the width.

Inputs smaller than 64 pixels get the CIFAR layout (3x3 stem, 128-wide exit heads); larger ones
the ImageNet layout (7x7 stride-2 stem with max-pool, heads as wide as their input). With the
defaults below and a 3x32x32 input, this is the 7-exit CIFAR "budgeted batch" model.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from . import register_architecture
from .base import GRADIENT_RESCALING, InputSpec, MultiExitNetwork, scale_gradient
from .base import ExitHead as HeadOutput

IMAGENET_MIN_SIZE = 64  # inputs at least this large get the ImageNet stem and heads
CIFAR_HEAD_WIDTH = 128
STEP_MODES = ("even", "lin_grow")
PRUNE_MODES = ("min", "max")


# --------------------------------------------------------------------------------------------
# Configuration
# --------------------------------------------------------------------------------------------


@dataclass
class MSDNetConfig:
    n_blocks: int = 7
    step_mode: str = "lin_grow"
    step: int = 1
    base: int = 1
    n_channels: int = 16
    growth_rate: int = 6
    gr_factor: list[int] = field(default_factory=lambda: [1, 2, 4])
    bn_factor: list[int] = field(default_factory=lambda: [1, 2, 4])
    n_scales: int = 3
    prune: str = "max"
    reduction: float = 0.5
    bottleneck: bool = True

    def validate(self, input_size: int | None = None) -> None:
        """Raise ValueError naming the first bad key; ``input_size`` also checks the scales fit."""
        for key in ("n_blocks", "step", "base", "n_channels", "growth_rate", "n_scales"):
            _check(
                _is_int(getattr(self, key)) and getattr(self, key) >= 1, key, getattr(self, key), "a positive integer"
            )
        _check(self.step_mode in STEP_MODES, "step_mode", self.step_mode, f"one of {', '.join(STEP_MODES)}")
        _check(self.prune in PRUNE_MODES, "prune", self.prune, f"one of {', '.join(PRUNE_MODES)}")
        _check(isinstance(self.bottleneck, bool), "bottleneck", self.bottleneck, "true or false")
        _check(
            isinstance(self.reduction, (int, float))
            and not isinstance(self.reduction, bool)
            and 0 <= self.reduction <= 1,
            "reduction",
            self.reduction,
            "a number in [0, 1] (0 disables the transition layers)",
        )
        for key in ("gr_factor", "bn_factor"):
            self._validate_factors(key)
        half_widths = [self.growth_rate * g for g in self.gr_factor[1:]]
        _check(
            all(w % 2 == 0 for w in half_widths),
            "growth_rate",
            self.growth_rate,
            "a value making growth_rate * gr_factor[s] even on every scale s >= 1 "
            "(those scales split new channels between a strided and a regular conv)",
        )
        for plan in layer_plan(self):
            _check(
                plan.width_out >= 1,
                "reduction",
                self.reduction,
                f"a value leaving at least one channel after a transition (width "
                f"{plan.width_in} + growth {self.growth_rate} shrinks to {plan.width_out})",
            )
        if input_size is not None:
            self._validate_input_size(input_size)

    def _validate_factors(self, key: str) -> None:
        value = getattr(self, key)
        _check(
            isinstance(value, (list, tuple)) and all(_is_int(v) and v >= 1 for v in value),
            key,
            value,
            "a list of positive integers, one per scale",
        )
        _check(len(value) == self.n_scales, key, value, f"a list of length n_scales={self.n_scales}")

    def _validate_input_size(self, input_size: int) -> None:
        coarsest = scale_sizes(input_size, self.n_scales)[-1]
        _check(
            coarsest >= 5,
            "n_scales",
            self.n_scales,
            f"at most as many scales as input size {input_size} allows: the coarsest scale is "
            f"{coarsest}x{coarsest}, but an exit head (two stride-2 convs and a 2x2 average "
            f"pool) needs at least 5x5",
        )


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _check(ok: bool, key: str, value: object, allowed: str) -> None:
    if not ok:
        raise ValueError(f"msdnet: invalid {key}={value!r}; allowed: {allowed}")


def _halve(size: int) -> int:
    """Output size of a 3x3 stride-2 conv with padding 1 (also the 7x7/s2 stem and 3x3/s2 pool)."""
    return (size - 1) // 2 + 1


def scale_sizes(input_size: int, n_scales: int) -> list[int]:
    """Spatial size of each scale's feature map."""
    size = input_size
    if input_size >= IMAGENET_MIN_SIZE:
        size = _halve(_halve(size))  # 7x7 stride-2 conv, then 3x3 stride-2 max-pool
    sizes = [size]
    for _ in range(1, n_scales):
        sizes.append(_halve(sizes[-1]))
    return sizes


def block_steps(config: MSDNetConfig) -> list[int]:
    """Layers per block: even [base, step, step, ...], lin_grow [base, step+1, 2*step+1, ...]."""
    if config.step_mode == "even":
        return [config.base] + [config.step] * (config.n_blocks - 1)
    return [config.base] + [config.step * i + 1 for i in range(1, config.n_blocks)]


@dataclass(frozen=True)
class LayerPlan:
    """One MSD layer: the scales it reads and writes, and its width before and after.

    Widths are per unit of ``gr_factor``: scale s holds ``width * gr_factor[s]`` channels.
    """

    scales_in: int
    scales_out: int
    width_in: int
    width_out: int
    transition: bool


def _scales_out(config: MSDNetConfig, total: int) -> list[int]:
    """Scales each layer outputs; pruning drops the finest scale, at most one per layer."""
    n = config.n_scales
    if config.prune == "max":  # drop evenly: one scale every ceil(total / n_scales) layers
        interval = math.ceil(total / n)
        return [n - (t - 1) // interval for t in range(1, total + 1)]
    # min: keep every scale until the last layers, which only feed the coarsest exit head
    return [min(n, total - t + 1) for t in range(1, total + 1)]


def layer_plan(config: MSDNetConfig) -> list[LayerPlan]:
    total = sum(block_steps(config))
    outs = _scales_out(config, total)
    plans, width, scales_in = [], config.n_channels, config.n_scales
    for t, scales_out in enumerate(outs, start=1):
        grown = width + config.growth_rate
        if config.reduction <= 0:
            transition = False
        elif config.prune == "max":
            transition = scales_out < scales_in
        else:
            transition = t in (total // 3, 2 * total // 3)
        width_out = math.floor(config.reduction * grown) if transition else grown
        plans.append(LayerPlan(scales_in, scales_out, width, width_out, transition))
        width, scales_in = width_out, scales_out
    return plans


# --------------------------------------------------------------------------------------------
# Building blocks
# --------------------------------------------------------------------------------------------


class ConvBNReLU(nn.Sequential):
    def __init__(self, c_in: int, c_out: int, kernel: int = 3, stride: int = 1):
        super().__init__(
            nn.Conv2d(c_in, c_out, kernel, stride, padding=kernel // 2, bias=False),
            nn.BatchNorm2d(c_out),
            nn.ReLU(inplace=True),
        )


def dense_conv(c_in: int, c_out: int, stride: int, bottleneck: bool, bn_factor: int) -> nn.Sequential:
    """3x3 conv, preceded by a 1x1 bottleneck to min(c_in, bn_factor * c_out) channels."""
    layers: list[nn.Module] = []
    if bottleneck:
        inner = min(c_in, bn_factor * c_out)
        layers.append(ConvBNReLU(c_in, inner, kernel=1))
        c_in = inner
    layers.append(ConvBNReLU(c_in, c_out, kernel=3, stride=stride))
    return nn.Sequential(*layers)


class DenseUnit(nn.Module):
    """One scale of an MSD layer: [input, strided conv of finer input, conv of input]."""

    def __init__(self, c_same: int, c_finer: int | None, c_new: int, config: MSDNetConfig, scale: int):
        super().__init__()
        bn = config.bn_factor
        c_conv = c_new if c_finer is None else c_new // 2  # the two convs share the new channels
        self.down = None
        if c_finer is not None:
            self.down = dense_conv(c_finer, c_conv, 2, config.bottleneck, bn[scale - 1])
        self.regular = dense_conv(c_same, c_conv, 1, config.bottleneck, bn[scale])

    def forward(self, same: torch.Tensor, finer: torch.Tensor | None = None) -> torch.Tensor:
        parts = [same]
        if self.down is not None:
            parts.append(self.down(finer))
        parts.append(self.regular(same))
        return torch.cat(parts, dim=1)


class MSDLayer(nn.Module):
    """A dense layer at every output scale. Inputs and outputs are lists, finest scale first."""

    def __init__(self, plan: LayerPlan, config: MSDNetConfig):
        super().__init__()
        n, gr, w = config.n_scales, config.gr_factor, plan.width_in
        self.first_in = n - plan.scales_in
        self.first_out = n - plan.scales_out
        units = []
        for s in range(self.first_out, n):
            # The first kept scale has no finer neighbour unless this layer drops one.
            c_finer = w * gr[s - 1] if s - 1 >= self.first_in else None
            units.append(DenseUnit(w * gr[s], c_finer, config.growth_rate * gr[s], config, s))
        self.units = nn.ModuleList(units)

    def forward(self, xs: list[torch.Tensor]) -> list[torch.Tensor]:
        out = []
        for s, unit in enumerate(self.units, start=self.first_out):
            i = s - self.first_in
            out.append(unit(xs[i], xs[i - 1] if unit.down is not None else None))
        return out


class Transition(nn.Module):
    """A 1x1 ConvBNReLU per scale, shrinking the width after a scale is dropped."""

    def __init__(self, plan: LayerPlan, config: MSDNetConfig):
        super().__init__()
        gr = config.gr_factor
        scales = range(config.n_scales - plan.scales_out, config.n_scales)
        grown = plan.width_in + config.growth_rate
        self.convs = nn.ModuleList(ConvBNReLU(grown * gr[s], plan.width_out * gr[s], kernel=1) for s in scales)

    def forward(self, xs: list[torch.Tensor]) -> list[torch.Tensor]:
        return [conv(x) for conv, x in zip(self.convs, xs)]


class Stem(nn.Module):
    """The first feature map at every scale, each a strided conv of the previous one."""

    def __init__(self, c_in: int, config: MSDNetConfig, imagenet: bool):
        super().__init__()
        widths = [config.n_channels * g for g in config.gr_factor]
        if imagenet:
            first = nn.Sequential(
                # the reference keeps this conv's (redundant) bias; kept so parameter counts match
                nn.Conv2d(c_in, widths[0], 7, stride=2, padding=3, bias=True),
                nn.BatchNorm2d(widths[0]),
                nn.ReLU(inplace=True),
                nn.MaxPool2d(3, stride=2, padding=1),
            )
        else:
            first = ConvBNReLU(c_in, widths[0])
        down = [ConvBNReLU(a, b, stride=2) for a, b in zip(widths[:-1], widths[1:])]
        self.layers = nn.ModuleList([first, *down])

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        out = []
        for layer in self.layers:
            x = layer(x)
            out.append(x)
        return out


class ExitHead(nn.Module):
    """Two stride-2 ConvBNReLUs, a 2x2 average pool and a linear classifier."""

    def __init__(self, c_in: int, width: int, in_size: int, num_classes: int):
        super().__init__()
        pooled = _halve(_halve(in_size)) // 2
        self.body = nn.Sequential(
            ConvBNReLU(c_in, width, stride=2),
            ConvBNReLU(width, width, stride=2),
            nn.AvgPool2d(2),
            nn.Flatten(),
        )
        self.linear = nn.Linear(width * pooled * pooled, num_classes)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        features = self.body(x)
        return self.linear(features), features


def init_weights(module: nn.Module) -> None:
    """He-normal convs (fan-out), unit batch norm, zero linear bias (weights keep the default)."""
    if isinstance(module, nn.Conv2d):
        fan_out = module.kernel_size[0] * module.kernel_size[1] * module.out_channels
        nn.init.normal_(module.weight, 0.0, math.sqrt(2.0 / fan_out))
    elif isinstance(module, nn.BatchNorm2d):
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)
    elif isinstance(module, nn.Linear) and module.bias is not None:
        nn.init.zeros_(module.bias)


# --------------------------------------------------------------------------------------------
# The network
# --------------------------------------------------------------------------------------------


@register_architecture("msdnet", MSDNetConfig)
class MSDNet(MultiExitNetwork):
    capabilities = frozenset({GRADIENT_RESCALING})
    test_params = {"n_blocks": 3, "n_channels": 4, "growth_rate": 2}

    def __init__(self, config: MSDNetConfig, input_spec: InputSpec):
        super().__init__()
        config.validate(input_spec.size)
        self.config = config
        self.num_exits = config.n_blocks
        self.gradient_rescaling = False  # BoostNet's gradient equilibrium, off unless asked for
        imagenet = input_spec.size >= IMAGENET_MIN_SIZE
        coarsest = scale_sizes(input_spec.size, config.n_scales)[-1]

        self.stem = Stem(input_spec.channels, config, imagenet)
        plans = iter(layer_plan(config))
        blocks, heads = [], []
        for n_layers in block_steps(config):
            block_plans = [next(plans) for _ in range(n_layers)]
            blocks.append(self._block(block_plans, config))
            c_head = block_plans[-1].width_out * config.gr_factor[-1]
            width = c_head if imagenet else CIFAR_HEAD_WIDTH
            heads.append(ExitHead(c_head, width, coarsest, input_spec.num_classes))
        self.blocks = nn.ModuleList(blocks)
        self.heads = nn.ModuleList(heads)
        self.apply(init_weights)

    @staticmethod
    def _block(plans: Sequence[LayerPlan], config: MSDNetConfig) -> nn.Sequential:
        layers: list[nn.Module] = []
        for plan in plans:
            layers.append(MSDLayer(plan, config))
            if plan.transition:
                layers.append(Transition(plan, config))
        return nn.Sequential(*layers)

    def set_gradient_rescaling(self, enabled: bool) -> None:
        """Scale head k's gradient into the coarsest scale by 1/(K-k) and the deeper blocks' by
        (K-k-1)/(K-k), so each block gets the mean of its heads' gradients (BoostNet, IMTA)."""
        self.gradient_rescaling = enabled

    # Segments (models.base): the state is the list of scales, finest first.
    def begin(self, x: torch.Tensor) -> list[torch.Tensor]:
        return self.stem(x)

    def run_segment(self, k: int, scales: list[torch.Tensor]) -> list[torch.Tensor]:
        rescale = self.gradient_rescaling and self.training
        if rescale and k > 0:  # the deeper blocks' share: (K-k) times the head input of exit k-1
            scales = [*scales[:-1], scale_gradient(scales[-1], float(self.num_exits - k))]
        scales = self.blocks[k](scales)
        if rescale:  # head k's input: its gradient into the coarsest scale scaled by 1/(K-k)
            scales = [*scales[:-1], scale_gradient(scales[-1], 1.0 / (self.num_exits - k))]
        return scales

    def exit_head(self, k: int, scales: list[torch.Tensor]) -> HeadOutput:
        return HeadOutput(*self.heads[k](scales[-1]))

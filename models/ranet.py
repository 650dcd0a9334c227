"""RANet: Resolution Adaptive Networks (Yang et al., CVPR 2020).

A written-from-scratch implementation of the architecture in yangle15/RANet-pytorch.

The network is a set of *scale flows*. A shared stem builds one base feature map per flow, from
the full input resolution down to the lowest. Flow 0 runs at the lowest resolution; every later
flow runs at a resolution given by ``scale_list`` (1 = lowest, each step up doubles it). Flow i has
``n_blocks + block_step * i`` blocks:

* its first blocks (as many as flow i-1 has) are *fusion* blocks: each dense layer also reads the
  matching layer of flow i-1, compressed by a 3x3 conv and resized bilinearly to its own size, and
  the block ends by concatenating a 1x1-compressed copy of flow i-1's block output. The last
  ``scale - 1`` of the blocks that end where an earlier flow ended down-sample by 2, so that each
  flow reaches the lowest resolution before it gets its own exits;
* its remaining blocks are plain dense blocks, each followed by an exit head.

Exits are numbered flow by flow, block by block, as in the reference. Blocks have ``step`` dense
layers each ("even") or ``step * b`` in block b ("lg"); some blocks end with a 1x1 transition that
shrinks the channels by ``reduction``.

Inputs smaller than 64 pixels use the CIFAR stem (3x3 conv) and exit heads (two strided 128-channel
convs, 2x2 average pooling, linear); larger inputs use the ImageNet stem (7x7/2 conv + 3x3/2 max
pooling) and heads (two strided convs keeping the width).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from . import register_architecture
from .base import ExitHead as HeadOutput
from .base import InputSpec, MultiExitNetwork

IMAGENET_MIN_SIZE = 64  # inputs at least this large get the ImageNet stem and heads
CIFAR_HEAD_WIDTH = 128
STEP_MODES = ("even", "lg")


# --------------------------------------------------------------------------------------------
# Config
# --------------------------------------------------------------------------------------------


@dataclass
class RANetConfig:
    """Defaults: the reference ``train_cifar.sh`` model (8 exits, CIFAR)."""

    n_blocks: int = 2  # blocks of the first (lowest-resolution) flow
    block_step: int = 2  # extra blocks per later flow = exits per later flow
    step_mode: str = "even"  # "even": `step` layers per block; "lg": `step * b` in block b
    step: int = 4
    n_channels: int = 16  # base stem width, times gr_factor per flow
    growth_rate: int = 6  # base growth rate, times gr_factor per flow
    gr_factor: list[int] = field(default_factory=lambda: [4, 2, 1, 1])
    bn_factor: list[int] = field(default_factory=lambda: [4, 2, 1, 1])
    scale_list: list[int] = field(default_factory=lambda: [1, 2, 3, 3])
    compress_factor: float = 0.25  # share of a fused layer's new channels taken from the lower flow
    reduction: float = 0.5  # channel ratio kept by transition layers
    bottleneck: bool = True  # 1x1 bottleneck conv before every 3x3 conv of a dense layer

    # -- derived quantities ---------------------------------------------------------------

    @property
    def n_flows(self) -> int:
        return len(self.scale_list)

    def blocks_per_flow(self) -> list[int]:
        return [self.n_blocks + self.block_step * i for i in range(self.n_flows)]

    def layers_in_block(self, block: int) -> int:
        """Dense layers in block ``block`` (1-based), the same in every flow."""
        return self.step if self.step_mode == "even" else self.step * block

    def stem_halvings(self, input_size: int) -> int:
        """How many times the stem halves the input before the lowest-resolution flow."""
        scales = list(self.scale_list)
        extra = 2 if input_size >= IMAGENET_MIN_SIZE else 0
        return extra + sum(a != b for a, b in zip(scales, scales[1:]))

    # -- validation -----------------------------------------------------------------------

    def validate(self, input_size: int | None = None) -> None:
        """Raise ValueError naming the first bad key; with ``input_size``, also check the fit."""
        for key in ("n_blocks", "block_step", "step", "n_channels", "growth_rate"):
            _check_positive_int(key, getattr(self, key))
        if self.step_mode not in STEP_MODES:
            raise ValueError(
                f"RANetConfig.step_mode={self.step_mode!r} is not allowed; "
                f"allowed: {', '.join(repr(m) for m in STEP_MODES)}"
            )
        for key in ("gr_factor", "bn_factor", "scale_list"):
            _check_int_list(key, getattr(self, key))
        self._check_lengths()
        self._check_scales()
        self._check_ratios()
        if not isinstance(self.bottleneck, bool):
            raise ValueError(f"RANetConfig.bottleneck={self.bottleneck!r} must be True or False")
        if input_size is not None:
            self._check_fit(input_size)

    def _check_lengths(self) -> None:
        n = len(self.scale_list)
        for key in ("gr_factor", "bn_factor"):
            value = list(getattr(self, key))
            if len(value) != n:
                raise ValueError(
                    f"RANetConfig.{key}={value} has {len(value)} entries but scale_list="
                    f"{list(self.scale_list)} has {n}; gr_factor, bn_factor and scale_list need "
                    "one entry per scale flow"
                )

    def _check_scales(self) -> None:
        scales = list(self.scale_list)
        steps_ok = all(b - a in (0, 1) for a, b in zip(scales, scales[1:]))
        if scales[0] != 1 or not steps_ok:
            raise ValueError(
                f"RANetConfig.scale_list={scales} is not allowed; it must start at 1 (the lowest "
                "resolution) and each next flow must keep the scale or raise it by 1, "
                "e.g. [1, 2, 3] or [1, 2, 3, 3]"
            )
        if 1 in scales[1:]:
            # the reference picks a flow's down-sampling blocks with nBlocks[-(scale - 1):], which
            # for a second flow at scale 1 is the whole list: it builds another network and crashes
            raise ValueError(
                f"RANetConfig.scale_list={scales} is not allowed: only the first flow may be at the "
                "lowest scale 1 (the reference RANet cannot build a repeated lowest scale); repeat a "
                "higher scale instead, e.g. [1, 2, 2, 3] or [1, 2, 3, 3]"
            )

    def _check_ratios(self) -> None:
        if not 0 < self.compress_factor < 1:
            raise ValueError(
                f"RANetConfig.compress_factor={self.compress_factor} is not allowed; "
                "it must lie strictly between 0 and 1"
            )
        if not 0 < self.reduction <= 1:
            raise ValueError(f"RANetConfig.reduction={self.reduction} is not allowed; it must lie in (0, 1]")
        for i, factor in enumerate(list(self.gr_factor)[1:], start=1):
            growth = self.growth_rate * factor
            if math.floor(growth * self.compress_factor) < 1:
                raise ValueError(
                    f"RANetConfig.growth_rate={self.growth_rate} with gr_factor[{i}]={factor} "
                    f"and compress_factor={self.compress_factor} gives flow {i} no channels from "
                    "the lower flow; growth_rate * gr_factor * compress_factor must be >= 1 for "
                    "every flow but the first"
                )

    def _check_fit(self, input_size: int) -> None:
        halvings = self.stem_halvings(input_size)
        if input_size % (2**halvings) != 0:
            raise ValueError(
                f"RANetConfig.scale_list={list(self.scale_list)} does not fit input size "
                f"{input_size}: the stem halves the input {halvings} times, so the size must be "
                f"a multiple of {2**halvings}; use fewer distinct scales"
            )


def _check_positive_int(key: str, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"RANetConfig.{key}={value!r} is not allowed; it must be an integer >= 1")


def _check_int_list(key: str, value: object) -> None:
    ok = isinstance(value, (list, tuple)) and len(value) > 0
    ok = ok and all(isinstance(v, int) and not isinstance(v, bool) and v >= 1 for v in value)
    if not ok:
        raise ValueError(
            f"RANetConfig.{key}={value!r} is not allowed; it must be a non-empty list of integers >= 1, e.g. [4, 2, 1]"
        )


# --------------------------------------------------------------------------------------------
# Layers
# --------------------------------------------------------------------------------------------


def _resize(x: torch.Tensor, size: torch.Size) -> torch.Tensor:
    if x.shape[-2:] == size:
        return x
    return F.interpolate(x, size=size, mode="bilinear", align_corners=True)


class ConvBNReLU(nn.Sequential):
    def __init__(self, c_in: int, c_out: int, kernel: int = 3, stride: int = 1):
        super().__init__(
            nn.Conv2d(c_in, c_out, kernel, stride, padding=kernel // 2, bias=False),
            nn.BatchNorm2d(c_out),
            nn.ReLU(inplace=True),
        )


class DenseConv(nn.Sequential):
    """[1x1 bottleneck to min(c_in, bn_width * c_out)] then 3x3 conv, each with BN and ReLU."""

    def __init__(self, c_in: int, c_out: int, stride: int, bn_width: int, bottleneck: bool):
        layers: list[nn.Module] = []
        if bottleneck:
            inner = min(c_in, bn_width * c_out)
            layers.append(ConvBNReLU(c_in, inner, kernel=1))
            c_in = inner
        layers.append(ConvBNReLU(c_in, c_out, kernel=3, stride=stride))
        super().__init__(*layers)


class DenseLayer(nn.Module):
    """Appends ``growth`` new channels to its input."""

    def __init__(self, c_in: int, growth: int, bn_width: int, bottleneck: bool):
        super().__init__()
        self.conv = DenseConv(c_in, growth, 1, bn_width, bottleneck)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([x, self.conv(x)], dim=1)


class FusionLayer(nn.Module):
    """A dense layer whose new channels partly come from the lower flow's matching layer.

    Of the ``growth`` new channels, ``floor(growth * compress)`` are a 3x3 conv of the lower
    flow's feature, resized to this flow's size; the rest are a 3x3 conv of the input (strided
    when ``down``, in which case the input itself is resized down before the concatenation).
    """

    def __init__(
        self,
        c_in: int,
        c_low: int,
        growth: int,
        compress: float,
        down: bool,
        bn_width: int,
        bn_width_low: int,
        bottleneck: bool,
    ):
        super().__init__()
        from_low = math.floor(growth * compress)
        self.conv_low = DenseConv(c_low, from_low, 1, bn_width_low, bottleneck)
        self.conv = DenseConv(c_in, growth - from_low, 2 if down else 1, bn_width, bottleneck)

    def forward(self, x: torch.Tensor, low: torch.Tensor) -> torch.Tensor:
        new = self.conv(x)
        size = new.shape[-2:]
        return torch.cat([_resize(x, size), _resize(self.conv_low(low), size), new], dim=1)


# --------------------------------------------------------------------------------------------
# Blocks: each returns (output, taps), taps = [input, after layer 1, ..., after the last layer];
# the next flow's fusion block of the same index reads them.
# --------------------------------------------------------------------------------------------


def _transition(channels: int, ratio: float | None) -> tuple[nn.Module | None, int]:
    """An optional 1x1 ConvBNReLU keeping floor(ratio * channels); returns it and the width."""
    if ratio is None:
        return None, channels
    out = math.floor(ratio * channels)
    return ConvBNReLU(channels, out, kernel=1), out


class DenseBlock(nn.Module):
    """``n_layers`` dense layers, then an optional transition."""

    def __init__(
        self, c_in: int, n_layers: int, growth: int, bn_width: int, bottleneck: bool, transition: float | None
    ):
        super().__init__()
        self.layers = nn.ModuleList(
            DenseLayer(c_in + i * growth, growth, bn_width, bottleneck) for i in range(n_layers)
        )
        self.tap_channels = [c_in + i * growth for i in range(n_layers + 1)]
        self.transition, self.out_channels = _transition(self.tap_channels[-1], transition)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        taps = [x]
        for layer in self.layers:
            x = layer(x)
            taps.append(x)
        if self.transition is not None:
            x = self.transition(x)
        return x, taps


class FusionBlock(nn.Module):
    """Fusion layers reading the lower flow's block taps (one layer per tap but the last), then
    a 1x1-compressed, resized copy of the lower block's last tap, then an optional transition."""

    def __init__(
        self,
        c_in: int,
        low_taps: list[int],
        growth: int,
        compress: float,
        down: bool,
        bn_width: int,
        bn_width_low: int,
        bottleneck: bool,
        transition: float | None,
    ):
        super().__init__()
        n_layers = len(low_taps) - 1
        self.layers = nn.ModuleList(
            FusionLayer(
                c_in + i * growth,
                low_taps[i],
                growth,
                compress,
                down and i == n_layers - 1,
                bn_width,
                bn_width_low,
                bottleneck,
            )
            for i in range(n_layers)
        )
        self.tap_channels = [c_in + i * growth for i in range(n_layers + 1)]
        dense_out = self.tap_channels[-1]
        self.from_low = ConvBNReLU(low_taps[-1], math.floor(dense_out * compress), kernel=1)
        fused = dense_out + math.floor(dense_out * compress)
        self.transition, self.out_channels = _transition(fused, transition)

    def forward(self, x: torch.Tensor, low_taps: list[torch.Tensor]) -> tuple[torch.Tensor, list[torch.Tensor]]:
        taps = [x]
        for layer, low in zip(self.layers, low_taps):
            x = layer(x, low)
            taps.append(x)
        x = torch.cat([x, _resize(self.from_low(low_taps[-1]), x.shape[-2:])], dim=1)
        if self.transition is not None:
            x = self.transition(x)
        return x, taps


# --------------------------------------------------------------------------------------------
# Stem and exit heads
# --------------------------------------------------------------------------------------------


class Stem(nn.Module):
    """A conv chain from full resolution down; returns each flow's base features, flow 0 first."""

    def __init__(self, in_channels: int, widths: list[int], scales: list[int], imagenet: bool):
        super().__init__()
        widths, scales = widths[::-1], scales[::-1]  # highest-resolution flow first
        if imagenet:
            first = nn.Sequential(
                nn.Conv2d(in_channels, widths[0], 7, 2, 3),  # with bias, as the reference
                nn.BatchNorm2d(widths[0]),
                nn.ReLU(inplace=True),
                nn.MaxPool2d(3, 2, 1),
            )
        else:
            first = ConvBNReLU(in_channels, widths[0], 3)
        layers = [first]
        for i in range(1, len(widths)):
            stride = 2 if scales[i] != scales[i - 1] else 1
            layers.append(ConvBNReLU(widths[i - 1], widths[i], 3, stride))
        self.layers = nn.ModuleList(layers)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        outs = []
        for layer in self.layers:
            x = layer(x)
            outs.append(x)
        return outs[::-1]


def _after_stride2(size: int) -> int:
    return (size - 1) // 2 + 1  # 3x3 conv, stride 2, padding 1


class ExitHead(nn.Module):
    """Two stride-2 3x3 convs, average pooling to 1x1, linear; returns (logits, pooled vector)."""

    def __init__(self, c_in: int, width: int, num_classes: int, in_size: int):
        super().__init__()
        pool = _after_stride2(_after_stride2(in_size))  # 2 at the reference sizes (8 and 7)
        self.body = nn.Sequential(
            ConvBNReLU(c_in, width, 3, 2),
            ConvBNReLU(width, width, 3, 2),
            nn.AvgPool2d(pool),
        )
        self.linear = nn.Linear(width, num_classes)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        features = self.body(x).flatten(1)
        return self.linear(features), features


# --------------------------------------------------------------------------------------------
# Network
# --------------------------------------------------------------------------------------------


def _transition_blocks(n_blocks: int, scale: int) -> set[int]:
    """1-based blocks of a flow at ``scale`` that end with a transition (scale - 1 of them)."""
    return {math.floor(i * n_blocks / scale) for i in range(1, scale)}


def _downsample_blocks(previous_counts: list[int], scale: int) -> set[int]:
    """The last ``scale - 1`` block indices at which an earlier flow ended."""
    return set(previous_counts[len(previous_counts) - (scale - 1) :]) if scale > 1 else set()


@register_architecture("ranet", RANetConfig)
class RANet(MultiExitNetwork):
    """Scale flows from low to high resolution; exits in flow order (see the module docstring)."""

    test_params = {
        "n_blocks": 1,
        "block_step": 1,
        "step": 1,
        "n_channels": 4,
        "growth_rate": 4,
        "scale_list": [1, 2],
        "gr_factor": [2, 1],
        "bn_factor": [2, 1],
    }

    def __init__(self, config: RANetConfig, input_spec: InputSpec):
        super().__init__()
        config.validate(input_spec.size)
        self.config = config
        imagenet = input_spec.size >= IMAGENET_MIN_SIZE
        gr_factor, scales = list(config.gr_factor), list(config.scale_list)
        widths = [config.n_channels * f for f in gr_factor]
        self.stem = Stem(input_spec.channels, widths, scales, imagenet)
        lowest = input_spec.size // 2 ** config.stem_halvings(input_spec.size)

        self.flows = nn.ModuleList()
        self.heads = nn.ModuleList()
        self.exit_blocks: list[tuple[int, int]] = []  # (flow, 0-based block) of each exit
        counts = config.blocks_per_flow()
        low_taps: list[list[int]] = []
        for f in range(config.n_flows):
            blocks = self._build_flow(f, widths[f], counts[: f + 1], low_taps)
            for b in range(counts[f - 1] if f else 0, counts[f]):
                c_in = blocks[b].out_channels
                width = c_in if imagenet else CIFAR_HEAD_WIDTH
                self.heads.append(ExitHead(c_in, width, input_spec.num_classes, lowest))
                self.exit_blocks.append((f, b))
            low_taps = [block.tap_channels for block in blocks]
            self.flows.append(blocks)
        self.num_exits = len(self.heads)
        self._init_weights()

    def _build_flow(self, f: int, c_in: int, counts: list[int], low_taps: list[list[int]]) -> nn.ModuleList:
        """Flow f's blocks; ``counts`` = block counts of flows 0..f, ``low_taps`` = flow f-1's."""
        cfg = self.config
        scale, growth = cfg.scale_list[f], cfg.growth_rate * cfg.gr_factor[f]
        transitions = _transition_blocks(counts[-1], scale)
        downs = _downsample_blocks(counts[:-1], scale)
        blocks = nn.ModuleList()
        for b in range(1, counts[-1] + 1):
            trans = cfg.reduction if b in transitions else None
            if b <= len(low_taps):
                block: DenseBlock | FusionBlock = FusionBlock(
                    c_in,
                    low_taps[b - 1],
                    growth,
                    cfg.compress_factor,
                    b in downs,
                    cfg.bn_factor[f],
                    cfg.bn_factor[f - 1],
                    cfg.bottleneck,
                    trans,
                )
            else:
                block = DenseBlock(c_in, cfg.layers_in_block(b), growth, cfg.bn_factor[f], cfg.bottleneck, trans)
            blocks.append(block)
            c_in = block.out_channels
        return blocks

    def _init_weights(self) -> None:
        # The reference re-initialises the flows and heads only; the stem keeps PyTorch defaults.
        for module in [*self.flows.modules(), *self.heads.modules()]:
            if isinstance(module, nn.Conv2d):
                fan_out = module.kernel_size[0] * module.kernel_size[1] * module.out_channels
                nn.init.normal_(module.weight, 0.0, math.sqrt(2.0 / fan_out))
            elif isinstance(module, nn.BatchNorm2d):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)
            elif isinstance(module, nn.Linear):
                nn.init.zeros_(module.bias)

    # Segments (models.base). The state: ``h``, the current flow's feature; ``taps``, the taps of
    # its blocks so far (the next flow's fusion blocks read them; not kept in the last flow); and
    # ``pending``, the stem features of the flows not started yet. A flow's fusion blocks all come
    # before its first exit, so the lower flow's taps are only needed inside one segment.
    def begin(self, x: torch.Tensor) -> dict[str, list[torch.Tensor] | torch.Tensor | None]:
        return {"h": None, "taps": [], "pending": self.stem(x)}

    def run_segment(self, k: int, state: dict) -> dict:
        flow, last = self.exit_blocks[k]
        h, taps, pending = state["h"], state["taps"], state["pending"]
        if k == 0 or self.exit_blocks[k - 1][0] != flow:  # a new flow, from its stem feature
            low_taps, taps = taps, []
            h, pending = pending[0], pending[1:]
            first = 0
        else:  # the flow goes on after the block of exit k-1
            low_taps, first = [], self.exit_blocks[k - 1][1] + 1
        keep_taps = flow + 1 < self.config.n_flows
        for b in range(first, last + 1):
            block = self.flows[flow][b]
            if isinstance(block, FusionBlock):
                h, block_taps = block(h, low_taps[b])
            else:
                h, block_taps = block(h)
            if keep_taps:
                taps = [*taps, block_taps]
        return {"h": h, "taps": taps, "pending": pending}

    def exit_head(self, k: int, state: dict) -> HeadOutput:
        return HeadOutput(*self.heads[k](state["h"]))

"""EENets: early-exit ResNets (Demir & Akbas, arXiv 2409.05336; reference eksuas/eenets.pytorch).

A plain ResNet with ``num_exits`` early exit blocks inserted after some of its residual blocks,
plus the final exit after the last stage, so the network has ``num_exits + 1`` exits. Note the two
counts: ``EEResNetConfig.num_exits`` is the number of *early* exits (the reference's ``--num-ee``),
while ``EEResNet.num_exits`` (the ``MultiExitNetwork`` contract) is the total, early + final.
``num_exits: 0`` builds the plain ResNet as a one-exit network (the final exit, with the same
confidence and classifier heads), so the harness can train and cost the non-EE counterpart.

Backbones (``style``):
    ``cifar``     6n+2 layers: 3x3 stem, three stages of n BasicBlocks at widths w, 2w, 4w (w = 16).
    ``imagenet``  18/34 (BasicBlock) or 50/101/152 (Bottleneck): 7x7/2 stem + 3x3/2 max pool, four
                  stages at widths w..8w (w = 64). Works for any input size >= 1 (Tiny-ImageNet 64x64
                  ends on a 2x2 map, CIFAR 32x32 on 1x1).
    ``auto``      by depth: 18, 34, 50, 101, 152 -> imagenet, any other 6n+2 -> cifar. 50 and 152
                  are also 6n+2; ask for ``style="cifar"`` to get the CIFAR-style network there.
Stage transitions use a strided 1x1 projection shortcut (+BN), as the reference does for both
styles; so the CIFAR ResNets have 2,752 more parameters than the zero-padding variant of He et al.

Exit placement (``distribution``), as the reference: F_tot is the FLOPs of the plain ResNet and
n = ``num_exits``; the targets are, for i = 0..n-1,
    pareto      F_tot * (1 - 0.8^(i+1))
    fine        F_tot * (1 - 0.95^(i+1))
    linear      F_tot * (i+1) / (n+1)
    gold_ratio  F_tot * phi^(i-n),  phi = 1.618...
Walking the residual blocks in order, exit i goes after the first block whose cumulative backbone
FLOPs (stem + blocks so far, no exit heads) reach target i. A block holds at most one exit: when
several targets are already reached at a block, the next one moves to the following block, and so
on (the reference checks one pending target per block). If blocks run out first, the config is
rejected. To reproduce the reference's placements exactly, F_tot and the cumulative FLOPs used for
placement are counted as the EENets code counts them (its flops-counter: batch norm 2 per element,
max pool 1 per input element, linear without bias; see ``EENETS_RULES``). Counting them in the
harness convention instead moves some exits by one block (e.g. ResNet-110, 8 exits, ``fine``).
Everything this module exposes (``backbone_flops``, ``total_flops``) follows ``eebench.flops``'
"reference" convention (``EEBENCH_RULES``), and equals what its fvcore counter measures.

Exit block (``exit_pool``): ``pool`` adaptive average pool to 1x1; ``bnpool`` BatchNorm then the
same pool (no ReLU, as the reference); ``bnpool_batchstats`` what the reference's ``bnpool`` really
computes: it keeps that BatchNorm in a plain Python list, so it is never trained (weight 1, bias
0), is not in the state dict, and always normalises with the statistics of the batch at hand,
also in evaluation (a prediction then depends on the other images of its batch); ``plain``
flattens C*H*W of the feature map. The reference
sized ``plain`` heads with the *input image's* H*W, which only matches before the first
downsampling; here the actual feature-map size is used. Then two separate linear heads:
confidence h = sigmoid(Linear(d, 1)) and classifier Linear(d, C) (logits; the reference applies a
softmax). The final exit always average-pools, then has the same two heads.

``forward_all`` returns per exit the logits, the vector fed to the two linear heads (``features``)
and the confidence branch's output h as the exit's gate, an (N,) tensor in [0, 1]
(``ExitOutputs.gates``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from . import register_architecture
from .base import CONFIDENCE_BRANCHES, PLAIN_COUNTERPART, InputSpec, MultiExitNetwork
from .base import ExitHead as HeadOutput

STYLES = ("auto", "cifar", "imagenet")
DISTRIBUTIONS = ("pareto", "fine", "linear", "gold_ratio")
EXIT_POOLS = ("pool", "bnpool", "bnpool_batchstats", "plain")
# depth -> (bottleneck blocks?, blocks per stage)
IMAGENET_LAYOUTS: dict[int, tuple[bool, tuple[int, ...]]] = {
    18: (False, (2, 2, 2, 2)),
    34: (False, (3, 4, 6, 3)),
    50: (True, (3, 4, 6, 3)),
    101: (True, (3, 4, 23, 3)),
    152: (True, (3, 8, 36, 3)),
}
DEFAULT_WIDTH = {"cifar": 16, "imagenet": 64}
GOLDEN_RATIO = (1 + math.sqrt(5)) / 2


def _invalid(key: str, value: object, allowed: str) -> ValueError:
    return ValueError(f"ee_resnet: invalid {key}={value!r}; allowed: {allowed}")


def _is_6n2(depth: int) -> bool:
    return depth >= 8 and (depth - 2) % 6 == 0


@dataclass
class EEResNetConfig:
    depth: int = 20
    num_exits: int = 2  # early exits; the network has num_exits + 1 exits (0: the plain ResNet)
    distribution: str = "fine"
    exit_pool: str = "pool"
    width: int | None = None  # base width; None: 16 (cifar) or 64 (imagenet)
    style: str = "auto"

    def resolved_style(self) -> str:
        if self.style != "auto":
            return self.style
        return "imagenet" if self.depth in IMAGENET_LAYOUTS else "cifar"

    def resolved_width(self) -> int:
        return self.width if self.width is not None else DEFAULT_WIDTH[self.resolved_style()]

    def validate(self) -> None:
        if self.style not in STYLES:
            raise _invalid("style", self.style, ", ".join(STYLES))
        self._validate_depth()
        if not isinstance(self.num_exits, int) or self.num_exits < 0:
            raise _invalid(
                "num_exits", self.num_exits, "an integer >= 0 (early exits; 0 builds the plain ResNet with one exit)"
            )
        if self.distribution not in DISTRIBUTIONS:
            raise _invalid("distribution", self.distribution, ", ".join(DISTRIBUTIONS))
        if self.exit_pool not in EXIT_POOLS:
            raise _invalid("exit_pool", self.exit_pool, ", ".join(EXIT_POOLS))
        if self.width is not None and (not isinstance(self.width, int) or self.width < 1):
            raise _invalid("width", self.width, "None or an integer >= 1")

    def _validate_depth(self) -> None:
        imagenet = ", ".join(map(str, IMAGENET_LAYOUTS))
        six_n_two = "6n+2 with n >= 1 (8, 14, 20, 32, 44, 56, 110, ...)"
        if not isinstance(self.depth, int):
            raise _invalid("depth", self.depth, f"{imagenet} or {six_n_two}")
        if self.style == "imagenet" and self.depth not in IMAGENET_LAYOUTS:
            raise _invalid("depth", self.depth, f"{imagenet} for style 'imagenet'")
        if self.style == "cifar" and not _is_6n2(self.depth):
            raise _invalid("depth", self.depth, f"{six_n_two} for style 'cifar'")
        if self.style == "auto" and not (self.depth in IMAGENET_LAYOUTS or _is_6n2(self.depth)):
            raise _invalid("depth", self.depth, f"{imagenet} (ImageNet stem) or {six_n_two} (CIFAR stem)")


# ---- Architecture plan and analytic FLOPs -----------------------------------------------------


@dataclass(frozen=True)
class FlopsRules:
    """How the non-convolution layers are charged; convolutions are always multiply-adds."""

    bn_per_element: int  # batch norm, per output element
    maxpool_per_input: bool  # max pool: one per input element (else k^2 per output element)
    linear_bias: bool  # linear layers: weights (+ bias)


# eebench.flops' "reference" convention: what the exposed FLOPs and exit_costs use
EEBENCH_RULES = FlopsRules(bn_per_element=0, maxpool_per_input=False, linear_bias=True)
# the flops-counter the EENets code places its exits with (affine batch norm counts twice)
EENETS_RULES = FlopsRules(bn_per_element=2, maxpool_per_input=True, linear_bias=False)


def _down(size: int, stride: int) -> int:
    """Output size of the 3x3/pad-1, 1x1/pad-0, 7x7/pad-3 convs and 3x3/pad-1 pool used here."""
    return (size - 1) // stride + 1


def _stem_out_size(style: str, size: int) -> int:
    return size if style == "cifar" else _down(_down(size, 2), 2)


def _conv_bn_flops(convs: list[tuple[int, int, int, int]], rules: FlopsRules) -> int:
    """Convolutions (c_in, c_out, kernel, out_size), each followed by a batch norm."""
    flops = 0
    for c_in, c_out, kernel, size in convs:
        flops += c_in * c_out * kernel * kernel * size * size
        flops += rules.bn_per_element * c_out * size * size
    return flops


@dataclass(frozen=True)
class BlockPlan:
    """One residual block: its channels, stride and the spatial size it reads."""

    bottleneck: bool
    in_channels: int
    planes: int
    stride: int
    in_size: int

    @property
    def out_channels(self) -> int:
        return self.planes * (4 if self.bottleneck else 1)

    @property
    def out_size(self) -> int:
        return _down(self.in_size, self.stride)

    @property
    def has_projection(self) -> bool:
        return self.stride != 1 or self.in_channels != self.out_channels

    def flops(self, rules: FlopsRules = EEBENCH_RULES) -> int:
        p, h, s, c_in, c_out = self.planes, self.in_size, self.out_size, self.in_channels, self.out_channels
        if self.bottleneck:
            convs = [(c_in, p, 1, h), (p, p, 3, s), (p, c_out, 1, s)]
            relus = p * h * h + p * s * s + c_out * s * s
        else:
            convs = [(c_in, p, 3, s), (p, p, 3, s)]
            relus = 2 * p * s * s
        if self.has_projection:
            convs.append((c_in, c_out, 1, s))
        return _conv_bn_flops(convs, rules) + relus


@dataclass(frozen=True)
class ResNetPlan:
    """The plain ResNet a config describes for one input spec."""

    style: str
    in_channels: int
    width: int
    input_size: int
    num_classes: int
    blocks: tuple[BlockPlan, ...]

    @property
    def final_channels(self) -> int:
        return self.blocks[-1].out_channels

    def stem_flops(self, rules: FlopsRules = EEBENCH_RULES) -> int:
        w, size = self.width, self.input_size
        if self.style == "cifar":
            return _conv_bn_flops([(self.in_channels, w, 3, size)], rules) + w * size * size
        conv_size, pool_size = _down(size, 2), _stem_out_size(self.style, size)
        pool = w * conv_size**2 if rules.maxpool_per_input else 9 * w * pool_size**2
        return _conv_bn_flops([(self.in_channels, w, 7, conv_size)], rules) + w * conv_size**2 + pool

    def cumulative_flops(self, rules: FlopsRules = EEBENCH_RULES) -> list[int]:
        """Backbone FLOPs (stem + blocks) up to and including each residual block."""
        total, out = self.stem_flops(rules), []
        for block in self.blocks:
            total += block.flops(rules)
            out.append(total)
        return out

    def total_flops(self, rules: FlopsRules = EEBENCH_RULES) -> int:
        """F_tot: the plain ResNet, average pool and classifier included."""
        c, size, classes = self.final_channels, self.blocks[-1].out_size, self.num_classes
        head = c * size * size + c * classes + (classes if rules.linear_bias else 0)
        return self.cumulative_flops(rules)[-1] + head


def resnet_plan(config: EEResNetConfig, input_spec: InputSpec) -> ResNetPlan:
    style, width = config.resolved_style(), config.resolved_width()
    if style == "cifar":
        bottleneck, stages = False, ((config.depth - 2) // 6,) * 3
    else:
        bottleneck, stages = IMAGENET_LAYOUTS[config.depth]
    blocks: list[BlockPlan] = []
    channels, size = width, _stem_out_size(style, input_spec.size)
    for stage, count in enumerate(stages):
        for index in range(count):
            stride = 2 if stage > 0 and index == 0 else 1
            block = BlockPlan(bottleneck, channels, width * 2**stage, stride, size)
            blocks.append(block)
            channels, size = block.out_channels, block.out_size
    return ResNetPlan(style, input_spec.channels, width, input_spec.size, input_spec.num_classes, tuple(blocks))


def exit_thresholds(distribution: str, num_early: int, total_flops: float) -> list[float]:
    """The cumulative-FLOPs target of each early exit."""
    targets = {
        "pareto": lambda i: 1 - 0.8 ** (i + 1),
        "fine": lambda i: 1 - 0.95 ** (i + 1),
        "linear": lambda i: (i + 1) / (num_early + 1),
        "gold_ratio": lambda i: GOLDEN_RATIO ** (i - num_early),
    }[distribution]
    return [total_flops * targets(i) for i in range(num_early)]


def place_exits(cumulative_flops: list[int], thresholds: list[float]) -> list[int] | None:
    """Index of the block each exit follows, one exit per block at most; None if they don't fit."""
    positions: list[int] = []
    for block, flops in enumerate(cumulative_flops):
        if len(positions) < len(thresholds) and flops >= thresholds[len(positions)]:
            positions.append(block)
    return positions if len(positions) == len(thresholds) else None


def exit_positions(config: EEResNetConfig, plan: ResNetPlan) -> list[int]:
    """Place the config's early exits on the plan, or explain why they do not fit."""
    cumulative, total = plan.cumulative_flops(EENETS_RULES), plan.total_flops(EENETS_RULES)
    positions = place_exits(cumulative, exit_thresholds(config.distribution, config.num_exits, total))
    if positions is not None:
        return positions
    fits = [
        n
        for n in range(1, config.num_exits)
        if place_exits(cumulative, exit_thresholds(config.distribution, n, total)) is not None
    ]
    most = max(fits, default=0)
    raise ValueError(
        f"ee_resnet: num_exits={config.num_exits} does not fit depth {config.depth} "
        f"({len(plan.blocks)} residual blocks) with distribution {config.distribution!r}; "
        f"allowed: at most {most} early exits"
    )


# ---- Modules ----------------------------------------------------------------------------------


def _conv_bn(c_in: int, c_out: int, kernel: int, stride: int = 1) -> list[nn.Module]:
    conv = nn.Conv2d(c_in, c_out, kernel, stride=stride, padding=kernel // 2, bias=False)
    return [conv, nn.BatchNorm2d(c_out)]


class ResidualBlock(nn.Module):
    """BasicBlock (two 3x3 convs) or Bottleneck (1x1, 3x3 with the stride, 1x1 x4), post-activation."""

    def __init__(self, plan: BlockPlan):
        super().__init__()
        p, c_in, c_out, stride = plan.planes, plan.in_channels, plan.out_channels, plan.stride
        if plan.bottleneck:
            layers = (
                _conv_bn(c_in, p, 1)
                + [nn.ReLU(inplace=True)]
                + _conv_bn(p, p, 3, stride)
                + [nn.ReLU(inplace=True)]
                + _conv_bn(p, c_out, 1)
            )
        else:
            layers = _conv_bn(c_in, p, 3, stride) + [nn.ReLU(inplace=True)] + _conv_bn(p, p, 3)
        self.residual = nn.Sequential(*layers)
        self.shortcut: nn.Module = nn.Identity()
        if plan.has_projection:
            self.shortcut = nn.Sequential(*_conv_bn(c_in, c_out, 1, stride))
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.relu(self.residual(x) + self.shortcut(x))


def _make_stem(plan: ResNetPlan) -> nn.Sequential:
    if plan.style == "cifar":
        return nn.Sequential(*_conv_bn(plan.in_channels, plan.width, 3), nn.ReLU(inplace=True))
    return nn.Sequential(
        *_conv_bn(plan.in_channels, plan.width, 7, stride=2),
        nn.ReLU(inplace=True),
        nn.MaxPool2d(kernel_size=3, stride=2, padding=1),
    )


def _init_weights(module: nn.Module) -> None:
    for m in module.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


class BatchStatisticsNorm(nn.Module):
    """Normalisation by the current batch's statistics, in training and evaluation alike, with no
    parameters and no running statistics (the reference ``bnpool``'s untracked BatchNorm)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return nn.functional.batch_norm(x, None, None, training=True)


class ExitHead(nn.Module):
    """Pooling, then separate confidence (sigmoid: the exit's gate) and classifier (logits) linear heads."""

    def __init__(self, channels: int, size: int, num_classes: int, pool: str):
        super().__init__()
        norm = {"bnpool": nn.BatchNorm2d(channels), "bnpool_batchstats": BatchStatisticsNorm()}.get(pool)
        layers: list[nn.Module] = [norm] if norm is not None else []
        if pool != "plain":
            layers.append(nn.AdaptiveAvgPool2d(1))
        self.pool = nn.Sequential(*layers, nn.Flatten())
        features = channels * (size * size if pool == "plain" else 1)
        self.confidence = nn.Linear(features, 1)
        self.classifier = nn.Linear(features, num_classes)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        features = self.pool(x)
        gate = torch.sigmoid(self.confidence(features)).squeeze(1)
        return self.classifier(features), features, gate


class PlainResNet(nn.Module):
    """The non-early-exit ResNet of a plan; ``forward`` returns logits."""

    def __init__(self, plan: ResNetPlan):
        super().__init__()
        self.stem = _make_stem(plan)
        self.blocks = nn.Sequential(*(ResidualBlock(b) for b in plan.blocks))
        self.pool = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.classifier = nn.Linear(plan.final_channels, plan.num_classes)
        _init_weights(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.pool(self.blocks(self.stem(x))))


@register_architecture("ee_resnet", EEResNetConfig)
class EEResNet(MultiExitNetwork):
    capabilities = frozenset({CONFIDENCE_BRANCHES, PLAIN_COUNTERPART})
    test_params = {"depth": 8, "num_exits": 2, "width": 4, "distribution": "linear"}

    """EENets ResNet with ``config.num_exits`` early exits and the final exit.

    ``exit_blocks[i]`` is the 0-based index of the residual block that early exit i follows;
    ``backbone_flops[b]`` the analytic cumulative backbone FLOPs after block b; ``total_flops``
    F_tot of the plain counterpart (all in ``eebench.flops``' "reference" convention).
    """

    def __init__(self, config: EEResNetConfig, input_spec: InputSpec):
        super().__init__()
        config.validate()
        self.config, self.input_spec = config, input_spec
        self.plan = resnet_plan(config, input_spec)
        self.exit_blocks: list[int] = exit_positions(config, self.plan)
        self.backbone_flops: list[int] = self.plan.cumulative_flops()
        self.total_flops: int = self.plan.total_flops()
        self.num_early_exits = config.num_exits
        self.num_exits = config.num_exits + 1

        self.stem = _make_stem(self.plan)
        self.blocks = nn.ModuleList(ResidualBlock(b) for b in self.plan.blocks)
        heads = [
            ExitHead(
                self.plan.blocks[b].out_channels, self.plan.blocks[b].out_size, input_spec.num_classes, config.exit_pool
            )
            for b in self.exit_blocks
        ]
        last = self.plan.blocks[-1]
        heads.append(ExitHead(last.out_channels, last.out_size, input_spec.num_classes, "pool"))
        self.exits = nn.ModuleList(heads)
        _init_weights(self)

    # Segments (models.base): the state is the trunk's feature map. Segment k runs the residual
    # blocks after exit k-1's block up to exit k's (the final exit's: up to the last block).
    def segment_blocks(self, k: int) -> range:
        first = self.exit_blocks[k - 1] + 1 if k > 0 else 0
        last = self.exit_blocks[k] if k < self.num_early_exits else len(self.blocks) - 1
        return range(first, last + 1)

    def begin(self, x: torch.Tensor) -> torch.Tensor:
        return self.stem(x)

    def run_segment(self, k: int, x: torch.Tensor) -> torch.Tensor:
        for b in self.segment_blocks(k):
            x = self.blocks[b](x)
        return x

    def exit_head(self, k: int, x: torch.Tensor) -> HeadOutput:
        return HeadOutput(*self.exits[k](x))

    def plain_counterpart(self) -> nn.Module:
        """A freshly initialised plain ResNet of the same depth, width and input spec."""
        return PlainResNet(self.plan)

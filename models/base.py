"""The contract every multi-exit architecture follows.

A multi-exit network maps an image batch to K exits. ``forward_all(x, upto=k)`` runs only what
exits 1..k need (the blocks up to exit k and the heads of exits 1..k) and returns, per exit, the
logits, the exit head's penultimate features (the input of its final linear layer, used by
post-hoc methods such as last-layer Laplace), and, for architectures with confidence branches
(EENets), the exit's gate: a learned per-exit exit probability in [0, 1]. ``forward(x)`` returns
the list of K logit tensors.

Running a prefix is what makes per-exit FLOPs counting exact: fvcore traces one module per exit
and the cost of exit k includes every earlier head, as a sample leaving at k has paid for them.

Segments. A family runs exit by exit through three methods, and ``forward_all`` is written in
terms of them (so the full pass and the exit-by-exit pass are one code path):

* ``begin(x) -> state``: the stem; ``state`` holds every tensor a later segment reads (all
  scales of MSDNet, the RANet flows' inputs and taps, the ResNet trunk), as nested lists, tuples
  and dicts of tensors whose first dimension is the sample;
* ``run_segment(k, state) -> state``: the blocks between exit k-1 and exit k (0-based k);
* ``exit_head(k, state) -> ExitHead``: exit k's head on the state ``run_segment(k, ...)`` left.

``select_samples(state, index)`` keeps some samples of a state; the dynamic runner
(``eebench.dynamic``) uses it to go on with the samples that did not leave. A family that cannot
be split this way sets ``segmented = False`` and overrides ``forward_all``; early exit then falls
back to the simulated protocol (every exit computed for every sample).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar, NamedTuple

import torch
from torch import nn
from torch.nn.utils.fusion import fuse_conv_bn_eval


@dataclass(frozen=True)
class InputSpec:
    """What an architecture needs to know about its dataset."""

    channels: int
    size: int
    num_classes: int


class ExitHead(NamedTuple):
    """What one exit head gives for a batch: logits (N, C), penultimate features (N, ...) and,
    where the exit has one, its gate (N,): a learned per-exit exit probability in [0, 1] (EENets'
    confidence branches, JEI-DNN's gates)."""

    logits: torch.Tensor
    features: torch.Tensor
    gate: torch.Tensor | None = None


@dataclass
class ExitOutputs:
    """Per-exit outputs: logits, penultimate features and, where the network or method gives them,
    ``gates`` (one (N,) tensor per exit), a learned per-exit exit probability in [0, 1]: EENets'
    confidence branches, JEI-DNN's gates."""

    logits: list[torch.Tensor]
    features: list[torch.Tensor] = field(default_factory=list)
    gates: list[torch.Tensor] | None = None

    @classmethod
    def from_heads(cls, heads: list[ExitHead]) -> ExitOutputs:
        """Per-exit lists from exit heads; ``gates`` only when every head has one."""
        gates = [h.gate for h in heads]
        has_gates = bool(heads) and all(g is not None for g in gates)
        return cls([h.logits for h in heads], [h.features for h in heads], gates if has_gates else None)

    def head(self, k: int) -> ExitHead:
        """Exit k (0-based) as an ``ExitHead``."""
        gate = None if self.gates is None else self.gates[k]
        features = self.features[k] if self.features else None
        return ExitHead(self.logits[k], features, gate)

    def tensors(self) -> list[torch.Tensor]:
        """Every output tensor, flattened, for tracing."""
        out = list(self.logits) + list(self.features)
        if self.gates is not None:
            out += list(self.gates)
        return out


# What an architecture may offer beyond the contract; training methods list the ones they need
# (``TrainingMethod.requires``) and the config check refuses a method on an architecture without them.
CONFIDENCE_BRANCHES = "confidence_branches"  # exits with confidence branches; they produce ExitOutputs.gates
GRADIENT_RESCALING = "gradient_rescaling"  # set_gradient_rescaling: BoostNet's gradient equilibrium
PLAIN_COUNTERPART = "plain_counterpart"  # plain_counterpart: the same network without early exits


State = Any  # a family's live tensors between segments: nested lists/tuples/dicts of tensors


def select_samples(state: State, index: torch.Tensor) -> State:
    """``state`` with only the samples ``index`` (a 1-D index tensor) along every tensor's first
    dimension; lists, tuples and dicts keep their structure, other values pass unchanged.
    Advanced indexing keeps a channels_last tensor channels_last (``index_select`` does not)."""
    if isinstance(state, torch.Tensor):
        return state[index]
    if isinstance(state, dict):
        return {key: select_samples(value, index) for key, value in state.items()}
    if isinstance(state, tuple) and hasattr(state, "_fields"):  # a NamedTuple (ExitHead)
        return type(state)(*(select_samples(value, index) for value in state))
    if isinstance(state, (list, tuple)):
        return type(state)(select_samples(value, index) for value in state)
    return state


class MultiExitNetwork(nn.Module):
    """Base class: subclasses set ``num_exits`` and implement ``begin``, ``run_segment`` and
    ``exit_head`` (see the module docstring), or set ``segmented = False`` and implement
    ``forward_all`` themselves. Those that offer more declare it in ``capabilities`` and implement
    the matching method below."""

    num_exits: int
    segmented: ClassVar[bool] = True  # False: no exit-by-exit execution (forward_all only)
    capabilities: ClassVar[frozenset[str]] = frozenset()
    # a tiny configuration (parameters, input) that the registry-wide tests build, run and count
    test_params: ClassVar[dict] = {}
    test_input: ClassVar[InputSpec] = InputSpec(3, 32, 10)

    def begin(self, x: torch.Tensor) -> State:
        """The state before segment 0 (the stem's outputs)."""
        raise NotImplementedError(
            f"{type(self).__name__} implements no segments: implement begin, "
            "run_segment and exit_head, or set segmented = False and override forward_all"
        )

    def run_segment(self, k: int, state: State) -> State:
        """The blocks between exit k-1 and exit k (k 0-based), on ``state``'s samples."""
        raise NotImplementedError(f"{type(self).__name__} implements no segments")

    def exit_head(self, k: int, state: State) -> ExitHead:
        """Exit k's head (k 0-based) on the state ``run_segment(k, ...)`` returned."""
        raise NotImplementedError(f"{type(self).__name__} implements no segments")

    def forward_all(self, x: torch.Tensor, upto: int | None = None) -> ExitOutputs:
        upto = self._check_upto(upto)
        state = self.begin(x)
        heads = []
        for k in range(upto):
            state = self.run_segment(k, state)
            heads.append(self.exit_head(k, state))
        return ExitOutputs.from_heads(heads)

    def forward(self, x: torch.Tensor, upto: int | None = None) -> list[torch.Tensor]:
        return self.forward_all(x, upto).logits

    def set_gradient_rescaling(self, enabled: bool) -> None:
        """Scale each exit head's gradient into the trunk by 1/(K-k) and the deeper blocks' by
        (K-k-1)/(K-k) (``gradient_equilibrium``); only with the ``gradient_rescaling`` capability."""
        raise NotImplementedError(f"{type(self).__name__} does not offer gradient rescaling")

    def plain_counterpart(self) -> nn.Module:
        """The same network without early exits (the baseline of cost ratios); only with the
        ``plain_counterpart`` capability."""
        raise NotImplementedError(f"{type(self).__name__} has no plain counterpart")

    def _check_upto(self, upto: int | None) -> int:
        if upto is None:
            return self.num_exits
        if not 1 <= upto <= self.num_exits:
            raise ValueError(f"upto must be in 1..{self.num_exits}, got {upto}")
        return upto


def fold_batchnorm(network: nn.Module) -> int:
    """Fold each BatchNorm2d that directly follows a Conv2d in an ``nn.Sequential`` into that
    convolution (inference only: the network must be in eval mode and stay there). Returns how
    many were folded. The outputs equal the unfolded network's up to float rounding."""
    if network.training:
        raise ValueError("fold_batchnorm needs a network in eval mode")
    folded = 0
    for module in network.modules():
        if not isinstance(module, nn.Sequential):
            continue
        names = list(module._modules)
        for first, second in zip(names, names[1:]):
            conv, bn = module._modules[first], module._modules[second]
            if isinstance(conv, nn.Conv2d) and isinstance(bn, nn.BatchNorm2d) and bn.track_running_stats:
                module._modules[first] = fuse_conv_bn_eval(conv, bn)
                module._modules[second] = nn.Identity()
                folded += 1
    return folded


class ExitPrefix(nn.Module):
    """The network truncated after exit k, returning every tensor exits 1..k produce."""

    def __init__(self, network: MultiExitNetwork, k: int):
        super().__init__()
        self.network = network
        self.k = k

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        return self.network.forward_all(x, upto=self.k).tensors()


# --- gradient rescaling (BoostNet's "gradient equilibrium"), for architectures that offer it ---
class _ScaleGradient(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, factor: float) -> torch.Tensor:
        ctx.factor = factor
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        return grad * ctx.factor, None


def scale_gradient(x: torch.Tensor, factor: float) -> torch.Tensor:
    """Identity in the forward pass; multiplies the gradient by ``factor`` in the backward pass.

    Returns ``x`` itself when no gradient will flow (no_grad, inference, FLOPs tracing), so the
    traced graph of a network using it is unchanged.
    """
    if not (torch.is_grad_enabled() and x.requires_grad):
        return x
    return _ScaleGradient.apply(x, factor)


def gradient_equilibrium(h: torch.Tensor, exit_index: int, num_exits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Split the trunk tensor after block ``exit_index`` (0-based) into (head input, trunk
    output): the head's gradient into ``h`` is scaled by 1/(K-k), the deeper blocks' gradient by
    (K-k-1)/(K-k). ``num_exits`` is the network's K, also when running only a prefix."""
    head_input = scale_gradient(h, 1.0 / (num_exits - exit_index))
    return head_input, scale_gradient(head_input, float(num_exits - exit_index - 1))

"""Per-exit cumulative FLOPs and parameter counts, counted with fvcore.

Two conventions:

``reference``
    What the MSDNet/RANet reference counter (``op_counter.py``) counts, so that published
    per-exit numbers are matched: convolutions as multiply-adds C_in*C_out*k^2*H_out*W_out/groups
    (no bias), linear layers as weights plus bias, ReLU one per output element, average and max
    pooling k^2 per output element, adaptive average pooling one per input element. Batch norm,
    additions, concatenation and interpolation are free.
``fvcore``
    fvcore's own defaults (multiply-adds of convolutions, matmuls and linear layers, eval-mode
    batch norm, adaptive pooling, upsampling), for comparison with other fvcore-based papers.

Exit k is counted by tracing the network truncated after exit k (``models.ExitPrefix``), so its
cost includes every earlier exit head.
"""

from __future__ import annotations

import logging
import math
import warnings
from typing import Any

import torch
from torch import nn

from models import ExitPrefix, MultiExitNetwork
from models.base import PLAIN_COUNTERPART

CONVENTIONS = ("reference", "fvcore")

_logger = logging.getLogger(__name__)


def _shape(value: Any) -> list[int]:
    return value.type().sizes()


def _numel(value: Any) -> int:
    return math.prod(_shape(value))


def _conv(inputs: list, outputs: list) -> int:
    weight = _shape(inputs[1])  # C_out, C_in/groups, kh, kw
    out = _shape(outputs[0])  # N, C_out, H_out, W_out
    return out[0] * math.prod(weight) * math.prod(out[2:])


def _linear(inputs: list, outputs: list) -> int:
    weight = _shape(inputs[1])  # out_features, in_features
    rows = _numel(outputs[0]) // weight[0]
    bias = 0 if inputs[2].type().kind() == "NoneType" else weight[0]
    return rows * (math.prod(weight) + bias)


def _addmm(inputs: list, outputs: list) -> int:
    # addmm(bias, x, weight^T): a linear layer with bias
    rows, inner = _shape(inputs[1])
    cols = _shape(inputs[2])[1]
    return rows * (inner * cols + cols)


def _elementwise(inputs: list, outputs: list) -> int:
    return _numel(outputs[0])


def _pool(inputs: list, outputs: list) -> int:
    kernel = inputs[1].toIValue()
    if kernel is None and inputs[1].node().kind() == "prim::ListConstruct":
        # traced pools pass their kernel size as a list built from constants
        kernel = [v.toIValue() for v in inputs[1].node().inputs()]
    if isinstance(kernel, int):
        kernel = [kernel, kernel]
    if len(kernel) == 1:
        kernel = [kernel[0], kernel[0]]
    return math.prod(kernel) * _numel(outputs[0])


def _adaptive_avg_pool(inputs: list, outputs: list) -> int:
    return _numel(inputs[0])


def _free(inputs: list, outputs: list) -> int:
    return 0


_REFERENCE_HANDLES = {
    "aten::_convolution": _conv,
    "aten::conv2d": _conv,
    "aten::convolution": _conv,
    "aten::linear": _linear,
    "aten::addmm": _addmm,
    "aten::relu": _elementwise,
    "aten::relu_": _elementwise,
    "aten::avg_pool2d": _pool,
    "aten::max_pool2d": _pool,
    "aten::adaptive_avg_pool2d": _adaptive_avg_pool,
    "aten::batch_norm": _free,
    "aten::upsample_bilinear2d": _free,
    "aten::upsample_nearest2d": _free,
    "aten::matmul": _free,
    "aten::mm": _free,
    "aten::bmm": _free,
    "aten::einsum": _free,
    "aten::layer_norm": _free,
    "aten::group_norm": _free,
    "aten::instance_norm": _free,
}


class _KeepAllOutputs(nn.Module):
    """Makes every leaf module's output a graph output, so the JIT tracer drops nothing.

    The tracer removes computations no output depends on, such as MSDNet's finer scales in the
    block before an exit (only later blocks read them). They still run, and the reference counter
    counts them, so they must be kept in the traced graph.
    """

    def __init__(self, module: nn.Module):
        super().__init__()
        self.module = module

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        kept: list[torch.Tensor] = []

        def keep(_module: nn.Module, _inputs: Any, out: Any) -> None:
            if isinstance(out, torch.Tensor):
                kept.append(out)

        leaves = [m for m in self.module.modules() if next(m.children(), None) is None]
        hooks = [m.register_forward_hook(keep) for m in leaves]
        try:
            out = self.module(x)
        finally:
            for h in hooks:
                h.remove()
        out = [out] if isinstance(out, torch.Tensor) else list(out)
        return out + kept


def _analysis(module: nn.Module, example: torch.Tensor, convention: str) -> Any:
    """An fvcore analysis of ``module`` (every leaf output kept) under ``convention``."""
    from fvcore.nn import FlopCountAnalysis  # imported late: it is slow and noisy to import

    analysis = FlopCountAnalysis(_KeepAllOutputs(module), (example,))
    if convention == "reference":
        analysis.set_op_handle(**_REFERENCE_HANDLES)
    analysis.unsupported_ops_warnings(False).uncalled_modules_warnings(False)
    analysis.tracer_warnings("none")
    return analysis


def _run_quietly(compute: Any) -> Any:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        logging.getLogger("fvcore").setLevel(logging.ERROR)
        return compute()


def _count(module: nn.Module, example: torch.Tensor, convention: str) -> int:
    return int(_run_quietly(_analysis(module, example, convention).total))


def _calls_per_prefix(network: MultiExitNetwork, example: torch.Tensor) -> list[dict[int, int]]:
    """For each k, how many times each module (by id) runs when exits 1..k are computed."""
    out = []
    for k in range(1, network.num_exits + 1):
        calls: dict[int, int] = {}

        def record(module: nn.Module, _inputs: Any, _output: Any) -> None:
            calls[id(module)] = calls.get(id(module), 0) + 1

        hooks = [m.register_forward_hook(record) for m in network.modules()]
        try:
            with torch.no_grad():
                network.forward_all(example, upto=k)
        finally:
            for h in hooks:
                h.remove()
        out.append(calls)
    return out


def _params_of(network: MultiExitNetwork, calls: dict[int, int]) -> int:
    params: dict[int, nn.Parameter] = {}
    for m in network.modules():
        if id(m) in calls:
            for p in m.parameters(recurse=False):
                params[id(p)] = p
    return sum(p.numel() for p in params.values())


def _flops_from_one_trace(
    network: MultiExitNetwork, example: torch.Tensor, convention: str, prefix_calls: list[dict[int, int]]
) -> list[int] | None:
    """Per-exit FLOPs from a single trace of the whole network, attributing each module's own
    operations to the exits whose prefix runs it. Returns None when that attribution is not exact:
    operations outside any submodule, or a module that runs a different number of times in a
    prefix than in the whole network (then every prefix is traced on its own)."""
    analysis = _analysis(ExitPrefix(network, network.num_exits), example, convention)
    by_module = _run_quietly(analysis.by_module)
    root = "module.network"
    names = {id(m): (f"{root}.{n}" if n else root) for n, m in network.named_modules()}
    own: dict[int, int] = {}
    for module in network.modules():
        children = sum(by_module.get(names[id(c)], 0) for c in module.children())
        own[id(module)] = by_module.get(names[id(module)], 0) - children
    if by_module.get("", 0) != by_module.get(root, 0) or own[id(network)] != 0:
        return None
    all_calls = prefix_calls[-1]
    flops = []
    for calls in prefix_calls:
        if any(all_calls.get(m, 0) != n for m, n in calls.items()):
            return None
        flops.append(sum(own.get(m, 0) for m in calls))
    return flops


def exit_flops(
    network: MultiExitNetwork,
    input_shape: tuple[int, int, int],
    convention: str = "reference",
    exact: bool = False,
) -> dict[str, list[int]]:
    """Cumulative FLOPs and parameter counts per exit for one image of ``input_shape``.

    By default the network is traced once and each module's operations are attributed to the
    exits that run it (falling back to one trace per exit where that is not exact); ``exact=True``
    always traces the network truncated after each exit.
    """
    if convention not in CONVENTIONS:
        raise ValueError(f"unknown FLOPs convention {convention!r}; allowed: {', '.join(CONVENTIONS)}")
    was_training = network.training
    network.eval()
    example = torch.zeros(1, *input_shape)
    try:
        prefix_calls = _calls_per_prefix(network, example)
        flops = None if exact else _flops_from_one_trace(network, example, convention, prefix_calls)
        if flops is None:
            flops = [_count(ExitPrefix(network, k), example, convention) for k in range(1, network.num_exits + 1)]
        params = [_params_of(network, calls) for calls in prefix_calls]
    finally:
        network.train(was_training)
    return {"flops": flops, "params": params}


def baseline_cost(
    network: MultiExitNetwork, input_shape: tuple[int, int, int], convention: str = "reference"
) -> int | None:
    """FLOPs of the network's plain counterpart (no early exits), if it defines one.

    Architectures with the ``plain_counterpart`` capability (the EENets ResNets) return the
    non-early-exit network of the same depth; exit costs are then reported as ratios of it.
    """
    if PLAIN_COUNTERPART not in network.capabilities:
        return None
    plain = network.plain_counterpart().eval()
    return _count(plain, torch.zeros(1, *input_shape), convention)

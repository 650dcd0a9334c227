"""The recipe's numeric and compilation switches: validated, and what they turn on."""

from __future__ import annotations

import pytest
import torch

from eebench import registry
from eebench.recipe import Recipe


def build(**values):
    return registry.build_params(Recipe, values, "recipe")


@pytest.mark.parametrize(
    "values, fragment",
    [
        ({"precision": "fp16"}, "recipe.precision = 'fp16'; allowed: fp32, tf32, bf16"),
        ({"compile": "max"}, "recipe.compile = 'max'; allowed: false, default, reduce-overhead"),
        ({"compile": True}, "recipe.compile = True; allowed: false, default, reduce-overhead"),
        ({"channels_last": "yes"}, "recipe.channels_last = 'yes'; allowed: auto, on, off"),
    ],
)
def test_bad_switches_are_refused(values, fragment):
    with pytest.raises(ValueError, match=fragment.replace("(", r"\(").replace(")", r"\)")):
        build(**values)


def test_defaults_are_the_references_fp32_eager():
    recipe = build()
    assert (recipe.precision, recipe.compile, recipe.channels_last) == ("fp32", False, "auto")


@pytest.mark.parametrize("precision, cuda_dtype", [("fp32", None), ("tf32", None), ("bf16", torch.bfloat16)])
def test_autocast_only_for_bf16_and_only_on_a_gpu(precision, cuda_dtype):
    recipe = build(precision=precision)
    assert recipe.autocast_dtype(torch.device("cuda")) is cuda_dtype
    assert recipe.autocast_dtype(torch.device("cpu")) is None


def test_channels_last_auto_means_gpu_only():
    assert build().uses_channels_last(torch.device("cuda")) and not build().uses_channels_last(torch.device("cpu"))
    assert build(channels_last="on").uses_channels_last(torch.device("cpu"))
    assert not build(channels_last="off").uses_channels_last(torch.device("cuda"))


def test_tf32_flags_follow_the_precision():
    before = torch.get_float32_matmul_precision(), torch.backends.cudnn.allow_tf32
    try:
        torch.backends.cudnn.allow_tf32 = True  # PyTorch's own default
        build(precision="fp32").apply_matmul_precision(torch.device("cuda"))
        assert not torch.backends.cudnn.allow_tf32 and torch.get_float32_matmul_precision() == "highest"
        build(precision="tf32").apply_matmul_precision(torch.device("cuda"))
        assert torch.backends.cudnn.allow_tf32 and torch.get_float32_matmul_precision() == "high"
        build(precision="fp32").apply_matmul_precision(torch.device("cpu"))  # nothing to do on CPU
        assert torch.backends.cudnn.allow_tf32
    finally:
        torch.set_float32_matmul_precision(before[0])
        torch.backends.cudnn.allow_tf32 = before[1]

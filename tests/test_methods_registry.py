"""Every registered training method, through the real training loop on the digits data."""

from __future__ import annotations

import pytest
import torch

from eebench.datasets import dataset_info, load_pool, make_split, split_images
from eebench.methods import METHODS
from eebench.recipe import Recipe
from eebench.training import TrainData, train
from models import build_model

ARCH_FOR = {"eenets": ("ee_resnet", {"depth": 8, "num_exits": 2, "width": 8})}
TINY_MSDNET = ("msdnet", {"n_blocks": 3, "n_channels": 6, "growth_rate": 4})


def digits_data() -> TrainData:
    info = dataset_info("digits")
    pool = load_pool("digits", "unused")
    split = make_split("digits", (len(pool.train_labels), 0), seed=0)
    tr, trl = split_images(pool, split, "train")
    va, val = split_images(pool, split, "val")
    return TrainData(tr, trl, va, val, info.mean, info.std, info.crop_padding, info.hflip)


@pytest.mark.slow
@pytest.mark.parametrize("compiled", [False, "default"], ids=["eager", "compiled"])
@pytest.mark.parametrize("name", METHODS.names())
def test_each_method_trains_two_epochs_and_its_loss_decreases(name, compiled, tmp_path):
    """Also with ``recipe.compile: default`` (the network's forward under torch.compile)."""
    torch.manual_seed(0)
    arch, params = ARCH_FOR.get(name, TINY_MSDNET)
    model = build_model(arch, dataset_info("digits").input, **params)
    method_cls = METHODS.get(name)
    method_params = METHODS.make_params(name, dict(method_cls.test_params))
    recipe = Recipe(epochs=2, batch_size=64, lr=0.05, schedule="constant", eval_batch_size=512, compile=compiled)
    k = model.num_exits
    result = train(
        model,
        lambda m, ctx: method_cls(m, method_params, ctx),
        digits_data(),
        recipe,
        torch.linspace(1 / k, 1.0, k),
        10,
        seed=0,
        state_dir=tmp_path,
        fingerprint=name,
        device=torch.device("cpu"),
    )
    losses = [row["loss"] for row in result.history]
    assert len(losses) == 2 and all(torch.isfinite(torch.tensor(losses)))
    assert losses[1] < losses[0], losses


def test_every_method_declares_params_and_test_params():
    for name in METHODS.names():
        cls = METHODS.get(name)
        assert cls.name == name
        METHODS.make_params(name, dict(cls.test_params))  # the tiny setting is valid


def test_unknown_method_lists_the_registered_ones():
    with pytest.raises(KeyError) as err:
        METHODS.get("no_such_method")
    assert "standard" in str(err.value) and "gater" in str(err.value)


def test_methods_that_need_eager_autograd_are_not_compiled(tmp_path, caplog):
    """L2W (double backward) and JEI-DNN (parameter reachability) train eagerly under
    ``recipe.compile: default``, with a warning; the others declare they can be compiled."""
    from train_helpers import digits_data, run_training

    assert {name for name in METHODS.names() if not METHODS.get(name).compilable} == {"l2w", "jei_dnn"}
    with caplog.at_level("WARNING", logger="eebench.train"):
        result = run_training("l2w", tmp_path, epochs=1, data=digits_data(64, 32), compile="default")
    assert "forward_all" not in vars(result.model)  # the bound method, not a compiled wrapper
    assert "l2w needs the network eager" in caplog.text

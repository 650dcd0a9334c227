"""Small, fast training runs on the digits data for the resume and multi-process tests."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from workflow_helpers import ROOT, default_config

from eebench.config import validate_schema
from eebench.datasets import dataset_info, load_pool, make_split, split_images
from eebench.pipeline import _method_factory, build_network
from eebench.recipe import Recipe
from eebench.training import TrainData, TrainResult, train


def digits_data(n_train: int = 256, n_val: int = 128) -> TrainData:
    """A slice of the digits split (8 batches of 32 per epoch by default)."""
    info = dataset_info("digits")
    pool = load_pool("digits", ROOT / "data")
    split = make_split("digits", (len(pool.train_labels), len(pool.test_labels)), 0)
    train_images, train_labels = split_images(pool, split, "train")
    val_images, val_labels = split_images(pool, split, "val")
    return TrainData(
        train_images[:n_train],
        train_labels[:n_train],
        val_images[:n_val],
        val_labels[:n_val],
        info.mean,
        info.std,
        info.crop_padding,
        info.hflip,
    )


def run_training(
    variant: str,
    state_dir: str | Path,
    *,
    arch: str = "msdnet",
    epochs: int = 2,
    batch_size: int = 32,
    seed: int = 0,
    data: TrainData | None = None,
    stop_after_batches: int | None = None,
    **recipe: Any,
) -> TrainResult:
    """Train a default-config variant from scratch on CPU (the same network for the same seed)."""
    config = default_config()
    validate_schema(config)  # fills the schema's defaults, as the workflow does at start
    torch.manual_seed(seed)
    network = build_network(config, "digits", arch)
    costs = torch.linspace(1.0 / network.num_exits, 1.0, network.num_exits)
    recipe_ = Recipe(epochs=epochs, batch_size=batch_size, lr=0.05, schedule="cosine", **recipe)
    return train(
        network,
        _method_factory(config, variant),
        data or digits_data(),
        recipe_,
        costs,
        dataset_info("digits").input.num_classes,
        seed,
        state_dir,
        f"test-{variant}-{arch}",
        torch.device("cpu"),
        stop_after_batches=stop_after_batches,
    )


def weights_of(result: TrainResult) -> dict[str, torch.Tensor]:
    """Every tensor that a run ends with: network, method's extra networks."""
    out = {f"model.{k}": v.detach().clone() for k, v in result.model.state_dict().items()}
    for name, module in result.method.extra_modules().items():
        out.update({f"{name}.{k}": v.detach().clone() for k, v in module.state_dict().items()})
    return out

"""A dataset's split when a pretrained checkpoint decides what val may be.

A checkpoint trained elsewhere has seen some of the dataset's training pool; the harness may only
calibrate on images it has not. Two ways out, chosen in the config:

- ``datasets.<name>.val_indices``: the indices its training held out (MSDNet's ``--use-valid``
  writes them as ``index.pth``, a random permutation of the training pool whose last 5000 (CIFAR)
  or 50000 (ImageNet) entries are val). The split's val is exactly these images, train the rest.
- ``datasets.<name>.val_from: test``: val is ``val_size`` images drawn (with ``split_seed``) from the
  dataset's own test set, which stays the test set without them; train is the whole pool.

Without either, ``eebench.datasets.make_split`` makes the split as for any trained cell.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from .checkpoints import load_weights_only
from .config import held_out_file, val_from, val_size
from .datasets import dataset_info, make_split
from .io import CorruptFileError

VAL_FROM_TEST = "val_from_test"  # a split-file entry: val indexes the test set, not the pool


def _index_array(value: Any, path: Path, key: str) -> np.ndarray:
    if not isinstance(value, (torch.Tensor, np.ndarray)):
        raise CorruptFileError(f"{path}: {key!r} must be a tensor of indices, got {type(value).__name__}")
    array = value.numpy() if isinstance(value, torch.Tensor) else value
    if array.ndim != 1 or not np.issubdtype(array.dtype, np.integer):
        raise CorruptFileError(
            f"{path}: {key!r} must be a 1-D integer tensor of indices, got {array.dtype} of shape {tuple(array.shape)}"
        )
    return array.astype(np.int64)


def read_val_indices(path: str | Path, pool_size: int, n_val: int, carved_test: bool) -> dict[str, np.ndarray]:
    """The held-out indices of a val_indices file: ``val`` (and ``test`` for a dataset whose test
    split is carved from its pool). A permutation of the whole pool (MSDNet's ``index.pth``) holds
    out its last ``n_val`` entries."""

    path = Path(path)
    if path.suffix == ".npz":
        with np.load(path, allow_pickle=False) as data:
            obj: Any = {key: data[key] for key in data.files}
    else:
        obj = load_weights_only(path)
    if isinstance(obj, dict):
        parts = {key: _index_array(obj[key], path, key) for key in ("val", "test") if key in obj}
        if "val" not in parts:
            raise CorruptFileError(f"{path}: a val_indices file with keys needs 'val' (found {sorted(obj)})")
    else:
        held = _index_array(obj, path, "indices")
        if len(held) == pool_size and np.array_equal(np.sort(held), np.arange(pool_size)):
            if not 0 < n_val < pool_size:
                raise CorruptFileError(
                    f"{path}: a permutation of the whole pool, but the val size {n_val} leaves "
                    f"no training images out of {pool_size}; set the dataset's val_size"
                )
            held = held[-n_val:]  # MSDNet: train_set_index[-num_sample_valid:]
        parts = {"val": held}
    if carved_test and "test" not in parts:
        raise CorruptFileError(
            f"{path}: this dataset has no test set of its own (its test split comes from the same pool), so the "
            "held-out indices must give both 'val' and 'test' (a tensor file with those two keys)"
        )
    if not carved_test and "test" in parts:
        raise CorruptFileError(f"{path}: 'test' is not allowed here: the dataset's own test set is the test split")
    for key, index in parts.items():
        if len(index) == 0 or index.min() < 0 or index.max() >= pool_size or len(np.unique(index)) != len(index):
            raise CorruptFileError(
                f"{path}: {key!r} must be distinct indices into the training pool of "
                f"{pool_size} images (got {len(index)} values in [{index.min() if len(index) else '-'}, "
                f"{index.max() if len(index) else '-'}]); is it the file of another dataset?"
            )
    if "test" in parts and np.intersect1d(parts["val"], parts["test"]).size:
        raise CorruptFileError(f"{path}: 'val' and 'test' share indices")
    return parts


def _count(size: int | float, total: int) -> int:
    return size if isinstance(size, int) else int(round(total * size))


def dataset_split(config: dict[str, Any], dataset: str, pool_sizes: tuple[int, int]) -> dict[str, np.ndarray]:
    """train / val / test index arrays of ``dataset`` under the config (see the module docstring)."""
    n_pool, n_test = pool_sizes
    info = dataset_info(dataset, config)
    size = val_size(config, dataset)
    if val_from(config, dataset) == "test":
        n_val = _count(size if size is not None else info.val_size, n_test)
        if not 0 < n_val < n_test:
            raise ValueError(
                f"dataset {dataset!r}: val_from test needs a val_size below the test set's {n_test} "
                f"images (got {n_val}); set datasets.{dataset}.val_size"
            )
        order = np.random.default_rng(config["split_seed"]).permutation(n_test)
        return {
            "train": np.arange(n_pool),
            "val": np.sort(order[:n_val]),
            "test": np.sort(order[n_val:]),
            VAL_FROM_TEST: np.ones(1, dtype=np.int64),
        }
    held_out = held_out_file(config, dataset)
    if held_out is None:
        return make_split(info, pool_sizes, config["split_seed"], size)
    carved = info.test_fraction is not None
    parts = read_val_indices(held_out, n_pool, _count(size if size is not None else info.val_size, n_pool), carved)
    taken = np.concatenate(list(parts.values()))
    return {
        "train": np.setdiff1d(np.arange(n_pool), taken),
        "val": np.sort(parts["val"]),
        "test": np.sort(parts["test"]) if carved else np.arange(n_test),
    }


def val_is_from_test(split: dict[str, Any]) -> bool:
    return VAL_FROM_TEST in split

"""Datasets declared in config: the built-in declarations, a user dataset in each on-disk format
(tiny files written here) through split, FLOPs and one training epoch, and bad declarations
refused before any job with the key named."""

from __future__ import annotations

import contextlib
import copy
import gzip
import io
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
import torch
import yaml
from dataset_files import class_images, write_cifar, write_folder, write_idx, write_svhn
from workflow_helpers import ROOT, run_workflow, tiny_config

from eebench import datasets, pipeline
from eebench.config import Cell, ConfigError, check_config, check_data, validate_schema
from eebench.datasets import builtin_datasets, dataset_info, load_pool
from eebench.report import eenets_table
from models import InputSpec, build_model

TINY_RESNET = {"family": "ee_resnet", "params": {"depth": 8, "num_exits": 1, "width": 4}}
CLASSES = 3


def user_config(data_dir: Path, declaration: dict[str, Any], arch: dict[str, Any] | None = None) -> dict[str, Any]:
    """The tiny config on one user dataset ``mine`` and one small network."""
    config = copy.deepcopy(tiny_config(epochs=1))
    config["data_dir"] = str(data_dir)
    config["datasets"] = {"mine": {"recipe": {"epochs": 1, "batch_size": 8}, **declaration}}
    config["architectures"] = {"net": copy.deepcopy(arch or TINY_RESNET)}
    config["experiments"] = [{"datasets": ["mine"], "architectures": ["net"], "methods": ["standard"]}]
    validate_schema(config)
    return config


def _split(n: int, size: int, channels: int, seed: int = 0):
    images, labels = class_images(n, CLASSES, size, channels, seed)
    return images, labels


def make_npz(root: Path, channels: int, size: int = 12) -> tuple[dict[str, Any], np.ndarray, np.ndarray]:
    train, test = _split(12, size, channels), _split(4, size, channels, seed=1)
    root.mkdir(parents=True)
    images = train[0][..., 0] if channels == 1 else train[0]  # (N, H, W) for grey, (N, H, W, C) else
    np.savez(
        root / "mine.npz",
        train_images=images,
        train_labels=train[1],
        test_images=test[0][..., 0] if channels == 1 else test[0],
        test_labels=test[1],
    )
    decl = {
        "format": "npz",
        "paths": [str(root)],
        "files": {"data": "mine.npz"},
        "image_size": size,
        "channels": channels,
        "classes": CLASSES,
        "val_size": 6,
        "augment": {"crop_padding": 2, "hflip": True},
    }
    return decl, train[0], train[1]


def make_idx(root: Path, compressed: bool) -> tuple[dict[str, Any], np.ndarray, np.ndarray]:
    train, test = _split(12, 12, 1), _split(4, 12, 1, seed=1)
    write_idx(root / "mine" / "raw", (train[0][..., 0], train[1]), (test[0][..., 0], test[1]), compressed)
    decl = {
        "format": "idx",
        "paths": ["mine/raw"],
        "image_size": 12,
        "channels": 1,
        "classes": CLASSES,
        "val_size": 0.25,
    }
    return decl, train[0], train[1]


def make_cifar(root: Path) -> tuple[dict[str, Any], np.ndarray, np.ndarray]:
    train, test = _split(8, 32, 3), _split(2, 32, 3, seed=1)
    write_cifar(root / "batches", train, test)
    decl = {
        "format": "cifar_batches",
        "paths": ["batches"],
        "files": {"train": ["data_batch_1", "data_batch_2"]},
        "image_size": 32,
        "channels": 3,
        "classes": CLASSES,
        "val_size": 6,
        "mean": [0.5] * 3,
        "std": [0.25] * 3,
    }
    return decl, train[0], train[1]


def make_folder(root: Path) -> tuple[dict[str, Any], np.ndarray, np.ndarray]:
    train = _split(8, 12, 1)
    write_folder(root / "tree" / "all", *train)
    # no test folder: the test set is carved out of the pool
    decl = {
        "format": "imagefolder",
        "paths": ["tree"],
        "files": {"train": "all"},
        "image_size": 12,
        "channels": 1,
        "classes": CLASSES,
        "val_size": 4,
        "test_fraction": 0.25,
        "augment": {"crop_padding": 1, "hflip": True},
    }
    return decl, None, None


def make_svhn(root: Path) -> tuple[dict[str, Any], np.ndarray, np.ndarray]:
    train, test = _split(8, 32, 3), _split(2, 32, 3, seed=1)
    write_svhn(root / "svhn", train, test)
    decl = {"format": "svhn_mat", "paths": ["svhn"], "image_size": 32, "channels": 3, "classes": CLASSES, "val_size": 6}
    return decl, train[0], train[1]


FORMAT_CASES: dict[str, Callable[[Path], tuple]] = {
    "npz-grey": lambda root: make_npz(root / "npz", 1),
    "npz-rgb": lambda root: make_npz(root / "npz", 3),
    "idx": lambda root: make_idx(root, compressed=False),
    "idx-gz": lambda root: make_idx(root, compressed=True),
    "cifar_batches": make_cifar,
    "imagefolder-grey": make_folder,
    "svhn_mat": make_svhn,
}


def test_builtin_declarations_resolve_to_their_inputs():
    shapes = {name: dataset_info(name).input for name in builtin_datasets()}
    assert shapes == {
        "digits": InputSpec(3, 32, 10),
        "cifar10": InputSpec(3, 32, 10),
        "cifar100": InputSpec(3, 32, 100),
        "imagenet": InputSpec(3, 224, 1000),
        "tinyimagenet": InputSpec(3, 64, 200),
        "mnist": InputSpec(1, 28, 10),
        "svhn": InputSpec(3, 32, 10),
        "fashionmnist": InputSpec(1, 28, 10),
    }
    assert dataset_info("imagenet").augment == "resized_crop" and dataset_info("cifar10").hflip
    assert dataset_info("fashionmnist").mean is None  # computed from the training split
    override = {"datasets": {"cifar10": {"val_size": 1000, "augment": {"hflip": False}}}}
    spec = dataset_info("cifar10", override)
    assert (spec.val_size, spec.hflip, spec.crop_padding) == (1000, False, 4)  # augment merged key by key


def test_a_bad_builtin_declaration_is_refused_when_the_config_is_validated(monkeypatch):
    builtins = datasets._builtin_file()
    entries = {**builtins, "broken": {**builtins["fashionmnist"], "image_size": "28"}}
    monkeypatch.setattr(datasets, "_builtin_file", lambda: entries)
    with pytest.raises(ConfigError, match=r"builtin_datasets.yaml: broken.image_size: '28' is not of type 'integer'"):
        validate_schema(copy.deepcopy(tiny_config()))


@pytest.mark.parametrize("case", list(FORMAT_CASES))
def test_user_dataset_loads_splits_and_trains_one_epoch(case, tmp_path):
    decl, images, labels = FORMAT_CASES[case](tmp_path / "data")
    config = user_config(tmp_path / "data", decl)
    check_config(config)
    check_data(config)
    spec = dataset_info("mine", config)
    pool = load_pool(spec, config["data_dir"], workers=0)
    if images is not None:  # what was written is what is read, in (N, C, H, W)
        assert torch.equal(pool.train_images, torch.from_numpy(images).permute(0, 3, 1, 2))
        assert pool.train_labels.tolist() == labels.tolist()
    out = tmp_path / "results"
    pipeline.write_split(config, "mine", str(out / "split.npz"))
    split = pipeline.read_split(str(out / "split.npz"))
    carved = len(split["test"]) if spec.test_fraction is not None else 0  # test set taken from the pool
    n_rest = len(pool.train_labels) - carved
    n_val = spec.val_size if isinstance(spec.val_size, int) else round(n_rest * spec.val_size)
    assert len(split["val"]) == n_val and len(split["train"]) == n_rest - n_val
    if spec.mean is None:  # normalisation computed from the training part, per channel
        train = pool.train_images[torch.as_tensor(split["train"])] if images is not None else None
        assert split["mean"].shape == (spec.input.channels,)
        if train is not None:
            x = train.double() / 255
            assert np.allclose(split["mean"], x.mean(dim=(0, 2, 3)).numpy())
            assert np.allclose(split["std"], x.std(dim=(0, 2, 3), unbiased=False).numpy())
    pipeline.write_flops(config, "mine", "net", str(out / "flops.json"))
    cell = Cell("mine", "net", "standard", 0)
    pipeline.train_cell(
        config,
        cell,
        str(out / "split.npz"),
        str(out / "flops.json"),
        str(out / "weights.pt"),
        str(out / "history.csv"),
        str(out / "state"),
    )
    history = pd.read_csv(out / "history.csv")
    assert list(history["epoch"]) == [1] and history["val_acc_2"].between(0, 100).all()


def test_grey_28x28_user_dataset_builds_every_architecture_of_the_fashion_config():
    config = yaml.safe_load((ROOT / "config" / "fashion.yaml").read_text())
    x = torch.zeros(2, 1, 28, 28)
    for name, arch in config["architectures"].items():
        network = build_model(arch["family"], InputSpec(1, 28, 10), **arch["params"])
        network.eval()
        logits = network(x)
        assert len(logits) == network.num_exits and all(t.shape == (2, 10) for t in logits), name


def _npz_config(tmp_path: Path, **changes: Any) -> dict[str, Any]:
    decl, _, _ = make_npz(tmp_path / "data", 1)
    decl.update(changes)
    return user_config(tmp_path / "data", decl)


# (id, change to the npz declaration or config, fragments of the message); every one fails in
# validate_schema / check_config / check_data, which run before any job
BAD_DECLARATIONS = [
    ("unknown-format", {"format": "hdf5"}, ["datasets.mine.format", "'hdf5'", "npz", "imagefolder"]),
    ("wrong-image-size", {"image_size": 16}, ["datasets.mine.image_size", "16 declared", "12x12"]),
    ("wrong-channels", {"channels": 3, "mean": None}, ["datasets.mine.channels", "3 declared", "1 channel"]),
    ("missing-path", {"paths": ["nowhere"]}, ["datasets.mine", "not found", "nowhere", "does not exist", "data_dir"]),
    ("missing-file", {"files": {"data": "other.npz"}}, ["datasets.mine", "not found", "no other.npz"]),
    ("classes-do-not-match", {"classes": 5}, ["datasets.mine.classes", "5 declared", "3 classes (labels 0..2)"]),
    ("fixed-format-size", {"format": "cifar_batches", "files": {}}, ["datasets.mine.channels", "3 (format"]),
    (
        "resized-crop-in-memory",
        {"augment": {"resized_crop": True}},
        ["datasets.mine.augment.resized_crop", "imagefolder"],
    ),
    ("mean-per-channel", {"mean": [0.5, 0.5], "std": [0.2, 0.2]}, ["datasets.mine.mean", "a list of 1 value"]),
    ("mean-without-std", {"mean": [0.5]}, ["datasets.mine.std", "both"]),
    ("unknown-file-role", {"files": {"labels": "x.npy"}}, ["datasets.mine.files.labels", "data"]),
    ("missing-keys", {"image_size": None, "classes": None}, ["datasets.mine", "required keys 'image_size', 'classes'"]),
    ("bad-augment-key", {"augment": {"rotate": 10}}, ["datasets.mine.augment", "'rotate'", "crop_padding"]),
]


@pytest.mark.parametrize("change,expected", [c[1:] for c in BAD_DECLARATIONS], ids=[c[0] for c in BAD_DECLARATIONS])
def test_bad_declaration_fails_naming_the_key(change, expected, tmp_path):
    decl, _, _ = make_npz(tmp_path / "data", 1)
    for key, value in change.items():
        if value is None:
            decl.pop(key, None)
        else:
            decl[key] = value
    config = copy.deepcopy(tiny_config(epochs=1))
    config["data_dir"] = str(tmp_path / "data")
    config["datasets"] = {"mine": decl}
    config["architectures"] = {"net": copy.deepcopy(TINY_RESNET)}
    config["experiments"] = [{"datasets": ["mine"], "architectures": ["net"], "methods": ["standard"]}]
    with pytest.raises(ConfigError) as err:
        validate_schema(config)
        check_config(config)
        check_data(config)
    message = str(err.value)
    assert message.startswith("config ")
    for fragment in expected:
        assert fragment in message, f"{fragment!r} not in: {message}"


@pytest.mark.parametrize(
    "write,expected",
    [
        (
            lambda raw: (raw / "train-images-idx3-ubyte.gz").write_bytes(b"not gzip at all"),
            "train-images-idx3-ubyte.gz",
        ),
        (
            lambda raw: (raw / "train-labels-idx1-ubyte.gz").write_bytes(gzip.compress(b"\0\0\x08\x03" + b"\0" * 12)),
            "train-labels-idx1-ubyte.gz",
        ),
    ],
    ids=["not-gzip", "labels-file-holds-images"],
)
def test_unreadable_file_is_named(write, expected, tmp_path):
    decl, _, _ = make_idx(tmp_path / "data", compressed=True)
    write(tmp_path / "data" / "mine" / "raw")
    with pytest.raises(ConfigError) as err:
        check_data(user_config(tmp_path / "data", decl))
    assert expected in str(err.value) and "not an idx file" in str(err.value), str(err.value)


def test_architecture_that_does_not_fit_the_declared_images_fails_at_config_time(tmp_path):
    decl, _, _ = make_npz(tmp_path / "data", 1)  # 12x12 grey
    msdnet = {
        "family": "msdnet",
        "params": {
            "n_blocks": 2,
            "n_channels": 4,
            "growth_rate": 2,
            "n_scales": 3,
            "gr_factor": [1, 2, 4],
            "bn_factor": [1, 2, 4],
        },
    }
    with pytest.raises(ConfigError) as err:
        check_config(user_config(tmp_path / "data", decl, msdnet))
    for fragment in ("architectures.net.params", "'mine'", "1x12x12", "datasets.mine", "n_scales=3"):
        assert fragment in str(err.value), str(err.value)


def test_bad_declaration_stops_the_workflow_before_any_job(tmp_path):
    decl, _, _ = make_npz(tmp_path / "data", 1)
    config = user_config(tmp_path / "data", {**decl, "classes": 4})
    proc = run_workflow(tmp_path / "run", config, "all_figures", check=False)
    assert proc.returncode != 0
    assert "datasets.mine.classes: 4 declared" in proc.stdout + proc.stderr
    assert not (tmp_path / "run" / "results" / "splits").exists()


def test_eenets_table_shows_each_exits_accuracy_and_share_leaving():
    rows = []
    for arch, variant, accs, shares in (
        ("ee", "eenets", [10.0, 11.0, 90.0], [0.0, 0.0, 1.0]),
        ("ee_lin", "two_stage", [60.0, 85.0, 91.0], [0.0, 1.0, 0.0]),
    ):
        for k, (acc, share) in enumerate(zip(accs, shares), start=1):
            point = 90.0 if variant == "eenets" else 85.0
            rows.append(
                {
                    "dataset": "d",
                    "architecture": arch,
                    "variant": variant,
                    "seed": 0,
                    "exit": k,
                    "flops": 1e6 * k,
                    "accuracy": acc,
                    "confidence_exit_accuracy": point,
                    "confidence_exit_cost_ratio": 1.0 if variant == "eenets" else 0.6,
                    "confidence_exit_fraction": share,
                }
            )
    rows.append(
        {
            "dataset": "d",
            "architecture": "plain",
            "variant": "standard",
            "seed": 0,
            "exit": 1,
            "flops": 2.5e6,
            "accuracy": 92.0,
        }
    )
    spec = {
        "variant": "eenets",
        "plain_variant": "standard",
        "rows": [
            {"dataset": "d", "architecture": "ee", "plain": "plain"},
            {"dataset": "d", "architecture": "ee_lin", "plain": "plain", "variant": "two_stage"},
        ],
    }
    flops = {"d/ee": {"baseline_flops": 2.5e6}, "d/ee_lin": {"baseline_flops": 2.5e6}}
    table = eenets_table(pd.DataFrame(rows), flops, spec).set_index("architecture")
    assert table.loc["ee", "variant"] == "eenets" and table.loc["ee_lin", "variant"] == "two_stage"
    assert table.loc["ee", ["exit1_leaving", "exit2_leaving", "exit3_leaving"]].tolist() == [0.0, 0.0, 100.0]
    assert table.loc["ee_lin", ["exit1_accuracy", "exit2_accuracy", "exit2_leaving"]].tolist() == [60.0, 85.0, 100.0]
    assert table.loc["ee_lin", "eenets_mflops"] == pytest.approx(1.5)
    assert table.loc["ee", "plain_accuracy"] == 92.0


def test_flops_command_uses_a_configs_declaration(tmp_path):
    from eebench.cli import main

    decl, _, _ = make_npz(tmp_path / "data", 1)
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(user_config(tmp_path / "data", decl)))
    buffer = io.StringIO()
    with contextlib.redirect_stdout(buffer):
        main(
            [
                "flops",
                "ee_resnet",
                "mine",
                "--config",
                str(path),
                "--set",
                "depth=8",
                "--set",
                "num_exits=1",
                "--set",
                "width=4",
                "--json",
            ]
        )
    record = json.loads(buffer.getvalue())  # traced on the declared 1x12x12 input
    assert len(record["flops"]) == 2 and record["flops"][0] < record["flops"][1]


def test_readme_declaration_example_is_a_valid_config():
    readme = (ROOT / "README.md").read_text()
    section = readme[readme.index("## Datasets") :]
    block = section[section.index("```yaml") + len("```yaml") :]
    example = yaml.safe_load(block[: block.index("```")])
    config = copy.deepcopy(tiny_config(epochs=1))
    config["datasets"] = {**config["datasets"], **example["datasets"]}
    validate_schema(config)
    check_config(config)
    sketches = dataset_info("sketches", config)
    assert (sketches.format, sketches.input, sketches.val_size) == ("npz", InputSpec(1, 28, 10), 5000)
    assert sketches.mean is None  # computed from the training split
    assert dataset_info("cifar10", config).val_size == 1000

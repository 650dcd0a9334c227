"""The real Fashion-MNIST (Debian's dataset-fashion-mnist, as `.ci/run` installs it): the files as
read by the harness against an independent reading, the split, the torchvision data_dir layout, and
the workflow from split to figures on a slice of it."""

from __future__ import annotations

import copy
import gzip
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import yaml
from dataset_files import idx_bytes
from workflow_helpers import run_workflow, tiny_config

from eebench.config import ConfigError, check_data
from eebench.datasets import dataset_info, load_pool, make_split

DEBIAN = Path("/usr/share/datasets/fashion-mnist")
FILES = {
    "train_images": "train-images-idx3-ubyte.gz",
    "train_labels": "train-labels-idx1-ubyte.gz",
    "test_images": "t10k-images-idx3-ubyte.gz",
    "test_labels": "t10k-labels-idx1-ubyte.gz",
}
pytestmark = pytest.mark.skipif(
    not all((DEBIAN / f).is_file() for f in FILES.values()),
    reason="Fashion-MNIST not installed: apt-get install dataset-fashion-mnist",
)


def read_idx(path: Path) -> np.ndarray:
    """An idx file read with gzip and numpy alone (magic: 0, 0, type 0x08 = uint8, dimensions)."""
    data = gzip.decompress(path.read_bytes())
    assert data[:3] == b"\x00\x00\x08"
    dims = [int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(data[3])]
    return np.frombuffer(data, np.uint8, offset=4 + 4 * len(dims)).reshape(dims)


@pytest.fixture(scope="module")
def pool():
    return load_pool("fashionmnist", "/nonexistent-data-dir")  # not in data_dir: Debian's path


def test_real_files_are_read_whole_and_right(pool):
    assert pool.train_images.shape == (60000, 1, 28, 28) and pool.test_images.shape == (10000, 1, 28, 28)
    assert pool.train_images.dtype == torch.uint8 and pool.train_labels.dtype == torch.int64
    assert pool.train_labels.bincount().tolist() == [6000] * 10
    assert pool.test_labels.bincount().tolist() == [1000] * 10
    train_labels, test_labels = read_idx(DEBIAN / FILES["train_labels"]), read_idx(DEBIAN / FILES["test_labels"])
    assert (
        pool.train_labels[:20].tolist()
        == train_labels[:20].tolist()
        == [9, 0, 0, 3, 0, 2, 7, 2, 5, 5, 0, 9, 5, 5, 7, 9, 1, 0, 6, 4]
    )
    assert np.array_equal(pool.test_labels.numpy(), test_labels)
    images = read_idx(DEBIAN / FILES["test_images"])
    assert np.array_equal(pool.test_images[:100, 0].numpy(), images[:100])
    assert np.array_equal(pool.train_images[-5:, 0].numpy(), read_idx(DEBIAN / FILES["train_images"])[-5:])


def test_split_holds_out_5000_of_train_and_tests_on_all_10000(pool):
    spec = dataset_info("fashionmnist")
    split = make_split(spec, (len(pool.train_labels), len(pool.test_labels)), seed=0)
    assert (len(split["train"]), len(split["val"]), len(split["test"])) == (55000, 5000, 10000)
    assert np.array_equal(split["test"], np.arange(10000))
    assert len(np.intersect1d(split["train"], split["val"])) == 0
    counts = np.bincount(pool.train_labels.numpy()[split["val"]], minlength=10)
    assert counts.sum() == 5000 and counts.min() > 400  # a random, not a sorted, hold-out


def write_slice(raw: Path, n_train: int, n_test: int, compressed: bool) -> None:
    """The first images of the real files in torchvision's FashionMNIST/raw layout."""
    raw.mkdir(parents=True)
    for role, name in FILES.items():
        array = read_idx(DEBIAN / name)[: n_train if role.startswith("train") else n_test]
        data = idx_bytes(array)
        if compressed:
            (raw / name).write_bytes(gzip.compress(data, compresslevel=1))
        else:
            (raw / name.removesuffix(".gz")).write_bytes(data)


def test_data_dir_comes_before_debians_path(tmp_path):
    write_slice(tmp_path / "FashionMNIST" / "raw", 300, 100, compressed=False)
    pool = load_pool("fashionmnist", tmp_path)
    assert (len(pool.train_labels), len(pool.test_labels)) == (300, 100)
    assert pool.train_labels[:10].tolist() == [9, 0, 0, 3, 0, 2, 7, 2, 5, 5]


def test_missing_files_name_both_places_and_the_apt_command(tmp_path):
    config = {
        "data_dir": str(tmp_path),
        "download": False,
        "experiments": [{"datasets": ["fashionmnist"]}],
        "datasets": {"fashionmnist": {"paths": ["FashionMNIST/raw", str(tmp_path / "debian")]}},
    }
    with pytest.raises(ConfigError) as err:
        check_data(config)
    message = str(err.value)
    for fragment in (
        str(tmp_path / "FashionMNIST" / "raw"),
        str(tmp_path / "debian"),
        "does not exist",
        "apt-get install dataset-fashion-mnist",
        "data_dir",
    ):
        assert fragment in message, message


def test_workflow_on_a_slice_of_the_real_data(tmp_path):
    """split -> flops -> train -> infer -> evaluate -> aggregate -> figures, two methods, one epoch,
    on the first 2,500 training and 500 test images of the real files (config/fashion.yaml's MSDNet
    cut to its first 2 blocks)."""
    data = tmp_path / "data"
    write_slice(data / "FashionMNIST" / "raw", 2500, 500, compressed=True)
    fashion = yaml.safe_load((Path(__file__).parents[1] / "config" / "fashion.yaml").read_text())
    config = copy.deepcopy(tiny_config(epochs=1))
    config["data_dir"] = str(data)
    config["datasets"] = {"fashionmnist": {"recipe": {"epochs": 1, "batch_size": 64, "lr": 0.1}, "val_size": 500}}
    msdnet = fashion["architectures"]["msdnet"]
    config["architectures"] = {"msdnet": {**msdnet, "params": {**msdnet["params"], "n_blocks": 2}}}
    config["methods"] = {name: fashion["methods"][name] for name in ("standard", "gater")}
    config["experiments"] = [
        {"datasets": ["fashionmnist"], "architectures": ["msdnet"], "methods": ["standard", "gater"]}
    ]
    config["report"] = {"figures": {"fig3_budgeted": {"variants": ["standard", "gater"]}}}
    run_workflow(tmp_path, config, "results/figures/fig3_budgeted.png")
    results = tmp_path / "results"
    split = np.load(results / "splits" / "fashionmnist.npz")
    assert (len(split["train"]), len(split["val"]), len(split["test"])) == (2000, 500, 500)
    assert split["mean"].shape == (1,) and 0.2 < split["mean"][0] < 0.4  # computed from the training part
    budgeted = pd.read_csv(results / "aggregate" / "budgeted.csv")
    assert set(budgeted["variant"]) == {"standard", "gater"} and set(budgeted["dataset"]) == {"fashionmnist"}
    anytime = pd.read_csv(results / "aggregate" / "anytime.csv")
    last = anytime[anytime["exit"] == anytime["exit"].max()]
    assert (last["accuracy"] > 50).all(), last  # one epoch on 2,000 real images learns (chance: 10%)
    assert (results / "figures" / "fig3_budgeted.png").stat().st_size > 1000

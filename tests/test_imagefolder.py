"""ImageFolder datasets (ImageNet, Tiny-ImageNet): loading, split, deterministic worker-decoded
batches, resumable training and the workflow end to end, on small generated image trees."""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image
from train_helpers import run_training, weights_of
from workflow_helpers import run_workflow, tiny_config

from eebench.config import ConfigError, check_data
from eebench.datasets import DatasetError, DatasetMissingError, dataset_info, load_pool, make_split, split_images
from eebench.imagefolder import FolderImages, eval_batches, train_batches
from eebench.tv import import_torchvision

CLASSES = ("n01", "n02", "n03")


def write_tree(
    root: Path, per_class: int, sizes: tuple[tuple[int, int], ...] = ((48, 40), (70, 64), (64, 64)), seed: int = 0
) -> None:
    """``root/<class>/<i>.JPEG`` with random images of varied sizes (JPEG, as ImageNet ships)."""
    rng = np.random.default_rng(seed)
    for c, name in enumerate(CLASSES):
        (root / name).mkdir(parents=True)
        for i in range(per_class):
            w, h = sizes[i % len(sizes)]
            pixels = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
            pixels[..., c] //= 4  # a class signal a network can pick up
            Image.fromarray(pixels).save(root / name / f"{i}.JPEG", quality=95)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("folders")
    for name, per_class in (("imagenet", 8), ("tinyimagenet", 24)):
        write_tree(root / name / "train", per_class)
        write_tree(root / name / "val", per_class // 2, seed=1)
    return root


def small_images(data_dir: Path, workers: int = 0, size: int = 32) -> tuple[FolderImages, torch.Tensor]:
    pool = load_pool("imagenet", data_dir, workers=workers)
    from dataclasses import replace

    return replace(pool.train_images, size=size), pool.train_labels


def test_pool_and_split_from_folders(data_dir):
    pool = load_pool("imagenet", data_dir, workers=0)
    assert isinstance(pool.train_images, FolderImages)
    assert (len(pool.train_labels), len(pool.test_labels)) == (24, 12)
    assert pool.train_labels.tolist() == [0] * 8 + [1] * 8 + [2] * 8  # classes in sorted folder order
    split = make_split("imagenet", (24, 12), seed=0, val_size=6)
    assert (len(split["train"]), len(split["val"]), len(split["test"])) == (18, 6, 12)
    images, labels = split_images(pool, split, "val")
    assert len(images) == 6 and labels.tolist() == pool.train_labels[split["val"]].tolist()
    assert [Path(p.decode()).parent.name for p in images.paths] == [CLASSES[y] for y in labels.tolist()]
    with pytest.raises(ValueError, match="val size 50000 leaves no training images"):
        make_split("imagenet", (24, 12), seed=0)  # ImageNet's own 50000 held-out images need the real data


def test_missing_folder_names_dataset_and_layout(tmp_path):
    (tmp_path / "imagenet" / "train").mkdir(parents=True)
    with pytest.raises(
        DatasetMissingError,
        match=r"'imagenet' not found .*looked in .*imagenet \(no folder val/\)"
        r".*ImageFolder trees",
    ):
        load_pool("imagenet", tmp_path)
    (tmp_path / "imagenet" / "val").mkdir()
    with pytest.raises(DatasetError, match=r"imagenet/train: not an ImageFolder tree: Couldn't find any class folder"):
        load_pool("imagenet", tmp_path)
    config = {"data_dir": str(tmp_path / "empty"), "download": False, "experiments": [{"datasets": ["tinyimagenet"]}]}
    (tmp_path / "empty").mkdir()
    with pytest.raises(
        ConfigError,
        match=r"datasets.tinyimagenet: dataset 'tinyimagenet' not found .*looked in "
        r".*empty/tinyimagenet \(does not exist\)",
    ):
        check_data(config)


def test_train_batches_do_not_depend_on_workers_or_resume(data_dir):
    images, _ = small_images(data_dir)
    order = torch.randperm(len(images), generator=torch.Generator().manual_seed(3))
    batches = list(order.split(8))
    cpu = torch.device("cpu")
    single = list(train_batches(images, batches, seed=0, epoch=0, device=cpu))
    assert [tuple(b.shape) for b in single] == [(8, 3, 32, 32)] * 3 and single[0].dtype == torch.uint8
    from dataclasses import replace

    workers = list(train_batches(replace(images, workers=2), batches, seed=0, epoch=0, device=cpu))
    resumed = list(train_batches(images, batches[1:], seed=0, epoch=0, device=cpu))
    assert all(torch.equal(a, b) for a, b in zip(single, workers))
    assert all(torch.equal(a, b) for a, b in zip(single[1:], resumed))
    other_epoch = list(train_batches(images, batches, seed=0, epoch=1, device=cpu))
    assert not torch.equal(single[0], other_epoch[0])  # fresh crops every epoch
    before = torch.get_rng_state()
    list(train_batches(images, batches, seed=0, epoch=0, device=cpu))
    assert torch.equal(before, torch.get_rng_state())  # the main process's generator is untouched


def test_eval_batches_resize_and_centre_crop(data_dir):
    pool = load_pool("imagenet", data_dir, workers=0)
    images = pool.test_images[torch.arange(5)]
    got = torch.cat(list(eval_batches(images, batch_size=2, device=torch.device("cpu"))))
    assert got.shape == (5, 3, 224, 224) and got.dtype == torch.uint8
    t = import_torchvision().transforms
    image = Image.open(images.paths[1].decode()).convert("RGB")
    expected = t.PILToTensor()(t.CenterCrop(224)(t.Resize(256)(image)))  # ImageNet's eval protocol
    assert torch.equal(got[1], expected)
    augmented = next(train_batches(pool.train_images, [torch.arange(4)], 0, 0, torch.device("cpu")))
    assert augmented.shape == (4, 3, 224, 224)  # RandomResizedCrop to the network's input size


def test_training_from_folders_resumes_exactly(data_dir, tmp_path):
    from eebench.training import TrainData

    images, labels = small_images(data_dir, workers=0)
    info = dataset_info("digits")
    data = TrainData(images, labels, images[torch.arange(6)], labels[:6], info.mean, info.std, 0, True)
    full = run_training("standard", tmp_path / "full", data=data, batch_size=8, epochs=2)
    with pytest.raises(SystemExit):
        run_training("standard", tmp_path / "cut", data=data, batch_size=8, epochs=2, stop_after_batches=4)
    resumed = run_training("standard", tmp_path / "cut", data=data, batch_size=8, epochs=2)
    assert resumed.resumed_from == (1, 1)
    a, b = weights_of(full), weights_of(resumed)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert len(full.history) == 2 and "val_acc_1" in full.history[0]


def test_workflow_on_tinyimagenet_folders(data_dir, tmp_path):
    """split -> flops -> train -> infer -> evaluate -> aggregate on Tiny-ImageNet-shaped folders."""
    config = copy.deepcopy(tiny_config(epochs=1))
    config["data_dir"] = str(data_dir)
    config["data_workers"] = 2
    # the generated trees have 3 of Tiny-ImageNet's 200 classes: the override says so
    config["datasets"] = {"tinyimagenet": {"recipe": {"epochs": 1, "batch_size": 16}, "val_size": 0.25, "classes": 3}}
    config["architectures"] = {"resnet8": {"family": "ee_resnet", "params": {"depth": 8, "num_exits": 1, "width": 4}}}
    config["experiments"] = [{"datasets": ["tinyimagenet"], "architectures": ["resnet8"], "methods": ["standard"]}]
    run_workflow(tmp_path, config, "results/aggregate/anytime.csv", "results/aggregate/budgeted.csv")
    split = np.load(tmp_path / "results" / "splits" / "tinyimagenet.npz")
    assert (len(split["train"]), len(split["val"]), len(split["test"])) == (54, 18, 36)
    cache = torch.load(tmp_path / "results" / "cache" / "tinyimagenet" / "resnet8" / "standard" / "seed0" / "test.pt")
    assert cache["logits"].shape == (2, 36, 3)
    curves = pd.read_csv(tmp_path / "results" / "aggregate" / "budgeted.csv")
    assert set(curves["dataset"]) == {"tinyimagenet"} and curves["accuracy"].between(0, 100).all()

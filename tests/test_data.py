"""Datasets, splits and the on-device augmentation."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from eebench.augment import crop_flip, epoch_plan, normalize
from eebench.datasets import DatasetMissingError, DeclarationError, dataset_info, load_pool, make_split, split_images


def test_digits_are_real_and_upsampled():
    pool = load_pool("digits", "unused")
    assert pool.train_images.shape == (1797, 3, 32, 32)
    assert pool.train_images.dtype == torch.uint8
    assert sorted(pool.train_labels.unique().tolist()) == list(range(10))


def test_split_is_deterministic_disjoint_and_complete():
    a = make_split("digits", (1797, 0), seed=0)
    b = make_split("digits", (1797, 0), seed=0)
    c = make_split("digits", (1797, 0), seed=1)
    for part in ("train", "val", "test"):
        assert np.array_equal(a[part], b[part])
    assert not np.array_equal(a["val"], c["val"])
    joined = np.concatenate([a["train"], a["val"], a["test"]])
    assert len(np.unique(joined)) == 1797 == len(joined)
    assert len(a["test"]) == round(1797 * 0.25)


def test_cifar_split_holds_out_5000_of_train():
    split = make_split("cifar100", (50000, 10000), seed=0)
    assert len(split["val"]) == 5000 and len(split["train"]) == 45000
    assert np.array_equal(split["test"], np.arange(10000))


def test_split_images_takes_digits_test_from_the_pool():
    pool = load_pool("digits", "unused")
    split = make_split("digits", (1797, 0), seed=0)
    images, labels = split_images(pool, split, "test")
    assert torch.equal(labels, pool.train_labels[torch.as_tensor(split["test"])])


@pytest.mark.parametrize("name", ["cifar10", "cifar100"])
def test_missing_cifar_names_dataset_directory_and_remedy(tmp_path, name):
    where = tmp_path / "nothing-here"
    with pytest.raises(DatasetMissingError) as err:
        load_pool(name, where)
    text = str(err.value)
    assert repr(name) in text and str(where) in text and "data_dir" in text


def test_missing_cifar_in_existing_empty_directory(tmp_path):
    with pytest.raises(DatasetMissingError, match="cifar-10-python.tar.gz"):
        load_pool("cifar10", tmp_path)


def test_unknown_dataset():
    with pytest.raises(DeclarationError, match="datasets.cifar1000: 'cifar1000' is not a built-in dataset"):
        dataset_info("cifar1000")


def test_batch_augmentation_is_bit_equal_to_torchvision():
    from eebench.tv import import_torchvision

    tv = import_torchvision()
    from PIL import Image

    F = tv.transforms.functional
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (16, 3, 32, 32), dtype=torch.uint8, generator=g)
    plan = epoch_plan(16, padding=4, seed=3, epoch=2)
    info = dataset_info("cifar10")
    mean, std = torch.tensor(info.mean), torch.tensor(info.std)
    ours = normalize(crop_flip(images, plan.offsets, plan.flips, 4), mean, std)
    for i in range(16):
        pil = Image.fromarray(images[i].permute(1, 2, 0).numpy())
        top, left = plan.offsets[i].tolist()
        img = F.crop(F.pad(pil, 4, fill=0), top, left, 32, 32)
        if plan.flips[i]:
            img = F.hflip(img)
        expected = F.normalize(F.to_tensor(img), info.mean, info.std)
        assert torch.equal(ours[i], expected), i


def test_epoch_plan_depends_on_seed_and_epoch_only():
    a, b = epoch_plan(100, 4, 0, 5), epoch_plan(100, 4, 0, 5)
    assert torch.equal(a.order, b.order) and torch.equal(a.offsets, b.offsets)
    assert not torch.equal(a.order, epoch_plan(100, 4, 0, 6).order)


def test_digits_read_without_sklearn_equal_load_digits():
    from sklearn.datasets import load_digits

    from eebench.datasets import digits_arrays

    bunch = load_digits()
    pixels, labels = digits_arrays()
    assert np.array_equal(pixels, bunch.images) and np.array_equal(labels, bunch.target)

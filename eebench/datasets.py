"""Datasets: what each one is (input shape, classes), how it is loaded, and its fixed splits.

Splits are index arrays into the dataset's training pool (train/val) and its test set; they are
derived from the seed alone, so the same config gives the same split everywhere. Images are held as
uint8 tensors (N, C, H, W); normalisation and augmentation happen per batch (``eebench.augment``).

- ``digits``: scikit-learn's 1797 real handwritten digits (8x8, 17 grey levels), upsampled to
  3x32x32. Train/val/test by proportion.
- ``cifar10``/``cifar100``: through torchvision from ``data_dir``; val = 5000 held out of train.
- ``imagenet``: ImageFolder trees ``data_dir/imagenet/{train,val}``; val = 50000 held out of
  train, the official val set is the test set (MSDNet's ``--use-valid`` protocol). Read from disk by
  DataLoader workers (``eebench.imagefolder``), never held in memory.
- ``mnist``, ``svhn``, ``tinyimagenet``: used by the EENets ResNets (mnist and svhn load through
  torchvision, tinyimagenet from ImageFolder trees ``data_dir/tinyimagenet/{train,val}``).
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from models import InputSpec

from .imagefolder import FolderImages, scan_folder


class DatasetMissingError(RuntimeError):
    """A dataset's files are not where the config says they are."""


@dataclass(frozen=True)
class DatasetInfo:
    name: str
    input: InputSpec
    mean: tuple[float, ...]
    std: tuple[float, ...]
    val_size: int | float  # absolute count, or a fraction of the training pool
    test_fraction: float | None = None  # for datasets without a test set of their own
    crop_padding: int = 4
    hflip: bool = True
    augment: str = "crop"  # crop (pad + random crop) | resized_crop (ImageNet's RandomResizedCrop)


DATASETS: dict[str, DatasetInfo] = {
    "digits": DatasetInfo(
        "digits", InputSpec(3, 32, 10), (0.5, 0.5, 0.5), (0.5, 0.5, 0.5),
        val_size=0.2, test_fraction=0.25, hflip=False,
    ),
    "cifar10": DatasetInfo(
        "cifar10", InputSpec(3, 32, 10),
        (0.4914, 0.4824, 0.4467), (0.2471, 0.2435, 0.2616), val_size=5000,
    ),
    "cifar100": DatasetInfo(
        "cifar100", InputSpec(3, 32, 100),
        (0.5071, 0.4867, 0.4408), (0.2675, 0.2565, 0.2761), val_size=5000,
    ),
    "imagenet": DatasetInfo(
        "imagenet", InputSpec(3, 224, 1000),
        (0.485, 0.456, 0.406), (0.229, 0.224, 0.225), val_size=50000, augment="resized_crop",
    ),
    "mnist": DatasetInfo(
        "mnist", InputSpec(1, 28, 10), (0.1307,), (0.3081,), val_size=5000, hflip=False,
        crop_padding=0,
    ),
    "svhn": DatasetInfo(
        "svhn", InputSpec(3, 32, 10),
        (0.4377, 0.4438, 0.4728), (0.198, 0.201, 0.197), val_size=5000, hflip=False,
    ),
    "tinyimagenet": DatasetInfo(
        "tinyimagenet", InputSpec(3, 64, 200),
        (0.4802, 0.4481, 0.3975), (0.2302, 0.2265, 0.2262), val_size=10000, crop_padding=8,
    ),
}


def dataset_info(name: str) -> DatasetInfo:
    if name not in DATASETS:
        raise KeyError(f"unknown dataset {name!r}; available: {', '.join(DATASETS)}")
    return DATASETS[name]


@dataclass
class ImagePool:
    """A dataset's training pool and test set: uint8 images in memory (N, C, H, W), or the image
    files of an ImageFolder tree (``FolderImages``), indexed the same way."""

    train_images: torch.Tensor | FolderImages
    train_labels: torch.Tensor  # (N,) int64
    test_images: torch.Tensor | FolderImages
    test_labels: torch.Tensor


_HOW_TO_PROVIDE = {
    "cifar10": "put the torchvision archive 'cifar-10-python.tar.gz' (or its extracted folder "
    "'cifar-10-batches-py') in that directory, or allow downloads (download: true) where the "
    "network permits",
    "cifar100": "put 'cifar-100-python.tar.gz' (or the extracted 'cifar-100-python' folder) in that "
    "directory, or allow downloads (download: true) where the network permits",
    "mnist": "put torchvision's 'MNIST/raw' files in that directory, or allow downloads",
    "svhn": "put 'train_32x32.mat' and 'test_32x32.mat' in that directory, or allow downloads",
    "imagenet": "arrange ILSVRC-2012 as ImageFolder trees '<data_dir>/imagenet/train/<wnid>/*.JPEG' and "
    "'<data_dir>/imagenet/val/<wnid>/*.JPEG' (the official val set sorted into class folders)",
    "tinyimagenet": "arrange Tiny-ImageNet as ImageFolder trees '<data_dir>/tinyimagenet/train/<wnid>/*.JPEG' "
    "and '<data_dir>/tinyimagenet/val/<wnid>/*.JPEG' (val images sorted into class folders with "
    "val_annotations.txt)",
}


def _missing(name: str, where: Path, detail: str = "") -> DatasetMissingError:
    extra = f" ({detail})" if detail else ""
    return DatasetMissingError(
        f"dataset {name!r} not found in {where}{extra}: {_HOW_TO_PROVIDE[name]}. "
        f"Set data_dir in the config to the directory that holds it."
    )


def digits_arrays() -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's digits, (1797, 8, 8) values 0..16 and labels, read from the file that
    ``sklearn.datasets.load_digits`` reads, without importing scikit-learn (a second per job)."""
    spec = importlib.util.find_spec("sklearn")
    path = Path(spec.submodule_search_locations[0]) / "datasets" / "data" / "digits.csv.gz" if spec else None
    if path is None or not path.is_file():  # another scikit-learn layout: let it load its own data
        from sklearn.datasets import load_digits

        bunch = load_digits()
        return bunch.images, bunch.target
    table = np.loadtxt(path, delimiter=",")
    return table[:, :-1].reshape(-1, 8, 8), table[:, -1].astype(np.int64)


def _digits() -> ImagePool:
    pixels, target = digits_arrays()
    images = torch.from_numpy(pixels).float()[:, None]  # (N, 1, 8, 8), values 0..16
    images = F.interpolate(images, size=32, mode="bilinear", align_corners=False)
    images = (images * (255.0 / 16.0)).round().clamp(0, 255).to(torch.uint8).expand(-1, 3, -1, -1)
    labels = torch.from_numpy(target).long()
    # digits has no test set of its own: the split carves one out of the pool
    return ImagePool(images.contiguous(), labels, images[:0].contiguous(), labels[:0])


def _torchvision_pool(name: str, root: Path, download: bool) -> ImagePool:
    from .tv import import_torchvision

    tv = import_torchvision()
    cls = {"cifar10": tv.datasets.CIFAR10, "cifar100": tv.datasets.CIFAR100}[name]
    try:
        train = cls(str(root), train=True, download=download)
        test = cls(str(root), train=False, download=download)
    except (RuntimeError, OSError) as err:
        raise _missing(name, root, str(err).splitlines()[0]) from None

    def to_tensor(ds) -> tuple[torch.Tensor, torch.Tensor]:
        images = torch.from_numpy(np.asarray(ds.data)).permute(0, 3, 1, 2).contiguous()
        return images, torch.as_tensor(ds.targets, dtype=torch.long)

    return ImagePool(*to_tensor(train), *to_tensor(test))


def _mnist_svhn_pool(name: str, root: Path, download: bool) -> ImagePool:
    from .tv import import_torchvision

    tv = import_torchvision()
    try:
        if name == "mnist":
            train = tv.datasets.MNIST(str(root), train=True, download=download)
            test = tv.datasets.MNIST(str(root), train=False, download=download)
            return ImagePool(train.data[:, None].clone(), train.targets.long(),
                             test.data[:, None].clone(), test.targets.long())
        train = tv.datasets.SVHN(str(root), split="train", download=download)
        test = tv.datasets.SVHN(str(root), split="test", download=download)
    except (RuntimeError, OSError) as err:
        raise _missing(name, root, str(err).splitlines()[0]) from None
    return ImagePool(torch.from_numpy(train.data), torch.from_numpy(train.labels).long(),
                     torch.from_numpy(test.data), torch.from_numpy(test.labels).long())


def _folder_pool(name: str, root: Path, workers: int) -> ImagePool:
    info = dataset_info(name)
    for part in ("train", "val"):  # both, before a long scan of the first
        if not (root / name / part).is_dir():
            raise _missing(name, root, f"no folder {root / name / part}")
    parts = {}
    for part in ("train", "val"):
        try:
            paths, labels = scan_folder(root / name / part)
        except (FileNotFoundError, OSError) as err:  # e.g. a class folder without images
            raise _missing(name, root, str(err).splitlines()[0]) from None
        images = FolderImages(paths, info.input.size, info.augment, info.crop_padding, info.hflip, workers)
        parts[part] = (images, labels)
    return ImagePool(*parts["train"], *parts["val"])


def load_pool(name: str, data_dir: str | Path, download: bool = False, workers: int = 4) -> ImagePool:
    """A dataset's training pool and test set: in memory, or (ImageNet, Tiny-ImageNet) as image
    files that ``workers`` DataLoader processes decode."""
    dataset_info(name)
    root = Path(data_dir)
    if name == "digits":
        return _digits()
    if name in ("cifar10", "cifar100"):
        if not download and not root.is_dir():
            raise _missing(name, root, "directory does not exist")
        return _torchvision_pool(name, root, download)
    if name in ("mnist", "svhn"):
        if not download and not root.is_dir():
            raise _missing(name, root, "directory does not exist")
        return _mnist_svhn_pool(name, root, download)
    return _folder_pool(name, root, workers)


def make_split(name: str, pool_sizes: tuple[int, int], seed: int,
               val_size: int | float | None = None) -> dict[str, np.ndarray]:
    """Index arrays for train / val / test, a function of the dataset and seed only.

    ``pool_sizes`` = (size of the training pool, size of the official test set). Datasets without
    a test set (digits) carve one out of the pool first. ``val_size`` (a count or a fraction of the
    pool) replaces the dataset's usual held-out size.
    """
    info = dataset_info(name)
    if val_size is not None:
        info = replace(info, val_size=val_size)
    n_pool, n_test = pool_sizes
    rng = np.random.default_rng(seed)
    order = rng.permutation(n_pool)
    if info.test_fraction is not None:
        n_carved = int(round(n_pool * info.test_fraction))
        test, order = np.sort(order[:n_carved]), order[n_carved:]
    else:
        test = np.arange(n_test)
    n_val = info.val_size if isinstance(info.val_size, int) else int(round(len(order) * info.val_size))
    if n_val >= len(order):
        raise ValueError(f"dataset {name!r}: val size {n_val} leaves no training images")
    return {"train": np.sort(order[n_val:]), "val": np.sort(order[:n_val]), "test": test}


def split_images(pool: ImagePool, split: dict[str, np.ndarray], part: str) -> tuple[torch.Tensor, torch.Tensor]:
    """The uint8 images and labels of one part (train, val, test) of a split."""
    index = torch.as_tensor(split[part], dtype=torch.long)
    from_pool = part != "test" or len(pool.test_labels) == 0
    if part == "val" and "val_from_test" in split:  # eebench.heldout: val held out of the test set
        from_pool = False
    images, labels = (pool.train_images, pool.train_labels) if from_pool else (pool.test_images, pool.test_labels)
    return images[index], labels[index]

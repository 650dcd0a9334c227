"""Writers of tiny datasets in each supported on-disk format, for the declaration tests."""

from __future__ import annotations

import gzip
import pickle
from pathlib import Path

import numpy as np
from PIL import Image


def class_images(
    n_per_class: int, classes: int, size: int, channels: int, seed: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """uint8 (N, H, W, C) images whose mean brightness depends on the class, and their labels."""
    rng = np.random.default_rng(seed)
    labels = np.repeat(np.arange(classes), n_per_class)
    rng.shuffle(labels)
    images = rng.integers(0, 96, (len(labels), size, size, channels), dtype=np.uint8)
    images += (labels * (150 // max(classes - 1, 1))).astype(np.uint8)[:, None, None, None]
    return images, labels


def idx_bytes(array: np.ndarray) -> bytes:
    """The idx encoding of a uint8 array (magic 0x08 = unsigned byte, then the dimensions, big-endian)."""
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in array.shape)
    return header + np.ascontiguousarray(array, dtype=np.uint8).tobytes()


def write_idx(
    folder: Path, train: tuple[np.ndarray, np.ndarray], test: tuple[np.ndarray, np.ndarray], compressed: bool
) -> None:
    """torchvision's MNIST raw file names; images (N, H, W)."""
    folder.mkdir(parents=True, exist_ok=True)
    parts = {
        "train-images-idx3-ubyte": train[0],
        "train-labels-idx1-ubyte": train[1],
        "t10k-images-idx3-ubyte": test[0],
        "t10k-labels-idx1-ubyte": test[1],
    }
    for name, array in parts.items():
        data = idx_bytes(array.astype(np.uint8))
        if compressed:
            (folder / f"{name}.gz").write_bytes(gzip.compress(data))
        else:
            (folder / name).write_bytes(data)


def write_cifar(folder: Path, train: tuple[np.ndarray, np.ndarray], test: tuple[np.ndarray, np.ndarray]) -> None:
    """Two training batches and a test batch of CIFAR's pickled dicts (data: N x 3072, channel-major)."""
    folder.mkdir(parents=True, exist_ok=True)
    halves = np.array_split(np.arange(len(train[1])), 2)
    for i, index in enumerate(halves, start=1):
        data = train[0][index].transpose(0, 3, 1, 2).reshape(len(index), -1)
        with open(folder / f"data_batch_{i}", "wb") as f:
            pickle.dump({"data": data, "labels": train[1][index].tolist()}, f)
    with open(folder / "test_batch", "wb") as f:
        pickle.dump({"data": test[0].transpose(0, 3, 1, 2).reshape(len(test[1]), -1), "labels": test[1].tolist()}, f)


def write_folder(root: Path, images: np.ndarray, labels: np.ndarray) -> None:
    """``root/<class>/<i>.png``; grey images for one channel."""
    for i, (image, label) in enumerate(zip(images, labels)):
        folder = root / f"class{label}"
        folder.mkdir(parents=True, exist_ok=True)
        pixels = image[..., 0] if image.shape[-1] == 1 else image
        Image.fromarray(pixels).save(folder / f"{i}.png")


def write_svhn(folder: Path, train: tuple[np.ndarray, np.ndarray], test: tuple[np.ndarray, np.ndarray]) -> None:
    """SVHN's MATLAB layout: X (H, W, C, N), y (N, 1) with 10 for the digit 0."""
    import scipy.io

    folder.mkdir(parents=True, exist_ok=True)
    for name, (images, labels) in (("train_32x32.mat", train), ("test_32x32.mat", test)):
        y = np.where(labels == 0, 10, labels).astype(np.uint8)[:, None]
        scipy.io.savemat(str(folder / name), {"X": images.transpose(1, 2, 3, 0), "y": y})

"""On-disk dataset formats: one reader per layout, registered by name.

A dataset declaration (``eebench.datasets``) names its ``format``; the reader of that format says
which files it needs (``roles``: a role such as ``train_images`` and its default file name, which
a declaration's ``files:`` may rename), finds them in a directory, and reads them into an
``ImagePool``. A new format is one ``DatasetFormat`` subclass decorated with ``@register_format``.

Readers hand over uint8 images as (N, C, H, W) tensors, or, for formats too large to hold in
memory (ImageFolder trees), the image files as ``FolderImages`` that DataLoader workers decode.
"""

from __future__ import annotations

import gzip
import importlib.util
import inspect
import pickle
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np
import torch
import torch.nn.functional as F

from .imagefolder import FolderImages, scan_folder
from .tv import import_torchvision

if TYPE_CHECKING:
    from .datasets import DatasetSpec


class DatasetError(RuntimeError):
    """A dataset's files are absent or unreadable."""


class DatasetMissingError(DatasetError):
    """A dataset's files are not where its declaration says they are."""


class DatasetFileError(DatasetError):
    """A dataset's file is there but is not what its format says it is."""


@dataclass
class ImagePool:
    """A dataset's training pool and test set: uint8 images in memory (N, C, H, W), or the image
    files of an ImageFolder tree (``FolderImages``), indexed the same way. A dataset without a
    test set of its own has an empty test part (its split carves one out of the pool)."""

    train_images: torch.Tensor | FolderImages
    train_labels: torch.Tensor  # (N,) int64
    test_images: torch.Tensor | FolderImages
    test_labels: torch.Tensor


@dataclass(frozen=True)
class Probe:
    """What the files hold, read cheaply, to check a declaration against: the stored image shape
    (C, H, W; None where images vary, as in an ImageFolder tree), the class labels found in the
    training part (sorted), and where they were read from."""

    image_shape: tuple[int, int, int] | None
    classes_found: list[int]
    source: str


class DatasetFormat:
    """How one on-disk layout is read. Subclasses set ``name`` and ``roles`` and implement ``read``.

    ``roles``: file role -> default name (a list: several files read in order), relative to the
    directory the dataset is found in. Roles named ``test...`` are optional when the declaration
    carves its test set out of the pool (``test_fraction``).
    ``in_memory``: ``read`` returns uint8 tensors (else ``FolderImages``, decoded per batch; only
    those can be augmented with a random resized crop).
    ``channels`` / ``image_size``: what the format always produces, where it is fixed.
    """

    name: ClassVar[str]
    roles: ClassVar[dict[str, str | list[str]]] = {}
    in_memory: ClassVar[bool] = True
    channels: ClassVar[int | None] = None
    image_size: ClassVar[int | None] = None
    layout: ClassVar[str] = ""  # one line for error messages: what the directory must hold

    def accepted_names(self, name: str) -> list[str]:
        """The names under which a file of the declaration is looked for (e.g. also compressed)."""
        return [name]

    def find(self, root: Path, name: str) -> Path | None:
        for candidate in self.accepted_names(name):
            if (root / candidate).exists():
                return root / candidate
        return None

    def needed(self, spec: DatasetSpec) -> dict[str, list[str]]:
        """Role -> file names that must be present (the test roles only without test_fraction)."""
        out = {}
        for role, names in spec.files.items():
            if role.startswith("test") and spec.test_fraction is not None:
                continue
            out[role] = [names] if isinstance(names, str) else list(names)
        return out

    def missing(self, spec: DatasetSpec, root: Path) -> list[str]:
        """The needed files absent from ``root``, each as looked for (``a or a.gz``)."""
        if not root.is_dir():
            return ["the directory"]
        absent = []
        for names in self.needed(spec).values():
            for name in names:
                if self.find(root, name) is None:
                    absent.append(" or ".join(self.accepted_names(name)))
        return absent

    def path(self, spec: DatasetSpec, root: Path, role: str) -> list[Path]:
        names = spec.files[role]
        found = [self.find(root, n) for n in ([names] if isinstance(names, str) else names)]
        return [p for p in found if p is not None]

    def has_test(self, spec: DatasetSpec, root: Path) -> bool:
        return any(role.startswith("test") for role in spec.files) and all(
            self.path(spec, root, role) for role in spec.files if role.startswith("test")
        )

    def read(self, spec: DatasetSpec, root: Path, workers: int) -> ImagePool:
        raise NotImplementedError

    def probe(self, spec: DatasetSpec, root: Path) -> Probe:
        """By default: read everything (formats that are cheap to read)."""
        pool = self.read(spec, root, workers=0)
        return Probe(tuple(pool.train_images.shape[1:]), sorted(pool.train_labels.unique().tolist()), str(root))


FORMATS: dict[str, DatasetFormat] = {}


def register_format(cls: type[DatasetFormat]) -> type[DatasetFormat]:
    if cls.name in FORMATS:
        raise ValueError(f"dataset format {cls.name!r} is registered twice")
    FORMATS[cls.name] = cls()
    return cls


def _empty_test(images: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return images[:0].clone(), labels[:0].clone()


def _hwc_to_chw(images: np.ndarray, source: Path, key: str) -> torch.Tensor:
    """uint8 (N, H, W) or (N, H, W, C), as numpy and PIL hold images, to (N, C, H, W)."""
    if images.dtype != np.uint8 or images.ndim not in (3, 4):
        raise DatasetFileError(
            f"{source}: {key!r} must be uint8 images of shape (N, H, W) or (N, H, W, C), "
            f"got {images.dtype} of shape {images.shape}"
        )
    tensor = torch.from_numpy(np.ascontiguousarray(images))
    return tensor[:, None] if tensor.dim() == 3 else tensor.permute(0, 3, 1, 2).contiguous()


def _labels(values: np.ndarray, source: Path, key: str, count: int) -> torch.Tensor:
    values = np.asarray(values).reshape(-1)
    if not np.issubdtype(values.dtype, np.integer) or len(values) != count:
        raise DatasetFileError(
            f"{source}: {key!r} must hold {count} integer labels (one per image), got "
            f"{values.dtype} of shape {values.shape}"
        )
    return torch.from_numpy(values.astype(np.int64))


# --------------------------------------------------------------------------------------------
# The formats
# --------------------------------------------------------------------------------------------


@register_format
class IdxFiles(DatasetFormat):
    """The idx files of MNIST and Fashion-MNIST (torchvision's ``<Name>/raw`` layout), plain or
    ``.gz``; read by torchvision's reader (which opens only uncompressed files: a ``.gz`` is
    decompressed to a temporary file first)."""

    name = "idx"
    roles = {
        "train_images": "train-images-idx3-ubyte",
        "train_labels": "train-labels-idx1-ubyte",
        "test_images": "t10k-images-idx3-ubyte",
        "test_labels": "t10k-labels-idx1-ubyte",
    }
    channels = 1
    layout = "idx files (uint8 images N x H x W, labels N), plain or .gz"

    def accepted_names(self, name: str) -> list[str]:
        return [name] if name.endswith(".gz") else [name, name + ".gz"]

    @staticmethod
    def _read(path: Path, labels: bool) -> torch.Tensor:
        mnist = import_torchvision().datasets.mnist
        reader = mnist.read_label_file if labels else mnist.read_image_file
        try:
            if path.suffix != ".gz":
                return reader(str(path))
            with tempfile.TemporaryDirectory() as tmp:
                raw = Path(tmp) / path.stem
                with gzip.open(path, "rb") as src, open(raw, "wb") as dst:
                    shutil.copyfileobj(src, dst)
                return reader(str(raw))
        except (AssertionError, TypeError, ValueError, OSError, EOFError, KeyError, RuntimeError) as err:
            what = "labels (idx1, uint8)" if labels else "images (idx3, uint8)"
            raise DatasetFileError(f"{path}: not an idx file of {what}: {err or type(err).__name__}") from None

    def _part(self, spec: DatasetSpec, root: Path, part: str) -> tuple[torch.Tensor, torch.Tensor]:
        images_path = self.path(spec, root, f"{part}_images")[0]
        labels_path = self.path(spec, root, f"{part}_labels")[0]
        images, labels = self._read(images_path, False), self._read(labels_path, True)
        if len(images) != len(labels):
            raise DatasetFileError(f"{labels_path}: {len(labels)} labels for the {len(images)} images of {images_path}")
        return images[:, None].contiguous(), labels

    def read(self, spec: DatasetSpec, root: Path, workers: int) -> ImagePool:
        train = self._part(spec, root, "train")
        test = self._part(spec, root, "test") if self.has_test(spec, root) else _empty_test(*train)
        return ImagePool(*train, *test)

    def probe(self, spec: DatasetSpec, root: Path) -> Probe:
        images = self.path(spec, root, "train_images")[0]
        labels = self._read(self.path(spec, root, "train_labels")[0], True)
        try:
            with (gzip.open if images.suffix == ".gz" else open)(images, "rb") as f:
                header = f.read(16)  # magic, N, H, W: enough for the shape
        except (OSError, EOFError) as err:
            raise DatasetFileError(f"{images}: not an idx file of images (idx3, uint8): {err}") from None
        if len(header) < 16 or header[2] != 0x08 or header[3] != 3:
            raise DatasetFileError(f"{images}: not an idx file of uint8 images (N x H x W)")
        h, w = (int.from_bytes(header[i : i + 4], "big") for i in (8, 12))
        return Probe((1, h, w), sorted(labels.unique().tolist()), str(root))


@register_format
class CifarBatches(DatasetFormat):
    """CIFAR's pickled batches (``cifar-10-batches-py``, ``cifar-100-python``): dicts with ``data``
    (N x 3072 uint8, channel-major 3x32x32) and ``labels`` (or ``fine_labels``), read as
    torchvision's ``CIFAR10`` reads them."""

    name = "cifar_batches"
    roles = {
        "train": ["data_batch_1", "data_batch_2", "data_batch_3", "data_batch_4", "data_batch_5"],
        "test": ["test_batch"],
    }
    channels, image_size = 3, 32
    layout = "pickled batches (dicts with 'data' N x 3072 uint8 and 'labels' or 'fine_labels')"

    @staticmethod
    def _batches(paths: list[Path]) -> tuple[torch.Tensor, torch.Tensor]:
        images, labels = [], []
        for path in paths:
            try:
                with open(path, "rb") as f:
                    entry = pickle.load(f, encoding="latin1")
                data = np.asarray(entry["data"], dtype=np.uint8).reshape(-1, 3, 32, 32)
                targets = entry["labels"] if "labels" in entry else entry["fine_labels"]
            except (pickle.UnpicklingError, EOFError, KeyError, ValueError, TypeError, AttributeError) as err:
                raise DatasetFileError(
                    f"{path}: not a CIFAR batch (a pickled dict with 'data' N x 3072 uint8 and "
                    f"'labels' or 'fine_labels'): {err!r}"
                ) from None
            images.append(torch.from_numpy(data))
            labels.append(_labels(np.asarray(targets), path, "labels", len(data)))
        return torch.cat(images), torch.cat(labels)

    def read(self, spec: DatasetSpec, root: Path, workers: int) -> ImagePool:
        train = self._batches(self.path(spec, root, "train"))
        test = self._batches(self.path(spec, root, "test")) if self.has_test(spec, root) else _empty_test(*train)
        return ImagePool(*train, *test)


@register_format
class NpzArrays(DatasetFormat):
    """One ``.npz`` of uint8 images and integer labels: ``train_images`` (N, H, W) or (N, H, W, C),
    ``train_labels`` (N,), and optionally ``test_images`` / ``test_labels``."""

    name = "npz"
    roles = {"data": "data.npz"}
    layout = "a .npz with train_images, train_labels (and test_images, test_labels)"

    def read(self, spec: DatasetSpec, root: Path, workers: int) -> ImagePool:
        path = self.path(spec, root, "data")[0]
        try:
            with np.load(path, allow_pickle=False) as data:
                arrays = {key: data[key] for key in data.files}
        except (ValueError, OSError, EOFError) as err:
            raise DatasetFileError(f"{path}: not a readable .npz ({err})") from None
        parts = {}
        for part in ("train", "test"):
            if f"{part}_images" not in arrays:
                if part == "test" and spec.test_fraction is not None:
                    continue
                raise DatasetFileError(
                    f"{path}: no array {part}_images (arrays: {', '.join(sorted(arrays))}); "
                    + (
                        "declare test_fraction to carve a test set out of train"
                        if part == "test"
                        else "expected train_images and train_labels"
                    )
                )
            images = _hwc_to_chw(arrays[f"{part}_images"], path, f"{part}_images")
            if f"{part}_labels" not in arrays:
                raise DatasetFileError(f"{path}: no array {part}_labels beside {part}_images")
            parts[part] = (images, _labels(arrays[f"{part}_labels"], path, f"{part}_labels", len(images)))
        test = parts.get("test") or _empty_test(*parts["train"])
        return ImagePool(*parts["train"], *test)


@register_format
class SvhnMat(DatasetFormat):
    """SVHN's MATLAB files (``train_32x32.mat``, ``test_32x32.mat``: ``X`` 32x32x3xN, ``y`` with 10
    for the digit 0), read with scipy as torchvision's ``SVHN`` reads them."""

    name = "svhn_mat"
    roles = {"train": "train_32x32.mat", "test": "test_32x32.mat"}
    channels, image_size = 3, 32
    layout = "MATLAB files with X (32 x 32 x 3 x N uint8) and y (N labels, 10 for 0)"

    @staticmethod
    def _mat(path: Path) -> tuple[torch.Tensor, torch.Tensor]:
        import scipy.io

        try:
            mat = scipy.io.loadmat(str(path))
            images = np.transpose(mat["X"], (3, 2, 0, 1))
            labels = mat["y"].astype(np.int64).reshape(-1) % 10
        except (ValueError, KeyError, OSError, TypeError) as err:
            raise DatasetFileError(f"{path}: not an SVHN .mat file (X: 32x32x3xN, y: N): {err!r}") from None
        return torch.from_numpy(np.ascontiguousarray(images)), torch.from_numpy(labels)

    def read(self, spec: DatasetSpec, root: Path, workers: int) -> ImagePool:
        train = self._mat(self.path(spec, root, "train")[0])
        test = self._mat(self.path(spec, root, "test")[0]) if self.has_test(spec, root) else _empty_test(*train)
        return ImagePool(*train, *test)


@register_format
class SklearnDigits(DatasetFormat):
    """scikit-learn's 1797 handwritten digits (8x8, 17 grey levels), upsampled bilinearly to
    3x32x32; read from the file that ``sklearn.datasets.load_digits`` reads. No test set of its
    own: the declaration's ``test_fraction`` carves one out."""

    name = "sklearn_digits"
    roles = {}
    channels, image_size = 3, 32
    layout = "scikit-learn's bundled digits.csv.gz"

    def missing(self, spec: DatasetSpec, root: Path) -> list[str]:
        return []

    def read(self, spec: DatasetSpec, root: Path, workers: int) -> ImagePool:
        pixels, target = digits_arrays()
        images = torch.from_numpy(pixels).float()[:, None]  # (N, 1, 8, 8), values 0..16
        images = F.interpolate(images, size=32, mode="bilinear", align_corners=False)
        images = (images * (255.0 / 16.0)).round().clamp(0, 255).to(torch.uint8).expand(-1, 3, -1, -1)
        labels = torch.from_numpy(target).long()
        return ImagePool(images.contiguous(), labels, *_empty_test(images, labels))


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


@register_format
class ImageFolderTree(DatasetFormat):
    """ImageFolder trees ``<root>/<train>/<class>/<image>`` and ``<root>/<test>/<class>/<image>``
    (classes in sorted folder order), never held in memory: DataLoader workers decode the images
    (``eebench.imagefolder``), resized/cropped to the declared size."""

    name = "imagefolder"
    roles = {"train": "train", "test": "val"}
    in_memory = False
    layout = "ImageFolder trees <folder>/<class>/<image> for train and test"

    def missing(self, spec: DatasetSpec, root: Path) -> list[str]:
        if not root.is_dir():
            return ["the directory"]
        return [f"folder {names[0]}/" for names in self.needed(spec).values() if not (root / names[0]).is_dir()]

    def has_test(self, spec: DatasetSpec, root: Path) -> bool:
        return (root / spec.files["test"]).is_dir()

    def _scan(self, folder: Path) -> tuple[np.ndarray, torch.Tensor]:
        try:
            return scan_folder(folder)
        except (FileNotFoundError, OSError) as err:  # e.g. a class folder without images
            raise DatasetFileError(f"{folder}: not an ImageFolder tree: {str(err).splitlines()[0]}") from None

    def read(self, spec: DatasetSpec, root: Path, workers: int) -> ImagePool:
        mode = "L" if spec.input.channels == 1 else "RGB"

        def images(paths: np.ndarray) -> FolderImages:
            return FolderImages(paths, spec.input.size, spec.augment, spec.crop_padding, spec.hflip, workers, mode)

        train_paths, train_labels = self._scan(root / spec.files["train"])
        if not self.has_test(spec, root):
            return ImagePool(images(train_paths), train_labels, images(train_paths[:0]), train_labels[:0])
        test_paths, test_labels = self._scan(root / spec.files["test"])
        return ImagePool(images(train_paths), train_labels, images(test_paths), test_labels)

    def probe(self, spec: DatasetSpec, root: Path) -> Probe:
        folder = root / spec.files["train"]
        classes = sorted(p.name for p in folder.iterdir() if p.is_dir())
        return Probe(None, list(range(len(classes))), f"{folder} ({len(classes)} class folders)")


def read_any(fmt: DatasetFormat, spec: DatasetSpec, root: Path, workers: int) -> ImagePool:
    """``fmt.read`` with the labels checked against the declared classes; with ``test_fraction``
    the files' own test set (if any) is left out, as the split carves the test set from the pool."""
    pool = fmt.read(spec, root, workers)
    if spec.test_fraction is not None and len(pool.test_labels):
        pool = ImagePool(pool.train_images, pool.train_labels, pool.train_images[:0], pool.train_labels[:0])
    for part, labels in (("train", pool.train_labels), ("test", pool.test_labels)):
        if len(labels) and (int(labels.min()) < 0 or int(labels.max()) >= spec.input.num_classes):
            raise DatasetFileError(
                f"{spec.key}.classes: {spec.input.num_classes} declared, but the {part} labels "
                f"in {root} run from {int(labels.min())} to {int(labels.max())}"
            )
    return pool


def torchvision_download(class_name: str, root: Path) -> None:
    """Let torchvision's dataset class ``class_name`` fetch its files into ``root``."""
    cls = getattr(import_torchvision().datasets, class_name)
    root.mkdir(parents=True, exist_ok=True)
    split_kw = "split" in inspect.signature(cls.__init__).parameters
    for train in (True, False):
        kwargs: dict[str, Any] = {"split": "train" if train else "test"} if split_kw else {"train": train}
        cls(str(root), download=True, **kwargs)

"""Datasets: what each one is (a declaration), where its files are, and its fixed splits.

A dataset is a declaration: its on-disk ``format`` (a reader in ``eebench.formats``), the
directories its files are looked for in, the image size, channels and classes the networks are
built for, how many training images are held out for validation (or, for a dataset without a
test set, what share of the pool is the test set), the training augmentation and the
normalisation. The built-in ones (``config/builtin_datasets.yaml``) and a config's own
(``datasets.<name>``) are the same kind of entry; a config entry named after a built-in extends
or overrides it, an entry with its own ``format`` stands alone. ``dataset_info(name, config)``
resolves one.

Splits are index arrays into the dataset's training pool (train/val) and its test set; they are
derived from the seed alone, so the same config gives the same split everywhere. Images are held as
uint8 tensors (N, C, H, W); normalisation and augmentation happen per batch (``eebench.augment``).
A declaration without mean/std gets them from its training split (``channel_stats``).
"""

from __future__ import annotations

import copy
import functools
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml

from models import InputSpec

from .formats import (
    FORMATS,
    DatasetError,
    DatasetFileError,
    DatasetFormat,
    DatasetMissingError,
    ImagePool,
    Probe,
    digits_arrays,
    read_any,
    torchvision_download,
)
from .imagefolder import FolderImages, eval_batches
from .tv import import_torchvision

__all__ = [
    "BUILTIN_PATH",
    "DatasetError",
    "DatasetFileError",
    "DatasetMissingError",
    "DatasetSpec",
    "DeclarationError",
    "ImagePool",
    "builtin_datasets",
    "validate_builtin_datasets",
    "channel_stats",
    "check_files",
    "dataset_info",
    "declaration",
    "digits_arrays",
    "load_pool",
    "locate",
    "make_split",
    "split_images",
]

BUILTIN_PATH = Path(__file__).resolve().parents[1] / "config" / "builtin_datasets.yaml"
# keys of a config's datasets.<name> entry that say how it is trained, not what it is
TRAINING_KEYS = ("recipe", "resources")
MERGED_KEYS = ("augment", "files")  # nested mappings an override extends key by key


class DeclarationError(ValueError):
    """A dataset declaration names an unknown format or contradicts itself (its message starts
    with the key, ``datasets.<name>.<key>``)."""


@dataclass(frozen=True)
class DatasetSpec:
    """A resolved dataset declaration."""

    name: str
    format: str
    input: InputSpec
    mean: tuple[float, ...] | None  # None: computed from the training split
    std: tuple[float, ...] | None
    val_size: int | float  # absolute count, or a fraction of the training pool
    test_fraction: float | None = None  # for datasets without a test set of their own
    crop_padding: int = 0
    hflip: bool = False
    augment: str = "crop"  # crop (pad + random crop) | resized_crop (ImageNet's RandomResizedCrop)
    paths: tuple[str, ...] = ()
    files: dict[str, Any] = field(default_factory=dict)
    archive: str | None = None
    torchvision_download: str | None = None
    hint: str = ""

    @property
    def key(self) -> str:
        return f"datasets.{self.name}"

    @property
    def reader(self) -> DatasetFormat:
        return FORMATS[self.format]


@functools.lru_cache(maxsize=1)
def _builtin_file() -> dict[str, dict[str, Any]]:
    with open(BUILTIN_PATH) as f:
        return yaml.safe_load(f)


def validate_builtin_datasets(schema: dict[str, Any]) -> None:
    """Check every built-in declaration against the config schema's ``dataset`` definition (the
    workflow does this at start with the config; the jobs and the GPU check run without jsonschema)."""
    import jsonschema

    validator = jsonschema.Draft202012Validator({**schema["$defs"]["dataset"], "$defs": schema["$defs"]})
    for name, entry in _builtin_file().items():
        error = jsonschema.exceptions.best_match(validator.iter_errors(entry))
        if error is not None:
            where = ".".join(map(str, error.absolute_path))
            raise DeclarationError(f"{BUILTIN_PATH}: {name}.{where}: {error.message}")


def builtin_datasets() -> list[str]:
    return list(_builtin_file())


def declaration(name: str, config: dict[str, Any] | None = None) -> dict[str, Any]:
    """The declaration of ``name``: the config's own entry (with a ``format``), or the built-in
    one extended by the config's entry."""
    entry = ((config or {}).get("datasets") or {}).get(name) or {}
    own = {k: copy.deepcopy(v) for k, v in entry.items() if k not in TRAINING_KEYS}
    builtins = _builtin_file()
    if "format" in own:
        return own
    if name not in builtins:
        raise DeclarationError(
            f"datasets.{name}: {name!r} is not a built-in dataset and declares no format; allowed: a built-in "
            f"dataset ({', '.join(builtins)}) or an entry with its own format ({', '.join(FORMATS)})"
        )
    merged = copy.deepcopy(builtins[name])
    for key, value in own.items():
        merged[key] = {**merged.get(key, {}), **value} if key in MERGED_KEYS else value
    return merged


def dataset_info(name: str, config: dict[str, Any] | None = None) -> DatasetSpec:
    """The resolved declaration of dataset ``name`` (a built-in, or the config's ``datasets.<name>``)."""
    decl = declaration(name, config)
    key = f"datasets.{name}"

    def fail(sub: str, value: Any, allowed: str) -> DeclarationError:
        return DeclarationError(f"{key}.{sub}: {value!r} is not allowed; allowed: {allowed}")

    missing = [k for k in ("format", "image_size", "channels", "classes", "val_size") if k not in decl]
    if missing:
        raise DeclarationError(
            f"{key}: required key{'s' if len(missing) > 1 else ''} {', '.join(map(repr, missing))} missing"
        )
    if decl["format"] not in FORMATS:
        raise fail("format", decl["format"], ", ".join(FORMATS))
    reader = FORMATS[decl["format"]]
    channels, size, classes = decl["channels"], decl["image_size"], decl["classes"]
    for sub, fixed, value in (("channels", reader.channels, channels), ("image_size", reader.image_size, size)):
        if fixed is not None and value != fixed:
            raise fail(sub, value, f"{fixed} (format {reader.name!r} always holds {fixed})")
    mean, std = decl.get("mean"), decl.get("std")
    if (mean is None) != (std is None):
        raise fail(
            "mean" if mean is None else "std",
            mean if std is None else std,
            "mean and std both given, or both left out (then computed from the training split)",
        )
    for sub, values in (("mean", mean), ("std", std)):
        if values is not None and len(values) != channels:
            raise fail(sub, values, f"a list of {channels} value{'s' if channels > 1 else ''}, one per channel")
    augment = decl.get("augment", {})
    if augment.get("resized_crop", False) and reader.in_memory:
        raise fail(
            "augment.resized_crop",
            True,
            f"false for format {reader.name!r} (a random resized crop "
            "needs images decoded per batch: format imagefolder)",
        )
    files = {**reader.roles, **decl.get("files", {})}
    unknown = sorted(set(files) - set(reader.roles))
    if unknown:
        raise fail(
            f"files.{unknown[0]}",
            files[unknown[0]],
            f"the roles of format {reader.name!r}: " + (", ".join(reader.roles) or "none (it reads no files)"),
        )
    val_size = decl["val_size"]
    return DatasetSpec(
        name=name,
        format=reader.name,
        input=InputSpec(channels, size, classes),
        mean=tuple(mean) if mean is not None else None,
        std=tuple(std) if std is not None else None,
        val_size=int(val_size) if isinstance(val_size, float) and val_size >= 1 else val_size,
        test_fraction=decl.get("test_fraction"),
        crop_padding=int(augment.get("crop_padding", 0)),
        hflip=bool(augment.get("hflip", False)),
        augment="resized_crop" if augment.get("resized_crop", False) else "crop",
        paths=tuple(decl.get("paths", [name])),
        files=files,
        archive=decl.get("archive"),
        torchvision_download=decl.get("torchvision_download"),
        hint=decl.get("hint", ""),
    )


def _as_spec(dataset: DatasetSpec | str) -> DatasetSpec:
    return dataset if isinstance(dataset, DatasetSpec) else dataset_info(dataset)


# --- where the files are ---------------------------------------------------------------------
def candidate_dirs(spec: DatasetSpec, data_dir: str | Path) -> list[Path]:
    """The directories a dataset is looked for in, in order (relative paths under ``data_dir``)."""
    return [Path(p) if Path(p).is_absolute() else Path(data_dir) / p for p in spec.paths]


def _missing_error(
    spec: DatasetSpec, data_dir: str | Path, looked: list[tuple[Path, list[str]]]
) -> DatasetMissingError:
    where = "; ".join(
        f"{path} ({'does not exist' if absent == ['the directory'] else 'no ' + ', '.join(absent)})"
        for path, absent in looked
    )
    hint = f": {spec.hint}" if spec.hint else ""
    return DatasetMissingError(
        f"dataset {spec.name!r} not found (format {spec.format}: {spec.reader.layout}); looked in {where}{hint}. "
        f"Set data_dir in the config (now {str(data_dir)!r}) to the directory that holds it, or {spec.key}.paths "
        "to where its files are."
    )


def locate(spec: DatasetSpec, data_dir: str | Path, download: bool = False) -> Path:
    """The first directory of ``spec.paths`` that holds every file the format needs; an
    ``archive`` in data_dir is extracted there first, and with ``download`` torchvision fetches
    what it can. Raises DatasetMissingError naming every place looked in."""
    looked = [(path, spec.reader.missing(spec, path)) for path in candidate_dirs(spec, data_dir)]
    for path, absent in looked:
        if not absent:
            return path
    archive = Path(data_dir) / spec.archive if spec.archive else None
    if archive is not None and archive.is_file():
        import_torchvision().datasets.utils.extract_archive(str(archive), str(data_dir))
    elif download and spec.torchvision_download:
        try:
            torchvision_download(spec.torchvision_download, Path(data_dir))
        except (RuntimeError, OSError) as err:
            raise DatasetMissingError(
                f"dataset {spec.name!r}: download into {data_dir} failed: {str(err).splitlines()[0]}"
            ) from None
    else:
        raise _missing_error(spec, data_dir, looked)
    looked = [(path, spec.reader.missing(spec, path)) for path in candidate_dirs(spec, data_dir)]
    for path, absent in looked:
        if not absent:
            return path
    raise _missing_error(spec, data_dir, looked)


def load_pool(dataset: DatasetSpec | str, data_dir: str | Path, download: bool = False, workers: int = 4) -> ImagePool:
    """A dataset's training pool and test set: in memory, or (ImageFolder trees) as image files
    that ``workers`` DataLoader processes decode."""
    spec = _as_spec(dataset)
    return read_any(spec.reader, spec, locate(spec, data_dir, download), workers)


def check_files(spec: DatasetSpec, data_dir: str | Path) -> Probe:
    """Find the files and check what they hold against the declaration (image shape, classes):
    DatasetError naming the key and the file when they differ."""
    root = locate(spec, data_dir)
    probe = spec.reader.probe(spec, root)
    if probe.image_shape is not None:
        c, h, w = probe.image_shape
        if (h, w) != (spec.input.size, spec.input.size):
            raise DatasetFileError(
                f"{spec.key}.image_size: {spec.input.size} declared, but {probe.source} holds {h}x{w} images"
            )
        if c != spec.input.channels:
            raise DatasetFileError(
                f"{spec.key}.channels: {spec.input.channels} declared, but {probe.source} holds "
                f"images of {c} channel{'s' if c > 1 else ''}"
            )
    found = probe.classes_found
    if found != list(range(spec.input.num_classes)):
        shown = f"{len(found)} classes" + (f" (labels {found[0]}..{found[-1]})" if found else "")
        raise DatasetFileError(
            f"{spec.key}.classes: {spec.input.num_classes} declared, but the training part of "
            f"{probe.source} has {shown}; expected labels 0..{spec.input.num_classes - 1}, "
            "each present"
        )
    return probe


# --- splits and normalisation ----------------------------------------------------------------
def make_split(
    dataset: DatasetSpec | str, pool_sizes: tuple[int, int], seed: int, val_size: int | float | None = None
) -> dict[str, np.ndarray]:
    """Index arrays for train / val / test, a function of the declaration and seed only.

    ``pool_sizes`` = (size of the training pool, size of the official test set). Datasets without
    a test set (digits) carve one out of the pool first. ``val_size`` (a count or a fraction of the
    pool) replaces the declaration's held-out size.
    """
    spec = _as_spec(dataset)
    held_out = spec.val_size if val_size is None else val_size
    n_pool, n_test = pool_sizes
    rng = np.random.default_rng(seed)
    order = rng.permutation(n_pool)
    if spec.test_fraction is not None or n_test == 0:
        if spec.test_fraction is None:
            raise DeclarationError(
                f"{spec.key}.test_fraction: the files have no test set, so the test set must be "
                "carved out of the training pool; allowed: a fraction in (0, 1)"
            )
        n_carved = int(round(n_pool * spec.test_fraction))
        test, order = np.sort(order[:n_carved]), order[n_carved:]
    else:
        test = np.arange(n_test)
    n_val = held_out if isinstance(held_out, int) else int(round(len(order) * held_out))
    if n_val >= len(order):
        raise ValueError(f"dataset {spec.name!r}: val size {n_val} leaves no training images")
    return {"train": np.sort(order[n_val:]), "val": np.sort(order[:n_val]), "test": test}


def split_images(pool: ImagePool, split: dict[str, np.ndarray], part: str) -> tuple[torch.Tensor, torch.Tensor]:
    """The uint8 images and labels of one part (train, val, test) of a split."""
    index = torch.as_tensor(split[part], dtype=torch.long)
    from_pool = part != "test" or len(pool.test_labels) == 0
    if part == "val" and "val_from_test" in split:  # eebench.heldout: val held out of the test set
        from_pool = False
    images, labels = (pool.train_images, pool.train_labels) if from_pool else (pool.test_images, pool.test_labels)
    return images[index], labels[index]


def channel_stats(images: torch.Tensor | FolderImages, batch_size: int = 4096) -> tuple[list[float], list[float]]:
    """Per-channel mean and standard deviation of images on the [0, 1] scale (ToTensor's), over
    every pixel; image files are decoded as for evaluation (resized, centre-cropped)."""
    if isinstance(images, FolderImages):
        batches = eval_batches(images, 256, torch.device("cpu"))
    else:
        batches = (images[i : i + batch_size] for i in range(0, len(images), batch_size))
    total = square = None
    count = 0
    for batch in batches:
        x = batch.double().div_(255)
        s, q = x.sum(dim=(0, 2, 3)), x.square().sum(dim=(0, 2, 3))
        total, square = (s, q) if total is None else (total + s, square + q)
        count += x.numel() // x.shape[1]
    if total is None:
        raise ValueError("no images to compute the normalisation from")
    mean = total / count
    std = (square / count - mean.square()).clamp_min(0).sqrt()
    return mean.tolist(), std.tolist()

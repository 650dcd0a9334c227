"""Files on disk: atomic writes, safe loads, content hashes.

Every file the harness writes goes to a temporary name in the same directory and is renamed into
place, so a killed job leaves the old file or the new one, never half of one. Tensors load with
``torch.load(weights_only=True)``: a checkpoint or cache from elsewhere is data, never code.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import tempfile
import zipfile
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch


class CorruptFileError(RuntimeError):
    """A checkpoint, cache or result file that cannot be read as what it claims to be."""


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; rename it onto ``path`` if the block succeeds."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        with open(tmp_path, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp_path, path)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


def write_text(path: str | os.PathLike, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def write_json(path: str | os.PathLike, obj: Any) -> None:
    write_text(path, json.dumps(obj, indent=2, sort_keys=True) + "\n")


def read_json(path: str | os.PathLike) -> Any:
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: file not found")
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise CorruptFileError(f"{path}: not valid JSON ({err}); delete it to have it rebuilt") from None


def write_csv(path: str | os.PathLike, frame: Any) -> None:
    with atomic_path(path) as tmp:
        frame.to_csv(tmp, index=False)


def save_tensors(path: str | os.PathLike, obj: dict[str, Any]) -> None:
    with atomic_path(path) as tmp:
        torch.save(obj, tmp)


def load_tensors(path: str | os.PathLike, what: str = "file") -> dict[str, Any]:
    """Load a ``.pt`` dict written by ``save_tensors`` (or an ``.npz`` with array keys)."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: {what} not found")
    if path.suffix == ".npz":
        try:
            with np.load(path, allow_pickle=False) as data:
                return {key: torch.from_numpy(data[key]) for key in data.files}
        except (ValueError, OSError, zipfile.BadZipFile, EOFError) as err:
            raise CorruptFileError(f"{path}: corrupt or truncated {what} ({err})") from None
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises many types for truncated or foreign files
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise CorruptFileError(
            f"{path}: corrupt, truncated or not a tensor file ({what}): {first[:200]}; "
            "delete it to have it rebuilt"
        ) from None
    if not isinstance(obj, dict):
        raise CorruptFileError(f"{path}: expected a dict of tensors in this {what}, got {type(obj).__name__}")
    return obj


def stable_hash(obj: Any) -> str:
    """A short hash of a JSON-serialisable object (key order does not matter)."""
    blob = json.dumps(obj, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def file_hash(path: str | os.PathLike) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()[:16]

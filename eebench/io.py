"""Files on disk: atomic writes, safe loads, content hashes.

Every file the harness writes goes to a temporary name in the same directory and is renamed into
place, so a killed job leaves the old file or the new one, never half of one. Tensors load with
``torch.load(weights_only=True)``: a checkpoint or cache from elsewhere is data, never code.
"""

from __future__ import annotations

import contextlib
import glob
import hashlib
import json
import os
import tempfile
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch


class CorruptFileError(RuntimeError):
    """A checkpoint, cache or result file that cannot be read as what it claims to be."""


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; rename it onto ``path`` if the block succeeds."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    _remove_orphans(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.pid{os.getpid()}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        with open(tmp_path, "rb") as f:
            os.fsync(f.fileno())
        os.chmod(tmp_path, _ordinary_file_mode())  # mkstemp's 0600 would hide results from colleagues
        os.replace(tmp_path, path)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


def _ordinary_file_mode() -> int:
    """The mode ``open(path, "w")`` would give a new file under the process's umask."""
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


def _remove_orphans(path: Path) -> None:
    """Delete temporary files a killed writer of ``path`` left behind (its process is gone)."""
    for orphan in path.parent.glob(f".{glob.escape(path.name)}.pid*.tmp"):
        pid = orphan.name[len(path.name) + 5 :].split(".", 1)[0]
        if pid.isdigit() and int(pid) != os.getpid() and not _alive(int(pid)):
            orphan.unlink(missing_ok=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


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
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        torch.save(obj, f)  # through a handle: the archive's inner name is fixed, so the bytes are too


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
            raise CorruptFileError(
                f"{path}: corrupt or truncated {what} ({err}); delete it to have it rebuilt"
            ) from None
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises many types for truncated or foreign files
        text = str(err).strip()
        lines = text.splitlines()
        if "Weights only load failed" in text:  # the pickle names objects other than tensors
            detail = next((line.strip() for line in lines if "GLOBAL" in line), None)
            if detail is not None:
                raise CorruptFileError(
                    f"{path}: refused to load this {what}: it holds Python objects other than tensors "
                    f"({detail}), and files are read as data only (torch.load with weights_only=True), "
                    "never unpickled as code. Use a file written by this harness, or delete it to have "
                    "it rebuilt"
                ) from None
            lines = [line for line in lines if "Unsupported" in line] or ["not a file written by torch.save"]
        first = lines[0].strip().split(". ")[0] if lines else type(err).__name__
        raise CorruptFileError(
            f"{path}: corrupt, truncated or not a tensor file ({what}): {first[:200]}; delete it to have it rebuilt"
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

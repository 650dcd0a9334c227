"""Where a number came from: code version, packages, machine."""

from __future__ import annotations

import platform
import subprocess
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path
from typing import Any

import torch

_PACKAGES = ("torch", "torchvision", "numpy", "fvcore", "snakemake", "pandas", "scikit-learn")
_ROOT = Path(__file__).resolve().parents[1]


def git_commit() -> str:
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=_ROOT, capture_output=True, text=True, timeout=10
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=_ROOT,
            capture_output=True,
            text=True,
            timeout=10,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    if not commit:
        return "unknown"
    return commit[:12] + ("+dirty" if dirty else "")


def versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for name in _PACKAGES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = "absent"
    return out


def device_name(device: torch.device | str | None = None) -> str:
    if device in (None, "auto"):
        device = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


def provenance(resolved_config: dict[str, Any], device: torch.device | str | None = None) -> dict[str, Any]:
    return {
        "config": resolved_config,
        "git_commit": git_commit(),
        "versions": versions(),
        "device": device_name(device),
        "host": platform.node(),
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
    }

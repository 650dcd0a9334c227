"""Run the workflow in a scratch directory with a config derived from the default one."""

from __future__ import annotations

import copy
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[1]
SNAKEMAKE = str(Path(sys.executable).with_name("snakemake"))


def default_config() -> dict[str, Any]:
    return yaml.safe_load((ROOT / "config" / "config.yaml").read_text())


def tiny_config(epochs: int = 1) -> dict[str, Any]:
    """The default config cut down to MSDNet + standard training for a fast end-to-end run."""
    config = copy.deepcopy(default_config())
    config["datasets"]["digits"]["recipe"]["epochs"] = epochs
    config["methods"] = {"standard": config["methods"]["standard"]}
    config["posthoc"] = {}
    config["architectures"] = {"msdnet": config["architectures"]["msdnet"]}
    config["experiments"] = [{"datasets": ["digits"], "architectures": ["msdnet"], "methods": ["standard"]}]
    config["report"] = {"figures": {}}
    config.pop("latency", None)  # its variants are not in this config
    return config


def run_workflow(
    workdir: Path,
    config: dict[str, Any],
    *targets: str,
    extra: list[str] | None = None,
    check: bool = True,
    timeout: int = 900,
) -> subprocess.CompletedProcess:
    workdir.mkdir(parents=True, exist_ok=True)
    config_path = workdir / "config.yaml"
    config_path.write_text(yaml.safe_dump(config))
    cmd = [
        SNAKEMAKE,
        "--snakefile",
        str(ROOT / "Snakefile"),
        "--directory",
        str(workdir),
        "--configfile",
        str(config_path),
        "--cores",
        "2",
        *(extra or []),
        *targets,
    ]
    env = {**os.environ, "PYTHONHASHSEED": "0"}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
    if check and proc.returncode != 0:
        raise AssertionError(f"snakemake failed ({proc.returncode}):\n{proc.stdout[-4000:]}\n{proc.stderr[-6000:]}")
    return proc


def planned_jobs(output: str) -> set[tuple[str, str]]:
    """(rule, variant or '') of every job that a dry run's output plans."""
    jobs, rule = set(), None
    for line in output.splitlines() + ["[end]"]:
        text = line.strip()
        job_ends = not text or text.startswith("[") or re.fullmatch(r"(?:local)?rule \w+:", text)
        if rule and job_ends:  # a job without wildcards
            jobs.add((rule, ""))
            rule = None
        if m := re.fullmatch(r"(?:local)?rule (\w+):", text):
            rule = m.group(1)
        elif rule and text.startswith("wildcards:"):
            variant = re.search(r"\bvariant=([\w-]+)", text)
            jobs.add((rule, variant.group(1) if variant else ""))
            rule = None
    return jobs

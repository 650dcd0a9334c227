"""One resolved spec per job: the part of the config a job reads, which is also its rerun trigger.

Each workflow rule passes ``job_spec(config, rule, ...)`` as its ``params.spec``; the job's script
hands the library exactly that spec (``with_runtime``), never the whole config. A spec has the
shape of a config (the library reads it with the same functions), restricted to what the job
needs: so anything a job reads is in the spec Snakemake compares, and a key the spec lacks fails
the job with a KeyError instead of being read silently from elsewhere.

``RUNTIME_KEYS`` are the exception: where the data lies and which device runs the job. They
change where and how fast a job runs, not what it computes, and are read from the config as it
is when the job runs, without rerunning finished jobs (device: CPU and GPU numbers differ by
float rounding only).
"""

from __future__ import annotations

import copy
from typing import Any

from .cache import CACHE_FORMAT
from .config import Cell, dependencies

RUNTIME_KEYS = ("data_dir", "download", "device", "data_workers")
SECTIONS = ("methods", "pretrained", "posthoc")  # variant sections a cell's chain may name

# the global keys each rule reads, beyond the entries of its datasets, architectures and variants
RULE_KEYS: dict[str, tuple[str, ...]] = {
    "split": ("split_seed",),
    "flops": ("flops_convention",),
    "train": ("split_seed",),
    "convert_pretrained": ("split_seed",),
    "infer": ("split_seed", "infer_batch_size"),
    "infer_train_split": ("split_seed", "infer_batch_size", "train_cache_samples"),
    "posthoc": ("split_seed",),
    "evaluate": ("split_seed", "flops_convention", "bootstrap"),
    "latency": ("split_seed", "infer_batch_size", "latency"),
    "aggregate": ("bootstrap",),
}


def _variant_entries(config: dict[str, Any], variants: list[str]) -> dict[str, dict[str, Any]]:
    out: dict[str, dict[str, Any]] = {section: {} for section in SECTIONS}
    for variant in variants:
        for section in SECTIONS:
            if variant in config.get(section, {}):
                out[section][variant] = config[section][variant]
    return out


def _chain(config: dict[str, Any], cell: Cell) -> list[str]:
    """The cell's variant and every variant it is made from (post-hoc base, init_from parents)."""
    return [cell.variant, *(c.variant for c in dependencies(config, cell))]


def job_spec(
    config: dict[str, Any],
    rule: str,
    cells: list[Cell] | None = None,
    dataset: str | None = None,
    arch: str | None = None,
) -> dict[str, Any]:
    """What a job of ``rule`` reads: the global keys of ``RULE_KEYS``, the entries of its
    dataset(s), architecture(s) and variants (with their chains), for one cell, several
    (aggregates) or a dataset and architecture (split, FLOPs)."""
    cells = cells or []
    datasets = [dataset] if dataset else sorted({c.dataset for c in cells})
    archs = [arch] if arch else sorted({c.arch for c in cells})
    variants = list(dict.fromkeys(v for c in cells for v in _chain(config, c)))
    spec: dict[str, Any] = {key: copy.deepcopy(config[key]) for key in RULE_KEYS[rule]}
    spec["datasets"] = {d: copy.deepcopy(config["datasets"][d]) for d in datasets}
    if archs and rule != "split":
        spec["architectures"] = {a: copy.deepcopy(config["architectures"][a]) for a in archs}
    spec.update(copy.deepcopy(_variant_entries(config, variants)))
    if rule == "latency":  # which cells are timed is the workflow's business, not the job's
        spec["latency"] = {
            k: v for k, v in spec["latency"].items() if k not in ("variants", "architectures", "datasets")
        }
    if rule in ("infer", "infer_train_split"):  # a new cache layout rebuilds the caches
        spec["cache_format"] = CACHE_FORMAT
    if rule == "flops":  # the FLOPs job checks Table 1's budgets when it counts Table 1's network
        table = config["report"].get("table1")
        if table is not None and (table["dataset"], table["architecture"]) == (dataset, arch):
            spec["report"] = {"table1": copy.deepcopy(table)}
    return spec


def cell_spec(config: dict[str, Any], rule: str, cell: Cell) -> dict[str, Any]:
    return job_spec(config, rule, cells=[cell])


def with_runtime(spec: dict[str, Any], config: dict[str, Any]) -> dict[str, Any]:
    """The config a job works with: its spec and the runtime keys of the config it runs under."""
    return {**spec, **{key: config[key] for key in RUNTIME_KEYS if key in config}}

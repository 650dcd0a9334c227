"""The experiment config: its cells, and the checks that go beyond the JSON schema.

The schema (``config/schema.yaml``, applied by Snakemake at start) checks the structure and the
types. ``check_config`` checks what needs the registries: every dataset, architecture, training
method and post-hoc method exists, every parameter is known and valid, every architecture can be
built for its datasets. It runs before any job starts, so a bad config fails in seconds.
"""

from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from . import registry
from .datasets import DATASETS
from .io import stable_hash


class ConfigError(ValueError):
    """The config names something that does not exist or cannot be built."""


@dataclass(frozen=True, order=True)
class Cell:
    dataset: str
    arch: str
    variant: str  # a training variant (config ``methods``) or a post-hoc variant (``posthoc``)
    seed: int

    @property
    def path(self) -> str:
        return f"{self.dataset}/{self.arch}/{self.variant}/seed{self.seed}"


def load_config(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.exists():
        raise ConfigError(f"config file {path} not found")
    with open(path) as f:
        return yaml.safe_load(f)


def is_posthoc(config: dict[str, Any], variant: str) -> bool:
    return variant in config.get("posthoc", {})


def training_variant(config: dict[str, Any], name: str) -> dict[str, Any]:
    return {"params": {}, "recipe": {}, "init_from": None, **config["methods"][name]}


def posthoc_variant(config: dict[str, Any], name: str) -> dict[str, Any]:
    return {"params": {}, **config["posthoc"][name]}


def cells(config: dict[str, Any]) -> list[Cell]:
    """Every (dataset, architecture, variant, seed) the experiments ask for, with the training
    cells that post-hoc and ``init_from`` variants depend on."""
    out: set[Cell] = set()
    for exp in config["experiments"]:
        for dataset in exp["datasets"]:
            for arch in exp["architectures"]:
                for seed in exp.get("seeds", config["seeds"]):
                    for variant in exp.get("methods", []) + exp.get("posthoc", []):
                        out.add(Cell(dataset, arch, variant, seed))
    for cell in list(out):
        out.update(dependencies(config, cell))
    return sorted(out)


def dependencies(config: dict[str, Any], cell: Cell) -> list[Cell]:
    """Training cells a cell needs: its post-hoc base, or the weights it is initialised from."""
    if is_posthoc(config, cell.variant):
        base = Cell(cell.dataset, cell.arch, posthoc_variant(config, cell.variant)["base"], cell.seed)
        return [base, *dependencies(config, base)]
    parent = training_variant(config, cell.variant)["init_from"]
    if parent is None:
        return []
    base = Cell(cell.dataset, cell.arch, parent, cell.seed)
    return [base, *dependencies(config, base)]


def architecture(config: dict[str, Any], name: str) -> tuple[str, dict[str, Any]]:
    arch = config["architectures"][name]
    return arch["family"], dict(arch.get("params", {}))


def recipe_for(config: dict[str, Any], dataset: str, variant: str):
    from .training import Recipe

    values = {**config["datasets"][dataset].get("recipe", {}), **training_variant(config, variant)["recipe"]}
    return registry.build_params(Recipe, values, f"recipe of dataset {dataset!r}, method {variant!r}")


def cell_fingerprint(config: dict[str, Any], cell: Cell) -> str:
    """A hash of everything that determines a training cell's weights (its parent's included)."""
    family, params = architecture(config, cell.arch)
    variant = training_variant(config, cell.variant)
    parent = dependencies(config, cell)[0] if variant["init_from"] else None
    return stable_hash({
        "dataset": cell.dataset, "split_seed": config["split_seed"], "family": family, "arch": params,
        "method": variant["method"], "params": variant["params"], "seed": cell.seed,
        "recipe": dataclasses.asdict(recipe_for(config, cell.dataset, cell.variant)),
        "parent": cell_fingerprint(config, parent) if parent else None,
    })


def check_config(config: dict[str, Any]) -> None:
    """Raise ConfigError naming the key, the bad value and what is allowed."""
    from models import get_architecture, list_architectures, make_config

    from .methods import METHODS
    from .posthoc import POSTHOC

    def fail(where: str, value: Any, allowed: Any) -> None:
        allowed_text = ", ".join(map(str, allowed)) if isinstance(allowed, (list, tuple)) else allowed
        raise ConfigError(f"config {where}: {value!r} is not allowed; allowed: {allowed_text}")

    for name in config["datasets"]:
        if name not in DATASETS:
            fail(f"datasets.{name}", name, list(DATASETS))
    for name, arch in config["architectures"].items():
        if arch["family"] not in list_architectures():
            fail(f"architectures.{name}.family", arch["family"], list_architectures())
        _wrap(lambda: make_config(arch["family"], arch.get("params", {})), f"architectures.{name}.params")
    for name in config["methods"]:
        variant = training_variant(config, name)
        if variant["method"] not in METHODS.names():
            fail(f"methods.{name}.method", variant["method"], METHODS.names())
        _wrap(lambda: METHODS.make_params(variant["method"], variant["params"]), f"methods.{name}.params")
        if variant["init_from"] is not None and variant["init_from"] not in config["methods"]:
            fail(f"methods.{name}.init_from", variant["init_from"], list(config["methods"]))
    for name in config.get("posthoc", {}):
        variant = posthoc_variant(config, name)
        if variant["method"] not in POSTHOC.names():
            fail(f"posthoc.{name}.method", variant["method"], POSTHOC.names())
        _wrap(lambda: POSTHOC.make_params(variant["method"], variant["params"]), f"posthoc.{name}.params")
        if variant["base"] not in config["methods"]:
            fail(f"posthoc.{name}.base", variant["base"], list(config["methods"]))
    for i, exp in enumerate(config["experiments"]):
        for key, known in (("datasets", config["datasets"]), ("architectures", config["architectures"]),
                           ("methods", config["methods"]), ("posthoc", config.get("posthoc", {}))):
            for value in exp.get(key, []):
                if value not in known:
                    fail(f"experiments[{i}].{key}", value, list(known))
        for arch in exp["architectures"]:
            family = config["architectures"][arch]["family"]
            for dataset in exp["datasets"]:
                if dataset not in get_architecture(family).datasets:
                    fail(f"experiments[{i}]: architecture {arch!r} ({family}) on dataset",
                         dataset, get_architecture(family).datasets)
                for variant in exp.get("methods", []):
                    _wrap(lambda: recipe_for(config, dataset, variant), f"recipe for {dataset}/{variant}")
    _check_report(config, fail)


def _check_report(config: dict[str, Any], fail) -> None:
    """Names in the report section must be configured datasets, architectures and variants."""
    report = config.get("report", {})
    variants = list(config["methods"]) + list(config.get("posthoc", {}))
    known = {"datasets": list(config["datasets"]), "architectures": list(config["architectures"]),
             "variants": variants}
    for name, spec in report.get("figures", {}).items():
        for key, allowed in known.items():
            for value in spec.get(key, []):
                if value not in allowed:
                    fail(f"report.figures.{name}.{key}", value, allowed)
    table = report.get("table1")
    if table is not None:
        if table["dataset"] not in known["datasets"]:
            fail("report.table1.dataset", table["dataset"], known["datasets"])
        if table["architecture"] not in known["architectures"]:
            fail("report.table1.architecture", table["architecture"], known["architectures"])
        for row, variant in table["rows"].items():
            if variant not in config["methods"]:
                fail(f"report.table1.rows.{row}", variant, list(config["methods"]))
    eenets = report.get("eenets_table")
    if eenets is not None:
        for key in ("variant", "plain_variant"):
            if eenets[key] not in config["methods"]:
                fail(f"report.eenets_table.{key}", eenets[key], list(config["methods"]))
        for i, row in enumerate(eenets["rows"]):
            for key, allowed in (("dataset", known["datasets"]), ("architecture", known["architectures"]),
                                 ("plain", known["architectures"])):
                if row[key] not in allowed:
                    fail(f"report.eenets_table.rows[{i}].{key}", row[key], allowed)


def _wrap(fn, where: str = "") -> Any:
    try:
        return fn()
    except (ValueError, TypeError, KeyError) as err:
        message = err.args[0] if err.args else str(err)
        raise ConfigError(f"config {where}: {message}" if where else str(message)) from None


def resolved_cell_config(config: dict[str, Any], cell: Cell) -> dict[str, Any]:
    """Everything that defines a cell, for its provenance record."""
    family, params = architecture(config, cell.arch)
    out: dict[str, Any] = {
        "dataset": cell.dataset, "architecture": cell.arch, "family": family, "arch_params": params,
        "variant": cell.variant, "seed": cell.seed, "split_seed": config["split_seed"],
        "flops_convention": config["flops_convention"],
    }
    if is_posthoc(config, cell.variant):
        out["posthoc"] = copy.deepcopy(posthoc_variant(config, cell.variant))
    else:
        out["method"] = copy.deepcopy(training_variant(config, cell.variant))
        out["recipe"] = dataclasses.asdict(recipe_for(config, cell.dataset, cell.variant))
    return out

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


SCHEMA_PATH = Path(__file__).resolve().parents[1] / "config" / "schema.yaml"


def load_config(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.exists():
        raise ConfigError(f"config file {path} not found")
    try:
        with open(path) as f:
            config = yaml.safe_load(f)
    except yaml.YAMLError as err:
        raise ConfigError(f"config file {path} is not valid YAML: {err}") from None
    if not isinstance(config, dict):
        raise ConfigError(f"config file {path}: expected a mapping of keys to values, got {type(config).__name__}")
    return config


def validate_schema(config: dict[str, Any], schema_path: str | Path = SCHEMA_PATH) -> None:
    """Check ``config`` against the JSON schema and fill in its defaults (as Snakemake's
    ``validate`` does); the first error is raised as a ConfigError naming the key
    (``datasets.digits.resources.mem_mb``), the bad value and what is allowed."""
    import jsonschema

    with open(schema_path) as f:
        schema = yaml.safe_load(f)
    if not isinstance(config, dict):
        raise ConfigError(f"config: expected a mapping of keys to values, got {type(config).__name__}")
    errors = list(jsonschema.Draft202012Validator(schema).iter_errors(config))
    if errors:
        raise ConfigError(_schema_message(jsonschema.exceptions.best_match(errors)))
    _set_defaults(config, schema, schema)


def _key_path(parts: Any) -> str:
    out = ""
    for part in parts:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


_TYPE_NAMES = {"integer": "an integer", "number": "a number", "string": "a string", "boolean": "true or false",
               "array": "a list", "object": "a mapping of keys to values", "null": "null"}


def _schema_message(err: Any) -> str:
    where = _key_path(err.absolute_path) or "(top level)"
    value, rule, kind = err.instance, err.validator_value, err.validator
    if kind == "type":
        types = rule if isinstance(rule, list) else [rule]
        allowed = " or ".join(_TYPE_NAMES.get(t, t) for t in types)
    elif kind == "enum":
        allowed = "one of " + ", ".join(map(str, rule))
    elif kind in ("minimum", "exclusiveMinimum", "maximum", "exclusiveMaximum"):
        sign = {"minimum": ">=", "exclusiveMinimum": ">", "maximum": "<=", "exclusiveMaximum": "<"}[kind]
        allowed = f"a number {sign} {rule}"
    elif kind == "pattern":
        allowed = f"a string matching {rule}"
    elif kind in ("minItems", "minProperties"):
        allowed = f"at least {rule} {'item' if kind == 'minItems' else 'entry'}{'s' if rule != 1 else ''}"
    elif kind == "additionalProperties":
        known = sorted(err.schema.get("properties", {}))
        unknown = sorted(set(value) - set(known))
        names = ", ".join(map(repr, unknown))
        return (f"config {where}: unknown key{'s' if len(unknown) > 1 else ''} {names}; "
                f"allowed: {', '.join(known) if known else 'none'}")
    elif kind == "required":
        missing = [k for k in rule if k not in value]
        return f"config {where}: required key{'s' if len(missing) > 1 else ''} {', '.join(map(repr, missing))} missing"
    else:
        return f"config {where}: {err.message}"
    return f"config {where}: {value!r} is not allowed; allowed: {allowed}"


def _set_defaults(instance: Any, schema: dict[str, Any], root: dict[str, Any]) -> None:
    """Fill missing keys that have a ``default`` in the schema, recursively."""
    if "$ref" in schema:
        target: Any = root
        for part in schema["$ref"].lstrip("#/").split("/"):
            target = target[part]
        schema = target
    if isinstance(instance, dict):
        properties = schema.get("properties", {})
        for key, sub in properties.items():
            if key not in instance and "default" in sub:
                instance[key] = copy.deepcopy(sub["default"])
            if key in instance:
                _set_defaults(instance[key], sub, root)
        extra = schema.get("additionalProperties")
        if isinstance(extra, dict):
            for key in instance.keys() - properties.keys():
                _set_defaults(instance[key], extra, root)
    elif isinstance(instance, list) and isinstance(schema.get("items"), dict):
        for item in instance:
            _set_defaults(item, schema["items"], root)


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


def latency_cells(config: dict[str, Any]) -> list[Cell]:
    """The cells the ``latency`` section measures: its variants, on its architectures and
    datasets (all when not given), every seed."""
    spec = config.get("latency")
    if not spec:
        return []
    archs, datasets = spec.get("architectures"), spec.get("datasets")
    return [c for c in cells(config) if c.variant in spec["variants"]
            and (archs is None or c.arch in archs) and (datasets is None or c.dataset in datasets)]


def table1_latency_cells(config: dict[str, Any]) -> list[Cell]:
    """With ``report.table1.budget_unit: ms``, the measured cells whose per-exit latency converts
    Table 1's curves to milliseconds (one per seed)."""
    spec = config.get("report", {}).get("table1")
    if spec is None or spec.get("budget_unit", "flops") != "ms":
        return []
    variant = spec.get("latency_variant") or config["latency"]["variants"][0]
    return [Cell(spec["dataset"], spec["architecture"], variant, seed) for seed in spec.get("seeds", config["seeds"])]


def architecture(config: dict[str, Any], name: str) -> tuple[str, dict[str, Any]]:
    arch = config["architectures"][name]
    return arch["family"], dict(arch.get("params", {}))


def recipe_for(config: dict[str, Any], dataset: str, variant: str):
    from .training import Recipe

    values = {**config["datasets"][dataset].get("recipe", {}), **training_variant(config, variant)["recipe"]}
    return registry.build_params(Recipe, values, f"recipe of dataset {dataset!r}, method {variant!r}")


def val_size(config: dict[str, Any], dataset: str) -> int | float | None:
    """``datasets.<dataset>.val_size``: a count (a float of at least 1 is read as one), a fraction
    of the training pool, or None for the dataset's usual held-out size."""
    value = config["datasets"].get(dataset, {}).get("val_size")
    return int(value) if isinstance(value, float) and value >= 1 else value


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
        # a changed held-out size makes another split (only present when set, so that older
        # configs keep their fingerprints)
        **({"val_size": held_out} if (held_out := val_size(config, cell.dataset)) is not None else {}),
    })


def check_config(config: dict[str, Any]) -> None:
    """Raise ConfigError naming the key, the bad value and what is allowed."""
    from models import get_architecture, list_architectures, make_config

    from .methods import METHODS
    from .posthoc import POSTHOC

    def fail(where: str, value: Any, allowed: Any) -> None:
        allowed_text = ", ".join(map(str, allowed)) if isinstance(allowed, (list, tuple)) else allowed
        raise ConfigError(f"config {where}: {value!r} is not allowed; allowed: {allowed_text}")

    from .training import Recipe

    for name, spec in config["datasets"].items():
        if name not in DATASETS:
            fail(f"datasets.{name}", name, list(DATASETS))
        _wrap(lambda: registry.build_params(Recipe, spec.get("recipe", {}), f"config datasets.{name}.recipe"))
    for name, arch in config["architectures"].items():
        if arch["family"] not in list_architectures():
            fail(f"architectures.{name}.family", arch["family"], list_architectures())
        _wrap(lambda: make_config(arch["family"], arch.get("params", {})), f"architectures.{name}.params")
    for name in config["methods"]:
        variant = training_variant(config, name)
        if variant["method"] not in METHODS.names():
            fail(f"methods.{name}.method", variant["method"], METHODS.names())
        _wrap(lambda: METHODS.make_params(variant["method"], variant["params"]), f"methods.{name}.params")
        _wrap(lambda: registry.build_params(Recipe, variant["recipe"], f"config methods.{name}.recipe"))
        if variant["init_from"] is not None and variant["init_from"] not in config["methods"]:
            fail(f"methods.{name}.init_from", variant["init_from"], list(config["methods"]))
    for name in config["methods"]:  # init_from chains must end
        chain = [name]
        while (parent := config["methods"][chain[-1]].get("init_from")) is not None:
            if parent in chain:
                raise ConfigError(f"config methods.{name}.init_from: {' -> '.join(chain + [parent])} is a cycle; "
                                  "allowed: a chain that ends at a variant trained from scratch")
            chain.append(parent)
    for name in config.get("posthoc", {}):
        variant = posthoc_variant(config, name)
        if variant["method"] not in POSTHOC.names():
            fail(f"posthoc.{name}.method", variant["method"], POSTHOC.names())
        _wrap(lambda: POSTHOC.make_params(variant["method"], variant["params"]), f"posthoc.{name}.params")
        if variant["base"] not in config["methods"]:
            fail(f"posthoc.{name}.base", variant["base"], list(config["methods"]))
    built: set[tuple[str, str]] = set()
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
                if (arch, dataset) not in built:
                    _check_buildable(config, arch, dataset)
                    built.add((arch, dataset))
    _check_report(config, fail)
    _check_latency(config, fail)


def _check_latency(config: dict[str, Any], fail) -> None:
    """The latency section names configured variants, architectures and datasets and selects at
    least one cell; Table 1 in milliseconds needs its (dataset, architecture) measured."""
    spec = config.get("latency")
    table = config.get("report", {}).get("table1")
    if spec is None:
        if table is not None and table.get("budget_unit", "flops") == "ms":
            raise ConfigError("config report.table1.budget_unit: 'ms' needs a latency section measuring "
                              f"{table['dataset']}/{table['architecture']}; allowed without one: flops")
        return
    variants = list(config["methods"]) + list(config.get("posthoc", {}))
    for key, allowed in (("variants", variants), ("architectures", list(config["architectures"])),
                         ("datasets", list(config["datasets"]))):
        for value in spec.get(key) or []:
            if value not in allowed:
                fail(f"latency.{key}", value, allowed)
    if not latency_cells(config):
        raise ConfigError("config latency: selects no cell of the experiments; allowed: variants, architectures "
                          "and datasets that some experiment combines")
    measured = set(latency_cells(config))
    for cell in table1_latency_cells(config):
        if cell not in measured:
            raise ConfigError(f"config report.table1.latency_variant: {cell.path} is not measured by the latency "
                              "section; allowed: a latency variant run on Table 1's dataset and architecture")


def _check_buildable(config: dict[str, Any], arch: str, dataset: str) -> None:
    """The checks a network runs on its config and the dataset's input size before it allocates
    anything (a scale list that does not fit the input, early exits that do not fit the depth),
    without building it: milliseconds, where building even on the meta device takes seconds."""
    import inspect

    from models import make_config

    family, params = architecture(config, arch)
    spec = DATASETS[dataset].input
    try:
        arch_config = make_config(family, params)
        validate = getattr(arch_config, "validate", None)
        if validate is not None and "input_size" in inspect.signature(validate).parameters:
            validate(spec.size)  # msdnet, ranet: scales that fit the input size
        if family == "ee_resnet":
            from models.ee_resnet import exit_positions, resnet_plan

            exit_positions(arch_config, resnet_plan(arch_config, spec))  # early exits that fit the depth
    except (ValueError, TypeError, KeyError) as err:
        message = err.args[0] if err.args else str(err)
        raise ConfigError(f"config architectures.{arch}.params (on dataset {dataset!r}): {message}") from None


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


# what must be in data_dir for each dataset read from disk (any one of the names)
DATA_FILES = {
    "cifar10": ("cifar-10-batches-py", "cifar-10-python.tar.gz"),
    "cifar100": ("cifar-100-python", "cifar-100-python.tar.gz"),
    "mnist": ("MNIST",),
    "svhn": ("train_32x32.mat",),
    "imagenet": ("imagenet/train",),  # ImageFolder trees
    "tinyimagenet": ("tinyimagenet/train",),
}


def check_data(config: dict[str, Any]) -> None:
    """Every dataset of the experiments is in ``data_dir`` (unless ``download`` is on): a missing
    directory fails at workflow start, not in the first job that reads it."""
    from .datasets import _HOW_TO_PROVIDE

    if config.get("download", False):
        return
    used = sorted({d for exp in config["experiments"] for d in exp["datasets"]})
    root = Path(config["data_dir"])
    for dataset in used:
        names = DATA_FILES.get(dataset)
        if names is None:  # embedded (digits)
            continue
        if not root.is_dir():
            raise ConfigError(
                f"config data_dir: {config['data_dir']!r} is not a directory ({root.resolve()}), but dataset "
                f"{dataset!r} is read from it: {_HOW_TO_PROVIDE[dataset]}; or set data_dir to where the data is"
            )
        if names and not any((root / name).exists() for name in names):
            raise ConfigError(
                f"config data_dir: {config['data_dir']!r} ({root.resolve()}) has no {' or '.join(names)} for "
                f"dataset {dataset!r}: {_HOW_TO_PROVIDE[dataset]}"
            )


def check_budgets(config: dict[str, Any], exit_flops: list[float]) -> None:
    """Table 1's budgets lie within the FLOPs range of its architecture (first to last exit);
    ``exit_flops`` is that architecture's per-exit cumulative FLOPs (``results/flops/...json``)."""
    spec = config.get("report", {}).get("table1")
    if spec is None or spec.get("budget_unit", "flops") == "ms":  # time budgets: nan outside the curve
        return
    low, high = min(exit_flops), max(exit_flops)
    outside = [b for b in spec["budgets"] if not low <= b <= high]
    if outside:
        raise ConfigError(
            f"config report.table1.budgets: {', '.join(f'{b:.4g}' for b in outside)} "
            f"{'is' if len(outside) == 1 else 'are'} outside the FLOPs range of {spec['architecture']!r} on "
            f"{spec['dataset']!r}; allowed: budgets from {low:.4g} (first exit) to {high:.4g} (last exit) "
            "FLOPs per image"
        )


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

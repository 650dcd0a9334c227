"""The experiment config: its cells, and the checks that go beyond the JSON schema.

The schema (``config/schema.yaml``, applied by Snakemake at start) checks the structure and the
types. ``check_config`` checks what needs the registries: every dataset, architecture, training
method and post-hoc method exists, every parameter is known and valid, every architecture can be
built for its datasets. It runs before any job starts, so a bad config fails in seconds.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import inspect
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from models import get_architecture, list_architectures, make_config
from models.ee_resnet import exit_positions, resnet_plan

from . import registry
from .checkpoints import FORMATS
from .datasets import DatasetError, DeclarationError, check_files, dataset_info, declaration, validate_builtin_datasets
from .io import file_hash, stable_hash
from .methods import METHODS
from .posthoc import POSTHOC
from .recipe import Recipe
from .style import all_variants, variant_label, variant_names

CELL_PATTERN = "{dataset}/{arch}/{variant}/seed{seed}"  # a cell's place under every results/ folder
# figure name -> the curves it draws (the schema's report.figures keys are these names)
FIGURE_KINDS = {
    "fig2_anytime": "anytime",
    "fig3_budgeted": "budgeted",
    "fig4_posthoc": "budgeted",
    "fig5_imagenet": "both",
}


class ConfigError(ValueError):
    """The config names something that does not exist or cannot be built."""


@dataclass(frozen=True, order=True)
class Cell:
    dataset: str
    arch: str
    variant: str  # a training, pretrained or post-hoc variant (config methods, pretrained, posthoc)
    seed: int

    @property
    def path(self) -> str:
        return CELL_PATTERN.format(**dataclasses.asdict(self))


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
    import jsonschema  # only here: the GPU check and the jobs run without it

    with open(schema_path) as f:
        schema = yaml.safe_load(f)
    if not isinstance(config, dict):
        raise ConfigError(f"config: expected a mapping of keys to values, got {type(config).__name__}")
    errors = list(jsonschema.Draft202012Validator(schema).iter_errors(config))
    if errors:
        raise ConfigError(_schema_message(jsonschema.exceptions.best_match(errors)))
    _set_defaults(config, schema, schema)
    try:
        validate_builtin_datasets(schema)
    except DeclarationError as err:
        raise ConfigError(str(err)) from None


def fill_defaults(config: dict[str, Any], schema_path: str | Path = SCHEMA_PATH) -> dict[str, Any]:
    """``config`` with the schema's defaults filled in, without validating it (for the GPU check,
    which runs where jsonschema is not installed); returns ``config``."""
    with open(schema_path) as f:
        schema = yaml.safe_load(f)
    _set_defaults(config, schema, schema)
    return config


def _key_path(parts: Any) -> str:
    out = ""
    for part in parts:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


_TYPE_NAMES = {
    "integer": "an integer",
    "number": "a number",
    "string": "a string",
    "boolean": "true or false",
    "array": "a list",
    "object": "a mapping of keys to values",
    "null": "null",
}


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
        return (
            f"config {where}: unknown key{'s' if len(unknown) > 1 else ''} {names}; "
            f"allowed: {', '.join(known) if known else 'none'}"
        )
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
    return variant in config["posthoc"]


def is_pretrained(config: dict[str, Any], variant: str) -> bool:
    """A variant whose weights are converted from a checkpoint file (config ``pretrained``)."""
    return variant in config["pretrained"]


def pretrained_variant(config: dict[str, Any], name: str) -> dict[str, Any]:
    return {"method": "standard", "params": {}, **config["pretrained"][name]}


def training_variant(config: dict[str, Any], name: str) -> dict[str, Any]:
    """A training variant; a pretrained variant reads as one trained by its ``method`` (whose
    evaluation, e.g. BoostNet's ensemble, the checkpoint needs), with no recipe and no parent."""
    if is_pretrained(config, name):
        spec = pretrained_variant(config, name)
        return {"method": spec["method"], "params": spec["params"], "recipe": {}, "init_from": None}
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
                    for variant in exp.get("methods", []) + exp.get("pretrained", []) + exp.get("posthoc", []):
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
    return [
        c
        for c in cells(config)
        if c.variant in spec["variants"]
        and (archs is None or c.arch in archs)
        and (datasets is None or c.dataset in datasets)
    ]


def table1_latency_cells(config: dict[str, Any]) -> list[Cell]:
    """With ``report.table1.budget_unit: ms``, the measured cells whose per-exit latency converts
    Table 1's curves to milliseconds (one per seed)."""
    spec = config["report"].get("table1")
    if spec is None or spec.get("budget_unit", "flops") != "ms":
        return []
    variant = spec.get("latency_variant") or config["latency"]["variants"][0]
    return [Cell(spec["dataset"], spec["architecture"], variant, seed) for seed in spec.get("seeds", config["seeds"])]


def comparison_latency_cells(config: dict[str, Any]) -> list[Cell]:
    """The measured cells whose per-exit latency converts the curves of each
    ``report.comparison_budgets`` entry with ``budget_unit: ms`` to milliseconds (one per seed of
    the experiments on that dataset and architecture)."""
    out: list[Cell] = []
    for entry in config["report"].get("comparison_budgets", []):
        if entry.get("budget_unit", "flops") != "ms":
            continue
        variant = entry.get("latency_variant") or (config.get("latency") or {}).get("variants", [None])[0]
        seeds = sorted(
            {c.seed for c in cells(config) if (c.dataset, c.arch) == (entry["dataset"], entry["architecture"])}
        )
        out += [Cell(entry["dataset"], entry["architecture"], variant, seed) for seed in seeds]
    return list(dict.fromkeys(out))


def architecture(config: dict[str, Any], name: str) -> tuple[str, dict[str, Any]]:
    arch = config["architectures"][name]
    return arch["family"], dict(arch.get("params", {}))


def recipe_for(config: dict[str, Any], dataset: str, variant: str):

    values = {**config["datasets"][dataset].get("recipe", {}), **training_variant(config, variant)["recipe"]}
    return registry.build_params(Recipe, values, f"recipe of dataset {dataset!r}, method {variant!r}")


def val_size(config: dict[str, Any], dataset: str) -> int | float | None:
    """``datasets.<dataset>.val_size``: a count (a float of at least 1 is read as one), a fraction
    of the training pool, or None for the dataset's usual held-out size."""
    value = config["datasets"].get(dataset, {}).get("val_size")
    return int(value) if isinstance(value, float) and value >= 1 else value


def val_from(config: dict[str, Any], dataset: str) -> str:
    """``datasets.<dataset>.val_from``: where the val split is drawn from, the training pool
    (``train``, the default) or the dataset's own test set (``test``)."""
    return config["datasets"].get(dataset, {}).get("val_from", "train")


@functools.lru_cache(maxsize=64)
def _hash_of(path: str, size: int, mtime_ns: int) -> str:
    return file_hash(path)


def content_hash(path: str | Path) -> str:
    """The file's content hash (computed once per process and file version), or ``missing``
    when it is absent (a dry run plans without the checkpoints; the run itself checks them)."""
    try:
        stat = Path(path).stat()
    except OSError:
        return "missing"
    return _hash_of(str(Path(path).resolve()), stat.st_size, stat.st_mtime_ns)


def held_out_file(config: dict[str, Any], dataset: str) -> str | None:
    """``datasets.<dataset>.val_indices``: the file of the training-pool images a pretrained
    checkpoint's training held out, which the split's val then is (None: a seeded split)."""
    return config["datasets"].get(dataset, {}).get("val_indices")


def split_identity(config: dict[str, Any], dataset: str) -> dict[str, Any]:
    """What makes a dataset's split other than its seed and val size: val drawn from the test set,
    or the held-out indices of a pretrained checkpoint, by content (empty when neither, so that
    configs without them keep their fingerprints)."""
    out: dict[str, Any] = {}
    if val_from(config, dataset) != "train":
        out["val_from"] = val_from(config, dataset)
    held_out = held_out_file(config, dataset)
    if held_out is not None:
        out["val_indices"] = content_hash(held_out)
    return out


def pretrained_fingerprint(
    dataset: str,
    family: str,
    arch_params: dict[str, Any],
    fmt: str,
    checkpoint_hash: str,
    method: str = "standard",
    method_params: dict[str, Any] | None = None,
) -> str:
    """What determines converted weights: the network, the checkpoint's content and format, and
    the method whose evaluation they get (``convert-checkpoint`` writes the same for ``standard``)."""
    return stable_hash(
        {
            "pretrained": {"format": fmt, "checkpoint": checkpoint_hash},
            "dataset": dataset,
            "family": family,
            "arch": arch_params,
            "method": method,
            "params": method_params or {},
        }
    )


def dataset_declared(config: dict[str, Any], dataset: str) -> dict[str, Any]:
    """What the config's ``datasets.<dataset>`` entry declares about the data itself (its format,
    files, size, augmentation, normalisation, ...; not the recipe, resources or the val split, which
    ``val_size``/``split_identity`` cover): part of
    what a split and a cell's weights depend on. Empty for a built-in dataset used as it is."""
    entry = config["datasets"].get(dataset, {})
    return {k: v for k, v in entry.items() if k not in ("recipe", "resources", "val_size", "val_from", "val_indices")}


def cell_fingerprint(config: dict[str, Any], cell: Cell) -> str:
    """A hash of everything that determines a training cell's weights (its parent's included)."""
    family, params = architecture(config, cell.arch)
    if is_pretrained(config, cell.variant):
        spec = pretrained_variant(config, cell.variant)
        return pretrained_fingerprint(
            cell.dataset,
            family,
            params,
            spec["format"],
            content_hash(spec["checkpoints"][cell.arch]),
            spec["method"],
            spec["params"],
        )
    variant = training_variant(config, cell.variant)
    parent = dependencies(config, cell)[0] if variant["init_from"] else None
    split = split_identity(config, cell.dataset)
    return stable_hash(
        {
            "dataset": cell.dataset,
            "split_seed": config["split_seed"],
            "family": family,
            "arch": params,
            "method": variant["method"],
            "params": variant["params"],
            "seed": cell.seed,
            "recipe": dataclasses.asdict(recipe_for(config, cell.dataset, cell.variant)),
            "parent": cell_fingerprint(config, parent) if parent else None,
            # a changed held-out size makes another split (only present when set, so that older
            # configs keep their fingerprints)
            **({"val_size": held_out} if (held_out := val_size(config, cell.dataset)) is not None else {}),
            **({"split": split} if split else {}),
            **({"dataset_declaration": declared} if (declared := dataset_declared(config, cell.dataset)) else {}),
        }
    )


def _fail(where: str, value: Any, allowed: Any) -> None:
    allowed_text = ", ".join(map(str, allowed)) if isinstance(allowed, (list, tuple)) else allowed
    raise ConfigError(f"config {where}: {value!r} is not allowed; allowed: {allowed_text}")


def check_config(config: dict[str, Any]) -> None:
    """Raise ConfigError naming the key, the bad value and what is allowed."""
    _check_datasets(config)
    _check_architectures(config)
    _check_methods(config)
    _check_posthoc(config)
    _check_pretrained(config, _fail)
    _check_experiments(config)
    _check_report(config, _fail)
    _check_latency(config, _fail)


def _check_datasets(config: dict[str, Any]) -> None:
    for name, spec in config["datasets"].items():
        try:
            dataset_info(name, config)
        except DeclarationError as err:
            raise ConfigError(f"config {err}") from None
        _wrap("", registry.build_params, Recipe, spec.get("recipe", {}), f"config datasets.{name}.recipe")


def _check_architectures(config: dict[str, Any]) -> None:
    for name, arch in config["architectures"].items():
        if arch["family"] not in list_architectures():
            _fail(f"architectures.{name}.family", arch["family"], list_architectures())
        _wrap(f"architectures.{name}.params", make_config, arch["family"], arch.get("params", {}))


def _check_methods(config: dict[str, Any]) -> None:
    """Known methods with valid params and recipes; init_from chains that end."""
    parents = list(config["methods"]) + list(config["pretrained"])
    for name in config["methods"]:
        variant = training_variant(config, name)
        if variant["method"] not in METHODS.names():
            _fail(f"methods.{name}.method", variant["method"], METHODS.names())
        _wrap(f"methods.{name}.params", METHODS.make_params, variant["method"], variant["params"])
        _wrap("", registry.build_params, Recipe, variant["recipe"], f"config methods.{name}.recipe")
        if variant["init_from"] is not None and variant["init_from"] not in parents:
            _fail(f"methods.{name}.init_from", variant["init_from"], parents)
    for name in config["methods"]:
        chain = [name]
        while (parent := training_variant(config, chain[-1])["init_from"]) is not None:
            if parent in chain:
                raise ConfigError(
                    f"config methods.{name}.init_from: {' -> '.join(chain + [parent])} is a cycle; "
                    "allowed: a chain that ends at a variant trained from scratch"
                )
            chain.append(parent)


def _check_posthoc(config: dict[str, Any]) -> None:
    bases = list(config["methods"]) + list(config["pretrained"])
    for name in config["posthoc"]:
        variant = posthoc_variant(config, name)
        if variant["method"] not in POSTHOC.names():
            _fail(f"posthoc.{name}.method", variant["method"], POSTHOC.names())
        _wrap(f"posthoc.{name}.params", POSTHOC.make_params, variant["method"], variant["params"])
        if variant["base"] not in bases:
            _fail(f"posthoc.{name}.base", variant["base"], bases)


def _check_experiments(config: dict[str, Any]) -> None:
    """Configured names only; every method on an architecture that offers what it needs; every
    architecture buildable on every dataset it runs on."""
    built: set[tuple[str, str]] = set()
    for i, exp in enumerate(config["experiments"]):
        for key in ("datasets", "architectures", "methods", "pretrained", "posthoc"):
            for value in exp.get(key, []):
                if value not in config[key]:
                    _fail(f"experiments[{i}].{key}", value, list(config[key]))
        for arch in exp["architectures"]:
            for variant in exp.get("methods", []) + exp.get("pretrained", []):
                _check_capabilities(config, variant, arch, f"experiments[{i}]")
            for dataset in exp["datasets"]:
                for variant in exp.get("methods", []):
                    _wrap(f"recipe for {dataset}/{variant}", recipe_for, config, dataset, variant)
                if (arch, dataset) not in built:
                    _check_buildable(config, arch, dataset)
                    built.add((arch, dataset))


def _check_latency(config: dict[str, Any], fail) -> None:
    """The latency section names configured variants, architectures and datasets and selects at
    least one cell; Table 1 in milliseconds needs its (dataset, architecture) measured."""
    spec = config.get("latency")
    table = config["report"].get("table1")
    in_ms = [("report.table1", table)] if table is not None and table.get("budget_unit", "flops") == "ms" else []
    in_ms += [
        (f"report.comparison_budgets[{i}]", entry)
        for i, entry in enumerate(config["report"].get("comparison_budgets", []))
        if entry.get("budget_unit", "flops") == "ms"
    ]
    if spec is None:
        for where, entry in in_ms:
            raise ConfigError(
                f"config {where}.budget_unit: 'ms' needs a latency section measuring "
                f"{entry['dataset']}/{entry['architecture']}; allowed without one: flops"
            )
        return
    variants = list(config["methods"]) + list(config["posthoc"])
    for key, allowed in (
        ("variants", variants),
        ("architectures", list(config["architectures"])),
        ("datasets", list(config["datasets"])),
    ):
        for value in spec.get(key) or []:
            if value not in allowed:
                fail(f"latency.{key}", value, allowed)
    if not latency_cells(config):
        raise ConfigError(
            "config latency: selects no cell of the experiments; allowed: variants, architectures "
            "and datasets that some experiment combines"
        )
    measured = set(latency_cells(config))
    for cell in table1_latency_cells(config):
        if cell not in measured:
            raise ConfigError(
                f"config report.table1.latency_variant: {cell.path} is not measured by the latency "
                "section; allowed: a latency variant run on Table 1's dataset and architecture"
            )
    for cell in comparison_latency_cells(config):
        if cell not in measured:
            raise ConfigError(
                f"config report.comparison_budgets: the entry on {cell.dataset}/{cell.arch} has budget_unit ms, "
                f"but {cell.path} is not measured by the latency section; allowed: a latency_variant that the "
                "latency section runs on that dataset and architecture"
            )


def _check_capabilities(config: dict[str, Any], variant: str, arch: str, where: str) -> None:
    """A method that needs what an architecture does not offer (EENets' confidence branches) is
    refused here, naming both, instead of failing in its first training step."""

    method = training_variant(config, variant)["method"]
    family = config["architectures"][arch]["family"]
    missing = METHODS.get(method).requires - get_architecture(family).network_class.capabilities
    if missing:
        raise ConfigError(
            f"config {where}: method {variant!r} ({method}) cannot train architecture {arch!r} ({family}): "
            f"it needs {', '.join(sorted(missing))}, which {family} does not offer; allowed: an architecture "
            f"whose family offers it ({', '.join(_families_offering(METHODS.get(method).requires))})"
        )


def _families_offering(capabilities: frozenset[str]) -> list[str]:

    return [f for f in list_architectures() if capabilities <= get_architecture(f).network_class.capabilities]


def _check_pretrained(config: dict[str, Any], fail) -> None:
    """Pretrained variants: known names and formats, a checkpoint for every cell that uses one, and
    a val split the checkpoint was not trained on."""

    for dataset, spec in config["datasets"].items():
        if spec.get("val_from") == "test" and dataset_info(dataset, config).test_fraction is not None:
            fail(
                f"datasets.{dataset}.val_from",
                "test",
                f"train ({dataset} has no test set of its own: its test split is carved from the same pool)",
            )
    for name in config["pretrained"]:
        where = f"pretrained.{name}"
        if name in config["methods"] or name in config["posthoc"]:
            raise ConfigError(
                f"config {where}: {name!r} also names a training or post-hoc variant; "
                "allowed: a name used once across methods, pretrained and posthoc"
            )
        spec = pretrained_variant(config, name)
        if spec["dataset"] not in config["datasets"]:
            fail(f"{where}.dataset", spec["dataset"], list(config["datasets"]))
        if spec["format"] not in FORMATS:
            fail(f"{where}.format", spec["format"], list(FORMATS))
        fmt = FORMATS[spec["format"]]
        for arch in spec["checkpoints"]:
            if arch not in config["architectures"]:
                fail(f"{where}.checkpoints", arch, list(config["architectures"]))
            family = config["architectures"][arch]["family"]
            if family not in fmt.families:
                raise ConfigError(
                    f"config {where}.checkpoints.{arch}: {arch!r} is a {family} architecture, but "
                    f"format {fmt.name!r} ({fmt.repository}) holds {' or '.join(fmt.families)} "
                    "checkpoints; allowed: an architecture of that family"
                )
        if spec["method"] not in METHODS.names():
            fail(f"{where}.method", spec["method"], METHODS.names())
        _wrap(f"{where}.params", METHODS.make_params, spec["method"], spec["params"])
    used = [c for c in cells(config) if is_pretrained(config, c.variant)]
    for cell in used:
        spec = pretrained_variant(config, cell.variant)
        if cell.dataset != spec["dataset"]:
            raise ConfigError(
                f"config experiments: pretrained variant {cell.variant!r} holds checkpoints for dataset "
                f"{spec['dataset']!r}; it is not allowed on dataset {cell.dataset!r}"
            )
        if cell.arch not in spec["checkpoints"]:
            raise ConfigError(
                f"config pretrained.{cell.variant}.checkpoints: no checkpoint for architecture "
                f"{cell.arch!r}, which the experiments run it on (or a variant initialised from it); "
                f"allowed architectures: {', '.join(spec['checkpoints'])}"
            )
    for dataset in sorted({c.dataset for c in used}):
        _check_held_out(config, dataset, sorted({c.variant for c in used if c.dataset == dataset}))
    for dataset, spec in config["datasets"].items():
        if "val_indices" in spec and val_from(config, dataset) == "test":
            raise ConfigError(
                f"config datasets.{dataset}.val_indices: not used, since datasets.{dataset}.val_from is 'test' "
                f"(val is drawn from the test set); allowed: no val_indices, or datasets.{dataset}.val_from: train"
            )


def _check_held_out(config: dict[str, Any], dataset: str, names: list[str]) -> None:
    """Refuse a pretrained variant whose training images may be in the val split (or, for a dataset
    without a test set of its own, the test split): thresholds calibrated on images the network was
    trained on are biased, all of them."""
    if val_from(config, dataset) == "test" or held_out_file(config, dataset) is not None:
        return
    raise ConfigError(
        f"config pretrained.{names[0]}: its checkpoints may have been trained on any image of {dataset}'s training "
        f"pool, from which the harness draws its val split, and calibrating exit thresholds on images a "
        "network was trained on biases every threshold. Give the indices of the images its training held "
        f"out (datasets.{dataset}.val_indices: the index.pth the reference code writes with --use-valid), or draw "
        f"val from the test set (datasets.{dataset}.val_from: test, with a val_size below the test set's size)"
    )


def check_pretrained_files(config: dict[str, Any]) -> None:
    """Every checkpoint (and held-out index file) the experiments use exists: checked at workflow
    start, as the data is, so that a dry run plans without them."""
    seen = set()
    for cell in cells(config):
        if not is_pretrained(config, cell.variant) or (cell.variant, cell.arch) in seen:
            continue
        seen.add((cell.variant, cell.arch))
        spec = pretrained_variant(config, cell.variant)
        fetch = f"; download it from {spec['source']}" if spec.get("source") else ""
        path = spec["checkpoints"][cell.arch]
        if not Path(path).is_file():
            raise ConfigError(
                f"config pretrained.{cell.variant}.checkpoints.{cell.arch}: {path!r} "
                f"({Path(path).resolve()}) is not a file{fetch}, or set the path to where it is"
            )
    for dataset in sorted({c.dataset for c in cells(config)}):
        path = held_out_file(config, dataset)
        if path is not None and not Path(path).is_file():
            raise ConfigError(
                f"config datasets.{dataset}.val_indices: {path!r} ({Path(path).resolve()}) is not a "
                "file, or set the path to where it is"
            )


def _check_buildable(config: dict[str, Any], arch: str, dataset: str) -> None:
    """The checks a network runs on its config and the dataset's input size before it allocates
    anything (a scale list that does not fit the input, early exits that do not fit the depth),
    without building it: milliseconds, where building even on the meta device takes seconds."""

    family, params = architecture(config, arch)
    spec = dataset_info(dataset, config).input  # what the network is built for: compatibility is its own checks
    try:
        arch_config = make_config(family, params)
        validate = getattr(arch_config, "validate", None)
        if validate is not None and "input_size" in inspect.signature(validate).parameters:
            validate(spec.size)  # msdnet, ranet: scales that fit the input size
        if family == "ee_resnet":
            exit_positions(arch_config, resnet_plan(arch_config, spec))  # early exits that fit the depth
    except (ValueError, TypeError, KeyError) as err:
        message = err.args[0] if err.args else str(err)
        raise ConfigError(
            f"config architectures.{arch}.params (on dataset {dataset!r}, {spec.channels}x{spec.size}x"
            f"{spec.size} images, datasets.{dataset}): {message}"
        ) from None


def _check_report(config: dict[str, Any], fail) -> None:
    """Names in the report section must be configured datasets, architectures and variants."""
    report = config["report"]
    variants = list(config["methods"]) + list(config["pretrained"]) + list(config["posthoc"])
    known = {"datasets": list(config["datasets"]), "architectures": list(config["architectures"]), "variants": variants}
    for name, spec in report.get("figures", {}).items():
        for key, allowed in known.items():
            for value in spec.get(key, []):
                if value not in allowed:
                    fail(f"report.figures.{name}.{key}", value, allowed)
        if "reference" in spec and spec["reference"] not in variants:
            fail(f"report.figures.{name}.reference", spec["reference"], variants)
    for i, entry in enumerate(report.get("comparison_budgets", [])):
        for key, allowed in (("dataset", known["datasets"]), ("architecture", known["architectures"])):
            if entry[key] not in allowed:
                fail(f"report.comparison_budgets[{i}].{key}", entry[key], allowed)
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
            if row.get("variant", eenets["variant"]) not in config["methods"]:
                fail(f"report.eenets_table.rows[{i}].variant", row.get("variant"), list(config["methods"]))
            for key, allowed in (
                ("dataset", known["datasets"]),
                ("architecture", known["architectures"]),
                ("plain", known["architectures"]),
            ):
                if row[key] not in allowed:
                    fail(f"report.eenets_table.rows[{i}].{key}", row[key], allowed)


def check_data(config: dict[str, Any]) -> None:
    """Every dataset of the experiments is where its declaration says, and holds what it declares
    (image size, channels, classes): a missing or mismatched dataset fails at workflow start, not
    in the first job that reads it. With ``download`` on, datasets that torchvision can fetch are
    left to the split job."""
    used = sorted({d for exp in config["experiments"] for d in exp["datasets"]})
    for dataset in used:
        spec = dataset_info(dataset, config)
        if config["download"] and spec.torchvision_download:
            continue
        try:
            check_files(spec, config["data_dir"])
        except DatasetError as err:
            raise ConfigError(
                f"config {err}" if str(err).startswith("datasets.") else f"config data_dir / datasets.{dataset}: {err}"
            ) from None


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


def _wrap(where: str, fn: Any, *args: Any) -> Any:
    """``fn(*args)``, its ValueError, TypeError or KeyError as a ConfigError at ``where``."""
    try:
        return fn(*args)
    except (ValueError, TypeError, KeyError) as err:
        message = err.args[0] if err.args else str(err)
        raise ConfigError(f"config {where}: {message}" if where else str(message)) from None


def resolved_cell_config(config: dict[str, Any], cell: Cell) -> dict[str, Any]:
    """Everything that defines a cell, for its provenance record."""
    family, params = architecture(config, cell.arch)
    out: dict[str, Any] = {
        "dataset": cell.dataset,
        "architecture": cell.arch,
        "family": family,
        "arch_params": params,
        "variant": cell.variant,
        "seed": cell.seed,
        "split_seed": config["split_seed"],
        "flops_convention": config["flops_convention"],
        "dataset_declaration": declaration(cell.dataset, config),  # format, files, size, augmentation, ...
    }
    if is_posthoc(config, cell.variant):
        out["posthoc"] = copy.deepcopy(posthoc_variant(config, cell.variant))
    elif is_pretrained(config, cell.variant):
        spec = copy.deepcopy(pretrained_variant(config, cell.variant))
        path = spec.pop("checkpoints")[cell.arch]
        out["pretrained"] = {**spec, "checkpoint": path, "checkpoint_hash": content_hash(path)}
        out["method"] = copy.deepcopy(training_variant(config, cell.variant))
    else:
        out["method"] = copy.deepcopy(training_variant(config, cell.variant))
        out["recipe"] = dataclasses.asdict(recipe_for(config, cell.dataset, cell.variant))
    return out


def figure_spec(config: dict[str, Any], figure: str) -> dict[str, Any]:
    """A figure's report entry, with its reference variant: the one given, else ``standard`` where
    the figure draws it, else the figure's first variant. A figure the config does not list draws
    every cell."""

    spec = dict(config["report"].get("figures", {}).get(figure, {}))
    if "reference" not in spec:
        drawn = spec.get("variants") or all_variants(config)
        spec["reference"] = "standard" if "standard" in drawn else drawn[0]
    return spec


def figure_selects(config: dict[str, Any], figure: str, cell: Cell) -> bool:
    """Is ``cell`` drawn in ``figure`` (its datasets, architectures and variants; none listed = all)?"""
    spec = figure_spec(config, figure)
    return all(
        spec.get(key) is None or value in spec[key]
        for key, value in (("datasets", cell.dataset), ("architectures", cell.arch), ("variants", cell.variant))
    )


def comparison_settings(config: dict[str, Any], figure_kinds: dict[str, str]) -> dict[str, Any]:
    """What the paired comparisons depend on: each figure's selection, curve kind and reference,
    the comparison budgets, Table 1's budgets (the default ones on its dataset and architecture),
    the variants' labels and the bootstrap settings."""

    report = config["report"]
    table = report.get("table1")
    return {
        "figures": {name: {**figure_spec(config, name), "kind": kind} for name, kind in figure_kinds.items()},
        "budgets": copy.deepcopy(report.get("comparison_budgets", [])),
        "table1": None
        if table is None
        else {k: table.get(k, "flops") for k in ("dataset", "architecture", "budgets", "budget_unit")},
        "labels": {name: variant_label(config, name) for name in variant_names(config)},
        "bootstrap": dict(config["bootstrap"]),
    }

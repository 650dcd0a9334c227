import sys

sys.path.insert(0, workflow.basedir)

from eebench import smk  # noqa: E402
from eebench.config import Cell, architecture, cell_fingerprint, cells, check_config, check_data  # noqa: E402
from eebench.config import is_posthoc, posthoc_variant, training_variant, val_size, validate_schema  # noqa: E402
from eebench.config import check_pretrained_files, pretrained_variant, split_identity  # noqa: E402
from eebench.config import comparison_settings, dataset_declared, figure_selects  # noqa: E402
from eebench.datasets import dataset_info  # noqa: E402
from eebench.style import styles_for  # noqa: E402
from eebench.config import dependencies, latency_cells, table1_latency_cells  # noqa: E402


# the schema (types, structure; fills defaults), then the registries: a bad config fails here, naming
# the key, the value and what is allowed, before any job starts
validate_schema(config)  # config/schema.yaml
check_config(config)


onstart:
    # not in a dry run (-n), so a run can be planned on a machine without the datasets
    check_data(config)
    check_pretrained_files(config)


CELLS = cells(config)
RESULTS = "results"
PUBLISHED = f"{workflow.basedir}/config/published.yaml"
BOOTSTRAP = config["bootstrap"]  # a rule parameter wherever intervals are computed
CELL = "{dataset}/{arch}/{variant}/seed{seed}"
# figure name -> the aggregate it is drawn from
FIGURES = {
    "fig2_anytime": "anytime",
    "fig3_budgeted": "budgeted",
    "fig4_posthoc": "budgeted",
    "fig5_imagenet": "both",
}


wildcard_constraints:
    dataset=smk.alternatives(config["datasets"]),
    arch=smk.alternatives(config["architectures"]),
    variant=smk.alternatives(list(config["methods"]) + list(config.get("pretrained", {})) + list(config.get("posthoc", {}))),
    seed=r"\d+",


def cell_of(wildcards):
    return Cell(wildcards.dataset, wildcards.arch, wildcards.variant, int(wildcards.seed))


def cell_path(cell):
    return f"{cell.dataset}/{cell.arch}/{cell.variant}/seed{cell.seed}"


def init_weights(wildcards):
    """The weights a training variant starts from (``init_from``), if any."""
    parent = training_variant(config, wildcards.variant)["init_from"]
    if parent is None:
        return []
    cell = Cell(wildcards.dataset, wildcards.arch, parent, int(wildcards.seed))
    return f"{RESULTS}/train/{cell_path(cell)}/weights.pt"


def posthoc_base(wildcards, part):
    base = posthoc_variant(config, wildcards.variant)["base"]
    cell = Cell(wildcards.dataset, wildcards.arch, base, int(wildcards.seed))
    return f"{RESULTS}/cache/{cell_path(cell)}/{part}.pt"


def posthoc_inputs(wildcards):
    spec = posthoc_variant(config, wildcards.variant)
    inputs = {
        "val": posthoc_base(wildcards, "val"),
        "test": posthoc_base(wildcards, "test"),
        "flops": f"{RESULTS}/flops/{wildcards.dataset}/{wildcards.arch}.json",
    }
    if smk.posthoc_needs_train_split(spec["method"]):
        inputs["train"] = posthoc_base(wildcards, "train")
    return inputs


def scored_split(wildcards, part):
    """What a cell is evaluated on: its own cache, or its post-hoc method's scores."""
    stage = "posthoc" if is_posthoc(config, wildcards.variant) else "cache"
    return f"{RESULTS}/{stage}/{cell_path(cell_of(wildcards))}/{part}.pt"


def scored_val(wildcards):
    return scored_split(wildcards, "val")


def scored_test(wildcards):
    return scored_split(wildcards, "test")


def curve_files(kind, selected=None):
    chosen = [c for c in CELLS if selected is None or selected(c)]
    return [f"{RESULTS}/curves/{cell_path(c)}/{kind}.csv" for c in chosen]


def provenance_files(selected=None):
    chosen = [c for c in CELLS if selected is None or selected(c)]
    return [f"{RESULTS}/curves/{cell_path(c)}/provenance.json" for c in chosen]


def dataset_resources(wildcards):
    return config["datasets"][wildcards.dataset].get("resources", {})


def train_resources(wildcards, attempt):
    """Runtime in minutes: the dataset's configured value, doubled on each retry."""
    return dataset_resources(wildcards).get("train_runtime", 60) * 2 ** (attempt - 1)


def infer_runtime(wildcards, attempt):
    return dataset_resources(wildcards).get("infer_runtime", 60) * 2 ** (attempt - 1)


def train_gpus(wildcards):
    """GPUs of a training job; more than one trains with DDP under torchrun."""
    return dataset_resources(wildcards).get("gpus", 1)


def cpus_per_gpu(wildcards):
    """CPU cores per GPU of the train and infer jobs on a cluster (data-loading workers)."""
    return dataset_resources(wildcards).get("cpus_per_gpu", 2)


def train_mem(wildcards):
    return dataset_resources(wildcards).get("mem_mb", 4000)


def figure_spec(wildcards):
    return config.get("report", {}).get("figures", {}).get(wildcards.figure, {})


def figure_kind(wildcards):
    return FIGURES[wildcards.figure]


def split_settings(wildcards):
    """What a split depends on (a rerun trigger: a changed split_seed rebuilds the split)."""
    declared = dataset_declared(config, wildcards.dataset)  # a config's own declaration (files, format, ...)
    return {"dataset": wildcards.dataset, "split_seed": config["split_seed"],
            "val_size": val_size(config, wildcards.dataset), **split_identity(config, wildcards.dataset),
            **({"declaration": declared} if declared else {})}


def flops_settings(wildcards):
    """What a FLOPs record depends on (a rerun trigger: changed architecture parameters recount)."""
    family, params = architecture(config, wildcards.arch)
    settings = {"family": family, "params": params, "convention": config["flops_convention"]}
    if dataset_declared(config, wildcards.dataset):  # the input the network is built for may differ
        spec = dataset_info(wildcards.dataset, config).input
        settings["input"] = [spec.channels, spec.size, spec.num_classes]
    return settings


def table1_flops(wildcards):
    spec = report_spec("table1")
    return f"{RESULTS}/flops/{spec['dataset']}/{spec['architecture']}.json" if spec else []


def training_fingerprint(wildcards):
    """Changes when anything that determines the cell's weights changes (a rerun trigger)."""
    return cell_fingerprint(config, cell_of(wildcards))


def pretrained_checkpoint(wildcards):
    """The checkpoint file a pretrained variant's weights are converted from (a param, not an
    input, so that a dry run plans without it; its content hash is in the fingerprint)."""
    return pretrained_variant(config, wildcards.variant)["checkpoints"][wildcards.arch]


def posthoc_settings(wildcards):
    return posthoc_variant(config, wildcards.variant)


def evaluation_settings(wildcards):
    """What an evaluation depends on beyond its input files."""
    if is_posthoc(config, wildcards.variant):
        return {"posthoc": posthoc_variant(config, wildcards.variant)}
    return {"method": training_variant(config, wildcards.variant)["method"]}


def report_spec(name):
    return config.get("report", {}).get(name)


def table1_cells():
    """Only the cells Table 1 needs, so that `snakemake results/table1.csv` builds no more."""
    spec = report_spec("table1")
    if spec is None:
        return []
    seeds = spec.get("seeds", config["seeds"])
    return [Cell(spec["dataset"], spec["architecture"], v, s) for v in spec["rows"].values() for s in seeds]


def eenets_cells():
    spec = report_spec("eenets_table")
    if spec is None:
        return []
    seeds = spec.get("seeds", config["seeds"])
    out = []
    for row in spec["rows"]:
        for seed in seeds:
            out.append(Cell(row["dataset"], row["architecture"], row.get("variant", spec["variant"]), seed))
            out.append(Cell(row["dataset"], row["plain"], spec["plain_variant"], seed))
    return out


def cell_curves(selected, kind):
    return [f"{RESULTS}/curves/{cell_path(c)}/{kind}.csv" for c in selected]


def cell_provenance(selected):
    return [f"{RESULTS}/curves/{cell_path(c)}/provenance.json" for c in selected]


def eenets_flops(wildcards):
    spec = report_spec("eenets_table") or {"rows": []}
    return [f"{RESULTS}/flops/{row['dataset']}/{row['architecture']}.json" for row in spec["rows"]]


def cell_samples(selected):
    """The per-sample records (``samples.pt``) of the selected cells, for the intervals."""
    return [f"{RESULTS}/curves/{cell_path(c)}/samples.pt" for c in selected]


def figure_style(wildcards):
    """Colour, marker, line style and label of every variant (the same in every figure), the
    marker fill of every architecture, and the FLOPs convention named in the caption."""
    return styles_for(config)


def comparison_cells():
    """The cells of every figure that has its reference variant, for results/comparisons.csv."""
    return [c for c in CELLS if any(figure_selects(config, name, c) for name in FIGURES)]


def comparison_spec():
    """Everything the comparisons job reads from the config (a rerun trigger)."""
    return comparison_settings(config, FIGURES)


# --- latency (opt-in: the config's latency section) ---------------------------------------------
LATENCY_CELLS = latency_cells(config)


def latency_inputs(wildcards):
    """The training cell's weights (a post-hoc cell's base), the cell's thresholds (its budgeted
    curve) and, for a post-hoc cell, its fitted scorer (saved with its test scores)."""
    cell = cell_of(wildcards)
    training_cell = dependencies(config, cell)[0] if is_posthoc(config, cell.variant) else cell
    inputs = {
        "weights": f"{RESULTS}/train/{cell_path(training_cell)}/weights.pt",
        "split": f"{RESULTS}/splits/{wildcards.dataset}.npz",
        "flops": f"{RESULTS}/flops/{wildcards.dataset}/{wildcards.arch}.json",
        "budgeted": f"{RESULTS}/curves/{cell_path(cell)}/budgeted.csv",
    }
    if is_posthoc(config, cell.variant):
        inputs["posthoc"] = f"{RESULTS}/posthoc/{cell_path(cell)}/test.pt"
    return inputs


def latency_settings(wildcards):
    """What a latency table depends on beyond its input files (a rerun trigger)."""
    cell = cell_of(wildcards)
    training_cell = dependencies(config, cell)[0] if is_posthoc(config, cell.variant) else cell
    how = {k: v for k, v in config["latency"].items() if k not in ("variants", "architectures", "datasets")}
    return {"latency": how, "fingerprint": cell_fingerprint(config, training_cell),
            "infer_batch_size": config["infer_batch_size"], **evaluation_settings(wildcards)}


def latency_threads(wildcards):
    return config["latency"]["threads"] or 1


def latency_gpus(wildcards):
    return 1 if config["latency"]["device"].startswith("cuda") else 0


def latency_files(kind, selected=None):
    """Each measured cell's latency table: ``budgets`` ({cell}.csv) or ``exits`` ({cell}_exits.csv)."""
    suffix = "" if kind == "budgets" else "_exits"
    return [f"{RESULTS}/latency/{cell_path(c)}{suffix}.csv" for c in (LATENCY_CELLS if selected is None else selected)]


def latency_figures(wildcards=None):
    return [f"{RESULTS}/figures/latency.{ext}" for ext in ("pdf", "png")] if LATENCY_CELLS else []


def table1_latency(wildcards):
    """Per-exit latency of Table 1's architecture, when its budgets are in milliseconds."""
    return latency_files("exits", table1_latency_cells(config))

import sys

sys.path.insert(0, workflow.basedir)

from eebench import smk  # noqa: E402
from eebench.config import CELL_PATTERN, FIGURE_KINDS, Cell, cell_fingerprint, cells, check_config  # noqa: E402
from eebench.config import check_data, check_pretrained_files  # noqa: E402
from eebench.config import (
    comparison_latency_cells,
    comparison_settings,
    dependencies,
    figure_selects,
    is_posthoc,
    latency_cells,
)  # noqa: E402
from eebench.config import posthoc_variant, pretrained_variant, split_identity, table1_latency_cells  # noqa: E402
from eebench.config import training_variant, validate_schema  # noqa: E402
from eebench.specs import job_spec  # noqa: E402
from eebench.style import all_variants, styles_for  # noqa: E402

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
CELL = CELL_PATTERN
FIGURES = FIGURE_KINDS


wildcard_constraints:
    dataset=smk.alternatives(config["datasets"]),
    arch=smk.alternatives(config["architectures"]),
    variant=smk.alternatives(all_variants(config)),
    seed=r"\d+",


def cell_of(wildcards):
    return Cell(wildcards.dataset, wildcards.arch, wildcards.variant, int(wildcards.seed))


def cell_path(cell):
    return cell.path


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


def train_runtime(wildcards, attempt):
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


# Every job gets the part of the config it reads as params.spec (eebench.specs): the spec it
# computes from is the spec whose change reruns it.
def split_spec(wildcards):
    return job_spec(config, "split", dataset=wildcards.dataset)


def split_files(wildcards):
    """The content of the files a split is made from beyond the data (held-out indices)."""
    return split_identity(config, wildcards.dataset)


def flops_spec(wildcards):
    return job_spec(config, "flops", dataset=wildcards.dataset, arch=wildcards.arch)


def cell_spec(rule):
    """The params.spec function of a per-cell rule."""
    return lambda wildcards: job_spec(config, rule, cells=[cell_of(wildcards)])


def aggregate_spec(selected):
    return job_spec(config, "aggregate", cells=selected)


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


def comparison_latency(wildcards):
    """Per-exit latency of each comparison_budgets entry in milliseconds."""
    return latency_files("exits", comparison_latency_cells(config))

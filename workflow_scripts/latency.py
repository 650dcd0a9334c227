import sys

sys.path.insert(0, snakemake.scriptdir + "/..")

from eebench import smk  # noqa: E402
from eebench.pipeline import latency_cell  # noqa: E402

with smk.logged(snakemake):
    latency_cell(
        smk.job_config(snakemake),
        smk.cell(snakemake),
        weights=snakemake.input.weights,
        split_path=snakemake.input.split,
        flops_path=snakemake.input.flops,
        budgeted_path=snakemake.input.budgeted,
        outs={"budgets": snakemake.output.budgets, "exits": snakemake.output.exits},
        posthoc_path=snakemake.input.get("posthoc"),
    )

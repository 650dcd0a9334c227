import sys

sys.path.insert(0, snakemake.scriptdir + "/..")

from eebench import smk  # noqa: E402
from eebench.pipeline import aggregate, aggregate_summary  # noqa: E402

with smk.logged(snakemake):
    for kind in ("anytime", "budgeted"):
        if kind in snakemake.output.keys():
            aggregate(
                smk.job_config(snakemake),
                snakemake.params.cells,
                snakemake.input[kind],
                snakemake.input.provenance,
                snakemake.output[kind],
            )
    if "anytime_summary" in snakemake.output.keys():
        aggregate_summary(
            snakemake.params.spec["bootstrap"],
            snakemake.params.cells,
            snakemake.input.samples,
            {kind: snakemake.output[kind] for kind in ("anytime", "budgeted")},
            {kind: snakemake.output[f"{kind}_summary"] for kind in ("anytime", "budgeted")},
        )

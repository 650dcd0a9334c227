import sys

sys.path.insert(0, snakemake.scriptdir + "/..")

from eebench import smk
from eebench.pipeline import aggregate

with smk.logged(snakemake):
    for kind in ("anytime", "budgeted"):
        aggregate(
            snakemake.config,
            snakemake.params.cells,
            snakemake.input[kind],
            snakemake.input.provenance,
            snakemake.output[kind],
        )

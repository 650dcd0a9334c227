import sys

sys.path.insert(0, snakemake.scriptdir + "/..")

from eebench import smk  # noqa: E402
from eebench.pipeline import aggregate  # noqa: E402

with smk.logged(snakemake):
    for kind in ("anytime", "budgeted"):
        if kind in snakemake.output.keys():
            aggregate(
                snakemake.config,
                snakemake.params.cells,
                snakemake.input[kind],
                snakemake.input.provenance,
                snakemake.output[kind],
            )

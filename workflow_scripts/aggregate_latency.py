import sys

sys.path.insert(0, snakemake.scriptdir + "/..")

from eebench import smk  # noqa: E402
from eebench.latency_report import aggregate_latency  # noqa: E402

with smk.logged(snakemake):
    cells = snakemake.params.cells
    aggregate_latency(cells, list(snakemake.input.budgets), snakemake.output.budgets)
    aggregate_latency(cells, list(snakemake.input.exits), snakemake.output.exits)

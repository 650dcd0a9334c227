import sys

sys.path.insert(0, snakemake.scriptdir + "/..")

from eebench import smk
from eebench.pipeline import infer_cell

with smk.logged(snakemake):
    infer_cell(
        smk.job_config(snakemake),
        smk.cell(snakemake),
        weights=snakemake.input.weights,
        split_path=snakemake.input.split,
        flops_path=snakemake.input.flops,
        outs=dict(snakemake.output.items()),
    )

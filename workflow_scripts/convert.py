import sys

sys.path.insert(0, snakemake.scriptdir + "/..")

from eebench import smk
from eebench.pipeline import convert_cell

with smk.logged(snakemake):
    convert_cell(
        smk.job_config(snakemake),
        smk.cell(snakemake),
        flops_path=snakemake.input.flops,
        weights_out=snakemake.output.weights,
    )

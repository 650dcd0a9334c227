import sys

sys.path.insert(0, snakemake.scriptdir + "/..")

from eebench import smk
from eebench.pipeline import train_cell

with smk.logged(snakemake):
    train_cell(
        snakemake.config,
        smk.cell(snakemake),
        split_path=snakemake.input.split,
        flops_path=snakemake.input.flops,
        weights_out=snakemake.output.weights,
        history_out=snakemake.output.history,
        state_dir=snakemake.params.state_dir,
        init_weights=snakemake.input.init or None,
    )

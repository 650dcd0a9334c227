import sys

sys.path.insert(0, snakemake.scriptdir + "/..")

from eebench import smk
from eebench.pipeline import posthoc_cell

with smk.logged(snakemake):
    posthoc_cell(
        smk.job_config(snakemake),
        smk.cell(snakemake),
        flops_path=snakemake.input.flops,
        val_cache=snakemake.input.val,
        test_cache=snakemake.input.test,
        train_cache=snakemake.input.get("train"),
        outs=dict(snakemake.output.items()),
    )

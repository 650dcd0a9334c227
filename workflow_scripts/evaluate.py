import sys

sys.path.insert(0, snakemake.scriptdir + "/..")

from eebench import smk
from eebench.pipeline import evaluate_cell

with smk.logged(snakemake):
    evaluate_cell(
        smk.job_config(snakemake),
        smk.cell(snakemake),
        val_path=snakemake.input.val,
        test_path=snakemake.input.test,
        flops_path=snakemake.input.flops,
        anytime_out=snakemake.output.anytime,
        budgeted_out=snakemake.output.budgeted,
        provenance_out=snakemake.output.provenance,
        samples_out=snakemake.output.samples,
    )

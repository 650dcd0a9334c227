import sys

sys.path.insert(0, snakemake.scriptdir + "/..")

from eebench import smk
from eebench.pipeline import write_flops

with smk.logged(snakemake):
    write_flops(smk.job_config(snakemake), snakemake.wildcards.dataset, snakemake.wildcards.arch, snakemake.output[0])

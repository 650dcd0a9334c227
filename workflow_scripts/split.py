import sys

sys.path.insert(0, snakemake.scriptdir + "/..")

from eebench import smk
from eebench.pipeline import write_split

with smk.logged(snakemake):
    write_split(smk.job_config(snakemake), snakemake.wildcards.dataset, snakemake.output[0])

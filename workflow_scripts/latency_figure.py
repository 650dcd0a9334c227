import sys

sys.path.insert(0, snakemake.scriptdir + "/..")

import pandas as pd  # noqa: E402

from eebench import smk  # noqa: E402
from eebench.latency_report import latency_figure  # noqa: E402

with smk.logged(snakemake):
    latency_figure(
        snakemake.params.style, pd.read_csv(snakemake.input.budgets), snakemake.output.pdf, snakemake.output.png
    )

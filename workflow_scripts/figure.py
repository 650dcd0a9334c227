import sys

sys.path.insert(0, snakemake.scriptdir + "/..")

import pandas as pd

from eebench import smk
from eebench.report import curve_figure, figure_panels

with smk.logged(snakemake):
    kind = snakemake.params.kind
    spec = snakemake.params.spec
    frame = pd.read_csv(snakemake.input[kind])
    title = spec.get("title", f"{kind} accuracy versus FLOPs")
    curve_figure(snakemake.config, frame, kind, figure_panels(frame, spec), title,
                 snakemake.output.pdf, snakemake.output.png)

import sys

sys.path.insert(0, snakemake.scriptdir + "/..")

import pandas as pd  # noqa: E402

from eebench import smk  # noqa: E402
from eebench.report import curve_figure, figure_panels  # noqa: E402

with smk.logged(snakemake):
    spec = snakemake.params.spec
    frames = {kind: pd.read_csv(snakemake.input[kind]) for kind in ("anytime", "budgeted")}
    panels = figure_panels(frames, spec, snakemake.params.kind)
    title = spec.get("title", snakemake.wildcards.figure)
    curve_figure(panels, title, snakemake.output.pdf, snakemake.output.png, snakemake.params.style)

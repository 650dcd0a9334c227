import sys

sys.path.insert(0, snakemake.scriptdir + "/..")

import pandas as pd  # noqa: E402

from eebench import io, smk  # noqa: E402
from eebench.bootstrap import BootstrapSettings  # noqa: E402
from eebench.config import check_budgets  # noqa: E402
from eebench.pipeline import read_flops  # noqa: E402
from eebench.report import table1, table_markdown  # noqa: E402
from eebench.summary import load_variants  # noqa: E402

with smk.logged(snakemake):
    spec = snakemake.params.spec
    settings = BootstrapSettings(**snakemake.params.bootstrap)
    check_budgets({"report": {"table1": spec}}, read_flops(snakemake.input.flops)["flops"])
    budgeted = pd.read_csv(snakemake.input.budgeted)
    variants = load_variants(snakemake.params.cells, snakemake.input.samples, settings)
    table = table1(budgeted, spec, variants)
    io.write_csv(snakemake.output.csv, table)
    seeds = "each seed's" if table["seeds"].max() <= 1 else "the seeds'"
    note = (f"Budgeted-batch top-1 accuracy (%) of the joint gater on {spec['dataset']} / "
            f"{spec['architecture']}, per input feature set. Each value is read off {seeds} budgeted curve "
            "by linear interpolation at the budget (MSDNet protocol, 39 budgets, thresholds from val), "
            f"then averaged over seeds ({int(table['seeds'].max())} here). In brackets: the "
            f"{settings.level:.0%} percentile bootstrap interval ({settings.resamples} resamples of the test "
            "set, the same interpolation within each resample; seeds resampled too where there are several).")
    io.write_text(snakemake.output.md, table_markdown(table, "Table 1", note))

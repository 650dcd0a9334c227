import sys

sys.path.insert(0, snakemake.scriptdir + "/..")

import pandas as pd  # noqa: E402

from eebench import io, smk  # noqa: E402
from eebench.config import check_budgets  # noqa: E402
from eebench.latency_report import with_time_axis  # noqa: E402
from eebench.pipeline import read_flops  # noqa: E402
from eebench.report import table1, table_markdown  # noqa: E402

with smk.logged(snakemake):
    spec = snakemake.params.spec
    check_budgets(snakemake.config, read_flops(snakemake.input.flops)["flops"])
    budgeted = pd.read_csv(snakemake.input.budgeted)
    if spec.get("budget_unit", "flops") == "ms":  # the curves' x-axis in measured ms per image
        exits = pd.concat([pd.read_csv(path).assign(dataset=c.dataset, architecture=c.arch, seed=c.seed)
                           for c, path in zip(snakemake.params.latency_cells, snakemake.input.latency)])
        budgeted = with_time_axis(budgeted, exits, spec["latency_batch_size"])
    table = table1(snakemake.config, budgeted, spec)
    io.write_csv(snakemake.output.csv, table)
    note = (f"Budgeted-batch top-1 accuracy (%) of the joint gater on {spec['dataset']} / "
            f"{spec['architecture']}, per input feature set. Each value is read off the budgeted curve "
            "by linear interpolation at the budget (MSDNet protocol, 39 budgets, thresholds from val), "
            "then averaged over seeds (± standard deviation when there are several).")
    if spec.get("budget_unit", "flops") == "ms":
        note += (f" Budgets are ms per image: each budget's expected time is sum_k (share leaving at exit k) x "
                 f"(measured cumulative ms of exit k, batch {spec['latency_batch_size']}, results/latency/).")
    io.write_text(snakemake.output.md, table_markdown(table, "Table 1", note))

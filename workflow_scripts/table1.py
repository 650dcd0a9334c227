import sys

sys.path.insert(0, snakemake.scriptdir + "/..")

import pandas as pd  # noqa: E402

from eebench import io, smk  # noqa: E402
from eebench.bootstrap import BootstrapSettings  # noqa: E402
from eebench.calibration import N_BUDGETS  # noqa: E402
from eebench.config import check_budgets  # noqa: E402
from eebench.latency_report import cell_exit_ms, latency_table, with_time_axis  # noqa: E402
from eebench.pipeline import read_flops  # noqa: E402
from eebench.report import table1, table_markdown  # noqa: E402
from eebench.summary import load_variants  # noqa: E402

with smk.logged(snakemake):
    spec = snakemake.params.spec
    settings = BootstrapSettings(**snakemake.params.bootstrap)
    check_budgets({"report": {"table1": spec}}, read_flops(snakemake.input.flops)["flops"])
    budgeted = pd.read_csv(snakemake.input.budgeted)
    per_exit_costs = None
    if spec.get("budget_unit", "flops") == "ms":  # the curves' x-axis in measured ms per image
        exits = latency_table(snakemake.params.latency_cells, list(snakemake.input.latency))
        budgeted = with_time_axis(budgeted, exits, spec["latency_batch_size"])
        per_exit_costs = cell_exit_ms(exits, spec["latency_batch_size"])
    variants = load_variants(snakemake.params.cells, snakemake.input.samples, settings, per_exit_costs)
    table = table1(budgeted, spec, variants)
    io.write_csv(snakemake.output.csv, table)
    seeds = "each seed's" if table["seeds"].max() <= 1 else "the seeds'"
    note = (
        f"Budgeted-batch top-1 accuracy (%) of the joint gater on {spec['dataset']} / "
        f"{spec['architecture']}, per input feature set. Each value is read off {seeds} budgeted curve "
        f"by linear interpolation at the budget (MSDNet protocol, {N_BUDGETS} budgets, thresholds from val), "
        f"then averaged over seeds ({int(table['seeds'].max())} here). In brackets: the "
        f"{settings.level:.0%} percentile bootstrap interval ({settings.resamples} resamples of the test "
        "set, the same interpolation within each resample; seeds resampled too where there are several)."
    )
    if spec.get("budget_unit", "flops") == "ms":
        note += (
            f" Budgets are ms per image: each budget's expected time is sum_k (share leaving at exit k) x "
            f"(measured cumulative ms of exit k, batch {spec['latency_batch_size']}, results/latency/)."
        )
    io.write_text(snakemake.output.md, table_markdown(table, "Table 1", note))

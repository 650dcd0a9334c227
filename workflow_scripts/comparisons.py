import sys

sys.path.insert(0, snakemake.scriptdir + "/..")


from eebench import io, smk  # noqa: E402
from eebench.bootstrap import BootstrapSettings  # noqa: E402
from eebench.comparisons import comparisons, comparisons_markdown  # noqa: E402
from eebench.latency_report import cell_exit_ms, latency_table  # noqa: E402
from eebench.summary import load_variants  # noqa: E402

with smk.logged(snakemake):
    spec = snakemake.params.spec
    settings = BootstrapSettings(**spec["bootstrap"])
    cells, samples = snakemake.params.cells, snakemake.input.samples
    variants = load_variants(cells, samples, settings)
    variants_in_ms = None
    if snakemake.params.latency_cells:  # report.comparison_budgets entries with budget_unit: ms
        exits = latency_table(snakemake.params.latency_cells, list(snakemake.input.latency))
        batch = {
            (e["dataset"], e["architecture"]): e["latency_batch_size"]
            for e in spec["budgets"]
            if e["budget_unit"] == "ms"
        }
        timed = [(c, path) for c, path in zip(cells, samples) if (c.dataset, c.arch) in batch]
        variants_in_ms = load_variants(
            [c for c, _ in timed],
            [path for _, path in timed],
            settings,
            lambda cell: cell_exit_ms(exits, batch[(cell.dataset, cell.arch)])(cell),
        )
    try:
        table = comparisons(variants, spec, variants_in_ms)
    except ValueError as err:
        raise io.CorruptFileError(str(err)) from None
    io.write_csv(snakemake.output.csv, table)
    io.write_text(snakemake.output.md, comparisons_markdown(table, spec["labels"]))

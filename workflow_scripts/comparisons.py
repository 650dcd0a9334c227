import sys

sys.path.insert(0, snakemake.scriptdir + "/..")

from eebench import io, smk  # noqa: E402
from eebench.bootstrap import BootstrapSettings  # noqa: E402
from eebench.comparisons import comparisons, comparisons_markdown  # noqa: E402
from eebench.summary import load_variants  # noqa: E402

with smk.logged(snakemake):
    spec = snakemake.params.spec
    variants = load_variants(snakemake.params.cells, snakemake.input.samples, BootstrapSettings(**spec["bootstrap"]))
    try:
        table = comparisons(variants, spec)
    except ValueError as err:
        raise io.CorruptFileError(str(err)) from None
    io.write_csv(snakemake.output.csv, table)
    io.write_text(snakemake.output.md, comparisons_markdown(table, spec["labels"]))

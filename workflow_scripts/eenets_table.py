import sys

sys.path.insert(0, snakemake.scriptdir + "/..")

from pathlib import Path  # noqa: E402

import pandas as pd  # noqa: E402

from eebench import io, smk  # noqa: E402
from eebench.report import eenets_table  # noqa: E402

with smk.logged(snakemake):
    flops = {"/".join(Path(p).with_suffix("").parts[-2:]): io.read_json(p) for p in snakemake.input.flops}
    table = eenets_table(pd.read_csv(snakemake.input.anytime), flops, snakemake.params.spec)
    io.write_csv(snakemake.output.csv, table)

import sys

sys.path.insert(0, snakemake.scriptdir + "/..")

import pandas as pd  # noqa: E402
import yaml  # noqa: E402

from eebench import io, smk  # noqa: E402
from eebench.report import reproduction_report  # noqa: E402

with smk.logged(snakemake):
    published = yaml.safe_load(open(snakemake.input.published))["published"]
    text = reproduction_report(published, pd.read_csv(snakemake.input.anytime),
                               pd.read_csv(snakemake.input.budgeted), snakemake.config.get("name", "custom"))
    io.write_text(snakemake.output[0], text)

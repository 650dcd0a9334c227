import sys

sys.path.insert(0, snakemake.scriptdir + "/..")

import yaml  # noqa: E402

from eebench import io, smk  # noqa: E402
from eebench.bootstrap import BootstrapSettings  # noqa: E402
from eebench.report import reproduction_report  # noqa: E402
from eebench.summary import load_variants  # noqa: E402

with smk.logged(snakemake):
    published = yaml.safe_load(open(snakemake.input.published))["published"]
    variants = load_variants(
        snakemake.params.cells, snakemake.input.samples, BootstrapSettings(**snakemake.params.bootstrap)
    )
    io.write_text(snakemake.output[0], reproduction_report(published, variants, snakemake.params.name))

# Early-exit harness: train every method, calibrate exit thresholds, count FLOPs, regenerate
# the papers' tables and figures. `snakemake --cores 2 all_figures` runs the embedded default.
from snakemake.utils import min_version

min_version("9.0")


# The embedded default only when no --configfile is given: Snakemake would otherwise merge a
# given config into the default, key by key, and the default's entries would leak into it.
if not workflow.overwrite_configfiles:

    configfile: f"{workflow.basedir}/config/config.yaml"


include: "rules/common.smk"
include: "rules/data.smk"
include: "rules/flops.smk"
include: "rules/train.smk"
include: "rules/pretrained.smk"
include: "rules/infer.smk"
include: "rules/posthoc.smk"
include: "rules/evaluate.smk"
include: "rules/report.smk"
include: "rules/latency.smk"


rule all:
    default_target: True
    input:
        rules.all_figures.input,
        rules.all_tables.input,


onsuccess:
    from eebench.timings import format_table, rule_time_table

    print(
        f"Per-rule times of the jobs with benchmark files ({RESULTS}/benchmarks; "
        "`python -m eebench timings` prints this again):"
    )
    print(format_table(rule_time_table(RESULTS)))

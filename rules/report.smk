rule figure:
    input:
        anytime=f"{RESULTS}/aggregate/anytime.csv",
        budgeted=f"{RESULTS}/aggregate/budgeted.csv",
    output:
        pdf=f"{RESULTS}/figures/{{figure}}.pdf",
        png=report(f"{RESULTS}/figures/{{figure}}.png", category="Figures"),
    log:
        f"{RESULTS}/logs/figures/{{figure}}.log",
    wildcard_constraints:
        figure=smk.alternatives(FIGURES),
    params:
        spec=figure_spec,
        kind=figure_kind,
    resources:
        mem_mb=2000,
        runtime=10,
    conda:
        "../environment.yml"
    script:
        "../workflow_scripts/figure.py"


rule all_figures:
    input:
        expand(f"{RESULTS}/figures/{{figure}}.{{ext}}", figure=FIGURES, ext=["pdf", "png"]),


rule all_tables:
    input:
        f"{RESULTS}/aggregate/budgeted.csv",

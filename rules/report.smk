rule figure:
    input:
        anytime=f"{RESULTS}/aggregate/anytime_summary.csv",
        budgeted=f"{RESULTS}/aggregate/budgeted_summary.csv",
    output:
        pdf=f"{RESULTS}/figures/{{figure}}.pdf",
        png=report(f"{RESULTS}/figures/{{figure}}.png", category="Figures"),
    log:
        f"{RESULTS}/logs/figures/{{figure}}.log",
    wildcard_constraints:
        figure=smk.alternatives(FIGURES),
    conda:
        "../environment.yml"
    resources:
        mem_mb=2000,
        runtime=10,
    params:
        spec=figure_spec,
        kind=figure_kind,
        style=figure_style,
    script:
        "../workflow_scripts/figure.py"


rule all_figures:
    input:
        expand(f"{RESULTS}/figures/{{figure}}.{{ext}}", figure=FIGURES, ext=["pdf", "png"]),
        latency_figures(),


rule aggregate_table1:
    input:
        budgeted=cell_curves(table1_cells(), "budgeted"),
        provenance=cell_provenance(table1_cells()),
    output:
        budgeted=f"{RESULTS}/aggregate/table1_budgeted.csv",
    log:
        f"{RESULTS}/logs/aggregate_table1.log",
    conda:
        "../environment.yml"
    resources:
        mem_mb=2000,
        runtime=10,
    params:
        spec=aggregate_spec(table1_cells()),
        cells=table1_cells(),
    script:
        "../workflow_scripts/aggregate.py"


rule table1:
    input:
        budgeted=f"{RESULTS}/aggregate/table1_budgeted.csv",
        flops=table1_flops,
        samples=cell_samples(table1_cells()),
        latency=table1_latency,
    output:
        csv=report(f"{RESULTS}/table1.csv", category="Tables"),
        md=f"{RESULTS}/table1.md",
    log:
        f"{RESULTS}/logs/table1.log",
    conda:
        "../environment.yml"
    resources:
        mem_mb=2000,
        runtime=10,
    params:
        spec=report_spec("table1"),
        cells=table1_cells(),
        bootstrap=BOOTSTRAP,
        latency_cells=table1_latency_cells(config),
    script:
        "../workflow_scripts/table1.py"


rule aggregate_eenets:
    input:
        anytime=cell_curves(eenets_cells(), "anytime"),
        provenance=cell_provenance(eenets_cells()),
    output:
        anytime=f"{RESULTS}/aggregate/eenets_anytime.csv",
    log:
        f"{RESULTS}/logs/aggregate_eenets.log",
    conda:
        "../environment.yml"
    resources:
        mem_mb=2000,
        runtime=10,
    params:
        spec=aggregate_spec(eenets_cells()),
        cells=eenets_cells(),
    script:
        "../workflow_scripts/aggregate.py"


rule eenets_table:
    input:
        anytime=f"{RESULTS}/aggregate/eenets_anytime.csv",
        flops=eenets_flops,
    output:
        csv=report(f"{RESULTS}/table_eenets.csv", category="Tables"),
    log:
        f"{RESULTS}/logs/table_eenets.log",
    conda:
        "../environment.yml"
    resources:
        mem_mb=2000,
        runtime=10,
    params:
        spec=report_spec("eenets_table"),
    script:
        "../workflow_scripts/eenets_table.py"


rule reproduction:
    input:
        published=PUBLISHED,
        samples=cell_samples(CELLS),
    output:
        report(f"{RESULTS}/reproduction.md", category="Tables"),
    log:
        f"{RESULTS}/logs/reproduction.log",
    conda:
        "../environment.yml"
    resources:
        mem_mb=2000,
        runtime=10,
    params:
        cells=CELLS,
        bootstrap=BOOTSTRAP,
        name=config.get("name", "custom"),
    script:
        "../workflow_scripts/reproduction.py"


rule comparisons:
    input:
        samples=cell_samples(comparison_cells()),
        latency=comparison_latency,
    output:
        csv=report(f"{RESULTS}/comparisons.csv", category="Tables"),
        md=f"{RESULTS}/comparisons.md",
    log:
        f"{RESULTS}/logs/comparisons.log",
    conda:
        "../environment.yml"
    resources:
        mem_mb=2000,
        runtime=10,
    params:
        cells=comparison_cells(),
        spec=comparison_spec(),
        latency_cells=comparison_latency_cells(config),
    script:
        "../workflow_scripts/comparisons.py"


rule all_tables:
    input:
        f"{RESULTS}/table1.csv",
        f"{RESULTS}/table1.md",
        f"{RESULTS}/table_eenets.csv",
        f"{RESULTS}/reproduction.md",
        f"{RESULTS}/comparisons.csv",
        f"{RESULTS}/comparisons.md",

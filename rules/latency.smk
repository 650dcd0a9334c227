rule latency:
    input:
        unpack(latency_inputs),
    output:
        budgets=f"{RESULTS}/latency/{CELL}.csv",
        exits=f"{RESULTS}/latency/{CELL}_exits.csv",
    log:
        f"{RESULTS}/logs/latency/{CELL}.log",
    benchmark:
        f"{RESULTS}/benchmarks/latency/{CELL}.tsv"
    conda:
        "../environment.yml"
    threads: latency_threads
    resources:
        gpu=latency_gpus,
        mem_mb=4000,
        runtime=30,
    params:
        spec=cell_spec("latency"),
    script:
        "../workflow_scripts/latency.py"


rule aggregate_latency:
    input:
        budgets=latency_files("budgets"),
        exits=latency_files("exits"),
    output:
        budgets=f"{RESULTS}/aggregate/latency.csv",
        exits=f"{RESULTS}/aggregate/latency_exits.csv",
    log:
        f"{RESULTS}/logs/aggregate_latency.log",
    conda:
        "../environment.yml"
    resources:
        mem_mb=2000,
        runtime=10,
    params:
        cells=LATENCY_CELLS,
    script:
        "../workflow_scripts/aggregate_latency.py"


rule latency_figure:
    input:
        budgets=f"{RESULTS}/aggregate/latency.csv",
    output:
        pdf=f"{RESULTS}/figures/latency.pdf",
        png=report(f"{RESULTS}/figures/latency.png", category="Figures"),
    log:
        f"{RESULTS}/logs/figures/latency.log",
    conda:
        "../environment.yml"
    resources:
        mem_mb=2000,
        runtime=10,
    params:
        style=figure_style,
    script:
        "../workflow_scripts/latency_figure.py"

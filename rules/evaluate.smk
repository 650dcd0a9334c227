rule evaluate:
    input:
        val=scored_val,
        test=scored_test,
        flops=f"{RESULTS}/flops/{{dataset}}/{{arch}}.json",
    output:
        anytime=f"{RESULTS}/curves/{CELL}/anytime.csv",
        budgeted=f"{RESULTS}/curves/{CELL}/budgeted.csv",
        provenance=f"{RESULTS}/curves/{CELL}/provenance.json",
        samples=f"{RESULTS}/curves/{CELL}/samples.pt",
    log:
        f"{RESULTS}/logs/evaluate/{CELL}.log",
    conda:
        "../environment.yml"
    resources:
        mem_mb=4000,
        runtime=30,
    params:
        spec=cell_spec("evaluate"),
    script:
        "../workflow_scripts/evaluate.py"


rule aggregate:
    input:
        anytime=curve_files("anytime"),
        budgeted=curve_files("budgeted"),
        provenance=provenance_files(),
        samples=cell_samples(CELLS),
    output:
        anytime=f"{RESULTS}/aggregate/anytime.csv",
        budgeted=f"{RESULTS}/aggregate/budgeted.csv",
        anytime_summary=f"{RESULTS}/aggregate/anytime_summary.csv",
        budgeted_summary=f"{RESULTS}/aggregate/budgeted_summary.csv",
    log:
        f"{RESULTS}/logs/aggregate.log",
    conda:
        "../environment.yml"
    resources:
        mem_mb=4000,
        runtime=30,
    params:
        spec=aggregate_spec(CELLS),
        cells=CELLS,
    script:
        "../workflow_scripts/aggregate.py"

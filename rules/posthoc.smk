rule posthoc:
    input:
        unpack(posthoc_inputs),
    output:
        val=f"{RESULTS}/posthoc/{CELL}/val.pt",
        test=f"{RESULTS}/posthoc/{CELL}/test.pt",
    log:
        f"{RESULTS}/logs/posthoc/{CELL}.log",
    conda:
        "../environment.yml"
    resources:
        mem_mb=8000,
        runtime=120,
    params:
        spec=cell_spec("posthoc"),
    script:
        "../workflow_scripts/posthoc.py"

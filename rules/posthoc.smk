rule posthoc:
    input:
        unpack(posthoc_inputs),
    output:
        val=f"{RESULTS}/posthoc/{CELL}/val.pt",
        test=f"{RESULTS}/posthoc/{CELL}/test.pt",
    log:
        f"{RESULTS}/logs/posthoc/{CELL}.log",
    params:
        spec=cell_spec("posthoc"),
    resources:
        mem_mb=8000,
        runtime=120,
    conda:
        "../environment.yml"
    script:
        "../workflow_scripts/posthoc.py"

rule flops:
    output:
        f"{RESULTS}/flops/{{dataset}}/{{arch}}.json",
    log:
        f"{RESULTS}/logs/flops/{{dataset}}/{{arch}}.log",
    params:
        spec=flops_spec,
    resources:
        mem_mb=4000,
        runtime=30,
    conda:
        "../environment.yml"
    script:
        "../workflow_scripts/flops.py"

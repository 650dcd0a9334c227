rule flops:
    output:
        f"{RESULTS}/flops/{{dataset}}/{{arch}}.json",
    log:
        f"{RESULTS}/logs/flops/{{dataset}}/{{arch}}.log",
    conda:
        "../environment.yml"
    resources:
        mem_mb=4000,
        runtime=30,
    params:
        spec=flops_spec,
    script:
        "../workflow_scripts/flops.py"

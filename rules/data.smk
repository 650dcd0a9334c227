rule split:
    output:
        f"{RESULTS}/splits/{{dataset}}.npz",
    log:
        f"{RESULTS}/logs/split/{{dataset}}.log",
    conda:
        "../environment.yml"
    resources:
        mem_mb=4000,
        runtime=30,
    params:
        spec=split_spec,
        files=split_files,
    script:
        "../workflow_scripts/split.py"

rule split:
    output:
        f"{RESULTS}/splits/{{dataset}}.npz",
    log:
        f"{RESULTS}/logs/split/{{dataset}}.log",
    params:
        spec=split_spec,
        files=split_files,
    resources:
        mem_mb=4000,
        runtime=30,
    conda:
        "../environment.yml"
    script:
        "../workflow_scripts/split.py"

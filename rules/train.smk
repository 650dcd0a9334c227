rule train:
    input:
        split=f"{RESULTS}/splits/{{dataset}}.npz",
        flops=f"{RESULTS}/flops/{{dataset}}/{{arch}}.json",
        init=init_weights,
    output:
        weights=f"{RESULTS}/train/{CELL}/weights.pt",
        history=f"{RESULTS}/train/{CELL}/history.csv",
    log:
        f"{RESULTS}/logs/train/{CELL}.log",
    benchmark:
        f"{RESULTS}/benchmarks/train/{CELL}.tsv"
    wildcard_constraints:
        variant=smk.alternatives(config["methods"]),  # pretrained variants are converted instead
    conda:
        "../environment.yml"
    resources:
        gpu=train_gpus,
        cpus_per_gpu=cpus_per_gpu,
        mem_mb=train_mem,
        runtime=train_runtime,
    params:
        # resumable state lives outside the declared outputs, which Snakemake deletes before a rerun
        state_dir=f"{RESULTS}/state/{CELL}",
        spec=cell_spec("train"),
        fingerprint=training_fingerprint,
    script:
        "../workflow_scripts/train.py"

rule infer:
    input:
        weights=f"{RESULTS}/train/{CELL}/weights.pt",
        split=f"{RESULTS}/splits/{{dataset}}.npz",
        flops=f"{RESULTS}/flops/{{dataset}}/{{arch}}.json",
    output:
        val=f"{RESULTS}/cache/{CELL}/val.pt",
        test=f"{RESULTS}/cache/{CELL}/test.pt",
    log:
        f"{RESULTS}/logs/infer/{CELL}.log",
    benchmark:
        f"{RESULTS}/benchmarks/infer/{CELL}.tsv"
    conda:
        "../environment.yml"
    resources:
        gpu=1,
        cpus_per_gpu=cpus_per_gpu,
        mem_mb=train_mem,
        runtime=infer_runtime,
    params:
        spec=cell_spec("infer"),
        fingerprint=training_fingerprint,
    script:
        "../workflow_scripts/infer.py"


use rule infer as infer_train_split with:
    output:
        train=f"{RESULTS}/cache/{CELL}/train.pt",
    log:
        f"{RESULTS}/logs/infer_train/{CELL}.log",
    benchmark:
        f"{RESULTS}/benchmarks/infer_train/{CELL}.tsv"
    params:
        spec=cell_spec("infer_train_split"),
        fingerprint=training_fingerprint,

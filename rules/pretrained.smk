rule convert_pretrained:
    input:
        flops=f"{RESULTS}/flops/{{dataset}}/{{arch}}.json",
    output:
        weights=f"{RESULTS}/train/{CELL}/weights.pt",
    log:
        f"{RESULTS}/logs/convert/{CELL}.log",
    wildcard_constraints:
        variant=smk.alternatives(config.get("pretrained", {})) or "(?!)",  # (?!): none, when there are none
    conda:
        "../environment.yml"
    resources:
        mem_mb=train_mem,
        runtime=30,
    params:
        spec=cell_spec("convert_pretrained"),
        checkpoint=pretrained_checkpoint,
        fingerprint=training_fingerprint,  # the checkpoint's content hash: a new file reconverts
    script:
        "../workflow_scripts/convert.py"

import sys

sys.path.insert(0, snakemake.scriptdir + "/..")

from eebench import smk
from eebench.launcher import launch_training
from eebench.pipeline import train_cell

args = dict(
    config=smk.job_config(snakemake),
    cell=smk.cell(snakemake),
    split_path=snakemake.input.split,
    flops_path=snakemake.input.flops,
    weights_out=snakemake.output.weights,
    history_out=snakemake.output.history,
    state_dir=snakemake.params.state_dir,
    init_weights=snakemake.input.init or None,
)
# one process per GPU the job asked for (datasets.<name>.resources.gpus): several run under torchrun
processes = int(snakemake.resources.get("gpu", 1) or 1)

with smk.logged(snakemake, attempts_dir=snakemake.params.state_dir):  # a resumed job adds to its log
    if processes > 1:
        launch_training(processes, **args)
    else:
        train_cell(**args)

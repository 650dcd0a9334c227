"""The workflow on a real one-node SLURM cluster (scripts/local_slurm.sh) through `--profile slurm`.

Run with `pytest -m slurm` as root (the script installs slurm-wlm and munge with apt-get when they
are missing and starts munged, slurmctld and slurmd; it stops only what it started). Skipped
without root or without a way to install SLURM. Each SLURM job pays a Snakemake start inside the
job and the plugin's status polling (2 s, then +10 s per check), so the module takes minutes.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from pathlib import Path
from typing import Any

import pandas as pd
import pytest
import torch
import yaml
from workflow_helpers import ROOT, SNAKEMAKE, run_workflow, tiny_config

pytestmark = pytest.mark.slurm

SCRIPT = ROOT / "scripts" / "local_slurm.sh"
EPOCHS = 3  # enough for a cancel after the first epoch's checkpoint
CELL = "digits/msdnet/standard/seed0"
WEIGHTS = f"results/train/{CELL}/weights.pt"
TIMEOUT = 1500  # s per Snakemake run; `timeout -k` because a stuck snakemake ignores SIGTERM


@pytest.fixture(scope="module")
def cluster():
    if os.geteuid() != 0:
        pytest.skip("the local SLURM cluster needs root (it writes /etc/slurm and starts daemons)")
    if not shutil.which("slurmctld") and not shutil.which("apt-get"):
        pytest.skip("SLURM is not installed and apt-get is not available to install it")
    already = subprocess.run([str(SCRIPT), "status"], capture_output=True).returncode == 0
    started = subprocess.run([str(SCRIPT), "start"], capture_output=True, text=True, timeout=900)
    if started.returncode in (2, 3, 5):  # not root / cannot install / a foreign SLURM is configured
        pytest.skip(f"cannot start the local SLURM cluster: {started.stderr.strip()[-500:]}")
    assert started.returncode == 0, started.stderr
    yield
    if not already:
        subprocess.run([str(SCRIPT), "stop"], capture_output=True, timeout=120)


def config() -> dict[str, Any]:
    return tiny_config(epochs=EPOCHS)


@pytest.fixture(scope="module")
def local_run(tmp_path_factory) -> Path:
    workdir = tmp_path_factory.mktemp("local")
    run_workflow(workdir, config(), "all_figures", timeout=TIMEOUT)
    return workdir


def snakemake_cmd(workdir: Path, *args: str) -> list[str]:
    return [
        SNAKEMAKE,
        *args,
        "--profile",
        str(ROOT / "slurm"),
        "--snakefile",
        str(ROOT / "Snakefile"),
        "--directory",
        str(workdir),
        "--configfile",
        str(workdir / "config.yaml"),
        "--slurm-init-seconds-before-status-checks",
        "2",
        "--slurm-keep-successful-logs",
    ]


def slurm_env() -> dict[str, str]:
    return {**os.environ, "PYTHONHASHSEED": "0", "EEBENCH_PARTITION": "main"}


def start_slurm_run(workdir: Path, *targets: str) -> subprocess.Popen:
    workdir.mkdir(parents=True, exist_ok=True)
    (workdir / "config.yaml").write_text(yaml.safe_dump(config()))
    out = open(workdir / "snakemake.out", "w")
    return subprocess.Popen(
        ["timeout", "-k", "10", str(TIMEOUT), *snakemake_cmd(workdir, *targets)],
        stdout=out,
        stderr=subprocess.STDOUT,
        text=True,
        cwd=workdir,
        env=slurm_env(),
    )


def finish(proc: subprocess.Popen, workdir: Path) -> str:
    rc = proc.wait()
    output = (workdir / "snakemake.out").read_text()
    if rc in (124, 137):  # killed by timeout: release the lock for whoever looks next
        subprocess.run(snakemake_cmd(workdir, "--unlock"), capture_output=True, cwd=workdir, env=slurm_env())
    assert rc == 0, f"snakemake --profile slurm failed ({rc}):\n{output[-8000:]}"
    return output


def weights(workdir: Path) -> dict[str, torch.Tensor]:
    return torch.load(workdir / WEIGHTS, weights_only=False)["model"]


def assert_same_weights(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    differing = [k for k in a if not torch.equal(a[k], b[k])]
    assert not differing, f"{len(differing)} tensors differ, e.g. {differing[:3]}"


def test_profile_run_equals_local_run(cluster, local_run, tmp_path):
    started = time.monotonic()
    output = finish(start_slurm_run(tmp_path, "all_figures"), tmp_path)
    print(f"all_figures through SLURM: {time.monotonic() - started:.0f} s")
    for rule in ("split", "flops", "train", "infer", "evaluate", "aggregate", "figure"):
        assert f"rule_{rule}/" in output, f"rule {rule} was not submitted to SLURM"
    assert "localrule all_figures" in output
    for name in ("anytime", "budgeted"):
        ours = pd.read_csv(tmp_path / "results" / "aggregate" / f"{name}.csv").drop(columns="git_commit")
        local = pd.read_csv(local_run / "results" / "aggregate" / f"{name}.csv").drop(columns="git_commit")
        pd.testing.assert_frame_equal(ours, local)
    history = f"results/train/{CELL}/history.csv"
    assert (tmp_path / history).read_text() == (local_run / history).read_text()
    assert_same_weights(weights(tmp_path), weights(local_run))
    for figure in (local_run / "results" / "figures").iterdir():
        assert (tmp_path / "results" / "figures" / figure.name).stat().st_size > 1000


def running_train_job() -> tuple[str, str] | None:
    """(job id, GPUs requested) of the running train job, if any."""
    listing = subprocess.run(
        ["squeue", "-h", "-t", "RUNNING", "-O", "JobID:20,Comment:300,tres-per-job:40"], capture_output=True, text=True
    ).stdout
    for line in listing.splitlines():
        fields = line.split()  # the plugin's comment: rule_<rule>_wildcards_<values>
        if len(fields) >= 2 and fields[1].startswith("rule_train_wildcards_"):
            return fields[0], fields[2] if len(fields) > 2 else ""
    return None


def test_cancelled_training_job_resumes_from_its_checkpoint(cluster, local_run, tmp_path):
    started = time.monotonic()
    proc = start_slurm_run(tmp_path, WEIGHTS)
    train_log = tmp_path / "results" / "logs" / "train" / f"{CELL}.log"
    deadline = time.monotonic() + TIMEOUT
    job = None
    while True:  # cancel once the first epoch is done (and checkpointed)
        assert proc.poll() is None, (
            "snakemake ended before the training job could be cancelled:\n"
            + (tmp_path / "snakemake.out").read_text()[-4000:]
        )
        assert time.monotonic() < deadline, "training never reached the end of its first epoch"
        job = job or running_train_job()
        if job and train_log.exists() and f"epoch 1/{EPOCHS}" in train_log.read_text():
            break
        time.sleep(0.2)
    job_id, gpus = job
    assert gpus == "gres:gpu:1", f"the train job asked for {gpus!r}, not one GPU"
    subprocess.run(["scancel", job_id], check=True)
    output = finish(proc, tmp_path)  # the profile's retries resubmit the cancelled job
    print(f"train with one scancel through SLURM: {time.monotonic() - started:.0f} s")
    assert f"SLURM-job '{job_id}' failed, SLURM status is: 'CANCELLED'" in output
    assert "Trying to restart job" in output
    log = train_log.read_text()  # the retry's log
    assert "resuming from" in log, log
    resumed_epoch = int(log.split("resuming from", 1)[1].split(" at epoch ", 1)[1].split(",")[0])
    assert resumed_epoch >= 2, f"resumed at epoch {resumed_epoch}, not after the first one:\n{log}"
    assert f"epoch 1/{EPOCHS}" not in log  # epoch 1 was not trained again
    assert_same_weights(weights(tmp_path), weights(local_run))

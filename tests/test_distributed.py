"""Several training processes under torchrun (gloo on CPU, as NCCL would be on GPUs).

What is checked: the processes end with identical weights (gradients are averaged, process 0's
BatchNorm statistics are shared), for a method that uses the default step (DDP) and one that
writes its own (gradients averaged at each optimizer step); the train rule launches torchrun when
the dataset asks for several GPUs; and a multi-process run killed mid-epoch resumes to the
weights of an uninterrupted multi-process run.

Not checked: equality with a single-process run on the whole batch. It does not hold, and is not
meant to: each process's BatchNorm normalises its own half of the batch (no SyncBatchNorm, as in
the reference implementations), and the gradient sum is reduced in another order.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from workflow_helpers import run_workflow, tiny_config

WORKER = Path(__file__).with_name("ddp_worker.py")


def torchrun(out: Path, *names: str, stop_after: int | None = None, check: bool = True) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "EEBENCH_TEST_STOP_AFTER"}
    if stop_after is not None:
        env["EEBENCH_TEST_STOP_AFTER"] = str(stop_after)
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc-per-node=2",
            str(WORKER),
            str(out),
            *names,
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )
    if check:
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    return proc


def load_ranks(out: Path, name: str) -> tuple[dict, dict]:
    return torch.load(out / f"{name}.rank0.pt"), torch.load(out / f"{name}.rank1.pt")


def assert_equal_weights(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    differing = [k for k in a if not torch.equal(a[k], b[k])]
    assert not differing, f"{len(differing)} tensors differ, e.g. {differing[:3]}"


def test_two_processes_end_with_the_same_weights(tmp_path):
    torchrun(tmp_path, "standard", "gater")
    for name in ("standard", "gater"):
        rank0, rank1 = load_ranks(tmp_path, name)
        assert_equal_weights(rank0["weights"], rank1["weights"])
        assert rank0["history"] == rank1["history"] and len(rank0["history"]) == 2
        assert all(torch.isfinite(v).all() for v in rank0["weights"].values() if v.is_floating_point())


def test_train_rule_launches_torchrun_for_several_gpus(tmp_path):
    config = tiny_config(epochs=1)
    config["datasets"]["digits"].setdefault("resources", {})["gpus"] = 2
    target = "results/train/digits/msdnet/standard/seed0/weights.pt"
    run_workflow(tmp_path, config, target)
    log = (tmp_path / "results/logs/train/digits/msdnet/standard/seed0.log").read_text()
    assert "launching 2 training processes" in log
    assert "DDP over 2 processes (gloo)" in log
    assert "all 2 processes hold the same weights" in log
    weights = torch.load(tmp_path / target, weights_only=False)
    assert weights["model"] and (tmp_path / "results/train/digits/msdnet/standard/seed0/history.csv").exists()


@pytest.mark.slow
def test_every_method_trains_in_two_processes(tmp_path):
    names = ["boostnet", "l2w", "jei_dnn", "eenets@ee_resnet", "standard@ranet"]
    torchrun(tmp_path, *names)
    for name in names:
        rank0, rank1 = load_ranks(tmp_path, name)
        assert_equal_weights(rank0["weights"], rank1["weights"])


@pytest.mark.slow
def test_two_process_run_resumes_to_the_uninterrupted_weights(tmp_path):
    whole, killed = tmp_path / "whole", tmp_path / "killed"
    torchrun(whole, "standard")
    stopped = torchrun(killed, "standard", stop_after=11, check=False)  # 8 + 3 batches
    assert stopped.returncode != 0 and not (killed / "standard.rank0.pt").exists()
    torchrun(killed, "standard")
    resumed0, resumed1 = load_ranks(killed, "standard")
    assert resumed0["resumed_from"] == resumed1["resumed_from"] == (1, 3)
    assert_equal_weights(resumed0["weights"], load_ranks(whole, "standard")[0]["weights"])
    assert_equal_weights(resumed1["weights"], resumed0["weights"])

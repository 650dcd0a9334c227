"""Reliability: nothing computed is lost, the same config gives the same numbers.

- a diverging run stops with the epoch and the loss, keeping its last good checkpoint;
- a process killed while writing leaves the old file or the new one, never part of one;
- a config error or a missing dataset stops the workflow before any job runs, with its message;
- the same config and seed give bit-identical split, FLOPs, weights, caches and curves (library
  functions here, the whole workflow in the slow test);
- after a crash, a rerun redoes only the unfinished cells; a stale cache copied in from another
  run is detected, and rebuilt once deleted (slow).

Kill-and-resume of training is in test_resume.py.
"""

from __future__ import annotations

import copy
import filecmp
import math
import re
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pandas as pd
import pytest
import torch
from train_helpers import digits_data
from workflow_helpers import run_workflow, tiny_config

from eebench import io, pipeline
from eebench.config import Cell, validate_schema
from eebench.methods.standard import Standard
from eebench.recipe import Recipe
from eebench.training import TrainingDiverged, train

TINY = {"family": "ee_resnet", "params": {"depth": 8, "num_exits": 2, "width": 4, "distribution": "linear"}}


def tiny_arch_config(epochs: int = 1) -> dict:
    """tiny_config() with a 3-exit, 8-layer EE-ResNet of width 4: seconds per epoch on CPU."""
    config = tiny_config(epochs)
    config["architectures"] = {"tiny": copy.deepcopy(TINY)}
    config["experiments"][0]["architectures"] = ["tiny"]
    return config


# --- divergence --------------------------------------------------------------------------------
def _diverge_after(monkeypatch, calls: int) -> None:
    """Standard's loss turns NaN after ``calls`` steps: the weights become NaN, as in a real blow-up."""
    loss, count = Standard.loss, [0]

    def diverging(self, outputs, targets, step=0):
        count[0] += 1
        value = loss(self, outputs, targets, step)
        return value * float("nan") if count[0] > calls else value

    monkeypatch.setattr(Standard, "loss", diverging)


@pytest.fixture(scope="module")
def small_data():
    return digits_data(n_train=128, n_val=32)


def run_training(state_dir: Path, data, epochs: int, stop_after_batches: int | None = None):
    """The tiny EE-ResNet with ``standard`` on CPU: 2 batches of 64 per epoch."""
    config = tiny_arch_config()
    validate_schema(config)  # the schema's defaults, as the workflow fills them at start
    torch.manual_seed(0)
    network = pipeline.build_network(config, "digits", "tiny")
    recipe = Recipe(epochs=epochs, batch_size=64, lr=0.05, schedule="cosine")
    return train(
        network,
        pipeline._method_factory(config, "standard"),
        data,
        recipe,
        torch.tensor([0.5, 0.75, 1.0]),
        10,
        0,
        state_dir,
        "test-divergence",
        torch.device("cpu"),
        stop_after_batches=stop_after_batches,
    )


def test_nan_stops_training_with_epoch_and_loss_and_keeps_last_good_checkpoint(monkeypatch, tmp_path, small_data):
    _diverge_after(monkeypatch, calls=2)  # epoch 1 is fine, epoch 2 diverges
    with pytest.raises(TrainingDiverged) as err:
        run_training(tmp_path, small_data, epochs=3)
    message = str(err.value)
    assert "diverged at epoch 2" in message and "mean loss nan" in message, message
    assert str(tmp_path / "checkpoint.pt") in message
    state = io.load_tensors(tmp_path / "checkpoint.pt")
    assert (state["epoch"], state["batch"]) == (1, 0)
    assert all(torch.isfinite(v).all() for v in state["model"].values() if v.is_floating_point())
    assert math.isfinite(state["history"][0]["loss"])


def test_nan_in_the_first_epoch_says_no_checkpoint_yet(monkeypatch, tmp_path, small_data):
    _diverge_after(monkeypatch, calls=0)
    with pytest.raises(TrainingDiverged, match=r"diverged at epoch 1: mean loss nan; no checkpoint had been written"):
        run_training(tmp_path, small_data, epochs=1)
    assert not (tmp_path / "checkpoint.pt").exists()


def test_stop_signal_during_a_diverged_epoch_keeps_the_good_checkpoint(monkeypatch, tmp_path, small_data):
    _diverge_after(monkeypatch, calls=2)
    with pytest.raises(TrainingDiverged, match=r"diverged in epoch 2 \(loss sum nan after batch 1\)"):
        run_training(tmp_path, small_data, epochs=3, stop_after_batches=3)
    assert io.load_tensors(tmp_path / "checkpoint.pt")["epoch"] == 1


# --- killed while writing ----------------------------------------------------------------------
WRITER = textwrap.dedent("""
    import io as stdio, sys, time
    sys.path[:0] = {paths!r}
    import pandas as pd, torch
    from eebench import io

    def half(data, f):  # write half the bytes for real, then hang until killed
        f.write(data[: len(data) // 2]); f.flush(); print("HALF", flush=True); time.sleep(600)

    if {kind!r} == "tensors":
        save = torch.save
        def slow_save(obj, f):
            buf = stdio.BytesIO(); save(obj, buf); half(buf.getvalue(), f)
        torch.save = slow_save
        io.save_tensors({target!r}, {{"x": torch.full((1 << 20,), 2.0)}})
    else:
        to_csv = pd.DataFrame.to_csv
        def slow_csv(self, path, **kw):
            with open(path, "w") as f:
                half(to_csv(self, None, **kw), f)
        pd.DataFrame.to_csv = slow_csv
        io.write_csv({target!r}, pd.DataFrame({{"a": range(200000)}}))
""")


def _kill_mid_write(kind: str, target: Path) -> None:
    here = Path(__file__).resolve().parent
    script = WRITER.format(paths=[str(here), str(here.parent)], kind=kind, target=str(target))
    child = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert child.stdout.readline().strip() == "HALF", child.stderr.read()
        partial = [p for p in target.parent.iterdir() if p.name.startswith(f".{target.name}.")]
        assert len(partial) == 1 and partial[0].stat().st_size > 0  # the half-written temporary file
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait(timeout=60)


@pytest.mark.parametrize("kind", ["tensors", "csv"])
def test_kill_during_a_write_keeps_the_old_file(kind, tmp_path):
    target = tmp_path / ("cache.pt" if kind == "tensors" else "curve.csv")
    if kind == "tensors":
        io.save_tensors(target, {"x": torch.ones(10)})
    else:
        io.write_csv(target, pd.DataFrame({"a": [1, 2, 3]}))
    old = target.read_bytes()
    _kill_mid_write(kind, target)
    assert target.read_bytes() == old  # the old file, whole
    if kind == "tensors":
        assert torch.equal(io.load_tensors(target)["x"], torch.ones(10))
    # the killed writer's temporary file is removed by the next write of that path
    io.write_text(target, "new")
    assert target.read_text() == "new"
    assert sorted(p.name for p in tmp_path.iterdir()) == [target.name]


def test_kill_during_a_first_write_leaves_no_file(tmp_path):
    target = tmp_path / "weights.pt"
    _kill_mid_write("tensors", target)
    assert not target.exists()


REAL_WRITER = textwrap.dedent("""
    import sys
    sys.path[:0] = {paths!r}
    import torch
    from eebench import io
    big = [torch.full((8 << 20,), float(v)) for v in (1, 2)]  # 32 MiB each
    print("READY", flush=True)
    i = 0
    while True:
        io.save_tensors({target!r}, {{"x": big[i % 2], "i": torch.tensor(i)}})
        i += 1
""")


def test_kill_at_random_moments_of_real_writes_never_leaves_a_partial_file(tmp_path):
    """No patching: a process rewriting a 32 MiB file in a loop is SIGKILLed at arbitrary moments."""
    here = Path(__file__).resolve().parent
    target = tmp_path / "big.pt"
    for delay in (0.3, 0.7, 1.1):
        script = REAL_WRITER.format(paths=[str(here), str(here.parent)], target=str(target))
        child = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
        assert child.stdout.readline().strip() == "READY"
        time.sleep(delay)
        child.send_signal(signal.SIGKILL)
        child.wait(timeout=60)
        if target.exists():  # absent only if killed before the first rename
            state = io.load_tensors(target)
            assert torch.equal(state["x"], torch.full((8 << 20,), float(int(state["i"]) % 2 + 1)))


# --- config errors and missing data through the workflow ---------------------------------------
def test_workflow_config_error_names_key_value_and_allowed(tmp_path):
    config = tiny_config()
    config["datasets"]["digits"]["resources"]["mem_mb"] = "lots"
    proc = run_workflow(tmp_path, config, "all_figures", extra=["-n"], check=False)
    assert proc.returncode != 0
    assert (
        "config datasets.digits.resources.mem_mb: 'lots' is not allowed; allowed: an integer"
        in proc.stdout + proc.stderr
    )
    assert not (tmp_path / "results").exists()


def test_workflow_with_missing_data_directory_stops_before_any_job(tmp_path):
    config = tiny_config()
    config["datasets"] = {"cifar10": config["datasets"]["digits"]}
    config["experiments"][0]["datasets"] = ["cifar10"]
    config["data_dir"] = "no-such-dir"
    plan = run_workflow(tmp_path, config, "results/splits/cifar10.npz", extra=["-n"], check=False)
    assert plan.returncode == 0, plan.stderr  # planning needs no data
    proc = run_workflow(tmp_path, config, "results/splits/cifar10.npz", check=False)
    assert proc.returncode != 0
    output = proc.stdout + proc.stderr
    assert "config data_dir / datasets.cifar10: dataset 'cifar10' not found" in output
    assert "looked in no-such-dir/cifar-10-batches-py (does not exist)" in output
    assert "'cifar10'" in output and "cifar-10-python.tar.gz" in output
    assert not (tmp_path / "results").exists()


# --- determinism -------------------------------------------------------------------------------
def _run_cell(config: dict, out: Path) -> None:
    cell = Cell("digits", "tiny", "standard", 0)
    pipeline.write_split(config, "digits", str(out / "split.npz"))
    pipeline.write_flops(config, "digits", "tiny", str(out / "flops.json"))
    pipeline.train_cell(
        config,
        cell,
        str(out / "split.npz"),
        str(out / "flops.json"),
        str(out / "weights.pt"),
        str(out / "history.csv"),
        str(out / "state"),
    )
    pipeline.infer_cell(
        config,
        cell,
        str(out / "weights.pt"),
        str(out / "split.npz"),
        str(out / "flops.json"),
        {"val": str(out / "val.pt"), "test": str(out / "test.pt")},
    )
    pipeline.evaluate_cell(
        config,
        cell,
        str(out / "val.pt"),
        str(out / "test.pt"),
        str(out / "flops.json"),
        str(out / "anytime.csv"),
        str(out / "budgeted.csv"),
        str(out / "provenance.json"),
        str(out / "samples.pt"),
    )


COMPARED = [
    "split.npz",
    "flops.json",
    "weights.pt",
    "history.csv",
    "state/checkpoint.pt",
    "val.pt",
    "test.pt",
    "anytime.csv",
    "budgeted.csv",
    "samples.pt",
]


def test_same_config_and_seed_give_bit_identical_files(tmp_path):
    """Split, FLOPs, CPU weights, caches, thresholds and curves of one cell, computed twice."""
    config = tiny_arch_config(epochs=1)
    config["device"] = "cpu"
    validate_schema(config)
    for run in ("a", "b"):
        _run_cell(config, tmp_path / run)
    differing = [
        name for name in COMPARED if not filecmp.cmp(tmp_path / "a" / name, tmp_path / "b" / name, shallow=False)
    ]
    assert not differing, f"not bit-identical: {differing}"
    assert {"threshold_1", "accuracy_ci_low", "flops_ci_high"} <= set(pd.read_csv(tmp_path / "a" / "budgeted.csv"))


def _results(workdir: Path) -> dict[str, bytes]:
    """Every result file but logs, benchmarks and provenance (which holds times and hosts)."""
    root = workdir / "results"
    skip = ("logs/", "benchmarks/")
    return {
        str(p.relative_to(root)): p.read_bytes()
        for p in sorted(root.rglob("*"))
        if p.is_file() and not str(p.relative_to(root)).startswith(skip) and p.name != "provenance.json"
    }


@pytest.mark.slow
def test_workflow_run_twice_gives_bit_identical_results(tmp_path):
    config = tiny_arch_config(epochs=2)
    config["device"] = "cpu"
    config["methods"]["gater"] = {"method": "gater", "params": {"features": ["confidence"], "update_every": 2}}
    config["experiments"][0]["methods"] = ["standard", "gater"]
    for run in ("a", "b"):
        run_workflow(tmp_path / run, config, "results/aggregate/budgeted.csv", "results/aggregate/anytime.csv")
    a, b = _results(tmp_path / "a"), _results(tmp_path / "b")
    assert a.keys() == b.keys()
    assert any(name.endswith("weights.pt") for name in a) and any(name.startswith("splits/") for name in a)
    differing = [name for name in a if a[name] != b[name] and not name.startswith("aggregate/")]
    assert not differing, f"not bit-identical: {differing}"
    for kind in ("budgeted", "anytime"):  # aggregates: identical but for provenance columns
        frames = [pd.read_csv(tmp_path / run / "results" / "aggregate" / f"{kind}.csv") for run in ("a", "b")]
        pd.testing.assert_frame_equal(frames[0], frames[1])


# --- crash and rerun ---------------------------------------------------------------------------
def _planned_jobs(proc: subprocess.CompletedProcess) -> dict[str, int]:
    """The 'Job stats' table of a dry run: rule -> count."""
    text = proc.stdout + proc.stderr
    stats = text[text.index("Job stats:") :]
    return {m.group(1): int(m.group(2)) for m in re.finditer(r"^(\w+)\s+(\d+)$", stats, re.M) if m.group(1) != "total"}


def _mtimes(workdir: Path) -> dict[str, int]:
    root = workdir / "results"
    return {
        str(p.relative_to(root)): p.stat().st_mtime_ns
        for p in root.rglob("*")
        if p.is_file() and not str(p.relative_to(root)).startswith(("logs/", "benchmarks/"))
    }


@pytest.mark.slow
def test_rerun_after_a_crash_redoes_only_the_unfinished_cells(tmp_path):
    config = tiny_arch_config(epochs=1)
    config["methods"]["big_batch"] = {"method": "standard", "recipe": {"batch_size": 5000}}  # crashes at run time
    config["experiments"][0]["methods"] = ["standard", "big_batch"]
    # the curves too: Snakemake does not remake a missing intermediate file (a curve whose evaluation
    # failed) while the aggregate made from it earlier is up to date
    targets = [
        "results/aggregate/budgeted.csv",
        *(f"results/curves/digits/tiny/{v}/seed0/budgeted.csv" for v in ("standard", "big_batch")),
    ]
    crashed = run_workflow(tmp_path, config, *targets, extra=["--keep-going"], check=False)
    assert crashed.returncode != 0
    log = (tmp_path / "results/logs/train/digits/tiny/big_batch/seed0.log").read_text()
    assert "batch size 5000 is larger than the training set" in log
    assert not (tmp_path / "results/train/digits/tiny/big_batch").exists() or not any(
        (tmp_path / "results/train/digits/tiny/big_batch/seed0").glob("*.pt")
    )
    finished = _mtimes(tmp_path)
    assert "curves/digits/tiny/standard/seed0/budgeted.csv" in finished

    config["methods"]["big_batch"]["recipe"]["batch_size"] = 128  # the fix
    plan = run_workflow(tmp_path, config, *targets, extra=["-n"])
    assert _planned_jobs(plan) == {"train": 1, "infer": 1, "evaluate": 1, "aggregate": 1}, plan.stdout[-3000:]
    assert "big_batch" in plan.stdout and "wildcards: dataset=digits, arch=tiny, variant=standard" not in plan.stdout
    run_workflow(tmp_path, config, *targets)
    after = _mtimes(tmp_path)
    assert {k: v for k, v in after.items() if k in finished} == finished  # nothing finished was redone
    assert "curves/digits/tiny/big_batch/seed0/budgeted.csv" in after

    # a stale cache copied in from another run (another fingerprint) is refused by evaluate ...
    cache = tmp_path / "results/cache/digits/tiny/standard/seed0/val.pt"
    state = io.load_tensors(cache)
    state["meta"]["fingerprint"] = "0000000000000000"
    io.save_tensors(cache, state)
    stale = run_workflow(tmp_path, config, *targets, check=False)
    assert stale.returncode != 0
    output = stale.stdout + stale.stderr
    assert "results/cache/digits/tiny/standard/seed0/val.pt: stale cache" in output
    assert "delete it and rerun the workflow to rebuild it" in output
    # ... and once deleted as the message says, rebuilt
    cache.unlink()
    run_workflow(tmp_path, config, *targets)
    assert io.load_tensors(cache)["meta"]["fingerprint"] != "0000000000000000"

"""A training run killed at any batch and rerun ends with the weights of an uninterrupted run.

The kill is simulated in-process with ``train(stop_after_batches=n)`` (mid-epoch, at an epoch
boundary, twice in a row), and for real by SIGTERM to a training subprocess, which must write its
checkpoint at the next batch boundary and exit with 128 + SIGTERM (what SLURM sees on preemption,
a time limit or scancel). Digits slice: 8 batches of 32 per epoch, 2 epochs, CPU, one thread
(bit-equality needs the same thread count in every run, and one thread is the fastest on a
shared 2-core machine).
"""

from __future__ import annotations

import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
from train_helpers import digits_data, run_training, weights_of

from eebench.io import load_tensors

STEPS = 8  # batches per epoch of digits_data()


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def data():
    return digits_data()


@pytest.fixture(scope="module")
def uninterrupted(data, tmp_path_factory):
    result = run_training("standard", tmp_path_factory.mktemp("whole"), data=data)
    assert result.resumed_from is None
    return weights_of(result), result.history


def assert_same_weights(actual: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> None:
    assert actual.keys() == expected.keys()
    differing = [k for k in expected if not torch.equal(actual[k], expected[k])]
    assert not differing, f"{len(differing)} tensors differ after resuming, e.g. {differing[:3]}"


@pytest.mark.parametrize(
    "stops",
    [(3,), (STEPS,), (STEPS + 5,), (2, 7)],
    ids=["mid-epoch-1", "epoch-boundary", "mid-epoch-2", "killed-twice"],
)
def test_resumed_run_equals_uninterrupted(stops, data, uninterrupted, tmp_path):
    done = 0
    for stop in stops:
        with pytest.raises(SystemExit) as exit_info:
            run_training("standard", tmp_path, data=data, stop_after_batches=stop)
        assert exit_info.value.code == 128 + signal.SIGTERM
        done += stop
        state = load_tensors(tmp_path / "checkpoint.pt")
        assert (state["epoch"], state["batch"]) == divmod(done, STEPS)
    result = run_training("standard", tmp_path, data=data)
    assert result.resumed_from == divmod(done, STEPS)
    weights, history = uninterrupted
    assert_same_weights(weights_of(result), weights)
    assert result.history == history


def test_checkpoint_of_another_configuration_is_not_resumed(data, tmp_path):
    with pytest.raises(SystemExit):
        run_training("standard", tmp_path, data=data, stop_after_batches=3)
    other = run_training("boostnet", tmp_path, data=data, epochs=1)  # another fingerprint
    assert other.resumed_from is None


CHILD = textwrap.dedent("""
    import sys, time
    sys.path[:0] = {paths!r}
    import torch
    torch.set_num_threads({threads})
    from eebench.methods.standard import Standard
    from train_helpers import run_training

    step = Standard.train_step
    def slow_step(self, *args):  # leaves time to signal mid-epoch; the numbers are unchanged
        time.sleep(0.15)
        return step(self, *args)
    Standard.train_step = slow_step
    run_training("standard", {state!r})
""")


def test_sigterm_checkpoints_and_rerun_resumes(data, uninterrupted, tmp_path):
    here = Path(__file__).resolve().parent
    script = CHILD.format(paths=[str(here), str(here.parent)], threads=torch.get_num_threads(), state=str(tmp_path))
    child = subprocess.Popen(
        [sys.executable, "-c", script], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    checkpoint = tmp_path / "checkpoint.pt"
    deadline = time.monotonic() + 120
    while not checkpoint.exists():  # the end-of-epoch-1 checkpoint: the child is in epoch 2 now
        assert child.poll() is None, f"training ended before it was signalled:\n{child.stdout.read()}"
        assert time.monotonic() < deadline, "no checkpoint after 120 s"
        time.sleep(0.02)
    time.sleep(0.3)
    child.send_signal(signal.SIGTERM)
    output, _ = child.communicate(timeout=60)
    assert child.returncode == 128 + signal.SIGTERM, output
    state = load_tensors(checkpoint)
    assert state["epoch"] == 1 and state["batch"] < STEPS, (state["epoch"], state["batch"])

    result = run_training("standard", tmp_path, data=data)
    assert result.resumed_from == (1, state["batch"])
    weights, history = uninterrupted
    assert_same_weights(weights_of(result), weights)
    assert result.history == history


def test_stop_logs_where_the_checkpoint_was_written(data, tmp_path, caplog):
    with caplog.at_level("INFO", logger="eebench.train"), pytest.raises(SystemExit):
        run_training("standard", tmp_path, data=data, stop_after_batches=3)
    assert f"stopped by SIGTERM: checkpoint written to {tmp_path / 'checkpoint.pt'} at epoch 1, batch 3" in caplog.text

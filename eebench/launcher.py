"""Training in several processes under torchrun (``eebench.distributed`` holds what they share).

``launch_training`` starts ``torchrun --standalone --nproc-per-node=N -m eebench.launcher``, whose
N worker processes each call ``pipeline.train_cell`` and meet in one process group.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import torch.distributed as dist

from . import distributed
from .config import Cell
from .pipeline import train_cell

log = logging.getLogger("eebench.launcher")


def launch_training(nproc: int, **train_cell_args: Any) -> None:
    """Run ``pipeline.train_cell(**train_cell_args)`` in ``nproc`` processes under torchrun.

    Stop signals (SIGTERM, SIGUSR1, SIGINT) are passed on to torchrun, which passes them to the
    workers; they checkpoint and exit, and this raises SystemExit(128 + signal), as a
    single-process run does.
    """
    state_dir = Path(train_cell_args["state_dir"])
    state_dir.mkdir(parents=True, exist_ok=True)
    args_path = state_dir / "torchrun_args.json"
    cell = train_cell_args["cell"]
    train_cell_args = {**train_cell_args, "cell": [cell.dataset, cell.arch, cell.variant, cell.seed]}
    args_path.write_text(json.dumps(train_cell_args))
    root = str(Path(__file__).resolve().parents[1])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")]))}
    if "OMP_NUM_THREADS" not in env:  # torchrun would set 1; share the job's CPUs instead
        env["OMP_NUM_THREADS"] = str(max(1, len(os.sched_getaffinity(0)) // nproc))
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc-per-node={nproc}",
        "-m",
        "eebench.launcher",
        str(args_path),
    ]
    log.info("launching %d training processes: %s", nproc, " ".join(cmd))
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    received: list[int] = []

    def forward(signum: int, _frame: Any) -> None:
        received.append(signum)
        # torchrun passes SIGTERM/SIGINT on to the workers; SIGUSR1 would end torchrun alone
        proc.send_signal(signal.SIGTERM if signum == signal.SIGUSR1 else signum)

    previous = {sig: signal.signal(sig, forward) for sig in (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)}
    try:
        assert proc.stdout is not None
        for line in proc.stdout:
            log.info("%s", line.rstrip())
        rc = proc.wait()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    if received:
        log.warning("stopped by signal %d; a rerun resumes from the checkpoint in %s", received[0], state_dir)
        raise SystemExit(128 + received[0])
    if rc != 0:
        log.error("torchrun exited with status %d", rc)
        raise SystemExit(rc)


def _worker(args_path: str) -> None:
    """One torchrun worker: train the cell described in ``args_path`` (see ``launch_training``)."""
    args = json.loads(Path(args_path).read_text())
    ctx = distributed.current()
    logging.basicConfig(
        level=logging.INFO if ctx.is_main else logging.WARNING,
        format=f"[rank {ctx.rank}] %(name)s %(levelname)s %(message)s",
        stream=sys.stderr,
    )
    args["cell"] = Cell(*args["cell"])
    try:
        train_cell(**args)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


if __name__ == "__main__":
    _worker(sys.argv[1])

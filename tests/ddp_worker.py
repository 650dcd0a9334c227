"""A torchrun worker for tests/test_distributed.py: train each variant named on the command line
in this process group and save this process's final weights and history to OUT/<name>.rank<r>.pt.

    torchrun --standalone --nproc-per-node=2 tests/ddp_worker.py OUT standard gater eenets@ee_resnet

A name is a default-config variant, optionally @architecture (default msdnet). With
EEBENCH_TEST_STOP_AFTER=n every process stops after n batches (as on SIGTERM) and exits 143.
"""

import os
import sys
from pathlib import Path

sys.path[:0] = [str(Path(__file__).resolve().parent), str(Path(__file__).resolve().parents[1])]

import torch  # noqa: E402
from train_helpers import run_training, weights_of  # noqa: E402

out = Path(sys.argv[1])
rank = int(os.environ["RANK"])
stop = os.environ.get("EEBENCH_TEST_STOP_AFTER")
torch.set_num_threads(1)
for name in sys.argv[2:]:
    variant, _, arch = name.partition("@")
    result = run_training(
        variant, out / "state" / name, arch=arch or "msdnet", epochs=2, stop_after_batches=int(stop) if stop else None
    )
    torch.save(
        {"weights": weights_of(result), "history": result.history, "resumed_from": result.resumed_from},
        out / f"{name}.rank{rank}.pt",
    )

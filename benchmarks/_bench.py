"""Shared machinery of the benchmark scripts: load, peak, reference checkout, interleaved workers.

Every comparison runs its candidates in persistent worker processes (one per variant) that the
parent drives in turn: worker A runs a timed chunk, then worker B, then A again, ... (the order is
reversed every other round, so a drift in machine load hits both sides alike). Only one worker
computes at a time; the others wait on a pipe. Separate processes keep allocator settings
(``mallopt``) and thread pools apart, so "the reference as shipped" really runs as shipped.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
REFERENCE_REPO = "https://github.com/kalviny/MSDNet-PyTorch"
REFERENCE_COMMIT = "f654595"
GET_REFERENCE = (
    f"  git clone {REFERENCE_REPO} /tmp/MSDNet-PyTorch\n"
    f"  git -C /tmp/MSDNet-PyTorch checkout {REFERENCE_COMMIT}\n"
    "then pass --reference /tmp/MSDNet-PyTorch"
)
TAG = "@@"  # prefix of the protocol lines on a worker's stdout (the reference prints freely)


def load_average() -> str:
    try:
        return "load average " + " ".join(Path("/proc/loadavg").read_text().split()[:3])
    except OSError:
        return "load average unknown"


def machine_line() -> str:
    import torch

    cpu = "?"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return (
        f"{cpu}, {os.cpu_count()} cores, torch {torch.__version__}, {torch.get_num_threads()} threads, {load_average()}"
    )


def check_reference(path: str | None, needed: tuple[str, ...] = ("models/msdnet.py",)) -> Path:
    """The reference checkout given on the command line, or exit with how to get it."""
    if path is None or not all((Path(path) / n).is_file() for n in needed):
        what = "no --reference given" if path is None else f"{path} lacks {', '.join(needed)}"
        sys.exit(f"error: the MSDNet reference code is needed ({what}). Get it with\n{GET_REFERENCE}")
    return Path(path).resolve()


def matmul_gflops(n: int = 4096, repeats: int = 5) -> float:
    """Best-of-``repeats`` fp32 n x n matmul speed, GFLOP/s (2 n^3 flops per product)."""
    import torch

    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - t0)
    return 2 * n**3 / best / 1e9


def keep_freed_memory() -> None:
    """Same call as eebench.inference.keep_freed_memory (kept here so reference workers import no eebench)."""
    import ctypes

    libc = ctypes.CDLL("libc.so.6")
    libc.mallopt(-4, 0)  # M_MMAP_MAX = 0
    libc.mallopt(-1, -1)  # M_TRIM_THRESHOLD: never trim


def import_reference_main(reference: Path, argv: list[str], save_dir: str):
    """Import the reference ``main.py`` as shipped, on CPU.

    ``main.py`` parses ``sys.argv`` at import and calls ``.cuda()`` on tensors and modules; on a
    CPU-only torch those calls are made no-ops (the only change). torchvision is imported first
    through the harness's CPU workaround (a no-op where torchvision imports normally).
    """
    import torch

    sys.path.insert(0, str(ROOT))
    from eebench.tv import import_torchvision

    import_torchvision()
    sys.path.remove(str(ROOT))
    if not torch.cuda.is_available():
        torch.Tensor.cuda = lambda self, *a, **k: self
        torch.nn.Module.cuda = lambda self, *a, **k: self
    sys.path.insert(0, str(reference))
    sys.argv = ["main.py", *argv, "--save", save_dir]
    import main as reference_main  # noqa: E402  (the reference's main.py)

    assert Path(reference_main.__file__).resolve().parent == reference, reference_main.__file__
    return reference_main


REFERENCE_ARGV = [  # the 7-exit CIFAR-100 budgeted-batch MSDNet (README command, nBlocks 7)
    "--data",
    "cifar100",
    "--arch",
    "msdnet",
    "--batch-size",
    "64",
    "--nBlocks",
    "7",
    "--stepmode",
    "lin_grow",
    "--step",
    "1",
    "--base",
    "1",
    "--nChannels",
    "16",
    "--growthRate",
    "6",
    "--grFactor",
    "1-2-4",
    "--bnFactor",
    "1-2-4",
    "--use-valid",
    "-j",
    "0",
    "--print-freq",
    "1000000",
]


def random_cifar(n: int, seed: int = 0, num_classes: int = 100):
    """n random uint8 images (N, 32, 32, 3) (CIFAR's own layout) and labels."""
    import torch

    g = torch.Generator().manual_seed(seed)
    images = torch.randint(0, 256, (n, 32, 32, 3), dtype=torch.uint8, generator=g)
    labels = torch.randint(0, num_classes, (n,), generator=g)
    return images, labels


def write_fake_cifar100(root: Path, images, labels, n_train: int = 50_000) -> None:
    """CIFAR-100's pickle files (python version) holding the given random images."""
    import pickle

    folder = Path(root) / "cifar-100-python"
    folder.mkdir(parents=True, exist_ok=True)
    flat = images.permute(0, 3, 1, 2).reshape(len(images), -1).numpy()  # CIFAR rows: R, G, B planes
    for name, part in (("train", slice(0, n_train)), ("test", slice(n_train, None))):
        with open(folder / name, "wb") as f:
            pickle.dump({"data": flat[part], "fine_labels": labels[part].tolist()}, f, protocol=4)
    with open(folder / "meta", "wb") as f:
        pickle.dump(
            {
                "fine_label_names": [f"class{i}" for i in range(100)],
                "coarse_label_names": [f"super{i}" for i in range(20)],
            },
            f,
        )


def accept_fake_cifar() -> None:
    """Skip torchvision's md5 checks, which random images cannot pass (nothing else changes)."""
    import torchvision.datasets.cifar as cifar

    cifar.check_integrity = lambda *a, **k: True
    cifar.CIFAR10._check_integrity = lambda self: True


class Chunk:
    """A reference data loader handed to its train()/validate() ``take`` batches at a time.

    Batches come from one persistent iterator (a new epoch starts when it runs out); ``len()`` is
    the loader's, which the reference uses only for its lr schedule and progress lines.
    """

    def __init__(self, loader):
        self.loader, self.take, self._it = loader, 0, iter(loader)

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self):
        for _ in range(self.take):
            try:
                yield next(self._it)
            except StopIteration:
                self._it = iter(self.loader)
                yield next(self._it)


# --- worker protocol -----------------------------------------------------------------------------
def serve(setup, run) -> None:
    """Worker side: ``setup()`` once, then answer 'run N' lines with the seconds N units took."""
    real_stdout = sys.stdout
    sys.stdout = sys.stderr  # whatever the code under test prints goes to stderr
    info = setup() or {}
    print(f"{TAG} ready {json.dumps(info)}", file=real_stdout, flush=True)
    for line in sys.stdin:
        cmd = line.split()
        if not cmd or cmd[0] == "quit":
            break
        t0 = time.perf_counter()
        extra = run(int(cmd[1])) or {}
        elapsed = time.perf_counter() - t0
        print(f"{TAG} done {elapsed} {json.dumps(extra)}", file=real_stdout, flush=True)


class Worker:
    """A persistent worker process; ``wait=False`` starts it without waiting for its set-up (call
    ``ready()``), so that several workers can build (and compile) at the same time."""

    def __init__(self, name: str, argv: list[str], quiet: bool = True, wait: bool = True, log: Path | None = None):
        self.name = name
        self.log = log
        self._stderr = open(log, "w") if log is not None else None
        self.proc = subprocess.Popen(
            [sys.executable, *argv],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self._stderr or (subprocess.DEVNULL if quiet else None),
            text=True,
            bufsize=1,
        )
        self.info: dict[str, Any] = {}
        if wait:
            self.ready()

    def ready(self) -> dict[str, Any]:
        self.info = json.loads(self._expect("ready"))
        return self.info

    def _expect(self, word: str) -> str:
        for line in self.proc.stdout:
            if line.startswith(f"{TAG} {word}"):
                return line[len(TAG) + len(word) + 2 :].strip()
        where = f"its stderr is in {self.log}" if self.log is not None else "rerun with --verbose"
        raise RuntimeError(f"worker {self.name} ended (exit code {self.proc.wait()}); {where}")

    def start(self, units: int) -> None:
        """Ask for ``units`` units of work without waiting (``finish()`` collects the answer)."""
        self.proc.stdin.write(f"run {units}\n")
        self.proc.stdin.flush()

    def finish(self) -> tuple[float, dict[str, Any]]:
        seconds, extra = self._expect("done").split(" ", 1)
        return float(seconds), json.loads(extra)

    def run(self, units: int) -> tuple[float, dict[str, Any]]:
        self.start(units)
        return self.finish()

    def close(self) -> None:
        if self.proc.poll() is None:
            try:
                self.proc.stdin.write("quit\n")
                self.proc.stdin.flush()
            except BrokenPipeError:
                pass
            self.proc.wait(timeout=60)
        if self._stderr is not None:
            self._stderr.close()


def cpu_busy(seconds: float = 1.0) -> float:
    """Fraction of all CPUs busy over ``seconds`` (from /proc/stat); nan where unavailable."""

    def read() -> tuple[int, int]:
        fields = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
        idle = fields[3] + fields[4]  # idle + iowait
        return sum(fields[:8]) - idle, sum(fields[:8])

    try:
        busy0, total0 = read()
        time.sleep(seconds)
        busy1, total1 = read()
        return (busy1 - busy0) / max(total1 - total0, 1)
    except (OSError, ValueError, IndexError):
        return float("nan")


def wait_for_quiet(threshold: float, max_wait: float) -> float:
    """Wait (at most ``max_wait`` s) until other processes use less than ``threshold`` of the CPUs."""
    deadline = time.monotonic() + max_wait
    busy = cpu_busy()
    while busy > threshold and time.monotonic() < deadline:
        busy = cpu_busy(2.0)
    return busy


def interleave(
    workers: list[Worker], units: int, repeats: int, log=print, quiet: float = 0.25, max_wait: float = 30.0
) -> dict[str, list[float]]:
    """Seconds per chunk for every worker, ABAB... with the order reversed on odd rounds.

    Before each round the parent waits up to ``max_wait`` seconds for the machine to be quiet
    (other processes using under ``quiet`` of the CPUs; the workers are idle then) and logs how busy
    it was, so a round run on a loaded machine can be told apart.
    """
    times: dict[str, list[float]] = {w.name: [] for w in workers}
    for r in range(repeats):
        busy = wait_for_quiet(quiet, max_wait)
        order = workers if r % 2 == 0 else workers[::-1]
        for w in order:
            seconds, _ = w.run(units)
            times[w.name].append(seconds)
        log(
            f"  round {r + 1}/{repeats}: "
            + "  ".join(f"{n} {t[-1]:.2f}s" for n, t in times.items())
            + f"  (others busy {busy:.0%} before; {load_average()})",
            flush=True,
        )
    return times


def spread(values: list[float]) -> str:
    if len(values) == 1:
        return f"{values[0]:.2f}"
    return (
        f"{statistics.mean(values):.2f} ± {statistics.stdev(values):.2f} "
        f"(min {min(values):.2f}, max {max(values):.2f}, n={len(values)})"
    )


def ratio_table(rates: dict[str, list[float]], baseline: str, unit: str) -> list[str]:
    """Rows: variant, rate mean ± sd, per-round ratio to ``baseline`` mean ± sd [min, max]."""
    base = rates[baseline]
    width = max(len(n) for n in rates)
    lines = [f"{'variant':<{width}}  {unit + ' (mean ± sd)':>22}  ratio to {baseline} per round (mean ± sd [min, max])"]
    for name, r in rates.items():
        ratios = [a / b for a, b in zip(r, base)]
        sd = statistics.stdev(r) if len(r) > 1 else 0.0
        rsd = statistics.stdev(ratios) if len(ratios) > 1 else 0.0
        lines.append(
            f"{name:<{width}}  {statistics.mean(r):>12.1f} ± {sd:<7.1f}  "
            f"{statistics.mean(ratios):.3f} ± {rsd:.3f} [{min(ratios):.3f}, {max(ratios):.3f}]"
        )
    return lines

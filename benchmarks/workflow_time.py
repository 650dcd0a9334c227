#!/usr/bin/env python
"""Workflow wall time: the default ``all_figures`` from nothing, per rule, start-up vs computation.

1. Dry runs (``snakemake -n --quiet rules``) of the default config and of ``config/paper.yaml`` in an empty
   directory: how long planning the DAG takes (the paper config has no data here: it plans only).
2. Python start-up + imports of each rule's script, measured: ``python -c`` with the snakemake
   script preamble's imports and the script's own top-level imports (median of ``--import-repeats``).
3. The full run: ``snakemake --cores N all_figures`` in a scratch directory with the default
   config. Job wall times come from Snakemake's log (start and finish timestamps, 1 s resolution),
   ``s`` and ``cpu_time`` from the ``benchmark:`` files of the train and infer rules.
4. A per-rule table and the share of job time spent in Python start-up and imports (measured
   import time x number of jobs of each rule) against computation (the rest).

    python benchmarks/workflow_time.py                 # about 10 minutes on 2 loaded cores
    python benchmarks/workflow_time.py --dry-run-only  # steps 1-2 only
"""

from __future__ import annotations

import argparse
import ast
import csv
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from datetime import datetime
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _bench  # noqa: E402

ROOT = _bench.ROOT
SNAKEMAKE = str(Path(sys.executable).with_name("snakemake"))
PREAMBLE = "import pickle; from snakemake.logging import logger; from snakemake.iocontainers import Snakemake"


def rule_files() -> tuple[dict[str, str], dict[str, str]]:
    """rule -> workflow script, and benchmark folder -> rule, from rules/*.smk (``use rule A as B``
    inherits A's script)."""
    scripts: dict[str, str] = {}
    bench_dirs: dict[str, str] = {}
    for smk in sorted((ROOT / "rules").glob("*.smk")):
        current, expect = None, None
        for line in smk.read_text().splitlines():
            if m := re.match(r"(?:rule|checkpoint)\s+(\w+)\s*:", line):
                current, expect = m.group(1), None
            elif m := re.match(r"use rule\s+(\w+)\s+as\s+(\w+)", line):
                if m.group(1) in scripts:
                    scripts[m.group(2)] = scripts[m.group(1)]
                current, expect = m.group(2), None
            elif m := re.match(r"\s+(script|benchmark):\s*$", line):
                expect = m.group(1)
            elif expect and line.strip():
                if expect == "script":
                    scripts[current] = str((smk.parent / line.strip().strip("\"'")).resolve())
                elif b := re.search(r"benchmarks/(\w+)/", line):
                    bench_dirs[b.group(1)] = current
                expect = None
    return scripts, bench_dirs


def rule_scripts() -> dict[str, str]:
    return rule_files()[0]


def import_snippet(script: str) -> str:
    """The preamble's imports plus the script's top-level imports, as one ``python -c`` program."""
    tree = ast.parse(Path(script).read_text())
    imports = [ast.unparse(node) for node in tree.body if isinstance(node, (ast.Import, ast.ImportFrom))]
    imports = [i for i in imports if i != "import sys"]
    return "; ".join(["import sys", f"sys.path.insert(0, {str(ROOT)!r})", PREAMBLE, *imports])


def timed(cmd: list[str], cwd: str | None = None) -> tuple[float, subprocess.CompletedProcess]:
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True)
    return time.perf_counter() - t0, proc


def import_times(scripts: dict[str, str], repeats: int) -> dict[str, float]:
    """Median wall time of start-up + imports per distinct script."""
    out = {}
    for script in sorted(set(scripts.values())):
        snippet = import_snippet(script)
        times = []
        for _ in range(repeats):
            seconds, proc = timed([sys.executable, "-c", snippet])
            if proc.returncode != 0:
                raise SystemExit(f"importing for {script} failed:\n{proc.stderr[-2000:]}")
            times.append(seconds)
        out[script] = statistics.median(times)
    return out


def dry_run(configfile: Path, repeats: int) -> tuple[list[float], int]:
    times, jobs = [], 0
    for _ in range(repeats):
        with tempfile.TemporaryDirectory(prefix="eebench-dry-") as empty:
            seconds, proc = timed(
                [
                    SNAKEMAKE,
                    "all_figures",
                    "-n",
                    "--snakefile",
                    str(ROOT / "Snakefile"),
                    "--directory",
                    empty,
                    "--configfile",
                    str(configfile),
                    "--quiet",
                    "rules",
                ]
            )
        if proc.returncode != 0:
            raise SystemExit(f"dry run of {configfile} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}")
        times.append(seconds)
        m = re.search(r"^total\s+(\d+)", proc.stdout + proc.stderr, re.M)
        jobs = int(m.group(1)) if m else jobs
    return times, jobs


STAMP = re.compile(r"^\[(\w{3} \w{3} +\d+ \d\d:\d\d:\d\d \d{4})\]")
START = re.compile(r"^(?:local)?rule (\w+):")
JOBID = re.compile(r"^\s+jobid: (\d+)")
FINISH = re.compile(r"^Finished jobid: (\d+) \(Rule: (\w+)\)")


def job_times(log: str) -> dict[int, tuple[str, float]]:
    """jobid -> (rule, seconds from its start line to its finish line) from a Snakemake log."""
    now = None
    starts: dict[int, tuple[str, datetime]] = {}
    pending_rule = None
    out = {}
    for line in log.splitlines():
        if m := STAMP.match(line):
            now = datetime.strptime(" ".join(m.group(1).split()), "%a %b %d %H:%M:%S %Y")
        elif m := START.match(line):
            pending_rule = (m.group(1), now)
        elif (m := JOBID.match(line)) and pending_rule is not None:
            starts[int(m.group(1))] = pending_rule
            pending_rule = None
        elif m := FINISH.match(line):
            jobid = int(m.group(1))
            if jobid in starts and now is not None:
                rule, t0 = starts[jobid]
                out[jobid] = (rule, (now - t0).total_seconds())
    return out


def benchmark_files(results: Path) -> dict[str, list[dict[str, float]]]:
    """rule -> rows of its ``benchmark:`` files (s, cpu_time, max_rss, ...)."""
    folders = rule_files()[1]
    out: dict[str, list[dict[str, float]]] = defaultdict(list)
    for tsv in sorted((results / "benchmarks").rglob("*.tsv")):
        folder = tsv.relative_to(results / "benchmarks").parts[0]
        rule = folders.get(folder, folder)
        with open(tsv) as f:
            for row in csv.DictReader(f, delimiter="\t"):
                out[rule].append({k: float(v) for k, v in row.items() if _is_number(v)})
    return out


def _is_number(v: str) -> bool:
    try:
        float(v)
        return True
    except (TypeError, ValueError):
        return False


def main() -> None:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--configfile", default=str(ROOT / "config" / "config.yaml"), help="config of the full run")
    p.add_argument("--paper-config", default=str(ROOT / "config" / "paper.yaml"))
    p.add_argument("--target", default="all_figures")
    p.add_argument("--cores", type=int, default=2)
    p.add_argument("--workdir", help="scratch directory for the full run (default: a new temporary one)")
    p.add_argument("--keep", action="store_true", help="keep the scratch directory")
    p.add_argument("--dry-run-only", action="store_true", help="only the dry runs and import timings")
    p.add_argument("--summarise", metavar="DIR", help="only summarise a run kept with --keep/--workdir (no new run)")
    p.add_argument("--skip-dry-run", action="store_true", help="leave out the dry runs")
    p.add_argument("--dry-repeats", type=int, default=2)
    p.add_argument("--import-repeats", type=int, default=3)
    opts = p.parse_args()
    print(f"workflow timing; {_bench.load_average()}")

    print("\n== planning (snakemake -n --quiet rules, empty directory) ==")
    for name, cfg in (
        () if opts.skip_dry_run or opts.summarise else (("default", opts.configfile), ("paper", opts.paper_config))
    ):
        times, jobs = dry_run(Path(cfg), opts.dry_repeats)
        print(
            f"{name:<8} {jobs:4d} jobs planned in " + ", ".join(f"{t:.1f}" for t in times) + " s"
            f"  ({_bench.load_average()})"
        )
    noop, _ = timed([sys.executable, "-c", "pass"])

    print(
        "\n== Python start-up + imports per rule script (median of "
        f"{opts.import_repeats}; bare interpreter {noop:.2f} s) =="
    )
    scripts = rule_scripts()
    imports = import_times(scripts, opts.import_repeats)
    for script, seconds in imports.items():
        rules = ", ".join(r for r, s in scripts.items() if s == script)
        print(f"  {Path(script).name:<20} {seconds:5.2f} s   ({rules})")
    if opts.dry_run_only:
        return

    if opts.summarise:  # a finished run: its log and benchmark files
        workdir = Path(opts.summarise)
        log = (workdir / "snakemake_run.log").read_text()
        wall = float((workdir / "snakemake_run.wall").read_text())
        load_before = "(not recorded)"
    else:
        workdir = Path(opts.workdir or tempfile.mkdtemp(prefix="eebench-workflow-"))
        if workdir.exists() and any(workdir.iterdir()) and opts.workdir:
            raise SystemExit(f"{workdir} is not empty: the run must start from nothing")
        workdir.mkdir(parents=True, exist_ok=True)
        print(f"\n== full run: snakemake --cores {opts.cores} {opts.target} in {workdir} ==", flush=True)
        load_before = _bench.load_average()
        wall, proc = timed(
            [
                SNAKEMAKE,
                "--cores",
                str(opts.cores),
                opts.target,
                "--snakefile",
                str(ROOT / "Snakefile"),
                "--directory",
                str(workdir),
                "--configfile",
                opts.configfile,
            ]
        )
        log = proc.stdout + proc.stderr
        (workdir / "snakemake_run.log").write_text(log)
        (workdir / "snakemake_run.wall").write_text(f"{wall}\n")
        if proc.returncode != 0:
            raise SystemExit(
                f"the run failed ({proc.returncode}); log in {workdir}/snakemake_run.log\n" + proc.stderr[-3000:]
            )
    jobs = job_times(log)
    bench = benchmark_files(workdir / "results")

    per_rule: dict[str, list[float]] = defaultdict(list)
    for rule, seconds in jobs.values():
        per_rule[rule].append(seconds)
    print(f"wall {wall:.0f} s, {len(jobs)} jobs; load before: {load_before}, after: {_bench.load_average()}")
    print()
    head = (
        f"{'rule':<20} {'jobs':>5} {'job wall s':>11} {'mean s':>7} {'bench s':>8} {'bench cpu s':>11} "
        f"{'start-up s':>10} {'start-up %':>10}"
    )
    print(head)
    print("-" * len(head))
    total_job = total_start = 0.0
    for rule in sorted(per_rule, key=lambda r: -sum(per_rule[r])):
        ts = per_rule[rule]
        script = scripts.get(rule)
        start = imports[script] * len(ts) if script else 0.0
        b = bench.get(rule, [])
        bs = f"{sum(r.get('s', 0) for r in b):8.0f}" if b else f"{'':>8}"
        bc = f"{sum(r.get('cpu_time', 0) for r in b):11.0f}" if b else f"{'':>11}"
        share = f"{100 * min(start, sum(ts)) / sum(ts):9.0f}%" if sum(ts) > 0 else f"{'':>10}"
        print(f"{rule:<20} {len(ts):5d} {sum(ts):11.0f} {statistics.mean(ts):7.1f} {bs} {bc} {start:10.0f} {share}")
        total_job += sum(ts)
        total_start += min(start, sum(ts))
    print("-" * len(head))
    print(
        f"{'all jobs':<20} {len(jobs):5d} {total_job:11.0f} {'':>7} {'':>8} {'':>11} {total_start:10.0f} "
        f"{100 * total_start / max(total_job, 1e-9):9.0f}%"
    )
    print()
    print(
        f"Wall time {wall:.0f} s on {opts.cores} cores. Of the {total_job:.0f} job-seconds, about {total_start:.0f} "
        f"({100 * total_start / max(total_job, 1e-9):.0f}%) are Python start-up and imports (measured per script, "
        f"x jobs), the remaining {total_job - total_start:.0f} ({100 * (1 - total_start / max(total_job, 1e-9)):.0f}%) "
        "computation and I/O. Job wall times have 1 s resolution (Snakemake's log timestamps); "
        f"jobs overlap on {opts.cores} cores, so job-seconds exceed wall time."
    )
    if not opts.keep and not opts.workdir and not opts.summarise:
        shutil.rmtree(workdir, ignore_errors=True)
    else:
        print(f"kept {workdir}")


if __name__ == "__main__":
    main()

"""Per-rule time table from the Snakemake ``benchmark:`` files of a run (``results/benchmarks``)."""

from __future__ import annotations

from pathlib import Path

import pandas as pd


def rule_time_table(results: str | Path) -> pd.DataFrame:
    """One row per rule with benchmark files: jobs, total / mean / max wall seconds, CPU seconds,
    peak memory, and the slowest job's cell. Empty when the run wrote no benchmark files."""
    root = Path(results) / "benchmarks"
    rows = []
    for tsv in sorted(root.glob("*/**/*.tsv")):
        parts = tsv.relative_to(root).with_suffix("").parts
        frame = pd.read_csv(tsv, sep="\t")
        if frame.empty or "s" not in frame:
            continue
        last = frame.iloc[-1]  # a job rerun appends nothing: the file is rewritten; take the last row
        rows.append(
            {
                "rule": parts[0],
                "cell": "/".join(parts[1:]),
                "s": float(last["s"]),
                "cpu_s": float(last.get("cpu_time", float("nan"))),
                "max_rss_mb": float(last.get("max_rss", float("nan"))),
            }
        )
    if not rows:
        return pd.DataFrame(columns=["rule", "jobs", "total_s", "mean_s", "max_s", "cpu_s", "max_rss_mb", "slowest"])
    jobs = pd.DataFrame(rows)
    table = jobs.groupby("rule").agg(
        jobs=("s", "size"),
        total_s=("s", "sum"),
        mean_s=("s", "mean"),
        max_s=("s", "max"),
        cpu_s=("cpu_s", "sum"),
        max_rss_mb=("max_rss_mb", "max"),
    )
    table["slowest"] = jobs.loc[jobs.groupby("rule")["s"].idxmax()].set_index("rule")["cell"]
    return table.sort_values("total_s", ascending=False).reset_index()


def format_table(table: pd.DataFrame) -> str:
    if table.empty:
        return "no benchmark files (results/benchmarks/) yet"
    return table.to_string(index=False, float_format=lambda v: f"{v:.1f}")

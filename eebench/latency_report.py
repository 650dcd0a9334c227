"""The latency aggregate and figure, and Table 1's curves in milliseconds; only from the cells'
latency tables (``results/latency/``) and the aggregates."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402

from . import io  # noqa: E402
from .config import Cell  # noqa: E402
from .latency import exit_latency, expected_ms  # noqa: E402
from .report import lay_out, save_figure  # noqa: E402
from .style import styles_from  # noqa: E402

IDENTITY = ("dataset", "architecture", "variant", "seed")


def latency_table(cells: list[Cell], files: list[str]) -> pd.DataFrame:
    """One table of every cell's latency rows (budgets or per-exit), the cell's identity columns first."""
    frames = []
    for cell, path in zip(cells, files):
        frame = pd.read_csv(path)
        for i, (key, value) in enumerate(zip(IDENTITY, (cell.dataset, cell.arch, cell.variant, cell.seed))):
            frame.insert(i, key, value)
        frames.append(frame)
    return pd.concat(frames, ignore_index=True)


def aggregate_latency(cells: list[Cell], files: list[str], out: str) -> None:
    io.write_csv(out, latency_table(cells, files))


def with_time_axis(budgeted: pd.DataFrame, exits: pd.DataFrame, batch_size: int) -> pd.DataFrame:
    """``budgeted`` (an aggregate of budgeted curves) with an ``ms`` column: each budget's expected
    ms per image from the per-exit latency (``exits``, an aggregate of ``*_exits.csv``) of the same
    dataset, architecture and seed at ``batch_size``; nan where none was measured."""
    out = budgeted.copy()
    out["ms"] = float("nan")
    for (dataset, arch, seed), rows in out.groupby(["dataset", "architecture", "seed"]):
        measured = exits[(exits["dataset"] == dataset) & (exits["architecture"] == arch) & (exits["seed"] == seed)]
        if measured.empty:
            continue
        out.loc[rows.index, "ms"] = expected_ms(rows, exit_latency(measured, batch_size))
    return out


def _seed_mean(frame: pd.DataFrame, keys: list[str]) -> pd.DataFrame:
    columns = ["flops", "accuracy", "ms_per_image", "ms_ci_low", "ms_ci_high"]
    return frame.groupby(keys, sort=False)[columns].mean().reset_index()


def latency_figure(style: dict[str, Any], frame: pd.DataFrame, out_pdf: str, out_png: str) -> None:
    """Accuracy against measured ms per image (one panel per batch size, the order-statistic
    interval of each median as a horizontal bar) beside accuracy against FLOPs, per variant, in
    the variants' styles of every other figure (``style``: ``eebench.style.styles_for(config)``)."""
    styles, fills = styles_from(style), style["architectures"]
    batch_sizes = sorted(frame["batch_size"].unique())
    fig, axes = plt.subplots(1, len(batch_sizes) + 1, figsize=(5.0 * (len(batch_sizes) + 1), 4.2), squeeze=False)
    stats = _seed_mean(frame, ["architecture", "variant", "batch_size", "budget_id"])
    show_arch = frame["architecture"].nunique() > 1

    def look(arch: str, variant: str) -> dict[str, Any]:
        label = styles[variant].label + (f" ({arch})" if show_arch else "")
        return {
            **styles[variant].plot_kwargs(),
            "fillstyle": fills[arch] if show_arch else "full",
            "markersize": 4,
            "linewidth": 1.2,
            "label": label,
        }

    for ax, batch_size in zip(axes[0], batch_sizes):
        for (arch, variant), curve in stats[stats["batch_size"] == batch_size].groupby(
            ["architecture", "variant"], sort=False
        ):
            curve = curve.sort_values("ms_per_image")
            ax.errorbar(
                curve["ms_per_image"],
                curve["accuracy"],
                xerr=[curve["ms_per_image"] - curve["ms_ci_low"], curve["ms_ci_high"] - curve["ms_per_image"]],
                capsize=2,
                **look(arch, variant),
            )
        ax.set_xlabel(f"measured ms per image, batch {batch_size}")
        ax.set_title(f"dynamic early exit, batch {batch_size}")
    ax = axes[0][-1]
    first = stats[stats["batch_size"] == batch_sizes[0]]
    for (arch, variant), curve in first.groupby(["architecture", "variant"], sort=False):
        curve = curve.sort_values("flops")
        ax.plot(curve["flops"] / 1e6, curve["accuracy"], **look(arch, variant))
    ax.set_xlabel("FLOPs per image (M)")
    ax.set_title("the same budgets against FLOPs")
    for ax in axes[0]:
        ax.set_ylabel("top-1 accuracy (%)")
        ax.grid(alpha=0.3)
    devices = ", ".join(dict.fromkeys(frame["device"].astype(str)))
    note = (
        f"{devices}, {int(frame['threads'].iloc[0])} thread(s); median of {int(frame['repeats'].max())} "
        f"interleaved rounds of {', '.join(str(i) for i in sorted(frame['images'].unique()))} test images "
        f"per pass, bars: order-statistic interval of the median ({frame['ci_level'].min():.0%}); "
        "budgets from the cells' budgeted curves (thresholds from val); each cell is timed in its own job, "
        "so milliseconds compare best within a cell (speedups: results/latency/)."
    )
    fig.suptitle("Accuracy against measured latency and against FLOPs", fontsize=11)
    lay_out(fig, axes[0], note, panel_width=5.0, height=4.2)
    save_figure(fig, out_pdf, out_png)


def cell_exit_ms(exits: pd.DataFrame, batch_size: int) -> Callable[[Any], list[float]]:
    """A cell -> its per-exit cumulative ms at ``batch_size``, from an aggregate of per-exit latency
    tables of the same dataset, architecture and seed (the cells of one network share it)."""

    def of(cell: Any) -> list[float]:
        rows = exits[
            (exits["dataset"] == cell.dataset) & (exits["architecture"] == cell.arch) & (exits["seed"] == cell.seed)
        ]
        if rows.empty:
            raise ValueError(
                f"no per-exit latency of {cell.dataset}/{cell.arch}/seed{cell.seed}: Table 1 in ms "
                "needs report.table1.latency_variant measured on every seed"
            )
        return exit_latency(rows, batch_size)

    return of

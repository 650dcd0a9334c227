"""Tables and figures, built only from the aggregate tables.

Seeds are averaged: anytime points by exit, budgeted points by budget index (each budget's
expected FLOPs and accuracy averaged over seeds); the spread is the standard deviation over seeds,
drawn as a band. Every method variant keeps one colour, and every architecture one marker, in
all figures.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import seaborn as sns  # noqa: E402

from . import io  # noqa: E402
from .calibration import accuracy_at_budget  # noqa: E402

MARKERS = ("o", "s", "^", "D", "v", "P", "X", "*")
PROTOCOL_NOTE = (
    "budgeted batch: MSDNet protocol, 39 budgets q=p/20, thresholds calibrated on val (no train "
    "augmentation), applied to test; FLOPs: {convention} convention, cumulative per exit"
)


def variant_styles(config: dict[str, Any]) -> dict[str, Any]:
    names = list(config["methods"]) + list(config.get("posthoc", {}))
    palette = sns.color_palette("tab20", n_colors=max(len(names), 1))
    return {name: palette[i] for i, name in enumerate(names)}


def arch_markers(config: dict[str, Any]) -> dict[str, str]:
    return {name: MARKERS[i % len(MARKERS)] for i, name in enumerate(config["architectures"])}


def label_of(config: dict[str, Any], variant: str) -> str:
    spec = config["methods"].get(variant) or config.get("posthoc", {}).get(variant, {})
    return spec.get("label", variant)


def seed_mean(frame: pd.DataFrame, key: str) -> pd.DataFrame:
    """Mean and standard deviation over seeds of FLOPs and accuracy, per cell and ``key``."""
    group = ["dataset", "architecture", "variant", key]
    stats = frame.groupby(group, sort=False).agg(
        flops=("flops", "mean"), accuracy=("accuracy", "mean"), accuracy_std=("accuracy", "std"),
        seeds=("seed", "nunique"),
    )
    return stats.reset_index().fillna({"accuracy_std": 0.0})


def _draw(ax: Any, stats: pd.DataFrame, config: dict[str, Any], key: str, show_arch: bool) -> None:
    colours, markers = variant_styles(config), arch_markers(config)
    for (arch, variant), curve in stats.groupby(["architecture", "variant"], sort=False):
        curve = curve.sort_values("flops")
        mflops = curve["flops"] / 1e6
        label = label_of(config, variant) + (f" ({arch})" if show_arch else "")
        ax.plot(mflops, curve["accuracy"], marker=markers[arch], markersize=4 if key == "exit" else 2.5,
                color=colours[variant], label=label, linewidth=1.2)
        if (curve["seeds"] > 1).any():
            ax.fill_between(mflops, curve["accuracy"] - curve["accuracy_std"],
                            curve["accuracy"] + curve["accuracy_std"], color=colours[variant], alpha=0.15)
    ax.set_xlabel("FLOPs per image (M)")
    ax.set_ylabel("top-1 accuracy (%)")
    ax.grid(alpha=0.3)


def curve_figure(config: dict[str, Any], frame: pd.DataFrame, kind: str, panels: list[tuple[str, pd.DataFrame]],
                 title: str, out_pdf: str, out_png: str) -> None:
    """One panel per (title, rows) pair; ``kind`` is anytime (per exit) or budgeted (per budget)."""
    key = "exit" if kind == "anytime" else "budget_id"
    width = max(1, len(panels))
    fig, axes = plt.subplots(1, width, figsize=(5.2 * width, 4.2), squeeze=False)
    for ax, (panel_title, rows) in zip(axes[0], panels):
        if rows.empty:
            ax.text(0.5, 0.5, "no cells configured for this panel", ha="center", va="center",
                    transform=ax.transAxes)
            ax.set_title(panel_title)
            continue
        _draw(ax, seed_mean(rows, key), config, key, show_arch=rows["architecture"].nunique() > 1)
        ax.set_title(panel_title)
        ax.legend(fontsize=7, loc="lower right")
    convention = frame["flops_convention"].iloc[0] if not frame.empty else config["flops_convention"]
    fig.suptitle(title, fontsize=11)
    fig.text(0.5, 0.005, PROTOCOL_NOTE.format(convention=convention), ha="center", fontsize=6.5, color="0.35")
    fig.tight_layout(rect=(0, 0.03, 1, 1))
    for path in (out_pdf, out_png):
        with io.atomic_path(path) as tmp:
            fig.savefig(tmp, format=Path(path).suffix[1:], dpi=150)
    plt.close(fig)


def _select(frame: pd.DataFrame, **filters: Any) -> pd.DataFrame:
    mask = pd.Series(True, index=frame.index)
    for column, values in filters.items():
        if values is not None:
            mask &= frame[column].isin(values if isinstance(values, (list, tuple)) else [values])
    return frame[mask]


def figure_panels(frame: pd.DataFrame, spec: dict[str, Any]) -> list[tuple[str, pd.DataFrame]]:
    """Panels of a figure spec: ``panel_by`` (dataset or architecture) and optional filters."""
    rows = _select(frame, dataset=spec.get("datasets"), architecture=spec.get("architectures"),
                   variant=spec.get("variants"))
    by = spec.get("panel_by", "dataset")
    values = spec.get(f"{by}s") or list(dict.fromkeys(rows[by]))
    return [(f"{by}: {v}", rows[rows[by] == v]) for v in values]


def table1(config: dict[str, Any], budgeted: pd.DataFrame, spec: dict[str, Any]) -> pd.DataFrame:
    """Paper 002's Table 1: budgeted accuracy per feature set (rows) at fixed budgets (columns).

    Each seed's curve is interpolated linearly at each budget, then seeds are averaged.
    """
    records = []
    for row_name, variant in spec["rows"].items():
        rows = _select(budgeted, dataset=spec["dataset"], architecture=spec["architecture"], variant=variant)
        record: dict[str, Any] = {"input": row_name, "variant": variant, "seeds": rows["seed"].nunique()}
        for budget in spec["budgets"]:
            values = [accuracy_at_budget(seed_rows["flops"], seed_rows["accuracy"], budget)
                      for _, seed_rows in rows.groupby("seed")]
            column = f"{budget / 1e6:g}M"
            record[column] = float(np.mean(values)) if values else float("nan")
            record[f"{column}_std"] = float(np.std(values, ddof=1)) if len(values) > 1 else float("nan")
        records.append(record)
    return pd.DataFrame(records)


def table_markdown(table: pd.DataFrame, title: str, note: str) -> str:
    columns = [c for c in table.columns if not c.endswith("_std") and c not in ("variant", "seeds")]
    lines = [f"# {title}", "", note, "", "| " + " | ".join(columns) + " |",
             "|" + "---|" * len(columns)]
    for _, row in table.iterrows():
        cells = []
        for c in columns:
            value = row[c]
            if isinstance(value, float):
                std = row.get(f"{c}_std", float("nan"))
                cells.append("n/a" if np.isnan(value) else f"{value:.2f}" + ("" if np.isnan(std) else f" ± {std:.2f}"))
            else:
                cells.append(str(value))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"

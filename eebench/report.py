"""Tables and figures, built only from the aggregate tables.

Seeds are averaged: anytime points by exit, budgeted points by budget index (each budget's
expected FLOPs and accuracy averaged over seeds); the spread is the standard deviation over seeds,
drawn as a band. Every method variant keeps one colour, and every architecture one marker, in
all figures.
"""

from __future__ import annotations

import textwrap
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


Panel = tuple[str, pd.DataFrame, str]  # title, aggregate rows, curve kind (anytime | budgeted)


def curve_figure(config: dict[str, Any], panels: list[Panel], title: str, out_pdf: str, out_png: str) -> None:
    """One panel per (title, rows, kind): anytime curves per exit, budgeted curves per budget."""
    width = max(1, len(panels))
    fig, axes = plt.subplots(1, width, figsize=(5.2 * width, 4.2), squeeze=False)
    convention = next((rows["flops_convention"].iloc[0] for _, rows, _ in panels if not rows.empty),
                      config["flops_convention"])
    for ax, (panel_title, rows, kind) in zip(axes[0], panels):
        key = "exit" if kind == "anytime" else "budget_id"
        if rows.empty:
            ax.text(0.5, 0.5, "no cells configured for this panel", ha="center", va="center",
                    transform=ax.transAxes)
            ax.set_title(panel_title)
            continue
        _draw(ax, seed_mean(rows, key), config, key, show_arch=rows["architecture"].nunique() > 1)
        ax.set_title(panel_title)
        ax.legend(fontsize=7, loc="lower right")
    fig.suptitle(title, fontsize=11)
    note = textwrap.fill(PROTOCOL_NOTE.format(convention=convention), width=60 * width)
    fig.text(0.5, 0.005, note, ha="center", va="bottom", fontsize=6.5, color="0.35")
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


def figure_panels(frames: dict[str, pd.DataFrame], spec: dict[str, Any], kind: str) -> list[Panel]:
    """Panels of a figure spec: one per value of ``panel_by`` (dataset, architecture or curve),
    restricted to the spec's datasets, architectures and variants when given."""
    by = spec.get("panel_by", "curve" if kind == "both" else "dataset")
    kinds = ["anytime", "budgeted"] if kind == "both" else [kind]
    panels: list[Panel] = []
    for curve in kinds:
        rows = _select(frames[curve], dataset=spec.get("datasets"), architecture=spec.get("architectures"),
                       variant=spec.get("variants"))
        if by == "curve":
            panels.append((f"{curve} ({', '.join(dict.fromkeys(rows['dataset']))})", rows, curve))
            continue
        values = spec.get(f"{by}s") or list(dict.fromkeys(rows[by]))
        panels += [(f"{by}: {v}", rows[rows[by] == v], curve) for v in values]
    return panels


def table1(config: dict[str, Any], budgeted: pd.DataFrame, spec: dict[str, Any]) -> pd.DataFrame:
    """Paper 002's Table 1: budgeted accuracy per feature set (rows) at fixed budgets (columns).

    Each seed's curve is interpolated linearly at each budget, then seeds are averaged. With
    ``budget_unit: ms`` the budgets are ms per image, read off the curves' ``ms`` column
    (``latency_report.with_time_axis``).
    """
    in_ms = spec.get("budget_unit", "flops") == "ms"
    records = []
    for row_name, variant in spec["rows"].items():
        rows = _select(budgeted, dataset=spec["dataset"], architecture=spec["architecture"], variant=variant)
        record: dict[str, Any] = {"input": row_name, "variant": variant, "seeds": rows["seed"].nunique()}
        for budget in spec["budgets"]:
            values = [accuracy_at_budget(seed_rows["ms" if in_ms else "flops"], seed_rows["accuracy"], budget)
                      for _, seed_rows in rows.groupby("seed")]
            column = f"{budget:g}ms" if in_ms else f"{budget / 1e6:g}M"
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


def eenets_table(anytime: pd.DataFrame, flops_by_arch: dict[str, dict[str, Any]], spec: dict[str, Any]) -> pd.DataFrame:
    """EENets (confidence-branch exits at 0.5) beside the plain ResNet of the same depth.

    ``spec``: ``rows`` = list of {dataset, architecture (the EE-ResNet), plain (its plain ResNet
    architecture)}, ``variant`` (the EENets training variant), ``plain_variant``.
    """
    records = []
    for row in spec["rows"]:
        ee = _select(anytime, dataset=row["dataset"], architecture=row["architecture"], variant=spec["variant"])
        plain = _select(anytime, dataset=row["dataset"], architecture=row["plain"], variant=spec["plain_variant"])
        record: dict[str, Any] = {"dataset": row["dataset"], "architecture": row["architecture"],
                                  "plain_architecture": row["plain"]}
        if not ee.empty and "confidence_exit_accuracy" in ee:
            per_seed = ee.groupby("seed")[["confidence_exit_accuracy", "confidence_exit_cost_ratio"]].first()
            record["eenets_accuracy"] = per_seed["confidence_exit_accuracy"].mean()
            record["eenets_accuracy_std"] = per_seed["confidence_exit_accuracy"].std(ddof=1)
            record["eenets_cost_ratio"] = per_seed["confidence_exit_cost_ratio"].mean()
            baseline = flops_by_arch.get(f"{row['dataset']}/{row['architecture']}", {}).get("baseline_flops")
            record["eenets_mflops"] = record["eenets_cost_ratio"] * baseline / 1e6 if baseline else float("nan")
        if not plain.empty:
            last = plain[plain["exit"] == plain["exit"].max()].groupby("seed")["accuracy"].first()
            record["plain_accuracy"] = last.mean()
            record["plain_accuracy_std"] = last.std(ddof=1)
            record["plain_mflops"] = plain["flops"].max() / 1e6
        record["seeds"] = int(ee["seed"].nunique()) if not ee.empty else 0
        records.append(record)
    columns = ["dataset", "architecture", "plain_architecture", "eenets_accuracy", "eenets_accuracy_std",
               "eenets_cost_ratio", "eenets_mflops", "plain_accuracy", "plain_accuracy_std", "plain_mflops", "seeds"]
    return pd.DataFrame(records).reindex(columns=columns)


def published_value(entry: dict[str, Any], anytime: pd.DataFrame, budgeted: pd.DataFrame) -> float:
    """Our number for one published claim, or nan when the config has no such cell.

    Kinds: ``anytime_exit`` (accuracy of exit ``exit``, -1 = last), ``anytime_at`` (the anytime
    curve interpolated at ``budget``), ``budgeted_at`` (accuracy at
    ``budget`` FLOPs, interpolated), ``flops_to_reach`` (smallest FLOPs at which the budgeted
    curve reaches ``accuracy``), ``peak_flops`` (FLOPs of the budgeted curve's best accuracy),
    ``budgeted_gap`` (mean accuracy of ``variant`` minus ``other`` over ``budgets``).
    """
    kind = entry["kind"]
    select = dict(dataset=entry["dataset"], architecture=entry["architecture"], variant=entry["variant"])
    if kind in ("anytime_exit", "anytime_at"):
        rows = _select(anytime, **select)
        if rows.empty:
            return float("nan")
        if kind == "anytime_at":
            curve = seed_mean(rows, "exit")
            return accuracy_at_budget(curve["flops"], curve["accuracy"], entry["budget"])
        exit_k = rows["exit"].max() if entry.get("exit", -1) == -1 else entry["exit"]
        return float(rows[rows["exit"] == exit_k]["accuracy"].mean())
    rows = _select(budgeted, **select)
    if rows.empty:
        return float("nan")
    curve = seed_mean(rows, "budget_id").sort_values("flops")
    if kind == "budgeted_at":
        return accuracy_at_budget(curve["flops"], curve["accuracy"], entry["budget"])
    if kind == "flops_to_reach":
        reached = curve[curve["accuracy"] >= entry["accuracy"]]
        return float(reached["flops"].min()) if not reached.empty else float("nan")
    if kind == "peak_flops":
        return float(curve.loc[curve["accuracy"].idxmax(), "flops"])
    if kind == "budgeted_gap":
        other = _select(budgeted, dataset=entry["dataset"], architecture=entry["architecture"], variant=entry["other"])
        if other.empty:
            return float("nan")
        other_curve = seed_mean(other, "budget_id").sort_values("flops")
        gaps = [accuracy_at_budget(curve["flops"], curve["accuracy"], b)
                - accuracy_at_budget(other_curve["flops"], other_curve["accuracy"], b) for b in entry["budgets"]]
        return float(np.nanmean(gaps)) if not np.all(np.isnan(gaps)) else float("nan")
    raise ValueError(f"published entry {entry.get('id')!r}: unknown kind {kind!r}")


def reproduction_report(published: list[dict[str, Any]], anytime: pd.DataFrame, budgeted: pd.DataFrame,
                        config_name: str) -> str:
    lines = [
        "# Reproduction report", "",
        f"Each number the papers state, beside ours from this run's aggregates (config: `{config_name}`).",
        "Budgeted numbers use the MSDNet protocol (39 budgets, thresholds from val without train",
        "augmentation); accuracy at a budget is linearly interpolated on the seed-averaged curve.",
        "`no data` means this config has no cell for that claim (e.g. the embedded digits default",
        "has no CIFAR cells): such rows are never filled in.", "",
        "| id | claim | source | published | ours | difference |", "|---|---|---|---|---|---|",
    ]
    covered = 0
    for entry in published:
        ours = published_value(entry, anytime, budgeted)
        scale = entry.get("scale", 1.0)
        value = entry["value"]
        if np.isnan(ours):
            ours_text, diff_text = "no data", "no data"
        else:
            covered += 1
            ours_text = f"{ours / scale:.2f}"
            diff_text = f"{ours / scale - value:+.2f}"
        lines.append(f"| {entry['id']} | {entry['claim']} | {entry['source']} | {value:g} | {ours_text} | {diff_text} |")
    lines += ["", f"{covered} of {len(published)} published numbers have a matching cell in this config."]
    return "\n".join(lines) + "\n"

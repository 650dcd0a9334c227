"""Tables and figures, built only from the aggregate tables and the cells' per-sample records.

Seeds are averaged: anytime points by exit, budgeted points by budget index (each budget's
expected FLOPs and accuracy averaged over seeds). Every band and interval is a percentile
bootstrap interval (``eebench.bootstrap``): over test samples, and over seeds too where a curve
has several. Every variant keeps one colour, marker and line style in all figures
(``eebench.style``); architectures sharing a panel differ by marker fill.
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

from . import io  # noqa: E402
from .bootstrap import VariantReplicates, interval  # noqa: E402
from .calibration import N_BUDGETS, accuracy_at_budget  # noqa: E402
from .style import VariantStyle, styles_from  # noqa: E402

PROTOCOL_NOTE = (
    f"budgeted batch: MSDNet protocol, {N_BUDGETS} budgets q=p/20, thresholds calibrated on val (no train "
    "augmentation), applied to test; FLOPs: {convention} convention, cumulative per exit"
)
COINCIDE_ATOL = 1e-9  # accuracy points and relative FLOPs under which two curves are one


def interval_note(rows: list[pd.DataFrame], budgeted: bool = True) -> str:
    """What the bands are, from the summary rows drawn."""
    frame = pd.concat([r for r in rows if not r.empty]) if any(not r.empty for r in rows) else pd.DataFrame()
    if frame.empty or "accuracy_ci_low" not in frame:
        return ""
    seeds = sorted(frame["seeds"].unique())
    seed_text = (
        f"{seeds[0]} seed" + ("s, seeds resampled too" if seeds[0] > 1 else "")
        if len(seeds) == 1
        else f"{seeds[0]}-{seeds[-1]} seeds, resampled too where there are several"
    )
    return (
        f"Bands: {frame['level'].iloc[0]:.0%} percentile bootstrap intervals of accuracy "
        f"({int(frame['resamples'].iloc[0])} resamples of the {int(frame['n_test'].max())} test samples; "
        f"{seed_text})" + ("; budgeted bands at each budget's mean FLOPs." if budgeted else ".")
    )


def _coincides(a: pd.DataFrame, b: pd.DataFrame) -> bool:
    if len(a) != len(b):
        return False
    return bool(
        np.allclose(a["flops"].to_numpy(), b["flops"].to_numpy(), rtol=COINCIDE_ATOL, atol=0)
        and np.allclose(a["accuracy"].to_numpy(), b["accuracy"].to_numpy(), rtol=0, atol=COINCIDE_ATOL)
    )


def _draw(
    ax: Any, rows: pd.DataFrame, styles: dict[str, VariantStyle], fills: dict[str, str], anytime: bool, show_arch: bool
) -> list[str]:
    """One line with markers and one band per (architecture, variant); a curve that coincides with
    one drawn before it is drawn on top with open, larger markers. Returns the coincidence notes."""
    drawn: list[tuple[str, pd.DataFrame]] = []
    notes = []
    arch_order, variant_order = list(fills), list(styles)  # config order: the same in every figure

    def rank(names: list[str], name: str) -> int:
        return names.index(name) if name in names else len(names)

    groups = sorted(
        rows.groupby(["architecture", "variant"], sort=False),
        key=lambda item: (rank(arch_order, item[0][0]), rank(variant_order, item[0][1])),
    )
    for (arch, variant), curve in groups:
        curve = curve.sort_values("flops")
        style = styles.get(variant, VariantStyle("0.3", "o", "solid", variant))
        name = style.label + (f" ({arch})" if show_arch else "")
        twin = next((other for other, points in drawn if _coincides(curve, points)), None)
        size = 4.5 if anytime else 3.2
        kwargs: dict[str, Any] = {"fillstyle": fills.get(arch, "full"), "markersize": size, "zorder": 2}
        label = name
        if twin is not None:
            kwargs.update(fillstyle="none", markersize=size * 1.9, markeredgewidth=1.1, zorder=3)
            label += f"\n(coincides with {twin})"
            notes.append(f"{name} coincides with {twin} (open markers on top).")
        mflops = curve["flops"].to_numpy() / 1e6
        ax.plot(mflops, curve["accuracy"], label=label, linewidth=1.2, **style.plot_kwargs(), **kwargs)
        if "accuracy_ci_low" in curve and curve["accuracy_ci_low"].notna().all():
            ax.fill_between(
                mflops,
                curve["accuracy_ci_low"],
                curve["accuracy_ci_high"],
                color=style.colour,
                alpha=0.12,
                linewidth=0,
                zorder=1,
            )
        drawn.append((name, curve))
    ax.set_xlabel("FLOPs per image (M)")
    ax.set_ylabel("top-1 accuracy (%)")
    ax.grid(alpha=0.3)
    return notes


Panel = tuple[str, pd.DataFrame, str]  # title, summary rows, curve kind (anytime | budgeted)


def draw_figure(panels: list[Panel], title: str, style: dict[str, Any]) -> Any:
    """One panel per (title, rows, kind) of seed-summary rows (``results/aggregate/*_summary.csv``);
    ``style`` is ``eebench.style.styles_for(config)``. One legend for the figure, right of the
    panels (it never hides a curve); the protocol caption below them. Returns the figure."""
    width = max(1, len(panels))
    fig, axes = plt.subplots(1, width, figsize=(5.2 * width, 4.6), squeeze=False)
    styles, fills = styles_from(style), style["architectures"]
    convention = next(
        (rows["flops_convention"].iloc[0] for _, rows, _ in panels if not rows.empty and "flops_convention" in rows),
        style["flops_convention"],
    )
    notes: list[str] = []
    for ax, (panel_title, rows, kind) in zip(axes[0], panels):
        ax.set_title(panel_title)
        if rows.empty:
            ax.text(0.5, 0.5, "no cells configured for this panel", ha="center", va="center", transform=ax.transAxes)
            continue
        several = rows["architecture"].nunique() > 1  # then architectures differ by marker fill
        notes += _draw(ax, rows, styles, fills if several else {}, kind == "anytime", show_arch=several)
    fig.suptitle(title, fontsize=11)
    budgeted = any(kind != "anytime" for _, _, kind in panels)
    text = " ".join(
        [
            PROTOCOL_NOTE.format(convention=convention) + ".",
            interval_note([r for _, r, _ in panels], budgeted),
            *dict.fromkeys(notes),
        ]
    )
    lay_out(fig, axes[0], text, panel_width=5.2, height=4.6)
    return fig


def lay_out(fig: Any, axes: Any, caption_text: str, panel_width: float, height: float) -> None:
    """One legend for the figure right of the panels (it never hides a curve), the caption below
    them, measured so that neither overlaps the panels' axis labels."""
    entries = {}  # label -> handle, first panel first
    for ax in axes:
        for handle, label in zip(*ax.get_legend_handles_labels()):
            entries.setdefault(label, handle)
    legend = fig.legend(list(entries.values()), list(entries), loc="center right", fontsize=6.5, frameon=False)
    fig.canvas.draw()
    legend_width = legend.get_window_extent().width / fig.dpi + 0.15  # inches
    fig.set_size_inches(panel_width * len(axes) + legend_width, height)
    caption = fig.text(
        0.5,
        0.01,
        textwrap.fill(caption_text, width=int(95 * len(axes) + 14 * legend_width)),
        ha="center",
        va="bottom",
        fontsize=6.5,
        color="0.3",
    )
    fig.canvas.draw()  # measure the caption, then fit the panels (and the suptitle) above it, left of the legend
    to_figure = fig.transFigure.inverted()
    bottom = to_figure.transform(caption.get_window_extent().p1)[1] + 0.01
    right = 1 - legend_width / fig.get_size_inches()[0]
    legend.set_bbox_to_anchor((1, (1 + bottom) / 2), transform=fig.transFigure)
    fig.tight_layout(rect=(0, bottom, right, 1))


def save_figure(fig: Any, out_pdf: str, out_png: str) -> None:
    for path in (out_pdf, out_png):
        with io.atomic_path(path) as tmp:
            fig.savefig(tmp, format=Path(path).suffix[1:], dpi=150)
    plt.close(fig)


def curve_figure(panels: list[Panel], title: str, out_pdf: str, out_png: str, style: dict[str, Any]) -> None:
    save_figure(draw_figure(panels, title, style), out_pdf, out_png)


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
        rows = _select(
            frames[curve],
            dataset=spec.get("datasets"),
            architecture=spec.get("architectures"),
            variant=spec.get("variants"),
        )
        if by == "curve":
            panels.append((f"{curve} ({', '.join(dict.fromkeys(rows['dataset']))})", rows, curve))
            continue
        values = spec.get(f"{by}s") or list(dict.fromkeys(rows[by]))
        panels += [(f"{by}: {v}", rows[rows[by] == v], curve) for v in values]
    return panels


def table1(
    budgeted: pd.DataFrame, spec: dict[str, Any], variants: dict[tuple[str, str, str], VariantReplicates] | None = None
) -> pd.DataFrame:
    """Paper 002's Table 1: budgeted accuracy per feature set (rows) at fixed budgets (columns).

    Each seed's curve is interpolated linearly at each budget, then seeds are averaged; with
    ``variants`` (the rows' per-sample replicates) each budget gets ``_ci_low``/``_ci_high``: the
    same interpolation within each bootstrap resample, then percentiles. With ``budget_unit: ms``
    the budgets are ms per image, read off the curves' ``ms`` column
    (``latency_report.with_time_axis``), and the replicates must carry per-exit ms as their costs.
    """
    in_ms = spec.get("budget_unit", "flops") == "ms"
    records = []
    for row_name, variant in spec["rows"].items():
        rows = _select(budgeted, dataset=spec["dataset"], architecture=spec["architecture"], variant=variant)
        record: dict[str, Any] = {"input": row_name, "variant": variant, "seeds": rows["seed"].nunique()}
        replicates = (variants or {}).get((spec["dataset"], spec["architecture"], variant))
        if replicates is not None:
            _, at = replicates.at_budgets(spec["budgets"])
            low, high = interval(at, replicates.level)
        for i, budget in enumerate(spec["budgets"]):
            values = [
                accuracy_at_budget(seed_rows["ms" if in_ms else "flops"], seed_rows["accuracy"], budget)
                for _, seed_rows in rows.groupby("seed")
            ]
            column = f"{budget:g}ms" if in_ms else f"{budget / 1e6:g}M"
            record[column] = float(np.mean(values)) if values else float("nan")
            record[f"{column}_std"] = float(np.std(values, ddof=1)) if len(values) > 1 else float("nan")
            if variants is not None:
                record[f"{column}_ci_low"] = float(low[i]) if replicates is not None else float("nan")
                record[f"{column}_ci_high"] = float(high[i]) if replicates is not None else float("nan")
        records.append(record)
    return pd.DataFrame(records)


def _with_interval(value: float, low: float, high: float, digits: int) -> str:
    if np.isnan(value):
        return "n/a"
    text = f"{value:.{digits}f}"
    return text if np.isnan(low) else f"{text} [{low:.{digits}f}, {high:.{digits}f}]"


def table_markdown(table: pd.DataFrame, title: str, note: str) -> str:
    """Value columns as ``76.8 [76.1, 77.5]`` where they have ``_ci_low``/``_ci_high`` columns,
    else ``76.84 ± 0.31`` (standard deviation over seeds, when there are several)."""
    suffixes = ("_std", "_ci_low", "_ci_high")
    columns = [c for c in table.columns if not c.endswith(suffixes) and c not in ("variant", "seeds")]
    lines = [f"# {title}", "", note, "", "| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for _, row in table.iterrows():
        cells = []
        for c in columns:
            value = row[c]
            if isinstance(value, float) and f"{c}_ci_low" in row:
                cells.append(_with_interval(value, row[f"{c}_ci_low"], row[f"{c}_ci_high"], 1))
            elif isinstance(value, float):
                std = row.get(f"{c}_std", float("nan"))
                cells.append("n/a" if np.isnan(value) else f"{value:.2f}" + ("" if np.isnan(std) else f" ± {std:.2f}"))
            else:
                cells.append(str(value))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def eenets_table(anytime: pd.DataFrame, flops_by_arch: dict[str, dict[str, Any]], spec: dict[str, Any]) -> pd.DataFrame:
    """EENets (confidence-branch exits at 0.5) beside the plain ResNet of the same depth, with
    each exit's own test accuracy and the share of test images that leave there, so that an exit
    no image leaves (a dead exit) shows as 0.

    ``spec``: ``rows`` = list of {dataset, architecture (the EE-ResNet), plain (its plain ResNet
    architecture), optional variant}, ``variant`` (the EENets training variant of rows that name
    none), ``plain_variant``. Per-exit columns: ``exit{k}_accuracy`` (%, mean over seeds) and
    ``exit{k}_leaving`` (% of test images leaving at exit k under the 0.5 rule, mean over seeds;
    from the anytime curve's ``confidence_exit_fraction``).
    """
    records, most_exits = [], 0
    for row in spec["rows"]:
        variant = row.get("variant", spec["variant"])
        ee = _select(anytime, dataset=row["dataset"], architecture=row["architecture"], variant=variant)
        plain = _select(anytime, dataset=row["dataset"], architecture=row["plain"], variant=spec["plain_variant"])
        record: dict[str, Any] = {
            "dataset": row["dataset"],
            "architecture": row["architecture"],
            "variant": variant,
            "plain_architecture": row["plain"],
        }
        if not ee.empty and "confidence_exit_accuracy" in ee:
            per_seed = ee.groupby("seed")[["confidence_exit_accuracy", "confidence_exit_cost_ratio"]].first()
            record["eenets_accuracy"] = per_seed["confidence_exit_accuracy"].mean()
            record["eenets_accuracy_std"] = per_seed["confidence_exit_accuracy"].std(ddof=1)
            record["eenets_cost_ratio"] = per_seed["confidence_exit_cost_ratio"].mean()
            baseline = flops_by_arch.get(f"{row['dataset']}/{row['architecture']}", {}).get("baseline_flops")
            record["eenets_mflops"] = record["eenets_cost_ratio"] * baseline / 1e6 if baseline else float("nan")
        if not ee.empty:
            per_exit = ee.groupby("exit", sort=True)
            for k, accuracy in per_exit["accuracy"].mean().items():
                record[f"exit{k}_accuracy"] = accuracy
            if "confidence_exit_fraction" in ee:
                for k, share in per_exit["confidence_exit_fraction"].mean().items():
                    record[f"exit{k}_leaving"] = 100 * share
            most_exits = max(most_exits, int(ee["exit"].max()))
        if not plain.empty:
            last = plain[plain["exit"] == plain["exit"].max()].groupby("seed")["accuracy"].first()
            record["plain_accuracy"] = last.mean()
            record["plain_accuracy_std"] = last.std(ddof=1)
            record["plain_mflops"] = plain["flops"].max() / 1e6
        record["seeds"] = int(ee["seed"].nunique()) if not ee.empty else 0
        records.append(record)
    columns = [
        "dataset",
        "architecture",
        "variant",
        "plain_architecture",
        "eenets_accuracy",
        "eenets_accuracy_std",
        "eenets_cost_ratio",
        "eenets_mflops",
        "plain_accuracy",
        "plain_accuracy_std",
        "plain_mflops",
        "seeds",
    ]
    columns += [f"exit{k}_{what}" for k in range(1, most_exits + 1) for what in ("accuracy", "leaving")]
    return pd.DataFrame(records).reindex(columns=columns)


Estimate = tuple[float, np.ndarray]  # point, (R,) bootstrap replicates


def _flops_to_reach(flops: np.ndarray, accuracy: np.ndarray, target: float) -> np.ndarray:
    """Smallest FLOPs at which the curve reaches ``target`` (inf where it never does), per row."""
    return np.where(accuracy >= target, flops, np.inf).min(axis=-1)


def _peak_flops(flops: np.ndarray, accuracy: np.ndarray) -> np.ndarray:
    best = accuracy.argmax(axis=-1)
    return np.take_along_axis(flops, best[..., None], axis=-1)[..., 0]


def published_estimate(
    entry: dict[str, Any], variants: dict[tuple[str, str, str], VariantReplicates]
) -> Estimate | None:
    """Our number for one published claim and its bootstrap replicates, or None when the config
    has no such cell.

    Kinds: ``anytime_exit`` (accuracy of exit ``exit``, -1 = last), ``anytime_at`` (the anytime
    curve interpolated at ``budget``), ``budgeted_at`` (accuracy at ``budget`` FLOPs: each seed's
    curve interpolated, then averaged, as in Table 1), ``flops_to_reach`` (smallest FLOPs at
    which the seed-averaged budgeted curve reaches ``accuracy``; inf when it does not),
    ``peak_flops`` (FLOPs of that curve's best accuracy), ``budgeted_gap`` (mean over ``budgets``
    of the accuracy of ``variant`` minus ``other``, paired resample by resample).
    """
    kind = entry["kind"]
    variant = variants.get((entry["dataset"], entry["architecture"], entry["variant"]))
    if variant is None:
        return None
    if kind == "anytime_exit":
        point, reps = variant.mean("anytime_accuracy")
        k = len(point) if entry.get("exit", -1) == -1 else entry["exit"]
        return (float(point[k - 1]), reps[:, k - 1]) if 1 <= k <= len(point) else None
    if kind in ("anytime_at", "budgeted_at"):
        point, reps = variant.at_budgets([entry["budget"]], "anytime" if kind == "anytime_at" else "budgeted")
        return float(point[0]), reps[:, 0]
    if kind in ("flops_to_reach", "peak_flops"):
        flops, acc, flops_r, acc_r = variant.mean_curve()
        if kind == "peak_flops":
            return float(_peak_flops(flops, acc)), _peak_flops(flops_r, acc_r)
        return float(_flops_to_reach(flops, acc, entry["accuracy"])), _flops_to_reach(flops_r, acc_r, entry["accuracy"])
    if kind == "budgeted_gap":
        other = variants.get((entry["dataset"], entry["architecture"], entry["other"]))
        if other is None:
            return None
        point_a, reps_a = variant.at_budgets(entry["budgets"])
        point_b, reps_b = other.at_budgets(entry["budgets"])
        with np.errstate(all="ignore"):
            gap = point_a - point_b
            if np.isnan(gap).all():
                return float("nan"), np.full(len(reps_a), np.nan)
            return float(np.nanmean(gap)), np.nanmean(reps_a - reps_b, axis=1)
    raise ValueError(f"published entry {entry.get('id')!r}: unknown kind {kind!r}")


def _number(value: float) -> str:
    return "not reached" if np.isinf(value) else ("n/a" if np.isnan(value) else f"{value:.2f}")


def reproduction_report(
    published: list[dict[str, Any]], variants: dict[tuple[str, str, str], VariantReplicates], config_name: str
) -> str:
    levels = {v.level for v in variants.values()} or {0.95}
    level = f"{next(iter(levels)):.0%}"
    resamples = next(iter({v.resamples for v in variants.values()}), 0)
    lines = [
        "# Reproduction report",
        "",
        f"Each number the papers state, beside ours from this run's per-sample records (config: `{config_name}`).",
        f"Budgeted numbers use the MSDNet protocol ({N_BUDGETS} budgets, thresholds from val without train",
        "augmentation); accuracy at a budget is each seed's curve linearly interpolated, then averaged",
        "over seeds (as in Table 1). FLOPs to reach an accuracy and peak FLOPs are read off the",
        f"seed-averaged budgeted curve. `ours` carries its {level} percentile bootstrap interval ({resamples}",
        "resamples of the test set; seeds resampled too where there are several; thresholds fixed);",
        "`inside` says whether the published number lies in it. The interval is our uncertainty only:",
        "the paper's own number has sampling and seed noise of its own.",
        "`no data` means this config has no cell for that claim (e.g. the embedded digits default",
        "has no CIFAR cells): such rows are never filled in.",
        "",
        "| id | claim | source | published | ours [interval] | difference | inside |",
        "|---|---|---|---|---|---|---|",
    ]
    covered = inside_count = 0
    for entry in published:
        estimate = published_estimate(entry, variants)
        scale = entry.get("scale", 1.0)
        value = entry["value"]
        if estimate is None:
            ours_text = diff_text = inside_text = "no data"
        else:
            covered += 1
            point, reps = estimate
            low, high = (float(x[0]) / scale for x in interval(reps[:, None], next(iter(levels))))
            ours = point / scale
            ours_text = _number(ours) + ("" if np.isnan(low) else f" [{_number(low)}, {_number(high)}]")
            diff_text = f"{ours - value:+.2f}" if np.isfinite(ours) else "n/a"
            if np.isnan(low):
                inside_text = "n/a"
            else:
                inside_text = "yes" if low <= value <= high else "no"
                inside_count += inside_text == "yes"
        lines.append(
            f"| {entry['id']} | {entry['claim']} | {entry['source']} | {value:g} | {ours_text} | "
            f"{diff_text} | {inside_text} |"
        )
    lines += [
        "",
        f"{covered} of {len(published)} published numbers have a matching cell in this config; "
        f"{inside_count} of them lie inside our interval.",
    ]
    return "\n".join(lines) + "\n"

"""Paired comparisons: every variant of a figure against the figure's reference variant.

The two variants of a pair share the test set, so their bootstrap replicates use the same
resampled test indices (and, with as many seeds, the same seed draws): the difference is
computed resample by resample, a paired bootstrap. Budgeted curves are compared at fixed FLOPs
budgets (each curve interpolated within each resample), anytime curves at each exit; with
per-exit costs in measured ms (``unit="ms"``), budgeted curves at fixed time budgets.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd

from .bootstrap import VariantReplicates, holm, interval, p_value
from .summary import VariantKey

DEFAULT_SPREAD = (0.2, 0.4, 0.6, 0.8)  # default budgets: these fractions of the range both curves cover
COLUMNS = [
    "figures",
    "curve",
    "dataset",
    "architecture",
    "variant",
    "reference",
    "exit",
    "budget",
    "budget_unit",
    "accuracy",
    "reference_accuracy",
    "difference",
    "ci_low",
    "ci_high",
    "p_value",
    "p_holm",
    "n_test",
    "seeds",
    "reference_seeds",
    "interval",
    "resamples",
    "level",
]


def budgets_for(
    settings: dict[str, Any], dataset: str, arch: str, a: VariantReplicates, b: VariantReplicates, unit: str = "flops"
) -> np.ndarray:
    """``report.comparison_budgets`` in ``unit`` for this dataset and architecture; else Table 1's
    budgets where Table 1 is on them in that unit; else, for FLOPs, 4 budgets spread over the range
    both curves cover (time budgets are only those asked for)."""
    for entry in settings["budgets"]:
        if (entry["dataset"], entry["architecture"], entry.get("budget_unit", "flops")) == (dataset, arch, unit):
            return np.asarray(entry["budgets"], dtype=float)
    table = settings.get("table1")
    if table is not None and (table["dataset"], table["architecture"], table.get("budget_unit", "flops")) == (
        dataset,
        arch,
        unit,
    ):
        return np.asarray(table["budgets"], dtype=float)
    if unit != "flops":
        return np.asarray([], dtype=float)
    low = max(a.mean_curve()[0].min(), b.mean_curve()[0].min())
    high = min(a.mean_curve()[0].max(), b.mean_curve()[0].max())
    return low + (high - low) * np.asarray(DEFAULT_SPREAD) if high > low else np.asarray([], dtype=float)


def _selected(spec: dict[str, Any], key: VariantKey) -> bool:
    return all(
        spec.get(name) is None or value in spec[name]
        for name, value in zip(("datasets", "architectures", "variants"), key)
    )


def _pair_rows(
    curve: str,
    key: VariantKey,
    reference: str,
    a: VariantReplicates,
    b: VariantReplicates,
    settings: dict[str, Any],
    unit: str,
) -> list[dict[str, Any]]:
    dataset, arch, variant = key
    if a.n_test != b.n_test:
        raise ValueError(
            f"{dataset}/{arch}: {variant} has {a.n_test} test samples and {reference} {b.n_test}; "
            "a paired comparison needs the same test set"
        )
    if curve == "anytime":
        point_a, reps_a = a.mean("anytime_accuracy")
        point_b, reps_b = b.mean("anytime_accuracy")
        exits = np.arange(1, len(point_a) + 1)
        budgets = a.flops_per_exit
        if len(point_a) != len(point_b):
            raise ValueError(f"{dataset}/{arch}: {variant} and {reference} have different exit counts")
    else:
        budgets = budgets_for(settings, dataset, arch, a, b, unit)
        point_a, reps_a = a.at_budgets(budgets)
        point_b, reps_b = b.at_budgets(budgets)
        exits = np.full(len(budgets), np.nan)
    diff = reps_a - reps_b
    low, high = interval(diff, a.level)
    p = p_value(diff)
    return [
        {
            "curve": curve,
            "dataset": dataset,
            "architecture": arch,
            "variant": variant,
            "reference": reference,
            "exit": exits[i],
            "budget": float(budgets[i]),
            "budget_unit": unit,
            "accuracy": point_a[i],
            "reference_accuracy": point_b[i],
            "difference": point_a[i] - point_b[i],
            "ci_low": low[i],
            "ci_high": high[i],
            "p_value": p[i],
            "n_test": a.n_test,
            "seeds": len(a.seeds),
            "reference_seeds": len(b.seeds),
            "interval": a.interval_kind if len(a.seeds) >= len(b.seeds) else b.interval_kind,
            "resamples": a.resamples,
            "level": a.level,
        }
        for i in range(len(budgets))
    ]


def comparisons(
    variants: dict[VariantKey, VariantReplicates],
    settings: dict[str, Any],
    variants_in_ms: dict[VariantKey, VariantReplicates] | None = None,
) -> pd.DataFrame:
    """One row per (curve, dataset, architecture, variant, reference, budget or exit); ``settings``
    is ``eebench.config.comparison_settings``. ``variants_in_ms``: the same records with measured
    per-exit ms as costs, for the budgeted rows at ``budget_unit: ms`` budgets. ``p_holm``: Holm's
    adjustment over every row."""
    rows: dict[tuple, dict[str, Any]] = {}
    for figure, spec in settings["figures"].items():
        curves = ["anytime", "budgeted"] if spec["kind"] == "both" else [spec["kind"]]
        passes = [(curve, "flops", variants) for curve in curves]
        if variants_in_ms and "budgeted" in curves:
            passes.append(("budgeted", "ms", variants_in_ms))
        for curve, unit, selected in passes:
            for row in _figure_rows(spec, curve, unit, selected, settings):
                ident = (curve, unit, row["dataset"], row["architecture"], row["variant"], row["budget"])
                rows.setdefault(ident, {**row, "figures": []})["figures"].append(figure)
    table = pd.DataFrame(list(rows.values()), columns=COLUMNS)
    table["figures"] = table["figures"].map(" ".join)
    table["p_holm"] = holm(table["p_value"].to_numpy(dtype=float))
    return table


def _figure_rows(
    spec: dict[str, Any],
    curve: str,
    unit: str,
    variants: dict[VariantKey, VariantReplicates],
    settings: dict[str, Any],
) -> list[dict[str, Any]]:
    """The rows of one figure's selection on one curve: each variant against the reference."""
    reference = spec["reference"]
    known = list(settings["labels"])
    order = spec.get("variants") or sorted(
        {v for _, _, v in variants}, key=lambda v: (known.index(v) if v in known else len(known), v)
    )
    out = []
    for dataset, arch in sorted({(d, a) for d, a, _ in variants if (d, a, reference) in variants}):
        for variant in order:
            key = (dataset, arch, variant)
            if variant == reference or key not in variants or not _selected(spec, key):
                continue
            out += _pair_rows(
                curve, key, reference, variants[key], variants[(dataset, arch, reference)], settings, unit
            )
    return out


def _verdict(row: pd.Series) -> str:
    if np.isnan(row["ci_low"]):
        return "n/a (budget outside a curve)"
    if row["ci_low"] == row["ci_high"] == 0:
        return "identical in every resample"
    if row["ci_low"] > 0 or row["ci_high"] < 0:
        direction = "higher" if row["ci_low"] > 0 else "lower"
        return f"**{direction}**" + (" (also after Holm)" if row["p_holm"] < 1 - row["level"] else "")
    return "interval contains 0"


def comparisons_markdown(table: pd.DataFrame, labels: dict[str, str]) -> str:
    """A page a reader can scan: per dataset, architecture, curve and reference, which differences
    exclude zero."""
    level = f"{table['level'].iloc[0]:.0%}" if not table.empty else "95%"
    finite = table.dropna(subset=["ci_low"])
    excluding = finite[(finite["ci_low"] > 0) | (finite["ci_high"] < 0)]
    after_holm = excluding[excluding["p_holm"] < 1 - excluding["level"]]
    lines = [
        "# Paired comparisons",
        "",
        "Each variant of a figure against the figure's reference variant (`report.figures.<f>.reference`),",
        "on the same test set: differences in accuracy points (variant minus reference) with their",
        f"{level} percentile interval from a paired bootstrap (the same resampled test indices for both",
        "variants, and the same seed draws when they have as many seeds; thresholds fixed, from val).",
        "Budgeted curves are compared at fixed FLOPs budgets (each curve interpolated within each",
        "resample; at time budgets, with the measured per-exit ms of results/latency/ as the exits'",
        "costs), anytime curves at each exit. p: two-sided, 2 min(P(d <= 0), P(d >= 0)) over the",
        "resamples with the +1 correction; p (Holm): adjusted over every row of this page. With many",
        "rows some intervals exclude 0 by chance alone; the Holm column controls that.",
        "",
        f"{len(excluding)} of {len(finite)} differences exclude 0 at {level}; {len(after_holm)} remain after "
        "Holm's correction.",
        "",
    ]
    for (curve, unit, dataset, arch, reference), group in table.groupby(
        ["curve", "budget_unit", "dataset", "architecture", "reference"], sort=False
    ):
        n_test = int(group["n_test"].iloc[0])
        in_ms = unit == "ms"
        title = f"{curve}{' at time budgets' if in_ms else ''}: {dataset} / {arch}"
        lines += [
            f"## {title}, against {labels.get(reference, reference)} ({n_test} test samples)",
            "",
            f"| variant | {'exit' if curve == 'anytime' else 'budget'} ({'ms' if in_ms else 'MFLOPs'}) | accuracy | "
            "reference | "
            "difference [interval] | p | p (Holm) | seeds | |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
        for _, row in group.iterrows():
            budget = f"{row['budget']:.3g}" if in_ms else f"{row['budget'] / 1e6:.3g}"
            where = f"{int(row['exit'])} ({budget})" if curve == "anytime" else budget
            diff = (
                "n/a"
                if np.isnan(row["difference"])
                else f"{row['difference']:+.2f} [{row['ci_low']:+.2f}, {row['ci_high']:+.2f}]"
            )
            p_text = "n/a" if np.isnan(row["p_value"]) else f"{row['p_value']:.3g}"
            holm_text = "n/a" if np.isnan(row["p_holm"]) else f"{row['p_holm']:.3g}"
            lines.append(
                f"| {labels.get(row['variant'], row['variant'])} | {where} | {row['accuracy']:.2f} | "
                f"{row['reference_accuracy']:.2f} | {diff} | {p_text} | {holm_text} | "
                f"{row['seeds']} vs {row['reference_seeds']} | {_verdict(row)} |"
            )
        lines.append("")
    return "\n".join(lines)

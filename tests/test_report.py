"""Figures, Table 1 and the reproduction report from synthetic per-sample records."""

from __future__ import annotations

import functools
import itertools

import numpy as np
import pandas as pd
import pytest
from test_bootstrap import random_cell

from eebench.bootstrap import BootstrapSettings, VariantReplicates
from eebench.report import draw_figure, figure_panels, reproduction_report, table1, table_markdown
from eebench.style import styles_for, variant_styles
from eebench.summary import summary_tables

SETTINGS = BootstrapSettings(resamples=200, seed=0)
CONFIG = {
    "flops_convention": "reference",
    "architectures": {"msdnet": {}, "ranet": {}},
    "methods": {
        "standard": {"label": "Standard"},
        "gater": {"label": "Ours: joint gater"},
        "gater_frozen": {"label": "Ours: frozen"},
        "boostnet": {"label": "BoostNet"},
    },
    "posthoc": {"eenet": {"label": "EENet"}},
    "pretrained": {},
    "report": {},
}


@functools.lru_cache(maxsize=1)
def synthetic_variants() -> dict:
    """msdnet: standard, gater, boostnet and gater_frozen (bit-identical to standard, as the
    frozen-backbone gater is); ranet: standard and gater."""
    records = {}
    for i, (arch, variant) in enumerate(
        [("msdnet", "standard"), ("msdnet", "gater"), ("msdnet", "boostnet"), ("ranet", "standard"), ("ranet", "gater")]
    ):
        records[(arch, variant)] = {s: random_cell(seed=10 * i + s)[0] for s in (0, 1)}
    records[("msdnet", "gater_frozen")] = records[("msdnet", "standard")]
    return {("digits", arch, v): VariantReplicates.build(r, SETTINGS) for (arch, v), r in records.items()}


def summaries() -> dict[str, pd.DataFrame]:
    variants = synthetic_variants()
    ident = pd.DataFrame(
        [
            {
                "dataset": d,
                "architecture": a,
                "variant": v,
                "method": v,
                "kind": "training",
                "flops_convention": "reference",
            }
            for d, a, v in variants
        ]
    )
    anytime, budgeted = summary_tables(variants, ident, ident)
    return {"anytime": anytime, "budgeted": budgeted}


def _overlap(a, b) -> bool:
    return a.x0 < b.x1 and b.x0 < a.x1 and a.y0 < b.y1 and b.y0 < a.y1


@pytest.mark.parametrize(
    "kind,spec",
    [
        ("budgeted", {"variants": ["standard", "gater", "gater_frozen", "boostnet"]}),
        ("anytime", {"variants": ["standard", "gater", "gater_frozen", "boostnet"], "panel_by": "architecture"}),
        ("both", {"architectures": ["msdnet"]}),
    ],
)
def test_every_variant_is_drawn_visibly_and_no_text_overlaps_the_axis_labels(kind, spec):
    frames = summaries()
    panels = figure_panels(frames, spec, kind)
    fig = draw_figure(panels, "a figure title", styles_for(CONFIG))
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    labels = {v.label for v in variant_styles(CONFIG).values()}
    for ax, (_, rows, _) in zip(fig.axes, panels):
        lines = [line for line in ax.get_lines() if line.get_label() and not line.get_label().startswith("_")]
        for arch, variant in set(zip(rows["architecture"], rows["variant"])):
            name = CONFIG["methods"][variant]["label"]
            drawn = [
                line
                for line in lines
                if line.get_label().startswith(name)
                and (rows["architecture"].nunique() == 1 or f"({arch})" in line.get_label())
            ]
            assert len(drawn) == 1, (variant, arch, [line.get_label() for line in lines])
            line = drawn[0]
            assert line.get_visible() and len(line.get_xdata()) >= 4 and line.get_marker() not in (None, "None", "")
        assert all(line.get_label().split("\n")[0].split(" (")[0] in labels for line in lines)
        # the frozen gater is bit-identical to standard: drawn on top, open and larger markers, named
        frozen = [line for line in lines if line.get_label().startswith("Ours: frozen")]
        standard = [
            line for line in lines if line.get_label().startswith("Standard") and "(ranet)" not in line.get_label()
        ]
        if frozen:
            assert "coincides with Standard" in frozen[0].get_label()
            assert frozen[0].get_zorder() > standard[0].get_zorder()
            assert frozen[0].get_fillstyle() == "none" and frozen[0].get_markersize() > standard[0].get_markersize()
            assert frozen[0].get_linestyle() != standard[0].get_linestyle()
    axis_labels = [t for ax in fig.axes for t in (ax.xaxis.label, ax.yaxis.label)]
    others = [fig._suptitle, *fig.texts, *(ax.title for ax in fig.axes), *fig.legends]
    caption = fig.texts[-1]
    assert "bootstrap" in caption.get_text() and "seeds resampled" in caption.get_text()
    assert "coincides with Standard" in caption.get_text().replace("\n", " ")
    for label, other in itertools.product(axis_labels, others):
        assert not _overlap(label.get_window_extent(renderer), other.get_window_extent(renderer)), other
    for ax in fig.axes:  # the caption clears every tick label, the legend every panel
        for tick in ax.get_xticklabels():
            assert not _overlap(tick.get_window_extent(renderer), caption.get_window_extent(renderer))
        assert not _overlap(ax.get_window_extent(renderer), fig.legends[0].get_window_extent(renderer))
    assert fig.legends[0].get_window_extent(renderer).x1 <= fig.bbox.x1 + 1  # inside the figure


def test_variant_styles_are_unique_and_stable():
    config = {
        "methods": {f"m{i}": {} for i in range(14)},
        "posthoc": {"p1": {}, "p2": {}},
        "pretrained": {},
        "architectures": {"a": {}},
        "flops_convention": "reference",
        "report": {},
    }
    styles = variant_styles(config)
    assert len({(s.colour, s.marker) for s in styles.values()}) == 16
    assert len({(s.marker, s.linestyle) for s in styles.values()}) == 16
    assert variant_styles(config) == styles
    # the variants the figures draw come first: 10 of them get 10 different colours
    config["report"] = {"figures": {"fig3_budgeted": {"variants": [f"m{i}" for i in range(13, 3, -1)]}}}
    drawn = [variant_styles(config)[f"m{i}"].colour for i in range(4, 14)]
    assert len(set(drawn)) == 10


def test_summary_tables_hold_seed_means_and_intervals():
    frames = summaries()
    anytime = frames["anytime"]
    row = anytime[(anytime["architecture"] == "msdnet") & (anytime["variant"] == "standard")].iloc[0]
    assert row["seeds"] == 2 and row["interval"] == "test-set x seed bootstrap" and row["resamples"] == 200
    for stat in ("accuracy", "top5", "nll", "ece"):
        assert row[f"{stat}_ci_low"] <= row[stat] <= row[f"{stat}_ci_high"]
    budgeted = frames["budgeted"]
    assert {"budget_id", "flops_ci_low", "flops_ci_high", "accuracy_std"} <= set(budgeted)
    assert len(budgeted) == 6 * 39


def test_table1_prints_value_and_interval():
    variants = synthetic_variants()
    rows = []
    for (d, a, v), rep in variants.items():
        for s, seed in enumerate(rep.seeds):
            for b in range(39):
                rows.append(
                    {
                        "dataset": d,
                        "architecture": a,
                        "variant": v,
                        "seed": seed,
                        "budget_id": b + 1,
                        "flops": rep.points["budgeted_flops"][s, b],
                        "accuracy": rep.points["budgeted_accuracy"][s, b],
                    }
                )
    spec = {
        "dataset": "digits",
        "architecture": "msdnet",
        "budgets": [1.5e6, 2.5e6],
        "rows": {"confidence": "gater", "all": "boostnet"},
    }
    table = table1(pd.DataFrame(rows), spec, variants)
    assert {"1.5M_ci_low", "1.5M_ci_high", "2.5M_ci_low"} <= set(table)
    first = table.iloc[0]
    assert first["1.5M_ci_low"] <= first["1.5M"] <= first["1.5M_ci_high"]
    text = table_markdown(table, "Table 1", "note")
    want = f"{first['1.5M']:.1f} [{first['1.5M_ci_low']:.1f}, {first['1.5M_ci_high']:.1f}]"
    assert f"| confidence | {want} |" in text


def test_reproduction_report_gives_intervals_and_says_whether_the_paper_is_inside():
    variants = synthetic_variants()
    point, reps = variants[("digits", "msdnet", "gater")].mean("anytime_accuracy")
    published = [
        {
            "id": "inside",
            "claim": "c",
            "source": "s",
            "kind": "anytime_exit",
            "dataset": "digits",
            "architecture": "msdnet",
            "variant": "gater",
            "exit": -1,
            "value": float(point[-1]),
        },
        {
            "id": "outside",
            "claim": "c",
            "source": "s",
            "kind": "anytime_exit",
            "dataset": "digits",
            "architecture": "msdnet",
            "variant": "gater",
            "exit": -1,
            "value": float(point[-1]) + 50,
        },
        {
            "id": "reach",
            "claim": "c",
            "source": "s",
            "kind": "flops_to_reach",
            "dataset": "digits",
            "architecture": "msdnet",
            "variant": "gater",
            "accuracy": 101.0,
            "scale": 1e6,
            "value": 2.0,
        },
        {
            "id": "gap",
            "claim": "c",
            "source": "s",
            "kind": "budgeted_gap",
            "dataset": "digits",
            "architecture": "msdnet",
            "variant": "gater_frozen",
            "other": "standard",
            "budgets": [1.5e6, 2.5e6],
            "value": 2.0,
        },
        {
            "id": "missing",
            "claim": "c",
            "source": "s",
            "kind": "budgeted_at",
            "dataset": "cifar100",
            "architecture": "msdnet",
            "variant": "gater",
            "budget": 3e7,
            "value": 70.0,
        },
    ]
    text = reproduction_report(published, variants, "test")
    lines = {
        line.split(" | ")[0][2:]: line for line in text.splitlines() if line.startswith("| ") and " | c | " in line
    }
    assert lines["inside"].endswith("| +0.00 | yes |") and " [" in lines["inside"]
    assert lines["outside"].endswith("| no |")
    assert "not reached" in lines["reach"]
    assert "| +0.00 [+0.00, +0.00]" not in lines["gap"] and "0.00 [0.00, 0.00] | -2.00 | no |" in lines["gap"]
    assert lines["missing"].endswith("| no data | no data | no data |")
    assert "4 of 5 published numbers" in text and "1 of them lie inside" in text


def test_comparison_budgets_come_from_the_config_then_table1_then_the_shared_range():
    from eebench.comparisons import budgets_for, comparisons, comparisons_markdown

    variants = synthetic_variants()
    a, b = variants[("digits", "msdnet", "gater")], variants[("digits", "msdnet", "standard")]
    settings = {
        "budgets": [{"dataset": "digits", "architecture": "ranet", "budgets": [2e6]}],
        "table1": {"dataset": "digits", "architecture": "msdnet", "budgets": [1.5e6, 2.5e6]},
    }
    assert budgets_for(settings, "digits", "ranet", a, b).tolist() == [2e6]
    assert budgets_for(settings, "digits", "msdnet", a, b).tolist() == [1.5e6, 2.5e6]
    spread = budgets_for({"budgets": [], "table1": None}, "digits", "msdnet", a, b)
    low = max(a.mean_curve()[0].min(), b.mean_curve()[0].min())
    high = min(a.mean_curve()[0].max(), b.mean_curve()[0].max())
    np.testing.assert_allclose(spread, low + (high - low) * np.array([0.2, 0.4, 0.6, 0.8]))
    spec = {
        "figures": {
            "fig3": {"kind": "budgeted", "reference": "standard", "variants": ["standard", "gater"]},
            "fig5": {"kind": "both", "reference": "standard", "architectures": ["msdnet"]},
        },
        "labels": {k: v["label"] for k, v in CONFIG["methods"].items()},
        **settings,
    }
    table = comparisons(variants, spec)
    budgeted = table[table["curve"] == "budgeted"]
    # fig3 and fig5 both compare gater with standard on msdnet: one row each, naming both figures
    gater = budgeted[(budgeted["variant"] == "gater") & (budgeted["architecture"] == "msdnet")]
    assert gater["figures"].tolist() == ["fig3 fig5", "fig3 fig5"] and gater["budget"].tolist() == [1.5e6, 2.5e6]
    assert set(budgeted[budgeted["architecture"] == "ranet"]["budget"]) == {2e6}
    assert set(table[table["curve"] == "anytime"]["variant"]) == {"gater", "gater_frozen", "boostnet"}
    text = comparisons_markdown(table, spec["labels"])
    assert "## budgeted: digits / msdnet, against Standard" in text and "identical in every resample" in text


def test_time_budget_comparisons_equal_flops_ones_when_ms_are_scaled_flops():
    """With each exit's 'measured ms' = its FLOPs x 1e-6, the rows at b ms equal the rows at
    b x 1e6 FLOPs; Table 1's budgets in ms are never read as FLOPs budgets."""
    from eebench.comparisons import comparisons, comparisons_markdown

    variants = synthetic_variants()
    in_ms = {}
    for i, (arch, variant) in enumerate([("msdnet", "standard"), ("msdnet", "gater")]):
        records = {s: dict(random_cell(seed=10 * i + s)[0]) for s in (0, 1)}
        for record in records.values():
            record["flops"] = record["flops"] * 1e-6
        in_ms[("digits", arch, variant)] = VariantReplicates.build(records, SETTINGS)
    spec = {
        "figures": {"fig3": {"kind": "budgeted", "reference": "standard", "variants": ["standard", "gater"]}},
        "labels": {k: v["label"] for k, v in CONFIG["methods"].items()},
        "budgets": [
            {"dataset": "digits", "architecture": "msdnet", "budgets": [1.5e6, 2.5e6], "budget_unit": "flops"},
            {"dataset": "digits", "architecture": "msdnet", "budgets": [1.5, 2.5], "budget_unit": "ms"},
        ],
        "table1": {"dataset": "digits", "architecture": "ranet", "budgets": [3.0], "budget_unit": "ms"},
    }
    table = comparisons(variants, spec, in_ms)
    gater = table[(table["variant"] == "gater") & (table["architecture"] == "msdnet")]
    flops, ms = gater[gater["budget_unit"] == "flops"], gater[gater["budget_unit"] == "ms"]
    assert ms["budget"].tolist() == [1.5, 2.5] and flops["budget"].tolist() == [1.5e6, 2.5e6]
    for column in ("accuracy", "reference_accuracy", "difference", "ci_low", "ci_high", "p_value"):
        np.testing.assert_allclose(ms[column].to_numpy(), flops[column].to_numpy())
    ranet = table[table["architecture"] == "ranet"]  # Table 1 is on ranet in ms: the FLOPs rows spread instead
    assert len(ranet) == 4 and ranet["budget"].min() > 1e5 and set(ranet["budget_unit"]) == {"flops"}
    text = comparisons_markdown(table, spec["labels"])
    assert "## budgeted at time budgets: digits / msdnet, against Standard" in text and "| budget (ms) |" in text

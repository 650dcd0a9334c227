"""Table 1 at budgets in milliseconds, and the latency figure, from hand-made latency tables."""

from __future__ import annotations

import pandas as pd
import pytest

from eebench.config import Cell
from eebench.latency import accuracy_at_time
from eebench.latency_report import aggregate_latency, latency_figure, with_time_axis
from eebench.report import table1
from eebench.style import styles_for


def _curves() -> pd.DataFrame:
    rows = []
    for seed, shift in ((0, 0.0), (1, 2.0)):
        for b, (f1, f2, acc) in enumerate([(1.0, 0.0, 50.0), (0.5, 0.5, 60.0), (0.0, 1.0, 70.0)], start=1):
            rows.append(
                {
                    "dataset": "digits",
                    "architecture": "msdnet",
                    "variant": "gater",
                    "seed": seed,
                    "budget_id": b,
                    "flops": 1.0 + b,
                    "accuracy": acc + shift,
                    "exit_fraction_1": f1,
                    "exit_fraction_2": f2,
                }
            )
    return pd.DataFrame(rows)


def test_table1_in_milliseconds():
    exits = pd.DataFrame(
        {
            "dataset": "digits",
            "architecture": "msdnet",
            "seed": [0, 0, 1, 1, 0, 0],
            "exit": [1, 2, 1, 2, 1, 2],
            "batch_size": [1, 1, 1, 1, 8, 8],
            "ms_per_image": [2.0, 4.0, 1.0, 5.0, 0.1, 0.2],
        }
    )
    curves = with_time_axis(_curves(), exits, batch_size=1)
    assert curves[curves["seed"] == 0]["ms"].tolist() == [2.0, 3.0, 4.0]
    assert curves[curves["seed"] == 1]["ms"].tolist() == [1.0, 3.0, 5.0]
    spec = {
        "dataset": "digits",
        "architecture": "msdnet",
        "budgets": [2.5, 3.0],
        "rows": {"c+e": "gater"},
        "budget_unit": "ms",
    }
    table = table1(curves, spec)
    seed0 = accuracy_at_time(curves[curves["seed"] == 0], [2.0, 4.0], 2.5)
    seed1 = accuracy_at_time(curves[curves["seed"] == 1], [1.0, 5.0], 2.5)
    assert (seed0, seed1) == (55.0, pytest.approx(59.5))
    assert table.loc[0, "2.5ms"] == pytest.approx((seed0 + seed1) / 2)
    assert table.loc[0, "3ms"] == pytest.approx(61.0)
    in_flops = table1(curves, {**spec, "budget_unit": "flops", "budgets": [3.0]})
    assert in_flops.loc[0, "3e-06M"] == pytest.approx(61.0)


def test_latency_aggregate_and_figure(tmp_path):
    frames = []
    for variant in ("standard", "gater"):
        frame = pd.DataFrame(
            {
                "budget_id": [1, 20, 39] * 2,
                "flops": [2e6, 4e6, 6e6] * 2,
                "accuracy": [80.0, 90.0, 92.0] * 2,
                "batch_size": [1] * 3 + [256] * 3,
                "ms_per_image": [1.0, 2.0, 3.0, 0.1, 0.2, 0.3],
                "ms_ci_low": [0.9, 1.8, 2.7, 0.09, 0.18, 0.27],
                "ms_ci_high": [1.1, 2.2, 3.3, 0.11, 0.22, 0.33],
                "device": "cpu",
                "threads": 1,
                "ci_level": 0.9375,
                "images": [64] * 3 + [256] * 3,
                "repeats": 5,
            }
        )
        path = tmp_path / f"{variant}.csv"
        frame.to_csv(path, index=False)
        frames.append(str(path))
    cells = [Cell("digits", "msdnet", v, 0) for v in ("standard", "gater")]
    aggregate_latency(cells, frames, str(tmp_path / "latency.csv"))
    table = pd.read_csv(tmp_path / "latency.csv")
    assert list(table.columns[:4]) == ["dataset", "architecture", "variant", "seed"] and len(table) == 12
    config = {
        "methods": {"standard": {"method": "standard"}, "gater": {"method": "gater", "label": "Ours"}},
        "architectures": {"msdnet": {}},
        "posthoc": {},
        "pretrained": {},
        "report": {},
        "flops_convention": "reference",
    }
    latency_figure(styles_for(config), table, str(tmp_path / "latency.pdf"), str(tmp_path / "latency.png"))
    assert (tmp_path / "latency.png").stat().st_size > 1000 and (tmp_path / "latency.pdf").stat().st_size > 1000

"""End to end: the workflow on the digits data produces the figures and CSVs."""

from __future__ import annotations

import json

import pandas as pd
import pytest

from workflow_helpers import default_config, run_workflow, tiny_config


def test_tiny_default_run_produces_figures_and_tables(tmp_path):
    run_workflow(tmp_path, tiny_config(epochs=1), "all_figures")
    results = tmp_path / "results"
    for name in ("fig2_anytime", "fig3_budgeted"):
        for ext in ("pdf", "png"):
            assert (results / "figures" / f"{name}.{ext}").stat().st_size > 1000
    budgeted = pd.read_csv(results / "aggregate" / "budgeted.csv")
    assert len(budgeted) == 39
    assert budgeted["accuracy"].between(0, 100).all()
    assert {"dataset", "architecture", "variant", "seed", "git_commit", "device", "flops"} <= set(budgeted)
    anytime = pd.read_csv(results / "aggregate" / "anytime.csv")
    flops = json.loads((results / "flops" / "digits" / "msdnet.json").read_text())
    assert anytime["flops"].tolist() == flops["flops"]
    history = pd.read_csv(results / "train" / "digits" / "msdnet" / "standard" / "seed0" / "history.csv")
    assert list(history["epoch"]) == [1]
    prov = json.loads((results / "curves" / "digits" / "msdnet" / "standard" / "seed0" / "provenance.json").read_text())
    assert prov["config"]["recipe"]["epochs"] == 1 and "torch" in prov["versions"]
    # a second run has nothing to do
    again = run_workflow(tmp_path, tiny_config(epochs=1), "all_figures", extra=["-n"])
    assert "Nothing to be done" in again.stdout + again.stderr


def test_default_config_plans(tmp_path):
    proc = run_workflow(tmp_path, default_config(), "all_figures", extra=["-n"])
    assert "train" in proc.stdout


@pytest.mark.slow
def test_full_default_config_end_to_end(tmp_path):
    run_workflow(tmp_path, default_config(), "all_figures", "all_tables", timeout=1800)
    assert (tmp_path / "results" / "figures" / "fig3_budgeted.png").exists()

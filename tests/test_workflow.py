"""End to end: the workflow on the digits data produces the figures and CSVs."""

from __future__ import annotations

import copy
import json
import shutil

import pandas as pd
import pytest
from workflow_helpers import ROOT, default_config, planned_jobs, run_workflow, tiny_config

from eebench.latency_report import with_time_axis


def three_method_config() -> dict:
    """The tiny config with three training variants: standard, boostnet, and a frozen-backbone
    gater initialised from standard's weights."""
    config = tiny_config(epochs=1)
    methods = default_config()["methods"]
    config["methods"] = {name: methods[name] for name in ("standard", "boostnet", "gater_frozen")}
    config["experiments"][0]["methods"] = list(config["methods"])
    return config


def with_latency(config: dict) -> dict:
    """Dynamic early exit timed for standard and an EENet scheduler fitted on its cache."""
    config = copy.deepcopy(config)
    config["posthoc"] = {
        "eenet": {
            "method": "eenet",
            "base": "standard",
            "params": {"n_budgets": 2, "epochs": 20, "lr": 1.0e-2, "period": 5},
        }
    }
    config["experiments"][0]["posthoc"] = ["eenet"]
    config["latency"] = {
        "variants": ["standard", "eenet"],
        "budgets": 3,
        "batch_sizes": [1, 16],
        "repeats": 2,
        "images": 8,
    }
    return config


def test_small_run_outputs_reruns_and_report(tmp_path):
    """A finished run: figures, tidy CSVs, provenance; nothing to redo; a change of one method's
    config replans only its cells, their dependants and the aggregates; the --report HTML."""
    config = with_latency(three_method_config())
    reports = ["results/comparisons.csv", "results/comparisons.md", "results/reproduction.md"]
    run_workflow(tmp_path, config, "all_figures", *reports)
    results = tmp_path / "results"
    for name in ("fig2_anytime", "fig3_budgeted"):
        for ext in ("pdf", "png"):
            assert (results / "figures" / f"{name}.{ext}").stat().st_size > 1000
    budgeted = pd.read_csv(results / "aggregate" / "budgeted.csv")
    assert len(budgeted) == 3 * 39 + 2 and set(budgeted["variant"]) == {"standard", "boostnet", "gater_frozen", "eenet"}
    assert budgeted["accuracy"].between(0, 100).all()
    assert {"dataset", "architecture", "variant", "seed", "git_commit", "device", "flops"} <= set(budgeted)
    anytime = pd.read_csv(results / "aggregate" / "anytime.csv")
    flops = json.loads((results / "flops" / "digits" / "msdnet.json").read_text())
    assert anytime[anytime["variant"] == "standard"]["flops"].tolist() == flops["flops"]
    history = pd.read_csv(results / "train" / "digits" / "msdnet" / "standard" / "seed0" / "history.csv")
    assert list(history["epoch"]) == [1]
    prov = json.loads((results / "curves" / "digits" / "msdnet" / "standard" / "seed0" / "provenance.json").read_text())
    assert prov["config"]["recipe"]["epochs"] == 1 and "torch" in prov["versions"]
    # intervals: per cell, in the aggregates, in the seed summaries; calibration metrics per exit
    assert (budgeted["accuracy_ci_low"] <= budgeted["accuracy"]).all()
    assert (budgeted["accuracy"] <= budgeted["accuracy_ci_high"]).all()
    assert {"flops_ci_low", "flops_ci_high"} <= set(budgeted)
    assert {"nll", "ece", "top5", "ece_ci_low", "top5_ci_high"} <= set(anytime) and anytime["nll"].gt(0).all()
    summary = pd.read_csv(results / "aggregate" / "budgeted_summary.csv")
    assert len(summary) == 3 * 39 + 2 and summary["interval"].eq("test-set bootstrap").all()
    assert (results / "curves" / "digits" / "msdnet" / "standard" / "seed0" / "samples.pt").exists()
    comparisons = pd.read_csv(results / "comparisons.csv")
    assert set(comparisons["reference"]) == {"standard"}
    assert set(comparisons["variant"]) == {"boostnet", "gater_frozen", "eenet"}
    frozen = comparisons[(comparisons["variant"] == "gater_frozen") & (comparisons["budget_unit"] == "flops")]
    assert (frozen["difference"] == 0).all() and (frozen["p_value"] == 1).all()  # standard's network, kept
    # comparisons at a time budget (in standard's measured ms curve): only the comparisons job reruns
    exits = pd.read_csv(results / "latency" / "digits" / "msdnet" / "standard" / "seed0_exits.csv")
    timed = with_time_axis(budgeted, exits.assign(dataset="digits", architecture="msdnet", seed=0), 1)
    standard_ms = timed[timed["variant"] == "standard"]["ms"]
    in_time = copy.deepcopy(config)
    middle = float((standard_ms.min() + standard_ms.max()) / 2)
    in_time["report"]["comparison_budgets"] = [
        {"dataset": "digits", "architecture": "msdnet", "budgets": [middle], "budget_unit": "ms"}
    ]
    proc = run_workflow(tmp_path, in_time, "results/comparisons.csv")
    assert planned_jobs(proc.stdout + proc.stderr) == {("comparisons", "")}
    in_ms = pd.read_csv(results / "comparisons.csv").query("budget_unit == 'ms'")
    assert set(in_ms["variant"]) == {"boostnet", "gater_frozen", "eenet"} and (in_ms["budget"] == middle).all()
    frozen = in_ms[in_ms["variant"] == "gater_frozen"]  # inside the curve it shares with standard
    assert len(frozen) == 1 and frozen["difference"].iloc[0] == 0 and frozen["accuracy"].between(0, 100).all()
    run_workflow(tmp_path, config, "results/comparisons.csv")  # back to the run's config
    assert "| yes |" not in (results / "reproduction.md").read_text()  # digits: no published cell
    # dynamic early exit: budgets of standard and of the post-hoc scheduler (reloaded from its
    # fitted state), checked against the simulated protocol
    for variant, n_budgets in (("standard", 3), ("eenet", 2)):
        latency = pd.read_csv(results / "latency" / "digits" / "msdnet" / variant / "seed0.csv")
        assert sorted(latency["batch_size"].unique()) == [1, 16] and len(latency) == 2 * n_budgets
        assert (latency["ties"] == 0).all() and set(latency["execution"]) == {"dynamic"}
        curve = pd.read_csv(results / "curves" / "digits" / "msdnet" / variant / "seed0" / "budgeted.csv")
        merged = latency.merge(curve, on="budget_id", suffixes=("", "_curve"))
        assert (merged["accuracy"] - merged["accuracy_curve"]).abs().max() < 1e-9  # the same exits as evaluate's
        assert (merged["flops"] / merged["flops_curve"] - 1).abs().max() < 1e-9
    assert (results / "figures" / "latency.png").stat().st_size > 1000

    def plan(changed_config, *extra):
        proc = run_workflow(tmp_path, changed_config, "all_figures", extra=["-n", *extra])
        return proc.stdout + proc.stderr

    assert "Nothing to be done" in plan(config)
    # retrain one cell (README "Failures ... and reruns"): --forcerun on its weights redoes it and
    # what depends on it, nothing else; re-evaluating one cell likewise
    cell = "digits/msdnet/boostnet/seed0"
    jobs = planned_jobs(plan(config, "--forcerun", f"results/train/{cell}/weights.pt"))
    assert {(r, v) for r, v in jobs if v} == {("train", "boostnet"), ("infer", "boostnet"), ("evaluate", "boostnet")}
    jobs = planned_jobs(plan(config, "--forcerun", f"results/curves/{cell}/budgeted.csv"))
    assert {(r, v) for r, v in jobs if v} == {("evaluate", "boostnet")}
    # everything a job reads is its rerun trigger (eebench.specs): the inference batch size replans
    # every inference (and, here, the timed latency cells), nothing trains again
    changed = copy.deepcopy(config)
    changed["infer_batch_size"] = 64
    rules = {rule for rule, variant in planned_jobs(plan(changed)) if variant}
    assert {"infer", "latency"} <= rules and "train" not in rules and "split" not in rules
    changed = copy.deepcopy(config)
    changed["methods"]["boostnet"]["params"] = {"gradient_rescaling": False}
    jobs = planned_jobs(plan(changed))
    per_cell = {(rule, variant) for rule, variant in jobs if variant}
    assert per_cell == {("train", "boostnet"), ("infer", "boostnet"), ("evaluate", "boostnet")}
    assert {rule for rule, variant in jobs if not variant} == {"aggregate", "figure", "all_figures"}
    changed = copy.deepcopy(config)
    changed["methods"]["standard"]["recipe"] = {"lr": 0.05}  # gater_frozen starts from these weights
    per_cell = {(rule, variant) for rule, variant in planned_jobs(plan(changed)) if variant}
    assert {variant for _, variant in per_cell} == {"standard", "gater_frozen", "eenet"}
    assert ("latency", "standard") in per_cell and ("latency", "eenet") in per_cell
    assert ("train", "gater_frozen") in per_cell
    # a new bootstrap seed recomputes every interval and nothing upstream of them (the timed cells
    # rerun too: they read the budgeted curves that evaluate rewrites, thresholds and all)
    changed = copy.deepcopy(config)
    changed["bootstrap"] = {"seed": 1}
    jobs = planned_jobs(run_workflow(tmp_path, changed, "all_figures", *reports, extra=["-n"]).stdout)
    assert {(rule, variant) for rule, variant in jobs if variant} == {
        *(("evaluate", v) for v in ("standard", "boostnet", "gater_frozen", "eenet")),
        ("latency", "standard"),
        ("latency", "eenet"),
    }
    assert {rule for rule, variant in jobs if not variant} == {
        "aggregate",
        "figure",
        "all_figures",
        "comparisons",
        "reproduction",
        "aggregate_latency",
        "latency_figure",
    }

    run_workflow(tmp_path, config, "all_figures", extra=["--report", str(tmp_path / "report.html")])
    html = (tmp_path / "report.html").read_text(errors="replace")
    assert len(html) > 10_000 and "fig3_budgeted.png" in html


def test_default_config_plans(tmp_path):
    proc = run_workflow(tmp_path, default_config(), "all_figures", extra=["-n"])
    assert "train" in proc.stdout


def test_a_given_config_is_not_merged_into_the_default(tmp_path):
    """With --configfile, the workflow reads that file alone: the default's latency section (which
    would time standard here) and its other variants do not leak into it."""
    config = tiny_config()
    assert "latency" not in config
    (tmp_path / "config").mkdir()  # run where the default lies, as from the repository's root
    shutil.copy(ROOT / "config" / "config.yaml", tmp_path / "config" / "config.yaml")
    proc = run_workflow(tmp_path, config, "all", extra=["-n"])
    rules = {rule for rule, _ in planned_jobs(proc.stdout + proc.stderr)}
    assert "train" in rules and not rules & {"latency", "aggregate_latency", "latency_figure"}
    assert "is extended by additional config" not in proc.stdout + proc.stderr


@pytest.mark.slow
def test_full_default_config_end_to_end(tmp_path):
    run_workflow(tmp_path, default_config(), "all_figures", "all_tables", timeout=1800)
    assert (tmp_path / "results" / "figures" / "fig3_budgeted.png").exists()

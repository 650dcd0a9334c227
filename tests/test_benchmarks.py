"""The benchmark scripts' own logic (no timing is asserted anywhere)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import torch

from eebench.calibration import budgeted_curve, geometric_exit_distributions

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"


def _load(name: str):
    sys.path.insert(0, str(BENCH))
    try:
        spec = importlib.util.spec_from_file_location(f"bench_{name}", BENCH / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module
    finally:
        sys.path.remove(str(BENCH))


def test_calibration_loops_agree_with_budgeted_curve():
    bench = _load("calibration")
    probs, labels = bench.make_probabilities(5, 400, 10, seed=0)
    test_probs, test_labels = bench.make_probabilities(5, 300, 10, seed=1)
    val = (probs.max(-1).values * 40).round() / 40  # ties, as real max-softmax scores have
    test_scores, pred = test_probs.max(-1)
    correct = pred == test_labels[None]
    pis = geometric_exit_distributions(5)[1].tolist()
    curve = budgeted_curve(val, test_scores, correct, [1.0, 2.0, 3.0, 4.0, 5.0])
    assert "identical" in bench.check_loop("lists", bench.run_loop_lists(val, test_scores, correct, pis), curve, 300)
    assert "identical" in bench.check_loop("tensor", bench.run_loop_tensor(val, test_scores, correct, pis), curve, 300)


def test_workflow_log_parser_pairs_starts_and_finishes():
    bench = _load("workflow_time")
    log = "\n".join(
        [
            "[Mon Nov 23 13:31:38 2026]",
            "rule train:",
            "    jobid: 3",
            "[Mon Nov 23 13:31:40 2026]",
            "localrule aggregate:",
            "    jobid: 5",
            "[Mon Nov 23 13:31:47 2026]",
            "Finished jobid: 3 (Rule: train)",
            "[Mon Nov 23 13:31:50 2026]",
            "Finished jobid: 5 (Rule: aggregate)",
        ]
    )
    assert bench.job_times(log) == {3: ("train", 9.0), 5: ("aggregate", 10.0)}
    scripts = bench.rule_scripts()
    assert scripts["infer_train_split"] == scripts["infer"]  # `use rule infer as ...` inherits the script
    assert "eebench.pipeline" in bench.import_snippet(scripts["train"])


def test_ratio_table_pairs_rounds():
    bench = _load("_bench")
    lines = bench.ratio_table({"ref": [10.0, 20.0], "ours": [12.0, 22.0]}, "ref", "img/s")
    assert "1.150" in lines[2]  # mean of 1.2 and 1.1, per round
    assert torch.isclose(torch.tensor(1.15), torch.tensor(float(lines[2].split()[4])))


def test_rule_time_table_sums_benchmark_files_per_rule(tmp_path):
    from eebench.timings import rule_time_table

    header = "s\th:m:s\tmax_rss\tmax_vms\tmax_uss\tmax_pss\tio_in\tio_out\tmean_load\tcpu_time\n"
    for rule, cell, seconds, rss in (
        ("train", "digits/msdnet/l2w/seed0", 150.0, 700.0),
        ("train", "digits/msdnet/standard/seed0", 30.0, 650.0),
        ("infer", "digits/msdnet/standard/seed0", 6.5, 500.0),
    ):
        path = tmp_path / "benchmarks" / rule / f"{cell}.tsv"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(header + f"{seconds}\t0:00:00\t{rss}\t0\t0\t0\t0\t0\t90\t{seconds * 0.9}\n")
    table = rule_time_table(tmp_path).set_index("rule")
    assert table.loc["train", "jobs"] == 2 and table.loc["train", "total_s"] == 180.0
    assert table.loc["train", "slowest"] == "digits/msdnet/l2w/seed0"
    assert table.loc["train", "max_rss_mb"] == 700.0 and table.loc["infer", "mean_s"] == 6.5
    assert list(table.index) == ["train", "infer"]  # costliest rule first
    assert rule_time_table(tmp_path / "nothing").empty


def test_bootstrap_loop_agrees_with_the_vectorised_replicates():
    import numpy as np

    from eebench.bootstrap import BootstrapSettings, cell_statistics

    bench = _load("bootstrap")
    record = bench.make_record(300, 4, 10, seed=0)
    settings = BootstrapSettings(resamples=30, seed=2)
    loop, vectorised = bench.loop_statistics(record, settings), cell_statistics(record, settings)[1]
    assert loop.keys() == vectorised.keys()
    for key in loop:
        np.testing.assert_allclose(vectorised[key], loop[key], rtol=1e-10, atol=1e-12, err_msg=key)


def test_cpu_projection_probes_every_training_cell(tmp_path, capsys, monkeypatch):
    import yaml
    from workflow_helpers import tiny_config

    bench = _load("cpu_projection")
    config = tiny_config(epochs=2)
    config["data_dir"] = str(tmp_path)
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    monkeypatch.setattr(sys, "argv", ["cpu_projection.py", str(path), "--steps", "2", "--rounds", "1", "--warmup", "1"])
    threads = torch.get_num_threads()
    try:
        bench.main()
    finally:
        torch.set_num_threads(threads)
    out = capsys.readouterr().out
    row = next(line for line in out.splitlines() if line.startswith("digits/msdnet/standard/seed0"))
    steps_per_epoch = int(row.split()[3])
    assert steps_per_epoch == 1078 // 64  # the digits training part at the recipe's batch size
    assert "PROJECTION on 2 cores" in out

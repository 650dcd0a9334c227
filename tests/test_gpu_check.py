"""benchmarks/gpu_check.py in its CPU mode (``--device cpu --small``): every check runs at tiny
sizes, none fails, and none needs Snakemake, fvcore or jsonschema (imports of them are refused in
every process of the run); the projection reads the measured figures back from the JSON.

What only a GPU can show (bf16 autocast, NCCL, CUDA graphs, the speed figures) is skipped here
with its reason; the checks' code is the same.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from eebench.methods import METHODS
from eebench.posthoc import POSTHOC

ROOT = Path(__file__).resolve().parents[1]
GROUPS = {
    "environment",
    "train",
    "cache",
    "posthoc",
    "curve",
    "dynamic",
    "ddp",
    "resume",
    "speed_train",
    "speed_infer",
    "flops_share",
    "sharing",
    "projection",
}
MAY_SKIP_ON_CPU = {"dynamic"}  # skipped where eebench.dynamic does not exist
REFUSE = textwrap.dedent("""
    import importlib.abc, sys

    class Refuse(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in {"fvcore", "iopath", "snakemake", "jsonschema"}:
                raise ImportError(f"{name} is refused in the GPU check's test")

    sys.meta_path.insert(0, Refuse())
""")


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("gpu_check")
    (tmp / "sitecustomize.py").write_text(REFUSE)  # loaded at start-up by every Python process of the run
    out = tmp / "gpu_check.json"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(tmp), os.environ.get("PYTHONPATH")]))}
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "gpu_check.py"), "--device", "cpu", "--small", "--json", str(out)],
        capture_output=True,
        text=True,
        env=env,
        timeout=900,
        cwd=tmp,
    )
    assert out.exists(), proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc, json.loads(out.read_text())


def test_every_check_runs_and_none_fails(report):
    proc, data = report
    checks = data["checks"]
    failed = [(c["name"], c["reason"]) for c in checks if c["status"] == "fail"]
    assert not failed, failed
    assert proc.returncode == 0, proc.stdout[-3000:]
    assert {c["group"] for c in checks} == GROUPS
    assert all(c["status"] in ("pass", "skipped") for c in checks)
    assert all(c["reason"] for c in checks if c["status"] == "skipped")
    skipped_groups = {c["group"] for c in checks if c["status"] == "skipped" and c["group"] != "train"}
    assert skipped_groups <= MAY_SKIP_ON_CPU, skipped_groups
    names = {c["name"]: c for c in checks}
    for method in METHODS.names():  # every registered method trains (fp32 on CPU; bf16 is a GPU switch)
        fp32 = [c for n, c in names.items() if n.startswith(f"train {method}@") and n.endswith(" fp32")]
        bf16 = [c for n, c in names.items() if n.startswith(f"train {method}@") and n.endswith(" bf16")]
        assert fp32 and fp32[0]["status"] == "pass" and bf16 and bf16[0]["status"] == "skipped"
    assert names["train gater+frozen@msdnet fp32"]["figures"]["frozen"] > 0  # the frozen switch is exercised
    for method in POSTHOC.names():
        assert names[f"posthoc {method}"]["status"] == "pass"


def test_figures_are_the_measured_ones(report):
    _, data = report
    by_group = {}
    for c in data["checks"]:
        by_group.setdefault(c["group"], []).append(c)
    resume = by_group["resume"][0]["figures"]
    assert resume["resumed_vs_whole_relative"] == 0.0  # on CPU a resumed run is bit-identical
    assert by_group["cache"][0]["figures"]["logits_difference_vs_cpu"] < 1e-4
    speed = by_group["speed_train"][0]["figures"]
    assert set(speed["img_s_median"]) == {"fp32", "fp32+cl"} and all(v > 0 for v in speed["img_s_median"].values())
    assert speed["skipped_variants"]  # the GPU-only variants say why they did not run
    assert set(by_group["sharing"][0]["figures"]["total_img_s_median"]) == {"1", "2"}
    assert [c["figures"]["backend"] for c in by_group["ddp"]] == ["gloo", "gloo"]
    projection = by_group["projection"][0]["figures"]
    assert set(projection["cells"]) == {"digits/msdnet/standard", "digits/msdnet/gater_frozen"}
    assert projection["gpu_hours"]["as_configured"] > 0


def test_projection_reads_the_measured_json(report, tmp_path, capsys):
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        import projection
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))
    _, data = report
    path = tmp_path / "gpu_check.json"
    path.write_text(json.dumps(data))
    projection.measured_main(str(path), None)
    printed = capsys.readouterr().out
    figures = next(c["figures"] for c in data["checks"] if c["group"] == "projection")
    assert f"total {figures['gpu_hours']['as_configured']:.1f} h" in printed
    assert "digits/msdnet/gater_frozen" in printed


def _gpu_check():
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        import gpu_check
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))
    return gpu_check


def test_report_records_pass_skip_fail_and_crash(tmp_path):
    gc = _gpu_check()
    path = tmp_path / "checks.json"
    report = gc.Report(path, {"what": "test"}, only=set(), skip={"skipped_group"})

    def fails():
        gc.expect(1 + 1 == 3, "arithmetic is off", {"got": 2})

    def crashes():
        raise ZeroDivisionError("boom")

    def skips():
        raise gc.Skip("not here")

    report.run("a", "passes", lambda: {"x": 1.23456789, "bad": float("nan")})
    report.run("a", "fails", fails)
    report.run("a", "crashes", crashes)
    report.run("a", "skips", skips)
    report.run("skipped_group", "not selected", lambda: {})
    written = json.loads(path.read_text())["checks"]
    assert [c["status"] for c in written] == ["pass", "fail", "fail", "skipped", "skipped"]
    assert written[0]["figures"] == {"x": 1.23457, "bad": "nan"}  # 6 significant digits, JSON-safe
    assert written[1]["reason"] == "arithmetic is off" and written[1]["figures"] == {"got": 2}
    assert "ZeroDivisionError: boom" in written[2]["reason"] and "boom" in written[2]["traceback"]
    assert written[3]["reason"] == "not here" and "--only" in written[4]["reason"]
    assert [c["name"] for c in report.failed()] == ["fails", "crashes"]


def test_datasheet_peaks_by_device_name():
    gc = _gpu_check()
    assert gc.datasheet_peak("NVIDIA H200")["bf16"] == 989.4e12
    assert gc.datasheet_peak("NVIDIA H100 80GB HBM3")["tf32"] == 494.7e12
    assert gc.datasheet_peak("NVIDIA H100 PCIe")["bf16"] == 756e12
    assert gc.datasheet_peak("NVIDIA A100-SXM4-80GB")["fp32"] == 19.5e12
    assert gc.datasheet_peak("NVIDIA H100 NVL") is None  # not in the table: only the measured peak


def test_projection_split_sizes_are_the_harness_splits():
    from eebench.datasets import make_split

    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        import projection
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))
    split = make_split("digits", (1797, 0), 0)
    assert (projection.TRAIN_SIZE["digits"], projection.VAL_SIZE["digits"], projection.TEST_SIZE["digits"]) == (
        len(split["train"]),
        len(split["val"]),
        len(split["test"]),
    )

"""Fault injection: bad input gets a clear error that names the file, key or value.

Every case feeds one bad input (a config, a cache, a checkpoint, a split file, a FLOPs record, a
data directory) to the function the workflow calls with it, and checks the exception type and
that its message names what is wrong and where. ``CASES`` counts them for the reliability note.
"""

from __future__ import annotations

import copy
import json
import os
import pickle
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from workflow_helpers import ROOT, default_config, tiny_config

from eebench import io, pipeline
from eebench.cache import CACHE_FORMAT, StaleCacheError, load_cache
from eebench.config import (
    Cell,
    ConfigError,
    cell_fingerprint,
    check_budgets,
    check_config,
    check_data,
    load_config,
    validate_schema,
)
from eebench.datasets import DatasetMissingError, load_pool
from eebench.io import CorruptFileError, load_tensors
from eebench.training import load_weights

TINY = {"family": "ee_resnet", "params": {"depth": 8, "num_exits": 2, "width": 4, "distribution": "linear"}}


def small_config() -> dict[str, Any]:
    """Digits, one tiny EE-ResNet, ``standard`` and a variant initialised from it, one post-hoc."""
    config = tiny_config()
    config["architectures"] = {"tiny": copy.deepcopy(TINY)}
    config["methods"]["frozen"] = {"method": "standard", "init_from": "standard"}
    config["posthoc"] = {"calibrated_dnn": {"method": "calibrated_dnn", "base": "standard"}}
    config["experiments"] = [
        {
            "datasets": ["digits"],
            "architectures": ["tiny"],
            "methods": ["standard", "frozen"],
            "posthoc": ["calibrated_dnn"],
        }
    ]
    validate_schema(config)
    return config


# --- configs ---------------------------------------------------------------------------------
def _both(*mutations: Callable[[dict], None]) -> Callable[[dict], None]:
    def mutate(config: dict) -> None:
        for change in mutations:
            change(config)

    return mutate


def _set(path: str, value: Any) -> Callable[[dict], None]:
    def mutate(config: dict) -> None:
        *parents, last = path.split(".")
        node = config
        for key in parents:
            node = node[int(key)] if key.isdigit() else node[key]
        node[int(last) if last.isdigit() else last] = value

    return mutate


def _delete(key: str) -> Callable[[dict], None]:
    return lambda config: config.pop(key)


def _add_arch(name: str, spec: dict) -> Callable[[dict], None]:
    def mutate(config: dict) -> None:
        config["architectures"][name] = spec
        config["experiments"].append({"datasets": ["digits"], "architectures": [name], "methods": ["standard"]})

    return mutate


def _eenets_on(arch: str) -> Callable[[dict], None]:
    def mutate(config: dict) -> None:
        config["methods"]["eenets"] = {"method": "eenets"}
        config["architectures"][arch] = copy.deepcopy(MSDNET)
        config["experiments"].append({"datasets": ["digits"], "architectures": [arch], "methods": ["eenets"]})

    return mutate


def _cycle(config: dict) -> None:
    config["methods"]["standard"]["init_from"] = "frozen"


RANET = default_config()["architectures"]["ranet"]
MSDNET = tiny_config()["architectures"]["msdnet"]

# (id, mutation, expected fragments of the message)
CONFIG_CASES = [
    ("wrong-type-seed", _set("seeds", [0, "one"]), ["seeds[1]", "'one'", "an integer"]),
    (
        "wrong-type-resources",
        _set("datasets.digits.resources.mem_mb", "lots"),
        ["datasets.digits.resources.mem_mb", "'lots'", "an integer"],
    ),
    ("negative-split-seed", _set("split_seed", -1), ["split_seed", "-1", ">= 0"]),
    ("unknown-top-level-key", _set("epochs", 3), ["unknown key 'epochs'", "data_dir", "experiments"]),
    ("missing-required-key", _delete("experiments"), ["required key 'experiments' missing"]),
    ("bad-device", _set("device", "gpu"), ["device", "'gpu'", "cuda"]),
    ("bad-flops-convention", _set("flops_convention", "thop"), ["flops_convention", "'thop'", "reference, fvcore"]),
    ("empty-seeds", _set("seeds", []), ["seeds", "[]", "at least 1 item"]),
    ("unknown-dataset", _set("datasets.cifar1000", {}), ["datasets.cifar1000", "'cifar1000'", "digits", "cifar100"]),
    (
        "unknown-architecture",
        _set("experiments.0.architectures", ["tiny", "vgg"]),
        ["experiments[0].architectures", "'vgg'", "allowed: tiny"],
    ),
    ("unknown-family", _set("architectures.tiny.family", "vgg"), ["architectures.tiny.family", "'vgg'", "msdnet"]),
    ("unknown-method", _set("methods.standard.method", "sgdx"), ["methods.standard.method", "'sgdx'", "boostnet"]),
    (
        "unknown-posthoc-method",
        _set("posthoc.calibrated_dnn.method", "laplace"),
        ["posthoc.calibrated_dnn.method", "'laplace'", "calibrated_dnn, eenet"],
    ),
    (
        "unknown-feature-set",
        _set("methods.standard", {"method": "gater", "params": {"features": ["entropyy"]}}),
        ["methods.standard.params", "'entropyy'", "confidence, margin, entropy"],
    ),
    ("unknown-method-param", _set("methods.standard.params", {"lrr": 0.1}), ["methods.standard.params", "lrr"]),
    (
        "recipe-wrong-type",
        _set("datasets.digits.recipe.lr", "fast"),
        ["datasets.digits.recipe", "'lr'", "'fast'", "float"],
    ),
    (
        "recipe-bad-optimizer",
        _set("methods.frozen.recipe", {"optimizer": "rmsprop"}),
        ["methods.frozen.recipe", "'rmsprop'", "sgd, adam, adamw"],
    ),
    ("init-from-cycle", _cycle, ["init_from", "standard -> frozen -> standard", "cycle"]),
    ("resnet-depth", _set("architectures.tiny.params.depth", 21), ["architectures.tiny.params", "depth=21", "6n+2"]),
    (
        "resnet-too-many-exits",
        _set("architectures.tiny.params.num_exits", 9),
        ["architectures.tiny.params", "num_exits=9", "at most"],
    ),
    (
        "msdnet-scale-list",
        _add_arch("msd", {**MSDNET, "params": {**MSDNET["params"], "gr_factor": [1, 2]}}),
        ["architectures.msd.params", "gr_factor=[1, 2]", "n_scales=3"],
    ),
    (
        "msdnet-scales-for-input",
        _add_arch(
            "msd", {**MSDNET, "params": {**MSDNET["params"], "n_scales": 6, "gr_factor": [1] * 6, "bn_factor": [1] * 6}}
        ),
        ["architectures.msd.params", "'digits'", "n_scales=6", "input size 32"],
    ),
    (
        "ranet-scale-list",
        _add_arch("ra", {**RANET, "params": {**RANET["params"], "scale_list": [3, 2, 1]}}),
        ["architectures.ra.params", "scale_list=[3, 2, 1]", "[1, 2, 3]"],
    ),
    (
        "ranet-repeated-lowest-scale",
        _add_arch(
            "ra",
            {
                **RANET,
                "params": {
                    **RANET["params"],
                    "scale_list": [1, 1, 2, 3],
                    "gr_factor": [4, 4, 2, 1],
                    "bn_factor": [4, 4, 2, 1],
                },
            },
        ),
        ["architectures.ra.params", "scale_list=[1, 1, 2, 3]", "only the first flow may be at the lowest scale"],
    ),
    (
        "method-needs-confidence-branches",
        _eenets_on("msd"),
        ["experiments[1]", "'eenets'", "'msd' (msdnet)", "confidence_branches", "ee_resnet"],
    ),
    (
        "table1-budget-type",
        _set(
            "report.table1",
            {"dataset": "digits", "architecture": "tiny", "budgets": ["4M"], "rows": {"all": "standard"}},
        ),
        ["report.table1.budgets[0]", "'4M'", "a number"],
    ),
    (
        "figure-unknown-variant",
        _set("report.figures", {"fig2_anytime": {"variants": ["gater"]}}),
        ["report.figures.fig2_anytime.variants", "'gater'", "standard"],
    ),
    (
        "figure-unknown-reference",
        _set("report.figures", {"fig3_budgeted": {"reference": "gater"}}),
        ["report.figures.fig3_budgeted.reference", "'gater'", "standard"],
    ),
    (
        "comparison-budgets-architecture",
        _set("report.comparison_budgets", [{"dataset": "digits", "architecture": "msd", "budgets": [1e6]}]),
        ["report.comparison_budgets[0].architecture", "'msd'", "tiny"],
    ),
    ("bootstrap-level", _set("bootstrap", {"level": 95}), ["bootstrap.level", "95", "< 1"]),
    (
        "bootstrap-unknown-key",
        _set("bootstrap", {"samples": 100}),
        ["bootstrap", "'samples'", "level, resamples, seed"],
    ),
    ("latency-unknown-variant", _set("latency", {"variants": ["gater"]}), ["latency.variants", "'gater'", "standard"]),
    (
        "latency-unknown-key",
        _set("latency", {"variants": ["standard"], "batch": 4}),
        ["latency", "'batch'", "batch_sizes"],
    ),
    (
        "latency-bad-batch-size",
        _set("latency", {"variants": ["standard"], "batch_sizes": [0]}),
        ["latency.batch_sizes[0]", "0", ">= 1"],
    ),
    (
        "latency-selects-nothing",
        _set("latency", {"variants": ["standard"], "architectures": ["tiny"], "datasets": []}),
        ["latency", "selects no cell"],
    ),
    (
        "table1-ms-without-latency",
        _set(
            "report.table1",
            {
                "dataset": "digits",
                "architecture": "tiny",
                "budgets": [2.0],
                "rows": {"all": "standard"},
                "budget_unit": "ms",
            },
        ),
        ["report.table1.budget_unit", "'ms'", "latency section"],
    ),
    (
        "comparison-ms-without-latency",
        _set(
            "report.comparison_budgets",
            [{"dataset": "digits", "architecture": "tiny", "budgets": [2.0], "budget_unit": "ms"}],
        ),
        ["report.comparison_budgets[0].budget_unit", "'ms'", "latency section"],
    ),
    (
        "comparison-ms-variant-not-timed",
        _both(
            _set("latency", {"variants": ["standard"]}),
            _set(
                "report.comparison_budgets",
                [
                    {
                        "dataset": "digits",
                        "architecture": "tiny",
                        "budgets": [2.0],
                        "budget_unit": "ms",
                        "latency_variant": "frozen",
                    }
                ],
            ),
        ),
        ["report.comparison_budgets", "digits/tiny", "digits/tiny/frozen/seed0 is not measured", "latency_variant"],
    ),
]


@pytest.mark.parametrize("mutate,expected", [c[1:] for c in CONFIG_CASES], ids=[c[0] for c in CONFIG_CASES])
def test_bad_config_is_refused_with_key_value_and_allowed(mutate, expected):
    config = small_config()
    mutate(config)
    with pytest.raises(ConfigError) as err:
        validate_schema(config)
        check_config(config)
    message = str(err.value)
    assert message.startswith("config ")
    for fragment in expected:
        assert fragment in message, f"{fragment!r} not in: {message}"


def test_good_configs_pass_and_get_defaults():
    for config in (small_config(), default_config()):
        validate_schema(config)
        check_config(config)
    config = small_config()
    del config["split_seed"], config["flops_convention"]
    validate_schema(config)
    assert config["split_seed"] == 0 and config["flops_convention"] == "reference"
    assert config["bootstrap"] == {"resamples": 1000, "seed": 0, "level": 0.95}


def _budget_config(budgets: list[float]) -> dict:
    config = small_config()
    config["report"]["table1"] = {
        "dataset": "digits",
        "architecture": "tiny",
        "budgets": budgets,
        "rows": {"all": "standard"},
    }
    return config


def test_budget_outside_the_flops_range():
    flops = [4.2e5, 6.6e5, 8.9e5]
    check_budgets(_budget_config([5e5, 8.9e5]), flops)
    with pytest.raises(ConfigError) as err:
        check_budgets(_budget_config([5e5, 4e6]), flops)
    message = str(err.value)
    for fragment in ("report.table1.budgets", "4e+06", "'tiny'", "'digits'", "4.2e+05", "8.9e+05"):
        assert fragment in message, message


def test_flops_job_fails_on_a_budget_outside_the_range(tmp_path):
    """The FLOPs job of Table 1's architecture checks the budgets: a bad one fails before training."""
    config = _budget_config([1e9])
    with pytest.raises(ConfigError, match=r"report.table1.budgets: 1e\+09 is outside"):
        pipeline.write_flops(config, "digits", "tiny", str(tmp_path / "flops.json"))
    assert not (tmp_path / "flops.json").exists()


def test_missing_data_directory(tmp_path):
    config = small_config()
    config["datasets"]["cifar10"] = {}
    config["experiments"][0]["datasets"].append("cifar10")
    config["data_dir"] = str(tmp_path / "nowhere")
    with pytest.raises(ConfigError) as err:
        check_data(config)
    assert "data_dir" in str(err.value) and "nowhere" in str(err.value) and "'cifar10'" in str(err.value)
    assert "cifar-10-python.tar.gz" in str(err.value)
    (tmp_path / "empty").mkdir()
    config["data_dir"] = str(tmp_path / "empty")
    with pytest.raises(
        ConfigError, match=r"looked in .*empty/cifar-10-batches-py \(does not exist\).*cifar-10-python.tar.gz"
    ):
        check_data(config)
    config["download"] = True
    check_data(config)  # torchvision fetches it


def test_missing_dataset_at_load_time(tmp_path):
    with pytest.raises(DatasetMissingError) as err:
        load_pool("cifar100", tmp_path / "nowhere")
    assert "'cifar100'" in str(err.value) and "nowhere" in str(err.value) and "cifar-100-python" in str(err.value)


def test_config_file_errors(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "absent.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("datasets: {digits: [\n")
    with pytest.raises(ConfigError, match=rf"{bad}.*not valid YAML"):
        load_config(bad)
    bad.write_text("- just\n- a list\n")
    with pytest.raises(ConfigError, match="expected a mapping"):
        load_config(bad)


def test_check_config_command_applies_the_schema(tmp_path):
    config = tiny_config()
    config["datasets"]["digits"]["recipe"]["epochs"] = "four"
    config["seeds"] = ["zero"]
    path = tmp_path / "config.yaml"
    import yaml

    path.write_text(yaml.safe_dump(config))
    proc = subprocess.run(
        [sys.executable, "-m", "eebench", "check-config", str(path), "--no-flops"],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=120,
    )
    assert proc.returncode == 1
    assert "error: config seeds[0]: 'zero' is not allowed; allowed: an integer" in proc.stderr
    assert "Traceback" not in proc.stderr


# --- files: caches, checkpoints, splits, FLOPs records -------------------------------------------
CONFIG = small_config()
CELL = Cell("digits", "tiny", "standard", 0)
FINGERPRINT = cell_fingerprint(CONFIG, CELL)
K, N, C = 3, 40, 10


def good_cache(part: str = "val", fingerprint: str = FINGERPRINT) -> dict[str, Any]:
    g = torch.Generator().manual_seed(0)
    return {
        "logits": torch.randn(K, N, C, generator=g),
        "labels": torch.randint(0, C, (N,), generator=g),
        "meta": {"fingerprint": fingerprint, "part": part, "split": "x", "format": CACHE_FORMAT},
    }


def write_flops(path: Path, flops: Any = (1e5, 2e5, 3e5)) -> Path:
    path.write_text(json.dumps({"flops": list(flops), "params": [1, 2, 3]}))
    return path


def _truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def _random_bytes(path: Path) -> None:
    path.write_bytes(np.random.default_rng(0).bytes(4096))


def _evaluate(tmp_path: Path, val: Path, test: Path) -> None:
    out = tmp_path / "out"
    pipeline.evaluate_cell(
        CONFIG,
        CELL,
        str(val),
        str(test),
        str(write_flops(tmp_path / "flops.json")),
        str(out / "anytime.csv"),
        str(out / "budgeted.csv"),
        str(out / "provenance.json"),
    )


def test_good_caches_evaluate(tmp_path):
    io.save_tensors(tmp_path / "val.pt", good_cache("val"))
    io.save_tensors(tmp_path / "test.pt", good_cache("test"))
    _evaluate(tmp_path, tmp_path / "val.pt", tmp_path / "test.pt")
    assert (tmp_path / "out" / "budgeted.csv").exists()


def _cache_with(**changes: Any) -> Callable[[Path], None]:
    def write(path: Path) -> None:
        cache = good_cache()
        for key, value in changes.items():
            if value is None:
                cache.pop(key)
            else:
                cache[key] = value
        io.save_tensors(path, cache)

    return write


def _save_then(fn: Callable[[Path], None]) -> Callable[[Path], None]:
    def write(path: Path) -> None:
        io.save_tensors(path, good_cache())
        fn(path)

    return write


def _npz_truncated(path: Path) -> None:
    cache = good_cache()
    np.savez(path, logits=cache["logits"].numpy(), labels=cache["labels"].numpy())
    _truncate(path)


def _npz_object(path: Path) -> None:
    np.savez(path, logits=np.array([{"a": 1}], dtype=object), labels=np.zeros(3))


# (id, file name, writer, expected exception, fragments)
CACHE_CASES = [
    ("cache-truncated", "val.pt", _save_then(_truncate), CorruptFileError, ["corrupt, truncated", "inference cache"]),
    ("cache-random-bytes", "val.pt", _random_bytes, CorruptFileError, ["corrupt, truncated", "delete it"]),
    ("cache-empty-file", "val.pt", lambda p: p.write_bytes(b""), CorruptFileError, ["corrupt, truncated"]),
    ("cache-no-logits", "val.pt", _cache_with(logits=None), CorruptFileError, ["no 'logits' entry"]),
    (
        "cache-logits-2d",
        "val.pt",
        _cache_with(logits=torch.zeros(N, C)),
        CorruptFileError,
        ["'logits' must be (exits, samples, classes)", f"({N}, {C})"],
    ),
    (
        "cache-labels-length",
        "val.pt",
        _cache_with(labels=torch.zeros(N + 1, dtype=torch.long)),
        CorruptFileError,
        ["'labels' must be", f"({N + 1},)"],
    ),
    (
        "cache-gates-shape",
        "val.pt",
        _cache_with(gates=torch.zeros(K, N + 2)),
        CorruptFileError,
        ["'gates' must be", f"({K}, {N})"],
    ),
    ("cache-not-a-dict", "val.pt", lambda p: torch.save([1, 2, 3], p), CorruptFileError, ["expected a dict", "list"]),
    ("cache-npz-truncated", "val.npz", _npz_truncated, CorruptFileError, ["corrupt or truncated", "inference cache"]),
    ("cache-npz-pickled-objects", "val.npz", _npz_object, CorruptFileError, ["corrupt or truncated", "pickle"]),
]


@pytest.mark.parametrize("name,write,error,expected", [c[1:] for c in CACHE_CASES], ids=[c[0] for c in CACHE_CASES])
def test_bad_cache_is_refused_naming_the_file(name, write, error, expected, tmp_path):
    path = tmp_path / name
    write(path)
    with pytest.raises(error) as err:
        load_cache(path)
    message = str(err.value)
    assert str(path) in message
    for fragment in expected:
        assert fragment in message, f"{fragment!r} not in: {message}"
    assert "Traceback" not in message


STALE_CASES = [
    # a cache copied in from another run: another configuration's weights
    (
        "stale-fingerprint",
        good_cache("val", fingerprint="0123456789abcdef"),
        good_cache("test"),
        "val.pt",
        ["stale cache", "fingerprint is '0123456789abcdef'", FINGERPRINT, "delete it and rerun"],
    ),
    ("stale-part", good_cache("val"), good_cache("val"), "test.pt", ["stale cache", "part is 'val'", "'test'"]),
    (
        "stale-format",  # written before the learned gates were stored under "gates"
        good_cache("val"),
        {**good_cache("test"), "meta": {**good_cache("test")["meta"], "format": None}},
        "test.pt",
        ["stale cache", "format is None", f"expects {CACHE_FORMAT}", "older cache format", "delete it and rerun"],
    ),
    (
        "stale-no-meta",
        good_cache("val"),
        {k: v for k, v in good_cache("test").items() if k != "meta"},
        "test.pt",
        ["stale cache", "no record of what produced it", "delete it and rerun"],
    ),
]


@pytest.mark.parametrize("val,test,bad,expected", [c[1:] for c in STALE_CASES], ids=[c[0] for c in STALE_CASES])
def test_stale_cache_is_detected_at_evaluation(val, test, bad, expected, tmp_path):
    io.save_tensors(tmp_path / "val.pt", val)
    io.save_tensors(tmp_path / "test.pt", test)
    with pytest.raises(StaleCacheError) as err:
        _evaluate(tmp_path, tmp_path / "val.pt", tmp_path / "test.pt")
    message = str(err.value)
    assert str(tmp_path / bad) in message
    for fragment in expected:
        assert fragment in message, f"{fragment!r} not in: {message}"


def test_cache_with_other_exit_count_than_flops(tmp_path):
    io.save_tensors(tmp_path / "val.pt", good_cache("val"))
    io.save_tensors(tmp_path / "test.pt", good_cache("test"))
    flops = write_flops(tmp_path / "flops.json", (1e5, 2e5))
    with pytest.raises(CorruptFileError, match=rf"{tmp_path / 'val.pt'} has 3 exits but {flops} has 2"):
        pipeline.evaluate_cell(
            CONFIG,
            CELL,
            str(tmp_path / "val.pt"),
            str(tmp_path / "test.pt"),
            str(flops),
            *(str(tmp_path / n) for n in ("a.csv", "b.csv", "p.json")),
        )


def test_posthoc_refuses_a_stale_base_cache(tmp_path):
    cell = Cell("digits", "tiny", "calibrated_dnn", 0)
    io.save_tensors(tmp_path / "val.pt", good_cache("val", fingerprint="another-run"))
    io.save_tensors(tmp_path / "test.pt", good_cache("test"))
    with pytest.raises(StaleCacheError, match=rf"{tmp_path / 'val.pt'}: stale cache: its fingerprint is 'another-run'"):
        pipeline.posthoc_cell(
            CONFIG,
            cell,
            str(write_flops(tmp_path / "flops.json")),
            str(tmp_path / "val.pt"),
            str(tmp_path / "test.pt"),
            {"val": str(tmp_path / "pv.pt"), "test": str(tmp_path / "pt.pt")},
        )


def test_posthoc_scores_of_other_settings_are_stale(tmp_path):
    cell = Cell("digits", "tiny", "calibrated_dnn", 0)
    scores = {
        "scores": torch.rand(K, N),
        "predictions": torch.zeros(K, N, dtype=torch.long),
        "labels": torch.zeros(N, dtype=torch.long),
        "meta": {**pipeline._expected_meta(CONFIG, cell, "val"), "posthoc": "other-settings"},
    }
    io.save_tensors(tmp_path / "val.pt", scores)
    with pytest.raises(StaleCacheError, match="its posthoc is 'other-settings'"):
        pipeline._scored(CONFIG, cell, str(tmp_path / "val.pt"), "val")


# --- checkpoints -------------------------------------------------------------------------------
class Bomb:
    """Unpickling this runs a shell command (what a malicious downloaded checkpoint would do)."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_pickle_bomb_checkpoint_is_refused_and_runs_nothing(tmp_path):
    marker = tmp_path / "code-was-run"
    path = tmp_path / "weights.pt"
    torch.save({"model": {"w": torch.zeros(2)}, "fingerprint": FINGERPRINT, "payload": Bomb(marker)}, path)
    for load in (lambda: load_weights(path, FINGERPRINT), lambda: load_cache(path), lambda: load_tensors(path)):
        with pytest.raises(CorruptFileError) as err:
            load()
        assert not marker.exists(), "loading a checkpoint ran code"
    message = str(err.value)
    assert str(path) in message and "refused to load" in message and "posix.system" in message
    assert "weights_only=True" in message and "set to `False`" not in message
    # the bomb is real: an unsafe load would have run it
    with open(path, "rb") as f:
        torch.load(f, weights_only=False)
    assert marker.exists()


def _weights(fingerprint: str = FINGERPRINT, **extra: Any) -> dict[str, Any]:
    return {"model": {"w": torch.zeros(2)}, "method": {}, "fingerprint": fingerprint, **extra}


CHECKPOINT_CASES = [
    (
        "weights-truncated",
        lambda p: (io.save_tensors(p, _weights()), _truncate(p)),
        CorruptFileError,
        ["corrupt, truncated", "trained weights"],
    ),
    (
        "weights-plain-pickle",
        lambda p: p.write_bytes(pickle.dumps({"model": {}}, protocol=4)),
        CorruptFileError,
        ["corrupt, truncated or not a tensor file", "trained weights"],
    ),
    (
        "weights-other-config",
        lambda p: io.save_tensors(p, _weights("feedfacefeedface")),
        CorruptFileError,
        ["trained for another configuration", "'feedfacefeedface'", FINGERPRINT, "retrain"],
    ),
    (
        "weights-no-model",
        lambda p: io.save_tensors(p, {"fingerprint": FINGERPRINT}),
        CorruptFileError,
        ["no 'model' entry"],
    ),
    ("weights-missing", lambda p: None, FileNotFoundError, ["trained weights not found"]),
]


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
@pytest.mark.parametrize(
    "write,error,expected", [c[1:] for c in CHECKPOINT_CASES], ids=[c[0] for c in CHECKPOINT_CASES]
)
def test_bad_weights_file_is_refused_naming_the_file(write, error, expected, tmp_path):
    path = tmp_path / "weights.pt"
    write(path)
    with pytest.raises(error) as err:
        load_weights(path, FINGERPRINT)
    message = str(err.value)
    assert str(path) in message
    for fragment in expected:
        assert fragment in message, f"{fragment!r} not in: {message}"


def _train_from(tmp_path: Path, parent: dict[str, Any]) -> None:
    io.save_tensors(tmp_path / "parent.pt", parent)
    cell = Cell("digits", "tiny", "frozen", 0)
    pipeline.train_cell(
        CONFIG,
        cell,
        str(tmp_path / "split.npz"),
        str(tmp_path / "flops.json"),
        str(tmp_path / "w.pt"),
        str(tmp_path / "h.csv"),
        str(tmp_path / "state"),
        init_weights=str(tmp_path / "parent.pt"),
    )


def test_init_from_weights_of_another_configuration(tmp_path):
    parent = pipeline.build_network(CONFIG, "digits", "tiny").state_dict()
    with pytest.raises(CorruptFileError, match=rf"{tmp_path / 'parent.pt'}: weights were trained for another"):
        _train_from(tmp_path, _weights("0000", model=parent))


def test_init_from_weights_of_another_architecture(tmp_path):
    other = copy.deepcopy(CONFIG)
    other["architectures"]["tiny"]["params"]["width"] = 8
    parent = pipeline.build_network(other, "digits", "tiny").state_dict()
    with pytest.raises(CorruptFileError) as err:
        _train_from(tmp_path, _weights(FINGERPRINT, model=parent))
    message = str(err.value)
    assert f"{tmp_path / 'parent.pt'}: these weights do not fit EEResNet" in message, message
    assert "size mismatch" in message


def test_truncated_training_checkpoint_names_the_file(tmp_path):
    from train_helpers import digits_data, run_training

    io.save_tensors(tmp_path / "checkpoint.pt", {"fingerprint": "x", "model": {"w": torch.zeros(1000)}})
    _truncate(tmp_path / "checkpoint.pt")
    with pytest.raises(
        CorruptFileError, match=rf"{tmp_path / 'checkpoint.pt'}: corrupt, truncated .*training checkpoint"
    ):
        run_training("standard", tmp_path, data=digits_data(128, 32), epochs=1)


# --- split files, FLOPs records ------------------------------------------------------------------
def _split(**parts: Any) -> Callable[[Path], None]:
    def write(path: Path) -> None:
        split = {"train": np.arange(0, 100), "val": np.arange(100, 120), "test": np.arange(120, 150), **parts}
        np.savez(path, **{k: v for k, v in split.items() if v is not None})

    return write


SPLIT_CASES = [
    ("split-missing-val", _split(val=None), ["lacks ['val']"]),
    ("split-float-indices", _split(train=np.linspace(0, 1, 5)), ["'train' must be a list of non-negative integer"]),
    ("split-negative-index", _split(test=np.array([-1, 3])), ["'test' must be a list of non-negative integer"]),
    ("split-overlap", _split(val=np.arange(90, 110)), ["train and val share images"]),
    ("split-truncated", lambda p: (_split()(p), _truncate(p)), ["corrupt or truncated split index file"]),
]


@pytest.mark.parametrize("write,expected", [c[1:] for c in SPLIT_CASES], ids=[c[0] for c in SPLIT_CASES])
def test_bad_split_file_is_refused_naming_the_file(write, expected, tmp_path):
    path = tmp_path / "digits.npz"
    write(path)
    with pytest.raises(CorruptFileError) as err:
        pipeline.read_split(str(path))
    assert str(path) in str(err.value)
    for fragment in expected:
        assert fragment in str(err.value), str(err.value)


def test_split_of_another_dataset_is_out_of_range(tmp_path):
    path = tmp_path / "digits.npz"
    _split(train=np.arange(200, 50000))(path)
    with pytest.raises(CorruptFileError, match=rf"{path}: 'train' index 49999 is out of range for a pool of 1797"):
        pipeline._train_data(CONFIG, "digits", str(path))


FLOPS_CASES = [
    ("flops-not-json", lambda p: p.write_text('{"flops": [1, 2'), ["not valid JSON"]),
    ("flops-no-list", lambda p: p.write_text('{"params": [1]}'), ["expected a JSON object with a 'flops' list"]),
    ("flops-decreasing", lambda p: write_flops(p, (3e5, 2e5)), ["non-decreasing list of positive numbers"]),
    ("flops-strings", lambda p: write_flops(p, ("1M", "2M")), ["non-decreasing list of positive numbers", "'1M'"]),
]


@pytest.mark.parametrize("write,expected", [c[1:] for c in FLOPS_CASES], ids=[c[0] for c in FLOPS_CASES])
def test_bad_flops_record_is_refused_naming_the_file(write, expected, tmp_path):
    path = tmp_path / "tiny.json"
    write(path)
    with pytest.raises(CorruptFileError) as err:
        pipeline.read_flops(str(path))
    assert str(path) in str(err.value)
    for fragment in expected:
        assert fragment in str(err.value), str(err.value)


@pytest.mark.parametrize(
    "write,expected",
    [
        (
            lambda p: io.save_tensors(p, {"correct": torch.ones(3, 4, dtype=torch.bool), "flops": torch.ones(3)}),
            "per-sample record has no 'exits' entry",
        ),
        (
            lambda p: io.save_tensors(
                p,
                {
                    "correct": torch.ones(3, 4, dtype=torch.bool),
                    "flops": torch.ones(3),
                    "exits": torch.zeros(39, 5, dtype=torch.uint8),
                },
            ),
            "expected (K, N), (B, N) and (K,)",
        ),
        (lambda p: p.write_bytes(b"not a tensor file"), "corrupt, truncated"),
    ],
    ids=["no-exits", "shapes", "garbage"],
)
def test_bad_per_sample_record_is_refused_naming_the_file(write, expected, tmp_path):
    from eebench.bootstrap import BootstrapSettings
    from eebench.summary import load_variants

    path = tmp_path / "samples.pt"
    write(path)
    with pytest.raises(CorruptFileError) as err:
        load_variants([CELL], [str(path)], BootstrapSettings(resamples=10))
    assert str(path) in str(err.value) and expected in str(err.value)

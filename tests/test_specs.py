"""One resolved spec per job (eebench.specs): the part of the config a job reads is the part
whose change reruns it."""

from __future__ import annotations

import copy

import pytest
import yaml
from workflow_helpers import default_config

from eebench.config import FIGURE_KINDS, SCHEMA_PATH, cell_fingerprint, cells, resolved_cell_config, validate_schema
from eebench.datasets import dataset_info
from eebench.specs import RULE_KEYS, RUNTIME_KEYS, job_spec, with_runtime

CELL_RULES = ("train", "infer", "infer_train_split", "posthoc", "evaluate", "latency")


@pytest.fixture(scope="module")
def config():
    config = default_config()
    validate_schema(config)
    return config


def spec_of(config, rule, cell):
    return job_spec(config, rule, cells=[cell])


def test_a_spec_is_a_part_of_the_config(config):
    for cell in cells(config):
        for rule in CELL_RULES:
            spec = spec_of(config, rule, cell)
            for key in RULE_KEYS[rule]:
                if key != "latency":
                    assert spec[key] == config[key]
            for section in ("datasets", "architectures", "methods", "pretrained", "posthoc"):
                for name, entry in spec[section].items():
                    assert entry == config[section][name], (rule, cell, section, name)
            assert not set(spec) & set(RUNTIME_KEYS)


def test_what_a_job_computes_from_its_spec_equals_what_the_config_gives(config):
    for cell in cells(config):
        spec = with_runtime(spec_of(config, "evaluate", cell), config)
        assert resolved_cell_config(spec, cell) == resolved_cell_config(config, cell)
        assert dataset_info(cell.dataset, spec) == dataset_info(cell.dataset, config)
        if cell.variant in config["methods"]:
            assert cell_fingerprint(spec, cell) == cell_fingerprint(config, cell)


def _changed(config, mutate):
    changed = copy.deepcopy(config)
    mutate(changed)
    return changed


@pytest.mark.parametrize(
    "mutate, rerun",
    [
        # the bug this design fixes: these were read by the infer jobs and in no rerun trigger
        (lambda c: c.update(train_cache_samples=100), {"infer_train_split"}),
        (lambda c: c.update(infer_batch_size=64), {"infer", "infer_train_split", "latency"}),
        (lambda c: c["bootstrap"].update(seed=7), {"evaluate"}),
        (lambda c: c.update(split_seed=3), set(CELL_RULES)),
        (lambda c: c["datasets"]["digits"]["recipe"].update(epochs=5), set(CELL_RULES)),
        (lambda c: c["latency"].update(repeats=9), {"latency"}),
        (lambda c: c["latency"].update(variants=["standard"]), set()),  # which cells are timed: not the job's
    ],
)
def test_changing_what_a_job_reads_changes_its_spec(config, mutate, rerun):
    changed = _changed(config, mutate)
    cell = next(c for c in cells(config) if (c.arch, c.variant) == ("msdnet", "standard"))
    differ = {rule for rule in CELL_RULES if spec_of(config, rule, cell) != spec_of(changed, rule, cell)}
    assert differ == rerun


def test_another_variants_settings_leave_a_cell_alone(config):
    changed = _changed(config, lambda c: c["methods"]["l2w"].setdefault("params", {}).update(hidden=16))
    for cell in cells(config):
        for rule in CELL_RULES:
            same = spec_of(config, rule, cell) == spec_of(changed, rule, cell)
            assert same == (cell.variant != "l2w"), (rule, cell)


def test_a_variant_depends_on_its_parents_settings(config):
    """gater_frozen starts from standard's weights, the post-hoc methods score standard's cache."""
    changed = _changed(config, lambda c: c["methods"]["standard"].update(recipe={"lr": 0.05}))
    for cell in cells(config):
        if cell.variant in ("gater_frozen", "jei_dnn", "calibrated_dnn", "eenet"):
            assert spec_of(config, "evaluate", cell) != spec_of(changed, "evaluate", cell)


def test_runtime_keys_come_from_the_running_config(config):
    cell = cells(config)[0]
    spec = spec_of(config, "train", cell)
    running = with_runtime(spec, {**config, "data_dir": "/elsewhere", "device": "cpu"})
    assert running["data_dir"] == "/elsewhere" and running["device"] == "cpu"
    assert spec_of(_changed(config, lambda c: c.update(data_dir="/elsewhere")), "train", cell) == spec


def test_the_schema_names_the_figures_the_workflow_draws():
    schema = yaml.safe_load(SCHEMA_PATH.read_text())
    assert set(schema["properties"]["report"]["properties"]["figures"]["properties"]) == set(FIGURE_KINDS)

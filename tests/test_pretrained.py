"""Pretrained variants: config checks, the split their held-out images give, fingerprints, and a
converted reference checkpoint through the workflow end to end."""

from __future__ import annotations

import copy
import lzma
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from workflow_helpers import ROOT, default_config, planned_jobs, run_workflow, tiny_config

from eebench.config import (
    Cell,
    ConfigError,
    cell_fingerprint,
    check_config,
    check_pretrained_files,
    load_config,
    split_identity,
    validate_schema,
)
from eebench.heldout import dataset_split, read_val_indices
from eebench.style import variant_label, variant_styles

FIXTURES = Path(__file__).resolve().parent / "fixtures" / "reference"
# the architecture of the msdnet_cifar fixture (kalviny/MSDNet-PyTorch, CIFAR layout): digits-shaped
REFERENCE_MSDNET = {
    "family": "msdnet",
    "params": {
        "n_blocks": 2,
        "step_mode": "even",
        "step": 2,
        "base": 1,
        "n_channels": 4,
        "growth_rate": 2,
        "gr_factor": [1, 2, 4],
        "bn_factor": [1, 2, 4],
        "n_scales": 3,
    },
}


def pretrained_config(checkpoint: str = "ckpt.pth.tar", val_indices: str | None = "held_out.npz") -> dict:
    """The tiny digits config with the reference MSDNet checkpoint as a pretrained variant and the
    frozen-backbone gater started from it."""
    config = tiny_config(epochs=1)
    config["architectures"] = {"msdnet_ref": copy.deepcopy(REFERENCE_MSDNET)}
    config["pretrained"] = {
        "released": {
            "dataset": "digits",
            "format": "msdnet",
            "label": "MSDNet (reference)",
            "checkpoints": {"msdnet_ref": checkpoint},
        }
    }
    if val_indices is not None:
        config["datasets"]["digits"]["val_indices"] = val_indices
    config["methods"] = {"gater_frozen": {**default_config()["methods"]["gater_frozen"], "init_from": "released"}}
    config["experiments"] = [
        {
            "datasets": ["digits"],
            "architectures": ["msdnet_ref"],
            "pretrained": ["released"],
            "methods": ["gater_frozen"],
        }
    ]
    config["report"] = {"figures": {"fig3_budgeted": {"variants": ["released", "gater_frozen"]}}}
    return config


def checked(config: dict) -> dict:
    config = copy.deepcopy(config)
    validate_schema(config)
    check_config(config)
    return config


def cifar_config() -> dict:
    """A CIFAR-10 config with a pretrained variant (nothing here reads the data)."""
    config = pretrained_config(val_indices=None)
    config["datasets"] = {"cifar10": config["datasets"].pop("digits")}
    config["pretrained"]["released"]["dataset"] = "cifar10"
    config["experiments"][0]["datasets"] = ["cifar10"]
    return config


def test_a_pretrained_variant_that_may_have_trained_on_val_is_refused():
    with pytest.raises(
        ConfigError,
        match=r"pretrained\.released: its checkpoints may have been trained on any image "
        r"of cifar10's training pool.*biases every threshold.*val_from: test",
    ):
        checked(cifar_config())
    config = cifar_config()
    config["datasets"]["cifar10"]["val_indices"] = "index.pth"
    checked(config)  # the images its training held out
    config = cifar_config()
    config["datasets"]["cifar10"].update(val_from="test", val_size=5000)
    checked(config)  # val from the test set, which no checkpoint trained on
    config["datasets"]["cifar10"]["val_indices"] = "index.pth"
    with pytest.raises(
        ConfigError, match=r"datasets\.cifar10\.val_indices: not used, since datasets.cifar10.val_from is 'test'"
    ):
        checked(config)


def test_pretrained_config_errors():
    config = pretrained_config()
    config["experiments"][0]["architectures"] = ["msdnet_ref", "msdnet_other"]
    config["architectures"]["msdnet_other"] = copy.deepcopy(REFERENCE_MSDNET)
    with pytest.raises(
        ConfigError,
        match=r"pretrained\.released\.checkpoints: no checkpoint for architecture "
        r"'msdnet_other'",
    ):
        checked(config)
    config = pretrained_config()
    config["architectures"]["msdnet_ref"] = {"family": "ranet", "params": {}}
    with pytest.raises(ConfigError, match=r"'msdnet_ref' is a ranet architecture, but format 'msdnet'"):
        checked(config)
    config = pretrained_config()
    config["pretrained"]["released"]["format"] = "caffe"
    with pytest.raises(
        ConfigError, match=r"pretrained\.released\.format: 'caffe' is not allowed; allowed: msdnet, l2w"
    ):
        checked(config)
    config = pretrained_config()
    config["datasets"]["digits"]["val_from"] = "test"
    with pytest.raises(ConfigError, match=r"datasets\.digits\.val_from: 'test' is not allowed"):
        checked(config)
    config = pretrained_config()
    config["methods"]["gater_frozen"]["init_from"] = "nothing"
    with pytest.raises(ConfigError, match=r"init_from: 'nothing' is not allowed; allowed: gater_frozen, released"):
        checked(config)
    with pytest.raises(ConfigError, match=r"checkpoints\.msdnet_ref: 'ckpt.pth.tar' .* is not a file"):
        check_pretrained_files(checked(pretrained_config()))


def test_the_released_imagenet_config_checks():
    config = load_config(ROOT / "config" / "imagenet_released.yaml")
    validate_schema(config)
    check_config(config)
    assert split_identity(config, "imagenet") == {"val_from": "test"}


def test_held_out_indices_make_the_split(tmp_path):
    pool, n_val = 1000, 100
    order = torch.randperm(pool, generator=torch.Generator().manual_seed(0))
    torch.save(order, tmp_path / "index.pth")  # MSDNet's --use-valid: a permutation, val = its last n_val
    held = read_val_indices(tmp_path / "index.pth", pool, n_val, carved_test=False)
    assert np.array_equal(held["val"], order[-n_val:].numpy())
    torch.save(order[:30], tmp_path / "some.pth")
    assert np.array_equal(read_val_indices(tmp_path / "some.pth", pool, n_val, False)["val"], order[:30].numpy())
    with pytest.raises(Exception, match="must give both 'val' and 'test'"):
        read_val_indices(tmp_path / "index.pth", pool, n_val, carved_test=True)
    torch.save(order[:30] + pool, tmp_path / "bad.pth")
    with pytest.raises(Exception, match="distinct indices into the training pool of 1000 images"):
        read_val_indices(tmp_path / "bad.pth", pool, n_val, False)

    config = cifar_config()
    config["datasets"]["cifar10"]["val_indices"] = str(tmp_path / "index.pth")
    config["datasets"]["cifar10"]["val_size"] = n_val  # of this small pool (CIFAR's is 5000 of 50000)
    sizes = (1000, 300)
    split = dataset_split(checked(config), "cifar10", sizes)
    assert np.array_equal(split["val"], np.sort(order[-n_val:].numpy()))
    assert len(split["train"]) == pool - n_val and not np.intersect1d(split["train"], split["val"]).size
    assert np.array_equal(split["test"], np.arange(300))
    config = cifar_config()
    config["datasets"]["cifar10"].update(val_from="test", val_size=100)
    split = dataset_split(checked(config), "cifar10", sizes)
    assert len(split["val"]) == 100 and len(split["test"]) == 200 and len(split["train"]) == pool
    assert not np.intersect1d(split["val"], split["test"]).size and "val_from_test" in split


def test_fingerprints_follow_the_checkpoint_and_the_split(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    Path("ckpt.pth.tar").write_bytes(b"one")
    np.savez("held_out.npz", val=np.arange(10), test=np.arange(10, 20))
    config = checked(pretrained_config())
    released, gater = Cell("digits", "msdnet_ref", "released", 0), Cell("digits", "msdnet_ref", "gater_frozen", 0)
    before = cell_fingerprint(config, released), cell_fingerprint(config, gater)
    Path("ckpt.pth.tar").write_bytes(b"two")
    after = cell_fingerprint(config, released), cell_fingerprint(config, gater)
    assert before[0] != after[0] and before[1] != after[1]  # the gater starts from the converted weights
    np.savez("held_out.npz", val=np.arange(12), test=np.arange(12, 20))
    assert cell_fingerprint(config, gater) != after[1]  # another split
    assert split_identity(checked(default_config()), "digits") == {}  # configs without pretrained: as before


def test_a_reference_checkpoint_through_the_workflow(tmp_path):
    """Converted weights, held-out val and test, a gater trained on the frozen converted network,
    evaluation; a changed checkpoint file is converted again, and what depends on it redone."""
    (tmp_path / "ckpt.pth.tar").write_bytes(lzma.decompress((FIXTURES / "msdnet_cifar.ckpt.xz").read_bytes()))
    order = np.random.default_rng(5).permutation(1797)
    np.savez(tmp_path / "held_out.npz", val=order[:300], test=order[300:700])
    config = pretrained_config()
    run_workflow(tmp_path, config, "results/aggregate/anytime.csv")
    results = tmp_path / "results"
    split = np.load(results / "splits" / "digits.npz")
    assert np.array_equal(split["val"], np.sort(order[:300])) and np.array_equal(split["test"], np.sort(order[300:700]))
    weights = torch.load(results / "train/digits/msdnet_ref/released/seed0/weights.pt", weights_only=True)
    assert weights["source"]["format"] == "msdnet" and len(weights["model"]) == 196
    anytime = pd.read_csv(results / "aggregate" / "anytime.csv")
    assert set(anytime["kind"]) == {"pretrained", "training"}
    curves = {v: g.sort_values("exit")["accuracy"].tolist() for v, g in anytime.groupby("variant")}
    assert curves["released"] == curves["gater_frozen"]  # the gater leaves the network as converted
    assert variant_label(config, "released") == "MSDNet (reference)" and "released" in variant_styles(config)

    def plan() -> set:
        proc = run_workflow(tmp_path, config, "results/aggregate/anytime.csv", extra=["-n"])
        return {job for job in planned_jobs(proc.stdout + proc.stderr) if job[1]}

    assert plan() == set()
    saved = torch.load(tmp_path / "ckpt.pth.tar", weights_only=True)
    saved["state_dict"]["module.classifier.1.linear.bias"] += 1.0
    torch.save(saved, tmp_path / "ckpt.pth.tar")
    assert plan() == {
        ("convert_pretrained", "released"),
        ("infer", "released"),
        ("evaluate", "released"),
        ("train", "gater_frozen"),
        ("infer", "gater_frozen"),
        ("evaluate", "gater_frozen"),
    }

"""Conversion of the reference repositories' checkpoints (eebench.checkpoints, the CLI).

The fixtures under tests/fixtures/reference were written by scripts/make_reference_fixtures.py
from the reference code itself: each is a checkpoint saved as that repository's training script
saves it, and the reference model's outputs in eval mode on a fixed input. No reference code is
needed here.
"""

from __future__ import annotations

import io
import json
import lzma
import os
import pickle
import sys
import types
from pathlib import Path

import pytest
import torch

from eebench import cli
from eebench.checkpoints import (
    FORMATS,
    CheckpointError,
    Inert,
    convert_checkpoint,
    load_restricted,
    read_checkpoint,
    reference_names,
)
from eebench.methods.boostnet import ensemble_logits
from models import InputSpec, build_model

FIXTURES = Path(__file__).resolve().parent / "fixtures" / "reference"
NAMES = sorted(p.name.split(".")[0] for p in FIXTURES.glob("*.expected.pt.xz"))


def expected(name: str) -> dict:
    data = torch.load(
        io.BytesIO(lzma.decompress((FIXTURES / f"{name}.expected.pt.xz").read_bytes())), weights_only=True
    )
    return {**data, "meta": json.loads(data["meta"])}


def checkpoint(name: str, tmp_path: Path) -> Path:
    """The checkpoint's bytes exactly as the reference wrote them."""
    path = tmp_path / f"{name}.pth.tar"
    path.write_bytes(lzma.decompress((FIXTURES / f"{name}.ckpt.xz").read_bytes()))
    return path


def images(data: dict) -> torch.Tensor:
    return (data["pixels"].float() / 255 - 0.5) / 0.25  # as the fixture script fed the reference


def convert(name: str, tmp_path: Path, **overrides):
    data = expected(name)
    meta = data["meta"]
    network, _ = convert_checkpoint(
        checkpoint(name, tmp_path),
        meta["format"],
        meta["family"],
        InputSpec(*meta["input"]),
        {**meta["params"], **overrides},
    )
    return network.eval(), data


def test_every_format_and_family_has_a_fixture():
    covered = {(expected(n)["meta"]["format"], expected(n)["meta"]["family"]) for n in NAMES}
    assert covered == {(f.name, family) for f in FORMATS.values() for family in f.families}
    assert tuple(FORMATS) == cli.CHECKPOINT_FORMATS
    assert sum(p.stat().st_size for p in FIXTURES.iterdir()) < 700_000


@pytest.mark.parametrize("name", NAMES)
def test_converted_weights_give_the_reference_outputs(name, tmp_path):
    network, data = convert(name, tmp_path)
    with torch.no_grad():
        out = network.forward_all(images(data))
    logits = torch.stack(out.logits)
    assert logits.shape == data["logits"].shape
    torch.testing.assert_close(logits, data["logits"], atol=1e-5, rtol=1e-5)
    assert data["logits"].std(dim=-1).min() > 1e-2  # the outputs depend on the input and the weights
    if "confidences" in data:  # EENets: its softmax and its confidence heads (our gates)
        torch.testing.assert_close(torch.stack(out.gates), data["confidences"], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(logits.softmax(-1), data["probabilities"], atol=1e-6, rtol=1e-5)
    if "ensemble_logits" in data:  # BoostNet: the additive ensemble its evaluation scores
        boosted = torch.stack(ensemble_logits(out.logits, data["meta"]["ensemble_reweight"]))
        torch.testing.assert_close(boosted, data["ensemble_logits"], atol=1e-5, rtol=1e-5)


def test_a_wrong_tensor_shows_in_the_outputs(tmp_path):
    """The comparison above can fail: one batch-norm statistic moved changes the logits."""
    network, data = convert("ranet_cifar", tmp_path)
    bn = network.flows[1][0].layers[0].conv[0][1]
    with torch.no_grad():
        bn.running_var.mul_(1.5)
        moved = torch.stack(network(images(data)))
    assert (moved - data["logits"]).abs().max() > 1e-3


def test_a_step_mismatch_names_the_parameters(tmp_path):
    with pytest.raises(CheckpointError) as err:
        convert("msdnet_cifar", tmp_path, step=1)  # the checkpoint has step 2
    text = str(err.value)
    assert "does not fit msdnet as configured" in text and "blocks.1.2.layers.0.conv_down" in text
    assert "MSD layers per block: [1, 2] in the checkpoint, [1, 1] as configured" in text
    assert "step=1" in text and "base=1" in text


def test_a_width_or_class_mismatch_names_what_to_check(tmp_path):
    with pytest.raises(CheckpointError, match=r"same; check the width parameters \(growth_rate=4"):
        convert("msdnet_cifar", tmp_path, growth_rate=4)
    data = expected("msdnet_cifar")
    with pytest.raises(CheckpointError, match=r"classes: 10 in the checkpoint, 100 as configured. Check dataset"):
        convert_checkpoint(
            checkpoint("msdnet_cifar", tmp_path), "msdnet", "msdnet", InputSpec(3, 32, 100), data["meta"]["params"]
        )


def test_an_eenets_exit_mismatch_names_num_exits(tmp_path):
    with pytest.raises(CheckpointError, match=r"early exits: 2 in the checkpoint, 1 as configured.*num_exits=1"):
        convert("eenets_cifar", tmp_path, num_exits=1)


def test_a_checkpoint_of_another_family(tmp_path):
    msdnet = expected("msdnet_cifar")["meta"]["params"]
    ranet = checkpoint("ranet_cifar", tmp_path)
    with pytest.raises(CheckpointError, match=r"holds a ranet network .* --arch ranet .*\(ranet, boostnet\)"):
        convert_checkpoint(ranet, "msdnet", "msdnet", InputSpec(3, 32, 10), msdnet)
    with pytest.raises(CheckpointError, match=r"format 'ranet' .* holds ranet checkpoints, not 'msdnet'"):
        convert_checkpoint(ranet, "ranet", "msdnet", InputSpec(3, 32, 10), msdnet)
    with pytest.raises(CheckpointError, match=r"names eenet\.EENet.*format 'eenets'"):
        convert_checkpoint(checkpoint("eenets_cifar", tmp_path), "msdnet", "msdnet", InputSpec(3, 32, 10), msdnet)


@pytest.mark.parametrize("name", ["msdnet_imagenet", "eenets_cifar"])  # zip; legacy whole model
def test_a_truncated_file(name, tmp_path):
    path = checkpoint(name, tmp_path)
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    meta = expected(name)["meta"]
    with pytest.raises(CheckpointError, match="corrupt or truncated checkpoint"):
        convert_checkpoint(path, meta["format"], meta["family"], InputSpec(*meta["input"]), meta["params"])


def test_checkpoints_of_old_torch_without_num_batches_tracked(tmp_path):
    path = checkpoint("msdnet_cifar", tmp_path)
    saved = torch.load(path, weights_only=True)
    saved["state_dict"] = {k: v for k, v in saved["state_dict"].items() if not k.endswith("num_batches_tracked")}
    torch.save(saved, path)
    network, data = convert("msdnet_cifar", tmp_path)
    with torch.no_grad():
        torch.testing.assert_close(torch.stack(network(images(data))), data["logits"], atol=1e-5, rtol=1e-5)


class _Harmful:
    """Pickles as a call of os.system (``posix.system``) with a shell command."""

    def __init__(self, command):
        self.command = command

    def __reduce__(self):
        return os.system, (self.command,)


def test_restricted_unpickler_imports_and_runs_nothing(tmp_path):
    marker = tmp_path / "ran"  # what the pickled command would create
    path = tmp_path / "model.pt"
    for legacy in (False, True):
        # a class of a module that exists only while saving: the loader would have to import it
        module = types.ModuleType("eebench_no_such_module")
        unknown = type("Unknown", (), {"__module__": module.__name__})
        module.Unknown = unknown
        sys.modules[module.__name__] = module
        try:
            torch.save(
                {"payload": _Harmful(f"touch {marker}"), "other": unknown(), "weight": torch.ones(2)},
                path,
                _use_new_zipfile_serialization=not legacy,
            )
        finally:
            del sys.modules[module.__name__]
        assert b"system" in path.read_bytes()  # the pickle names it
        loaded = load_restricted(path)
        assert isinstance(loaded["payload"], Inert) and loaded["payload"].qualified_name.endswith(".system")
        assert loaded["payload"].args == (f"touch {marker}",)
        assert isinstance(loaded["other"], Inert) and "eebench_no_such_module" not in sys.modules
        torch.testing.assert_close(loaded["weight"], torch.ones(2))
    assert not marker.exists()
    with pytest.raises(pickle.UnpicklingError):  # what torch's own loader makes of it
        torch.load(path, weights_only=True)


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # torch.jit.script, to write one
def test_torchscript_archives_are_refused(tmp_path):
    """torch.load hands them to torch.jit.load, which runs their code."""
    path = tmp_path / "scripted.pt"
    torch.jit.save(torch.jit.script(torch.nn.Linear(2, 2)), str(path))
    with pytest.raises(CheckpointError, match="a TorchScript archive"):
        read_checkpoint(path, "eenets")


def test_whole_pickled_model_is_read_as_tensors(tmp_path):
    tensors, about = read_checkpoint(checkpoint("eenets_cifar", tmp_path), "eenets")
    assert about["class"] == "eenet.EENet" and about["num_ee"] == 2 and about["total_layers"] == 8
    assert all(isinstance(t, torch.Tensor) for t in tensors.values())
    assert "stages.0.0.0.weight" in tensors and "classifier.0.weight" in tensors  # DataParallel stripped


@pytest.mark.parametrize(
    "family, params, size",
    [
        (
            "msdnet",
            {
                "n_blocks": 5,
                "step_mode": "even",
                "step": 4,
                "base": 4,
                "n_channels": 32,
                "growth_rate": 16,
                "gr_factor": [1, 2, 4, 4],
                "bn_factor": [1, 2, 4, 4],
                "n_scales": 4,
            },
            224,
        ),
        ("msdnet", {"prune": "min", "bottleneck": False}, 32),
        ("ranet", {}, 32),
        ("ee_resnet", {"depth": 50, "num_exits": 3, "exit_pool": "bnpool"}, 64),
    ],
)
def test_every_tensor_has_one_reference_name(family, params, size):
    names = reference_names(family, build_model(family, InputSpec(3, size, 10), **params))
    assert len(set(names.values())) == len(names)


def test_cli_convert_and_logits(tmp_path, capsys):
    data = expected("ranet_cifar")
    sets = [f"--set={key}={json.dumps(value)}" for key, value in data["meta"]["params"].items()]
    weights, logits, inputs = tmp_path / "w.pt", tmp_path / "l.pt", tmp_path / "x.pt"
    cli.main(
        [
            "convert-checkpoint",
            str(checkpoint("ranet_cifar", tmp_path)),
            "--from",
            "ranet",
            "--arch",
            "ranet",
            "--dataset",
            "cifar10",
            *sets,
            "--out",
            str(weights),
        ]
    )
    saved = torch.load(weights, weights_only=True)
    assert set(saved) == {"model", "method", "fingerprint", "source"} and saved["method"] == {}
    torch.save(images(data), inputs)
    cli.main(
        [
            "logits",
            str(weights),
            "--arch",
            "ranet",
            "--dataset",
            "cifar10",
            *sets,
            "--input",
            str(inputs),
            "--out",
            str(logits),
            "--batch-size",
            "2",
        ]
    )
    torch.testing.assert_close(torch.load(logits, weights_only=True)["logits"], data["logits"], atol=1e-5, rtol=1e-5)
    assert "logits of 3 exits x 3 images x 10 classes" in capsys.readouterr().out
    with pytest.raises(SystemExit, match=r"error: .*does not fit ranet as configured.*step=4"):
        cli.main(
            [
                "convert-checkpoint",
                str(checkpoint("ranet_cifar", tmp_path)),
                "--from",
                "ranet",
                "--arch",
                "ranet",
                "--dataset",
                "cifar10",
                *sets,
                "--set",
                "step=4",
                "--out",
                str(weights),
            ]
        )
    with pytest.raises(SystemExit, match=r"expected a float tensor of normalised images \(N, 3, 32, 32\)"):
        torch.save(torch.zeros(2, 3, 28, 28), inputs)
        cli.main(
            [
                "logits",
                str(weights),
                "--arch",
                "ranet",
                "--dataset",
                "cifar10",
                *sets,
                "--input",
                str(inputs),
                "--out",
                str(logits),
            ]
        )

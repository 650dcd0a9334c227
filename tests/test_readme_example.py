"""The README's "Adding a method" example really is a working method."""

from __future__ import annotations

import re
import sys
import types
from pathlib import Path

import torch

from eebench.methods import METHODS, TrainContext

README = Path(__file__).resolve().parents[1] / "README.md"


def example_source() -> str:
    text = README.read_text()
    match = re.search(r"<!-- example-method[^>]*-->\s*```python\n(.*?)```", text, re.S)
    assert match, "README lost its example method block"
    return match.group(1)


def test_readme_example_registers_and_trains(toy_network, toy_batch):
    module = types.ModuleType("eebench.methods.weighted_exits")
    module.__package__ = "eebench.methods"
    sys.modules[module.__name__] = module
    try:
        exec(compile(example_source(), "README.md", "exec"), module.__dict__)
        assert "weighted_exits" in METHODS.names()
        cls = METHODS.get("weighted_exits")
        params = METHODS.make_params("weighted_exits", {"power": 2.0})
        ctx = TrainContext(exit_costs=torch.tensor([0.3, 0.6, 1.0]), num_classes=4, epochs=1, steps_per_epoch=1)
        method = cls(toy_network, params, ctx)
        x, y = toy_batch
        outputs = toy_network.forward_all(x)
        weights = torch.tensor([1.0, 4.0, 9.0]) * 3 / 14
        expected = sum(w * torch.nn.functional.cross_entropy(z, y) for w, z in zip(weights, outputs.logits))
        assert torch.allclose(method.loss(outputs, y), expected)
        before = [p.clone() for p in toy_network.parameters()]
        opt = torch.optim.SGD(toy_network.parameters(), lr=0.1)
        method.train_step(x, y, opt, 0)
        assert any(not torch.equal(a, b) for a, b in zip(before, toy_network.parameters()))
    finally:
        METHODS._entries.pop("weighted_exits", None)
        sys.modules.pop(module.__name__, None)

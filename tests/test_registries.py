"""Registry-wide tests (as timm's): every registered architecture, training method and post-hoc
method is exercised by being registered, with its own tiny ``test_params``.

Per-family numbers (reference FLOPs, bit-identity, hand-computed losses) are in the per-module
test files; here every entry must honour the contract its base class declares.
"""

from __future__ import annotations

import io as stdio

import pytest
import torch

from eebench.flops import exit_flops
from eebench.methods import METHODS, TrainContext
from eebench.posthoc import POSTHOC
from eebench.registry import build_params
from models import build_model, get_architecture, list_architectures
from models.base import CONFIDENCE_BRANCHES, GRADIENT_RESCALING, PLAIN_COUNTERPART, MultiExitNetwork


def tiny_network(family: str, seed: int = 0) -> MultiExitNetwork:
    cls = get_architecture(family).network_class
    torch.manual_seed(seed)
    return build_model(family, cls.test_input, **cls.test_params)


def images_for(network: MultiExitNetwork, n: int = 4) -> torch.Tensor:
    spec = type(network).test_input
    return torch.randn(n, spec.channels, spec.size, spec.size, generator=torch.Generator().manual_seed(1))


# --- architectures -------------------------------------------------------------------------------
@pytest.mark.parametrize("family", list_architectures())
def test_architecture_contract(family):
    network = tiny_network(family).eval()
    spec = type(network).test_input
    x = images_for(network)
    with torch.no_grad():
        out = network.forward_all(x)
        prefix = network.forward_all(x, upto=1)
    assert network.num_exits >= 2 and len(out.logits) == network.num_exits == len(out.features)
    for logits, features in zip(out.logits, out.features):
        assert logits.shape == (len(x), spec.num_classes) and torch.isfinite(logits).all()
        assert features.shape[0] == len(x)
    assert len(prefix.logits) == 1 and torch.allclose(prefix.logits[0], out.logits[0], atol=1e-6)
    assert [t.shape for t in network(x)] == [t.shape for t in out.logits]
    assert (out.gates is not None) == (CONFIDENCE_BRANCHES in network.capabilities)
    if out.gates is not None:
        assert all(c.shape == (len(x),) and ((c >= 0) & (c <= 1)).all() for c in out.gates)
    with pytest.raises(ValueError, match="upto"):
        network.forward_all(x, upto=network.num_exits + 1)


@pytest.mark.parametrize("family", list_architectures())
def test_architecture_trains_every_parameter(family):
    network = tiny_network(family).train()
    out = network.forward_all(images_for(network))
    loss = sum(logits.square().mean() for logits in out.logits)
    if out.gates is not None:
        loss = loss + sum(c.mean() for c in out.gates)
    loss.backward()
    without = [name for name, p in network.named_parameters() if p.grad is None or not torch.isfinite(p.grad).all()]
    assert not without, f"parameters without a finite gradient: {without[:5]}"


@pytest.mark.parametrize("family", list_architectures())
def test_architecture_flops_record(family):
    network = tiny_network(family)
    spec = type(network).test_input
    record = exit_flops(network, (spec.channels, spec.size, spec.size))
    flops, params = record["flops"], record["params"]
    assert len(flops) == len(params) == network.num_exits
    assert all(f > 0 for f in flops) and flops == sorted(flops) and params == sorted(params)
    assert params[-1] == sum(p.numel() for p in network.parameters())


@pytest.mark.parametrize("family", list_architectures())
def test_declared_capabilities_are_implemented(family):
    network = tiny_network(family)
    if GRADIENT_RESCALING in network.capabilities:
        network.set_gradient_rescaling(True)
        network.set_gradient_rescaling(False)
    else:
        with pytest.raises(NotImplementedError):
            network.set_gradient_rescaling(True)
    if PLAIN_COUNTERPART in network.capabilities:
        plain = network.plain_counterpart().eval()
        with torch.no_grad():
            assert plain(images_for(network)).shape[0] == 4
    else:
        with pytest.raises(NotImplementedError):
            network.plain_counterpart()


# --- training methods ----------------------------------------------------------------------------
def family_for(method_cls) -> str:
    """The first architecture that offers what the method requires."""
    return next(
        f for f in list_architectures() if method_cls.requires <= get_architecture(f).network_class.capabilities
    )


@pytest.mark.parametrize("name", METHODS.names())
def test_method_contract_and_one_step(name):
    cls = METHODS.get(name)
    assert cls.exit_score in ("max_softmax", "gate")
    params = METHODS.make_params(name, dict(cls.test_params))
    network = tiny_network(family_for(cls))
    k = network.num_exits
    ctx = TrainContext(
        exit_costs=torch.linspace(1 / k, 1.0, k),
        num_classes=type(network).test_input.num_classes,
        epochs=2,
        steps_per_epoch=2,
    )
    method = cls(network, params, ctx)
    trainable = list(method.trainable_parameters())
    optimizer = torch.optim.SGD(trainable, lr=0.1) if trainable else None
    before = {n: p.detach().clone() for n, p in network.named_parameters()}
    x, y = images_for(network, 8), torch.randint(0, ctx.num_classes, (8,), generator=torch.Generator().manual_seed(2))
    for step in range(2):
        loss = method.train_step(x, y, optimizer, step)
        assert loss.dim() == 0 and torch.isfinite(loss) and not loss.requires_grad
    moved = {n for n, p in network.named_parameters() if not torch.equal(p.detach(), before[n])}
    trained = {n for n, p in network.named_parameters() if any(p is q for q in trainable)}
    assert moved <= trained, f"parameters outside trainable_parameters() moved: {sorted(moved - trained)[:3]}"
    assert moved or not trainable or method.extra_modules(), "a step moved nothing"
    assert 0 < cls.confidence_exit_threshold(params, k) <= 1
    method.load_state_dict(method.state_dict())
    evaluated = method.eval_outputs(network.eval().forward_all(x))
    assert len(evaluated.logits) == k


# --- post-hoc methods ----------------------------------------------------------------------------
def tiny_cache(n: int, seed: int, k: int = 3, c: int = 4, d: int = 5) -> dict:
    """Exits of rising accuracy: logits that point more and more often to the label."""
    gen = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, c, (n,), generator=gen)
    features = [torch.randn(n, d, generator=gen) for _ in range(k)]
    logits = torch.stack(
        [torch.randn(n, c, generator=gen) + (j + 1) * torch.nn.functional.one_hot(labels, c) for j in range(k)]
    )
    return {"logits": logits, "labels": labels, "features": features, "split_size": n}


@pytest.mark.parametrize("name", POSTHOC.names())
def test_posthoc_contract(name):
    cls = POSTHOC.get(name)
    method = cls(build_params(cls.Params, dict(cls.test_params), name), [1e6, 2e6, 3e6], seed=0)
    val, test = tiny_cache(120, 1), tiny_cache(80, 2)
    method.fit(val, tiny_cache(150, 3) if cls.needs_train_split else None)
    scored = method.score(test)
    k, n = 3, 80
    assert scored.predictions.shape == (k, n)
    assert scored.scores.shape in ((k, n), (scored.scores.shape[0], k, n))
    if scored.scores.dim() == 3:  # one scorer per budget: each with its exit distribution
        assert scored.exit_distributions.shape == (scored.scores.shape[0], k)
        torch.testing.assert_close(
            scored.exit_distributions.sum(1).double(),
            torch.ones(scored.scores.shape[0], dtype=torch.float64),
            atol=1e-5,
            rtol=0,
        )
    if scored.probabilities is not None:
        assert scored.probabilities.shape == (k, n, 4)
        torch.testing.assert_close(scored.probabilities.sum(-1), torch.ones(k, n), atol=1e-4, rtol=0)
    buffer = stdio.BytesIO()  # the fitted state is data: it saves and loads with weights_only
    torch.save(method.state_dict(), buffer)
    buffer.seek(0)
    torch.load(buffer, weights_only=True)
    again = cls(build_params(cls.Params, dict(cls.test_params), name), [1e6, 2e6, 3e6], seed=0)
    again.fit(val, tiny_cache(150, 3) if cls.needs_train_split else None)
    assert torch.equal(again.score(test).scores, scored.scores)  # same seed, same scores

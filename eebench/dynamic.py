"""Real early exit: run a network exit by exit and let each sample leave at its first exit whose
score reaches the threshold.

The network runs segment by segment (``models.base``: ``begin``, ``run_segment``,
``exit_head``). After exit head k an ``ExitScorer`` gives each remaining sample its exit score and
prediction, exactly as the calibration scores the cache; samples with score >= T_k leave; the
others go on, their live tensors (``select_samples``) and the scorer's carry cut down to them; the
last exit takes everyone left. When every sample has left, no later segment runs.

Scorers (what the evaluation of the cell uses):

* ``MethodScorer``: max softmax, or the method's own ``exit_score = "gate"`` (JEI-DNN's
  gates), of the outputs after the method's ``eval_outputs`` (BoostNet's additive ensemble). A
  method that overrides ``eval_outputs`` sees the exits run so far, so its carry is their outputs.
* ``PosthocScorer``: a post-hoc method's ``score_exit`` (``eebench.posthoc.base``).

Where the network is not ``segmented`` or the post-hoc method has no ``score_exit``,
``run_simulated`` runs the simulated protocol on the batch instead (every exit of every sample).

``compare_with_simulation`` checks a dynamic run against the simulated protocol (every exit of
every sample, then ``calibration.exit_indices``): exit and prediction must agree on every sample
but where the simulated score lies within ``tolerance`` of the threshold (or the top two
probabilities within ``tolerance`` of each other), which is counted as a tie.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from models import ExitHead, ExitOutputs, MultiExitNetwork, select_samples

from .cache import EXIT_SCORES, scored_outputs
from .calibration import exit_indices
from .methods.base import TrainingMethod
from .posthoc.base import PosthocMethod
from .scored import ScoredOutputs

TIE_TOLERANCE = 1e-4  # scores this close to a threshold may fall either side under float rounding


class NotSegmentedError(TypeError):
    """The network or the scorer cannot run exit by exit (use the simulated protocol)."""


# --- scorers ---------------------------------------------------------------------------------
class ExitScorer:
    """How a cell is scored: exit by exit (``step``, dynamic) and on a whole cache
    (``score_cache``, the simulated protocol; the cache made with ``transform``)."""

    transform: Callable[[ExitOutputs], ExitOutputs] | None = None  # run_network's transform
    needs_features: bool = False
    budget: int = 0  # the row of the budgeted curve, for scores that differ per budget

    def step(self, k: int, head: ExitHead, carry: Any) -> tuple[torch.Tensor, torch.Tensor, Any]:
        """Scores (n,) and predictions (n,) at exit k of the n samples still in; ``carry`` is
        what this scorer returned at exit k-1 (None at exit 0), cut down to the samples still
        in. Returns (scores, predictions, carry)."""
        raise NotImplementedError

    def score_cache(self, cache: dict[str, Any]) -> ScoredOutputs:
        raise NotImplementedError


class MethodScorer(ExitScorer):
    """The training method's exit score on its evaluated outputs (``scored_outputs``' rule)."""

    def __init__(self, method: TrainingMethod | None = None, exit_score: str | None = None):
        if exit_score is None:
            exit_score = "max_softmax" if method is None else method.exit_score
        if exit_score not in EXIT_SCORES:
            raise ValueError(f"unknown exit score {exit_score!r}; allowed: {', '.join(EXIT_SCORES)}")
        self.method = method
        self.exit_score = exit_score
        # the default eval_outputs is the identity: nothing of the earlier exits is needed
        self.reads_earlier_exits = method is not None and type(method).eval_outputs is not TrainingMethod.eval_outputs
        self.transform = method.eval_outputs if self.reads_earlier_exits else None

    def evaluate(self, k: int, head: ExitHead, carry: Any) -> tuple[ExitHead, Any]:
        """Exit k's evaluated output (``eval_outputs`` of the exits so far); carry: their heads."""
        if not self.reads_earlier_exits:
            return head, carry
        carry = [*(carry or []), head]
        return self.method.eval_outputs(ExitOutputs.from_heads(carry)).head(k), carry

    def step(self, k: int, head: ExitHead, carry: Any) -> tuple[torch.Tensor, torch.Tensor, Any]:
        head, carry = self.evaluate(k, head, carry)
        top, predictions = head.logits.float().softmax(dim=-1).max(dim=-1)
        if self.exit_score == "max_softmax":
            return top, predictions, carry
        if head.gate is None:
            raise ValueError("exit_score 'gate' needs outputs with gates")
        return head.gate.float().reshape(-1), predictions, carry

    def score_cache(self, cache: dict[str, Any]) -> ScoredOutputs:
        return scored_outputs(cache, self.exit_score)


class PosthocScorer(ExitScorer):
    """A post-hoc method's scores for one budget (the row of the budgeted curve, 0-based), on
    the outputs its base training method evaluates."""

    needs_features = True

    def __init__(self, method: PosthocMethod, budget: int, base: MethodScorer | None = None):
        self.method = method
        self.budget = budget
        self.base = base or MethodScorer()
        self.transform = self.base.transform

    @property
    def exit_by_exit(self) -> bool:
        return self.method.scores_exit_by_exit()

    def step(self, k: int, head: ExitHead, carry: Any) -> tuple[torch.Tensor, torch.Tensor, Any]:
        if not self.exit_by_exit:
            raise NotSegmentedError(f"post-hoc method {self.method.name!r} implements no score_exit")
        base_carry, own = carry if carry is not None else (None, None)
        head, base_carry = self.base.evaluate(k, head, base_carry)
        scores, predictions, own = self.method.score_exit(k, head, own, self.budget)
        return scores, predictions, (base_carry, own)

    def score_cache(self, cache: dict[str, Any]) -> ScoredOutputs:
        return self.method.score(cache)


def cache_of(outputs: ExitOutputs, with_features: bool = True) -> dict[str, Any]:
    """A batch's outputs as an inference cache holds them (``inference.run_network``)."""
    cache: dict[str, Any] = {"logits": torch.stack([t.float() for t in outputs.logits]).cpu()}
    if with_features and outputs.features:
        cache["features"] = [f.float().flatten(1).cpu() for f in outputs.features]
    if outputs.gates is not None:
        cache["gates"] = torch.stack([g.float().reshape(-1) for g in outputs.gates]).cpu()
    return cache


def exit_by_exit(network: MultiExitNetwork, scorer: ExitScorer) -> bool:
    """Whether dynamic execution is possible (else: the simulated protocol, ``run_simulated``)."""
    return network.segmented and getattr(scorer, "exit_by_exit", True)


# --- the runner ------------------------------------------------------------------------------
@dataclass
class DynamicResult:
    exits: torch.Tensor  # (N,) 0-based exit each sample left at
    predictions: torch.Tensor  # (N,) its prediction there
    samples_per_segment: list[int]  # how many samples each segment ran on (0: never ran)
    scores: torch.Tensor | None = None  # (K, N) exit scores where computed, nan elsewhere


def check_thresholds(thresholds: Any, num_exits: int, what: str = "thresholds") -> list[float]:
    """(K,) thresholds as floats, or a ValueError saying what is wrong (plain Python: this runs once
    per batch, and at batch 1 torch's per-call overhead would show in the latency)."""
    values = [float(t) for t in (thresholds.flatten().tolist() if isinstance(thresholds, torch.Tensor) else thresholds)]
    has_nan = any(math.isnan(v) for v in values)
    if len(values) != num_exits or has_nan:
        raise ValueError(
            f"{what}: expected {num_exits} thresholds (one per exit of the network), got "
            f"{len(values)}{' with nan' if has_nan else ''}"
        )
    return values


@torch.inference_mode()
def run_dynamic(
    network: MultiExitNetwork, x: torch.Tensor, thresholds: Any, scorer: ExitScorer, record_scores: bool = False
) -> DynamicResult:
    """Exit-by-exit inference of the batch ``x`` (prepared as the network expects it, on its
    device) with per-exit ``thresholds`` (K,) of one budget. The network must be in eval mode."""
    if not network.segmented:
        raise NotSegmentedError(f"{type(network).__name__} does not run exit by exit (segmented = False)")
    num_exits = network.num_exits
    limits = check_thresholds(thresholds, num_exits)
    n = x.shape[0]
    exits = torch.full((n,), num_exits - 1, dtype=torch.long)
    predictions = torch.zeros(n, dtype=torch.long)
    scores = torch.full((num_exits, n), math.nan) if record_scores else None
    ran = [0] * num_exits
    alive = slice(None)  # the samples still in: all of them, then their original indices
    state, carry = network.begin(x), None
    for k in range(num_exits):
        ran[k] = n if isinstance(alive, slice) else len(alive)
        state = network.run_segment(k, state)
        score, prediction, carry = scorer.step(k, network.exit_head(k, state), carry)
        score, prediction = score.cpu(), prediction.cpu()
        if scores is not None:
            scores[k, alive] = score.float()
        if k == num_exits - 1:
            predictions[alive] = prediction
            break
        leave = score >= limits[k]
        n_leave = int(leave.sum())
        if n_leave == 0:
            continue
        if n_leave == ran[k]:
            exits[alive], predictions[alive] = k, prediction
            break
        if isinstance(alive, slice):
            alive = torch.arange(n)
        exits[alive[leave]], predictions[alive[leave]] = k, prediction[leave]
        stay = (~leave).nonzero().squeeze(1)
        alive = alive[stay]
        stay = stay.to(x.device)
        state, carry = select_samples(state, stay), select_samples(carry, stay)
    return DynamicResult(exits, predictions, ran, scores)


def run_dynamic_batches(
    network: MultiExitNetwork,
    images: torch.Tensor,
    thresholds: Any,
    scorer: ExitScorer,
    batch_size: int,
    record_scores: bool = False,
) -> DynamicResult:
    """``run_dynamic`` over prepared ``images`` in consecutive batches; results concatenated."""
    parts = [
        run_dynamic(network, images[i : i + batch_size], thresholds, scorer, record_scores)
        for i in range(0, len(images), batch_size)
    ]
    return DynamicResult(
        exits=torch.cat([p.exits for p in parts]),
        predictions=torch.cat([p.predictions for p in parts]),
        samples_per_segment=[sum(c) for c in zip(*(p.samples_per_segment for p in parts))],
        scores=torch.cat([p.scores for p in parts], dim=1) if record_scores else None,
    )


@torch.inference_mode()
def run_simulated(network: MultiExitNetwork, x: torch.Tensor, thresholds: Any, scorer: ExitScorer) -> DynamicResult:
    """The simulated protocol on one batch: every exit of every sample, then the first exit whose
    score reaches its threshold (the fallback where ``exit_by_exit`` is false)."""
    limits = check_thresholds(thresholds, network.num_exits)
    outputs = network.forward_all(x)
    if scorer.transform is not None:
        outputs = scorer.transform(outputs)
    scored = scorer.score_cache(cache_of(outputs, scorer.needs_features))
    exits, predictions = simulated_exits(scored, limits, scorer.budget)
    return DynamicResult(exits, predictions, [x.shape[0]] * network.num_exits)


# --- exactness -------------------------------------------------------------------------------
@dataclass
class Agreement:
    """A dynamic run against the simulated protocol on the same samples and thresholds."""

    samples: int
    exit_ties: int = 0  # exit differs, the simulated score within tolerance of the threshold
    prediction_ties: int = 0  # same exit, prediction differs, top two probabilities within tolerance
    mismatches: list[int] = field(default_factory=list)  # samples that differ without a tie
    max_score_difference: float = 0.0  # over the exits both computed (when scores were recorded)

    @property
    def ties(self) -> int:
        return self.exit_ties + self.prediction_ties

    @property
    def exact(self) -> bool:
        return not self.mismatches

    def describe(self) -> str:
        return (
            f"{self.samples} samples: {len(self.mismatches)} mismatches, {self.exit_ties} exit ties, "
            f"{self.prediction_ties} prediction ties, largest score difference {self.max_score_difference:.3g}"
        )


def simulated_exits(scored: ScoredOutputs, thresholds: Any, budget: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """(exits, predictions) (N,) of the simulated protocol for one budget's thresholds."""
    scores = scored.scores if scored.scores.dim() == 2 else scored.scores[budget]
    limits = torch.tensor(check_thresholds(thresholds, scores.shape[0]), dtype=scores.dtype)
    exits = exit_indices(scores, limits[None])[0]
    return exits, scored.predictions.gather(0, exits[None])[0]


def compare_with_simulation(
    dynamic: DynamicResult, scored: ScoredOutputs, thresholds: Any, budget: int = 0, tolerance: float = TIE_TOLERANCE
) -> Agreement:
    """Sample by sample, ``dynamic`` against the simulated protocol on ``scored`` (the same
    samples, every exit computed)."""
    scores = (scored.scores if scored.scores.dim() == 2 else scored.scores[budget]).double()
    limits = torch.tensor(check_thresholds(thresholds, scores.shape[0]), dtype=torch.float64)
    sim_exits, sim_predictions = simulated_exits(scored, thresholds, budget)
    agreement = Agreement(samples=len(sim_exits))
    if dynamic.scores is not None:
        computed = ~dynamic.scores.isnan()
        if computed.any():
            agreement.max_score_difference = float((dynamic.scores.double() - scores)[computed].abs().max())
    for i in (sim_exits != dynamic.exits).nonzero().flatten().tolist():
        first = int(min(sim_exits[i], dynamic.exits[i]))  # where one left and the other did not
        if abs(float(scores[first, i] - limits[first])) <= tolerance:
            agreement.exit_ties += 1
        else:
            agreement.mismatches.append(i)
    same_exit = sim_exits == dynamic.exits
    for i in (same_exit & (sim_predictions != dynamic.predictions)).nonzero().flatten().tolist():
        if scored.probabilities is not None:
            top2 = scored.probabilities[sim_exits[i], i].float().topk(2).values
            if float(top2[0] - top2[1]) <= tolerance:
                agreement.prediction_ties += 1
                continue
        agreement.mismatches.append(i)
    agreement.mismatches.sort()
    return agreement

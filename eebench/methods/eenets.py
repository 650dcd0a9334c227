"""EENets: early-exit CNNs with learned confidence branches (Demir & Akbas, arXiv 2409.05336).

Needs an architecture whose exits have a confidence branch (``ee_resnet``): exit i gives class
logits (p_i = softmax) and a confidence h_i in [0, 1] per sample (its gate, ``ExitOutputs.gates``).
What the official code (eksuas/eenets.pytorch, ``loss_functions.py``) computes, with i = 1..K
(K = the final exit), c_i the cost of exit i (c_K = 1) and lambda = ``lam`` (the reference's
``--lambda-coef``):

- mixtures: P~_K = p_K, C~_K = c_K = 1, and for i = K-1..1
  P~_i = h_i p_i + (1 - h_i) P~_{i+1},  C~_i = h_i c_i + (1 - h_i) C~_{i+1}  (per sample).
- ``v2`` (the reference default): sum_{i=1..K} [NLL(log P~_i, y) + lambda mean_batch(C~_i)]. The
  sum includes i = K, i.e. the final exit's own cross-entropy and the constant lambda * 1.
- ``v1``: only the i = 1 term, NLL(log P~_1, y) + lambda mean(C~_1).
- ``v0``: the reference's two-stage training (``--two-stage``): the plain sum of the exits'
  cross-entropies for the first ``two_stage_epochs`` epochs (reference: 25), then ``v1``. The
  epoch is ``step // ctx.steps_per_epoch``. With ``two_stage_epochs >= epochs`` it is v0 throughout
  (= the ``standard`` method), with 0 it is v1 throughout.
- ``v3``: sum_i w_i (CE_i + lambda c_i), w_i = mean_batch(h_i) / sum_j mean_batch(h_j); the
  weights are not detached (the confidences learn through them). The reference also lowers its
  inference threshold to 1/(K-1) for v3 (``inference_threshold`` below).
- ``v4``: exit tags. Each sample carries a tag t in 1..K; the loss is
  NLL(log p_t, y) + lambda mean(c_t) + sum_{i=1..K} BCE(h_i, [t = i]) with per-sample weights
  (1 - r_i) for samples tagged i and r_i for the others, r_i the batch fraction tagged i (torch's
  BCE, mean-reduced over the batch). The cost term has no gradient.
  Tags are recomputed as t = argmin_i [CE_i + lambda c_i] (first minimum; computed without
  gradient). *Where* a sample's tag comes from is ill-defined in the reference: tags are stored
  per (batch index, position in batch), start uniformly random, and are refreshed after each epoch
  by a second pass over a freshly *shuffled* loader, so next epoch's sample at a position gets the
  tag computed for whichever sample sat there before. ``v4_tags``:
    ``reference`` (default) does what it does: a table indexed by (step % steps_per_epoch,
      position), uniformly random until written; each step uses its row, then overwrites the row
      with the tags of this step's own samples (from this step's forward, before the update),
      which the next epoch's (reshuffled) batch at that index uses. Difference: the reference
      fills the table in a separate pass with the end-of-epoch weights (in train mode, so that
      pass also moves BatchNorm statistics); here no extra pass is run. A batch whose size differs
      from its row's gets random tags.
    ``batch``: the evident intent: each sample's tag from its own current forward pass.

Choices and deviations:
- Exit costs c_i are ``ctx.exit_costs``: cumulative FLOPs of exit i (all earlier exit heads
  included) over the last exit's FLOPs, in the harness's FLOPs convention. The reference uses
  FLOPs(backbone up to exit i + exit i's head only) / FLOPs(plain ResNet) from its own counter and
  fixes c_K = 1. Both give c_K = 1; intermediate ratios differ by the early heads (~0.1%).
- The mixtures' NLL needs only the target column: the recursion runs on the target-class
  probabilities in float64 (the reference: full (N, C) float32 softmax mixtures, then ``.log()``),
  so that no probability underflows to 0 and gives an infinite loss; identical otherwise.
  The pure cross-entropies (v0, v3, v4, the final exit) use log-softmax.
- The loss is returned in float32. Everything else (optimizer Adam lr 1e-3, batch 32, 150 epochs,
  wd 1e-4 in the reference) is the training recipe's; the reference's ``--adaptive-lr`` is broken
  and not reproduced.
- Inference: exit scores for the harness's budgeted curves are the classification branches' max
  softmax (``exit_score = "max_softmax"``); the confidence branches are cached (as ``gates``) and
  the evaluation adds the reference's fixed-threshold point (first exit with h_i > 0.5,
  ``confidence_exit``).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch.nn import functional as F

from models import ExitOutputs, MultiExitNetwork
from models.base import CONFIDENCE_BRANCHES

from . import register_method
from .base import TrainContext, TrainingMethod

log = logging.getLogger("eebench.train")
LossVersion = Literal["v0", "v1", "v2", "v3", "v4"]
LOSSES = ("v0", "v1", "v2", "v3", "v4")
TAG_MODES = ("reference", "batch")
TINY = 1e-300  # floor of the float64 mixture probabilities before the log


@dataclass
class EENetsParams:
    loss: LossVersion = "v2"
    lam: float = 1.0  # lambda, the reference's --lambda-coef
    two_stage_epochs: int = 25  # v0 only: epochs of plain CE before switching to v1
    v4_tags: Literal["reference", "batch"] = "reference"  # v4 only, see the module docstring

    def validate(self) -> None:
        if self.loss not in LOSSES:
            raise ValueError(f"unknown loss {self.loss!r}; allowed: {', '.join(LOSSES)}")
        if self.lam < 0:
            raise ValueError(f"lam must be >= 0, got {self.lam}")
        if self.two_stage_epochs < 0:
            raise ValueError(f"two_stage_epochs must be >= 0, got {self.two_stage_epochs}")
        if self.v4_tags not in TAG_MODES:
            raise ValueError(f"unknown v4_tags {self.v4_tags!r}; allowed: {', '.join(TAG_MODES)}")


def inference_threshold(params: EENetsParams, num_exits: int) -> float:
    """The reference's fixed exit threshold on h: 0.5, or 1/(number of early exits) for v3."""
    if params.loss == "v3" and num_exits > 1:
        return 1.0 / (num_exits - 1)
    return 0.5


# --------------------------------------------------------------------------------------------
# The losses, on (N,) tensors per exit; each testable alone
# --------------------------------------------------------------------------------------------


def target_log_probs(logits: list[torch.Tensor], targets: torch.Tensor) -> torch.Tensor:
    """(K, N) log p_i[y] in float32."""
    return torch.stack([out.float().log_softmax(dim=1).gather(1, targets[:, None])[:, 0] for out in logits])


def mixtures(
    log_q: torch.Tensor, conf: torch.Tensor, costs: torch.Tensor
) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """P~_i[y] and C~_i for i = 1..K, each (N,) float64, from (K, N) log p_i[y], (K, N) h_i, (K,) c_i."""
    q, h, c = log_q.double().exp(), conf.double(), costs.double()
    k = q.shape[0]
    p_mix, c_mix = [q[-1]], [c[-1].expand_as(q[-1])]
    for i in range(k - 2, -1, -1):
        p_mix.append(h[i] * q[i] + (1 - h[i]) * p_mix[-1])
        c_mix.append(h[i] * c[i] + (1 - h[i]) * c_mix[-1])
    return p_mix[::-1], c_mix[::-1]


def _mixture_nll(p_mix: torch.Tensor) -> torch.Tensor:
    return -p_mix.clamp_min(TINY).log().mean()


def loss_v0(log_q: torch.Tensor) -> torch.Tensor:
    """Sum over exits of the mean cross-entropy."""
    return -log_q.mean(dim=1).sum()


def loss_v1(log_q: torch.Tensor, conf: torch.Tensor, costs: torch.Tensor, lam: float) -> torch.Tensor:
    """NLL(log P~_1) + lambda mean(C~_1)."""
    if log_q.shape[0] == 1:  # no early exit: P~_1 = p_K, C~_1 = 1
        return -log_q[0].mean() + lam * costs[-1].double()
    p_mix, c_mix = mixtures(log_q, conf, costs)
    return _mixture_nll(p_mix[0]) + lam * c_mix[0].mean()


def loss_v2(log_q: torch.Tensor, conf: torch.Tensor, costs: torch.Tensor, lam: float) -> torch.Tensor:
    """sum_{i=1..K} NLL(log P~_i) + lambda mean(C~_i)."""
    p_mix, c_mix = mixtures(log_q, conf, costs)
    total = -log_q[-1].double().mean() + lam * c_mix[-1].mean()  # i = K, exactly log-softmax
    for p, c in zip(p_mix[:-1], c_mix[:-1]):
        total = total + _mixture_nll(p) + lam * c.mean()
    return total


def loss_v3(log_q: torch.Tensor, conf: torch.Tensor, costs: torch.Tensor, lam: float) -> torch.Tensor:
    """sum_i w_i (CE_i + lambda c_i), w_i = mean(h_i) / sum_j mean(h_j) (not detached)."""
    mean_conf = conf.float().mean(dim=1)
    weights = mean_conf / mean_conf.sum()
    return (weights * (-log_q.mean(dim=1) + lam * costs.float())).sum()


def exit_tags(log_q: torch.Tensor, costs: torch.Tensor, lam: float) -> torch.Tensor:
    """(N,) 0-based argmin_i [CE_i + lambda c_i], the first exit on ties; no gradient."""
    return (-log_q.detach() + lam * costs.float()[:, None]).argmin(dim=0)


def loss_v4(
    log_q: torch.Tensor, conf: torch.Tensor, costs: torch.Tensor, lam: float, tags: torch.Tensor
) -> torch.Tensor:
    """NLL of each sample's tagged exit + lambda mean(c_tag) + sum_i weighted BCE(h_i, [tag = i])."""
    k = log_q.shape[0]
    picked = log_q.gather(0, tags[None])[0]
    cost = costs.float()[tags].mean()
    h = conf.float()
    onehot = F.one_hot(tags, k).T.float()  # (K, N)
    rate = onehot.mean(dim=1, keepdim=True)  # r_i: batch fraction tagged i
    weight = onehot * (1 - rate) + (1 - onehot) * rate
    with torch.autocast(h.device.type, enabled=False):  # BCE refuses to run under autocast
        bce = F.binary_cross_entropy(h, onehot, weight=weight, reduction="none")
    return -picked.mean() + lam * cost + bce.mean(dim=1).sum()


# --------------------------------------------------------------------------------------------
# The method
# --------------------------------------------------------------------------------------------


@register_method
class EENets(TrainingMethod):
    name = "eenets"
    Params = EENetsParams
    test_params = {"two_stage_epochs": 1}
    requires = frozenset({CONFIDENCE_BRANCHES})

    @classmethod
    def confidence_exit_threshold(cls, params: EENetsParams, num_exits: int) -> float:
        return inference_threshold(params, num_exits)

    def __init__(self, model: MultiExitNetwork, params: EENetsParams, ctx: TrainContext):
        super().__init__(model, params, ctx)
        if CONFIDENCE_BRANCHES not in model.capabilities:
            raise ValueError(
                f"eenets needs an architecture with confidence branches (ee_resnet); {type(model).__name__} has none"
            )
        if len(ctx.exit_costs) != model.num_exits:
            raise ValueError(f"eenets: {len(ctx.exit_costs)} exit costs for a network with {model.num_exits} exits")
        if params.loss == "v0" and params.two_stage_epochs >= ctx.epochs:
            log.warning(
                "eenets: two_stage_epochs (%d) >= epochs (%d): loss v0 never switches to v1",
                params.two_stage_epochs,
                ctx.epochs,
            )
        self.tag_table: dict[int, torch.Tensor] = {}  # v4_tags "reference": batch index -> (N,) tags

    def loss_version(self, step: int) -> str:
        """The loss used at ``step``: v0 switches to v1 after ``two_stage_epochs`` epochs."""
        if self.params.loss == "v0" and step >= self.params.two_stage_epochs * self.ctx.steps_per_epoch:
            return "v1"
        return self.params.loss

    def loss(self, outputs: ExitOutputs, targets: torch.Tensor, step: int = 0) -> torch.Tensor:
        lam, costs = self.params.lam, self.ctx.exit_costs
        log_q = target_log_probs(outputs.logits, targets)
        conf = torch.stack([g.float() for g in outputs.gates])  # the confidences h_i
        version = self.loss_version(step)
        if version == "v0":
            loss = loss_v0(log_q)
        elif version == "v1":
            loss = loss_v1(log_q, conf, costs, lam)
        elif version == "v2":
            loss = loss_v2(log_q, conf, costs, lam)
        elif version == "v3":
            loss = loss_v3(log_q, conf, costs, lam)
        else:
            current = exit_tags(log_q, costs, lam)
            tags = current if self.params.v4_tags == "batch" else self._swap_tags(step, current)
            loss = loss_v4(log_q, conf, costs, lam, tags)
        return loss.float()

    def _swap_tags(self, step: int, current: torch.Tensor) -> torch.Tensor:
        """This batch index's stored tags (random if none fit), replaced by ``current``."""
        batch = step % self.ctx.steps_per_epoch
        stored = self.tag_table.get(batch)
        if stored is None or stored.shape != current.shape:
            stored = torch.randint(0, self.model.num_exits, current.shape, device=current.device)
        self.tag_table[batch] = current.detach().clone()
        return stored.to(current.device)

    def state_dict(self) -> dict[str, Any]:
        return {"tag_table": {b: t.clone() for b, t in self.tag_table.items()}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        device = self.ctx.device
        self.tag_table = {int(b): t.to(device) for b, t in state.get("tag_table", {}).items()}

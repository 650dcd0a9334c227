"""Budget-aware joint gater (Addad, Lechervy & Jurie 2024, papers/002_*): the harness's headline method.

A gater MLP (parameters phi) maps confidence features of each exit to the probability that a
sample exits there; the network (theta) is trained with a loss weighted by those probabilities
and by each exit's cost, and the gater is trained on the same loss with the network fixed.

Equations implemented (k = 1..K exits, i = 1..N samples of the batch, p = softmax of exit k's
logits):
- features (eq. 6-8): confidence = max_c p_c; entropy = sum_c p_c log p_c (as written in eq. 7:
  the *negative* entropy, <= 0); margin = top-1 minus top-2 probability. s_ik is the chosen
  features, always in the order confidence, margin, entropy whatever order the config lists.
- P_ik = sigmoid(MLP(s_ik)), MLP = Linear(d, hidden) -> ReLU -> Linear(hidden, 1).
- eq. 5: Pr(1|x) = P_1, Pr(k|x) = P_k prod_{j<k} (1 - P_j), Pr(K|x) = prod_{j<K} (1 - P_j),
  computed as log-probabilities (log sigmoid), so no product underflows.
- eq. 9: A_ik = Pr(k|x_i)^(1/T) / sum_j Pr(j|x_i)^(1/T), a softmax of log Pr / T.
- inner loss (eq. 10, theta): (1/N) sum_i sum_k (A_ik + 1)(CE_ik + lambda Cost_k). Its gradient
  is eq. 11: A is *not* detached, so theta also receives the gradient through the scores s_ik
  and the (fixed) MLP. Only the network's parameters are updated by this step.
- outer loss (eq. 10/12, phi): (1/N) sum_i sum_k (CE_ik + lambda Cost_k) A_ik, with CE and the
  scores detached (theta* fixed). Only the MLP is updated by this step.
Cost_k is ``ctx.exit_costs``: cumulative FLOPs of exit k over those of the last exit (last = 1).

Interpretation choices where the paper is ambiguous or silent:
- Eq. 4 writes the weight as Pr(k|x) + 1 and eq. 10 as A + 1; A (eq. 9) is what is trained.
- One MLP shared by all exits (phi carries no exit index in the paper). It is applied to exits
  1..K-1 only: eq. 5 never uses P_K.
- The paper does not say whether phi sees theta before or after theta's step on the batch. One
  forward pass serves both steps: the theta step, then (every ``update_every`` steps, i.e. when
  ``step % update_every == 0``) the phi step on the same batch with that pass's detached CE and
  scores, i.e. theta* = theta before its update on this batch.
- The gater optimizer is not named in the paper (only "lr 1e-3, cosine to 1e-5"): Adam, no weight
  decay, lr cosine-decayed per network iteration over the whole run (``ctx.total_steps``).
- Loss normalisation: mean over the batch, sum over exits, as eq. 4 (1/N sum_i sum_k).
- Cross-entropy is plain CE; the paper's recipe extras (label smoothing, Mixup, CutMix,
  RandAugment, EMA) belong to the training recipe, not to this method.
- ``frozen`` ("MSDNet frozen + Ours"): the network must come trained (``init_from``); all its
  parameters get requires_grad False, ``trainable_parameters()`` yields nothing (the loop then
  builds no main optimizer and passes None), its forward runs without a graph, and BatchNorm
  layers run in eval mode so that running statistics are not updated either: the whole network
  state stays bit-identical and only the gater is learned.
At inference the gater is not used: thresholds are calibrated on max softmax as for every method.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from models import ExitOutputs, MultiExitNetwork

from ..schedules import cosine
from . import register_method
from .base import TrainContext, TrainingMethod
from .common import frozen_batchnorms, per_exit_ce

FEATURES = ("confidence", "margin", "entropy")


@dataclass
class GaterParams:
    features: list[str] = field(default_factory=lambda: ["confidence", "entropy"])  # paper's CIFAR set
    lam: float = 2.0
    temperature: float = 0.5
    hidden: int = 500
    update_every: int = 10  # 100 for ImageNet
    gater_lr: float = 1e-3
    gater_lr_min: float = 1e-5
    frozen: bool = False

    def validate(self) -> None:
        if not self.features:
            raise ValueError(f"features must be a non-empty subset of {', '.join(FEATURES)}")
        for name in self.features:
            if name not in FEATURES:
                raise ValueError(f"unknown feature {name!r}; allowed: {', '.join(FEATURES)}")
        if len(set(self.features)) != len(self.features):
            raise ValueError(f"features lists a feature twice: {self.features}")
        if self.lam < 0:
            raise ValueError(f"lam must be >= 0, got {self.lam}")
        if self.temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {self.temperature}")
        if self.hidden < 1:
            raise ValueError(f"hidden must be >= 1, got {self.hidden}")
        if self.update_every < 1:
            raise ValueError(f"update_every must be >= 1, got {self.update_every}")
        if not 0 <= self.gater_lr_min <= self.gater_lr:
            raise ValueError(f"need 0 <= gater_lr_min <= gater_lr, got {self.gater_lr_min} and {self.gater_lr}")

    def ordered_features(self) -> list[str]:
        return [name for name in FEATURES if name in self.features]


# --------------------------------------------------------------------------------------------
# Pieces, each testable alone
# --------------------------------------------------------------------------------------------


def exit_features(logits: torch.Tensor, names: list[str]) -> torch.Tensor:
    """(N, d) features of one exit's logits (eq. 6-8), in the order of ``names``."""
    logits = logits.float()
    log_p = logits.log_softmax(dim=1)
    p = log_p.exp()
    top2 = p.topk(2, dim=1).values
    values = {
        "confidence": top2[:, 0],
        "margin": top2[:, 0] - top2[:, 1],
        "entropy": (p * log_p).sum(dim=1),  # eq. 7 as written: negative entropy
    }
    return torch.stack([values[name] for name in names], dim=1)


def gater_mlp(in_dim: int, hidden: int) -> nn.Sequential:
    """The gater: Linear(d, hidden) -> ReLU -> Linear(hidden, 1), outputs the logit of P_k."""
    return nn.Sequential(nn.Linear(in_dim, hidden), nn.ReLU(), nn.Linear(hidden, 1))


def exit_log_probs(gate_logits: torch.Tensor) -> torch.Tensor:
    """log Pr(k|x) of eq. 5, (N, K), from the (N, K-1) logits of P_1..P_{K-1}."""
    log_exit = F.logsigmoid(gate_logits)
    log_stay = F.logsigmoid(-gate_logits).cumsum(dim=1)  # sum_{j<=k} log(1 - P_j)
    zeros = gate_logits.new_zeros(gate_logits.shape[0], 1)
    return torch.cat([log_exit, zeros], dim=1) + torch.cat([zeros, log_stay], dim=1)


def exit_weights(gate_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """A of eq. 9: Pr(k|x)^(1/T) normalised over exits, (N, K)."""
    return (exit_log_probs(gate_logits) / temperature).softmax(dim=1)


def inner_loss(weights: torch.Tensor, ce: torch.Tensor, costs: torch.Tensor, lam: float) -> torch.Tensor:
    """(1/N) sum_i sum_k (A_ik + 1)(CE_ik + lambda Cost_k) (eq. 10, inner)."""
    return ((weights + 1) * (ce + lam * costs)).sum(dim=1).mean()


def outer_loss(weights: torch.Tensor, ce: torch.Tensor, costs: torch.Tensor, lam: float) -> torch.Tensor:
    """(1/N) sum_i sum_k (CE_ik + lambda Cost_k) A_ik with CE detached (eq. 10, outer)."""
    return (weights * (ce.detach() + lam * costs)).sum(dim=1).mean()


# --------------------------------------------------------------------------------------------
# The method
# --------------------------------------------------------------------------------------------


@register_method
class Gater(TrainingMethod):
    name = "gater"
    Params = GaterParams
    test_params = {"hidden": 8, "update_every": 1, "features": ["confidence", "margin", "entropy"]}

    def __init__(self, model: MultiExitNetwork, params: GaterParams, ctx: TrainContext):
        super().__init__(model, params, ctx)
        self.feature_names = params.ordered_features()
        self.mlp = gater_mlp(len(self.feature_names), params.hidden).to(ctx.device)
        self.gater_optimizer = torch.optim.Adam(self.mlp.parameters(), lr=params.gater_lr)
        if params.frozen:
            for p in model.parameters():
                p.requires_grad_(False)
        self._theta = [p for p in model.parameters() if p.requires_grad]
        self._frozen_bn = frozen_batchnorms(model)

    def trainable_parameters(self) -> Iterator[nn.Parameter]:
        return iter(self._theta)  # empty when frozen: only the gater learns

    def extra_modules(self) -> dict[str, nn.Module]:
        return {"gater": self.mlp}

    def state_dict(self) -> dict[str, Any]:
        return {"gater": self.mlp.state_dict(), "gater_optimizer": self.gater_optimizer.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.mlp.load_state_dict(state["gater"])
        self.gater_optimizer.load_state_dict(state["gater_optimizer"])

    # --- losses -----------------------------------------------------------------------------
    def scores(self, outputs: ExitOutputs) -> torch.Tensor:
        """(N, K-1, d) features of exits 1..K-1 (the last exit's P is never used)."""
        feats = [exit_features(z, self.feature_names) for z in outputs.logits[:-1]]
        if not feats:
            return outputs.logits[0].new_zeros(outputs.logits[0].shape[0], 0, len(self.feature_names))
        return torch.stack(feats, dim=1)

    def weights(self, scores: torch.Tensor) -> torch.Tensor:
        """A (N, K) from the scores through the gater MLP."""
        return exit_weights(self.mlp(scores).squeeze(-1), self.params.temperature)

    def terms(self, outputs: ExitOutputs, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(CE (N, K), scores (N, K-1, d)), both still attached to theta."""
        return per_exit_ce(outputs.logits, targets), self.scores(outputs)

    def inner(self, ce: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        """Eq. 10 inner loss; its gradient reaches theta through CE and through A (eq. 11)."""
        return inner_loss(self.weights(scores), ce, self._costs(ce), self.params.lam)

    def outer(self, ce: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        """Eq. 10 outer loss with theta fixed (CE and scores detached): gradient to phi only."""
        weights = self.weights(scores.detach())
        return outer_loss(weights, ce.detach(), self._costs(ce), self.params.lam)

    def losses(self, outputs: ExitOutputs, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(inner, outer) on one batch's outputs."""
        ce, scores = self.terms(outputs, targets)
        return self.inner(ce, scores), self.outer(ce, scores)

    def _costs(self, ce: torch.Tensor) -> torch.Tensor:
        return self.ctx.exit_costs.to(ce.device, torch.float32)

    def loss(self, outputs: ExitOutputs, targets: torch.Tensor, step: int = 0) -> torch.Tensor:
        return self.losses(outputs, targets)[0]

    # --- one step ---------------------------------------------------------------------------
    def train_step(
        self,
        images: torch.Tensor,
        targets: torch.Tensor,
        optimizer: torch.optim.Optimizer | None,
        step: int,
    ) -> torch.Tensor:
        for bn in self._frozen_bn:
            bn.eval()
        with torch.set_grad_enabled(not self.params.frozen), self.ctx.autocast():
            outputs = self.model.forward_all(images)
        ce, scores = self.terms(outputs, targets)
        inner = self.inner(ce, scores)
        if not self.params.frozen:
            optimizer.zero_grad(set_to_none=True)
            inner.backward(inputs=self._theta)  # the theta step leaves phi (and its grads) alone
            optimizer.step()
        if step % self.params.update_every == 0:
            # built after the theta backward: under torch.compile one graph holding both losses
            # would have its saved tensors freed by the first backward
            self.gater_step(self.outer(ce.detach(), scores.detach()), step)
        return inner.detach()

    def gater_step(self, outer: torch.Tensor, step: int) -> None:
        """One Adam step of phi on the outer loss, at the cosine-decayed gater lr."""
        lr = cosine(step / max(self.ctx.total_steps, 1), self.params.gater_lr, self.params.gater_lr_min)
        for group in self.gater_optimizer.param_groups:
            group["lr"] = lr
        self.gater_optimizer.zero_grad(set_to_none=True)
        outer.backward(inputs=list(self.mlp.parameters()))
        self.gater_optimizer.step()

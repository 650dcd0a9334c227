"""JEI-DNN: jointly-learned exit and inference (Regol, Chataoui & Coates, ICLR 2024).

The official code (networkslab/dynn) augments a *frozen*, pre-trained T2T-ViT with intermediate
classifiers (IMs, one linear layer per exit on the class token) and one learned gate per IM, and
trains them in alternation. What is implemented here, per exit l = 1..K (K = last exit, no gate):
- gate input (``LearnableUncGate``): [max p, entropy -sum p log p, margin top1 - top2, entropy of
  p^2 / sum p^2] of the exit's softmax p, computed without gradient; gate_l = Linear(4 -> 1).
- gate target per sample: t = argmin_l [CE_l + lambda Cost_l], lambda = ``ce_ic_tradeoff``,
  Cost_l = ``ctx.exit_costs`` (last = 1). Gate l's label is 1 when t <= l ("the sample should
  have left at or before l"), i.e. the cumulative sum of the one-hot of t without its last entry.
- gate loss: mean over samples and gates of BCE-with-logits, the positive terms of gate l scaled
  by w_l = min((n - n_l) / max(n_l, 0.1), 5), n_l = number of samples whose target is l
  (w = 1 until counts exist), as ``set_from_validation`` does.
- IM loss: the official "weighted"/"boosted" loss mean_{i,l}(P_il L_il r_i), r_i = sum_l L_il /
  sum_l P_il L_il with r not detached, which is identically mean_{i,l<K} L_il (value and
  gradient): that plain mean of the intermediate cross-entropies is what is computed.
- warm-up loss: CE_K + sum_{l<K} (K - l + 1) CE_l (l 1-based), i.e. weight K for exit 1 down to 2
  for exit K-1; the frozen last exit contributes no gradient.
- schedule: ``warmup_epochs`` epochs of warm-up, then within each epoch the batch index b gives
  the phase: gate when (b // switch_every) is even, IMs when odd (the official loop starts every
  epoch in the gate phase and switches every ``bilevel_batch_count`` batches).
- one optimizer (the loop's) over IMs and gates, as the official code; in each phase only one of
  them has gradients, and SGD skips parameters without a gradient.
- inference: ``exit_score = "gate"``; ``eval_outputs`` puts sigmoid(gate_l) into
  ``ExitOutputs.gates`` (1 for the last exit), on which the harness calibrates its
  per-budget thresholds.

Deviations from the reference, and why:
- Backbone. The paper uses transfer-learned T2T-ViT-7/14 on 224-px images; the harness trains the
  same generic multi-exit CNNs for every method. The network must come trained (config
  ``init_from``, e.g. the ``standard`` cell). "IM" = the parameters that one intermediate exit's
  logits depend on and no other exit's (found once, by autograd, on two images of the first
  batch): for MSDNet/RANet/EE-ResNet that is each intermediate exit head. The shared trunk and the
  last exit (the reference's frozen final ``head``) stay frozen, BatchNorm running statistics
  included (frozen BN layers run in eval mode). IMs therefore start from trained heads (the
  reference's start from scratch) and are larger (conv heads, not one linear layer).
- The reference's warm-up stops each IM early on validation accuracy (patience 2, at most 6
  epochs) and restores its best weights; here warm-up is a fixed number of epochs without
  validation. Its gate class weights come from a validation pass after every epoch; here from the
  gate targets of the previous epoch's training batches (updated at each epoch start).
- The reference exits at the first gate whose "direct exit probability" reaches 0.5 (one operating
  point per lambda); here the gate outputs are exit scores and the harness sweeps budgets with
  calibrated thresholds, as for every method.
- Learning-rate schedule, batch size and weight decay come from the training recipe (reference:
  SGD lr 0.01, momentum 0.9, wd 5e-4, batch 64, cosine to 2e-4).
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import nn
from torch.nn import functional as F

from models import ExitOutputs, MultiExitNetwork

from . import register_method
from .base import TrainContext, TrainingMethod
from .common import frozen_batchnorms, per_exit_ce

log = logging.getLogger("eebench.train")
Phase = Literal["warmup", "gate", "classifier"]
POS_WEIGHT_MAX = 5.0  # the reference clips the gate class weights "for stability"
MIN_COUNT = 0.1  # and floors the counts so an exit nobody should take gets the max weight


@dataclass
class JEIDNNParams:
    ce_ic_tradeoff: float = 0.7
    switch_every: int = 200
    warmup_epochs: int = 6

    def validate(self) -> None:
        if self.ce_ic_tradeoff < 0:
            raise ValueError(f"ce_ic_tradeoff must be >= 0, got {self.ce_ic_tradeoff}")
        if self.switch_every < 1:
            raise ValueError(f"switch_every must be >= 1, got {self.switch_every}")
        if self.warmup_epochs < 0:
            raise ValueError(f"warmup_epochs must be >= 0, got {self.warmup_epochs}")


# --------------------------------------------------------------------------------------------
# Pieces, each testable alone
# --------------------------------------------------------------------------------------------


@torch.no_grad()
def uncertainty_features(logits: torch.Tensor) -> torch.Tensor:
    """(N, 4): [max p, entropy, margin, entropy of p^2 normalised], without gradient."""
    log_p = logits.float().log_softmax(dim=1)
    p = log_p.exp()
    top2 = p.topk(2, dim=1).values
    entropy = -(p * log_p).sum(dim=1)
    log_q = (2 * log_p).log_softmax(dim=1)
    entropy_pow = -(log_q.exp() * log_q).sum(dim=1)
    return torch.stack([top2[:, 0], entropy, top2[:, 0] - top2[:, 1], entropy_pow], dim=1)


def gate_targets(ce: torch.Tensor, costs: torch.Tensor, tradeoff: float) -> torch.Tensor:
    """Per-sample best exit (0-based): argmin_l CE_l + tradeoff * Cost_l over all K exits."""
    return (ce + tradeoff * costs).argmin(dim=1)


def gate_labels(targets: torch.Tensor, num_gates: int) -> torch.Tensor:
    """(N, K-1): 1 at gates l >= target (exit at or after the best exit), else 0."""
    gates = torch.arange(num_gates, device=targets.device)
    return (targets[:, None] <= gates[None, :]).float()


def gate_loss(gate_logits: torch.Tensor, targets: torch.Tensor, pos_weight: torch.Tensor) -> torch.Tensor:
    """Mean weighted BCE of the (N, K-1) gate logits against the at-or-after labels."""
    labels = gate_labels(targets, gate_logits.shape[1])
    bce = F.binary_cross_entropy_with_logits(gate_logits, labels, reduction="none")
    return (bce * (labels * pos_weight + (1 - labels))).mean()


def pos_weights(counts: torch.Tensor) -> torch.Tensor:
    """Gate l's positive weight from the per-exit target counts (K,): (n - n_l) / n_l, clipped."""
    total = counts.sum()
    gate_counts = counts[:-1].clamp(min=MIN_COUNT)
    return ((total - gate_counts) / gate_counts).clamp(max=POS_WEIGHT_MAX)


def warmup_loss(ce: torch.Tensor) -> torch.Tensor:
    """sum_l w_l mean_i CE_il with w = (K, K-1, ..., 2) for the IMs and 1 for the last exit."""
    k = ce.shape[1]
    weights = torch.arange(k, 1, -1, device=ce.device, dtype=ce.dtype)
    return (ce[:, :-1].mean(dim=0) * weights).sum() + ce[:, -1].mean()


def im_loss(ce: torch.Tensor) -> torch.Tensor:
    """Mean over samples and intermediate exits of CE (= the reference's weighted IM loss)."""
    return ce[:, :-1].mean()


def training_phase(step: int, steps_per_epoch: int, warmup_epochs: int, switch_every: int) -> Phase:
    if step < warmup_epochs * steps_per_epoch:
        return "warmup"
    batch = step % steps_per_epoch
    return "gate" if (batch // switch_every) % 2 == 0 else "classifier"


def private_exit_parameters(model: MultiExitNetwork, example: torch.Tensor) -> list[list[nn.Parameter]]:
    """For each exit, the trainable parameters that its logits depend on and no other exit's do.

    One forward in eval mode (no BatchNorm statistics change) and one backward per exit; a
    parameter counts as used when autograd reaches it, whatever the value of its gradient.
    """
    params = [p for p in model.parameters() if p.requires_grad]
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        with torch.enable_grad():
            logits = model.forward_all(example).logits
            used = []
            for out in logits:
                grads = torch.autograd.grad(out.float().sum(), params, retain_graph=True, allow_unused=True)
                used.append({i for i, g in enumerate(grads) if g is not None})
    finally:
        for module, mode in modes:
            module.train(mode)
    private = []
    for k, mine in enumerate(used):
        others = set().union(*(u for j, u in enumerate(used) if j != k))
        private.append([params[i] for i in sorted(mine - others)])
    return private


# --------------------------------------------------------------------------------------------
# The method
# --------------------------------------------------------------------------------------------


@register_method
class JEIDNN(TrainingMethod):
    name = "jei_dnn"
    Params = JEIDNNParams
    # the trunk freeze finds each exit's own parameters by which ones autograd reaches; a compiled
    # backward returns a gradient for every input, so every parameter would look shared
    compilable = False
    test_params = {"switch_every": 1, "warmup_epochs": 0}
    exit_score = "gate"

    def __init__(self, model: MultiExitNetwork, params: JEIDNNParams, ctx: TrainContext):
        super().__init__(model, params, ctx)
        if model.num_exits < 2:
            raise ValueError("jei_dnn needs a network with at least 2 exits")
        if params.warmup_epochs >= ctx.epochs:
            raise ValueError(
                f"jei_dnn: warmup_epochs ({params.warmup_epochs}) must be smaller than the number "
                f"of training epochs ({ctx.epochs}), or no gate is ever trained"
            )
        if params.switch_every >= ctx.steps_per_epoch:
            log.warning(
                "jei_dnn: switch_every (%d) >= batches per epoch (%d): every epoch after warm-up trains the gates only",
                params.switch_every,
                ctx.steps_per_epoch,
            )
        k = model.num_exits
        self.gates = nn.ModuleList(nn.Linear(4, 1) for _ in range(k - 1)).to(ctx.device)
        self.exit_counts = torch.zeros(k, device=ctx.device)  # gate targets since the last update
        self.pos_weight = torch.ones(k - 1, device=ctx.device)
        # Fixed list so the optimizer (and its checkpoint) always sees the same parameters; the
        # trunk's entries never receive a gradient once frozen at the first step.
        self._params = [p for p in model.parameters() if p.requires_grad] + list(self.gates.parameters())
        self.im_params: list[nn.Parameter] | None = None
        self._frozen_bn: list[nn.Module] = []

    def trainable_parameters(self) -> Iterator[nn.Parameter]:
        """IMs and gates; before the first step this also lists the trunk, which is frozen then
        (requires_grad False) and never updated (optimizers skip parameters without grad)."""
        return iter(self._params)

    def extra_modules(self) -> dict[str, nn.Module]:
        return {"gates": self.gates}

    def state_dict(self) -> dict[str, Any]:
        return {
            "gates": self.gates.state_dict(),
            "exit_counts": self.exit_counts.clone(),
            "pos_weight": self.pos_weight.clone(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.gates.load_state_dict(state["gates"])
        self.exit_counts.copy_(state["exit_counts"])
        self.pos_weight.copy_(state["pos_weight"])

    # --- what is trained --------------------------------------------------------------------
    def freeze_trunk(self, example: torch.Tensor) -> None:
        """Keep the intermediate exits' own parameters trainable, freeze everything else."""
        private = private_exit_parameters(self.model, example[:2])
        self.im_params = [p for exit_params in private[:-1] for p in exit_params]
        if not self.im_params:
            log.warning("jei_dnn: no parameter belongs to one intermediate exit only; only the gates learn")
        keep = {id(p) for p in self.im_params}
        for p in self.model.parameters():
            if id(p) not in keep:
                p.requires_grad_(False)
        self._frozen_bn = frozen_batchnorms(self.model)

    # --- one step ---------------------------------------------------------------------------
    def phase(self, step: int) -> Phase:
        return training_phase(
            step, max(self.ctx.steps_per_epoch, 1), self.params.warmup_epochs, self.params.switch_every
        )

    def gate_logits(self, logits: list[torch.Tensor]) -> torch.Tensor:
        """(N, K-1) gate logits from the exits' (detached) uncertainty features."""
        return torch.cat([gate(uncertainty_features(z)) for gate, z in zip(self.gates, logits)], dim=1)

    def train_step(
        self, images: torch.Tensor, targets: torch.Tensor, optimizer: torch.optim.Optimizer, step: int
    ) -> torch.Tensor:
        if self.im_params is None:
            self.freeze_trunk(images)
        for bn in self._frozen_bn:
            bn.eval()
        phase = self.phase(step)
        if phase != "warmup":
            self._maybe_update_pos_weight(step)
        with torch.set_grad_enabled(phase != "gate"), self.ctx.autocast():
            outputs = self.model.forward_all(images)
        ce = per_exit_ce(outputs.logits, targets)
        if phase == "warmup":
            loss = warmup_loss(ce)
        else:
            costs = self.ctx.exit_costs.to(ce.device, torch.float32)
            best = gate_targets(ce.detach(), costs, self.params.ce_ic_tradeoff)
            self.exit_counts.index_add_(0, best, torch.ones_like(best, dtype=self.exit_counts.dtype))
            if phase == "gate":
                loss = gate_loss(self.gate_logits(outputs.logits), best, self.pos_weight)
            else:
                loss = im_loss(ce)
        if loss.requires_grad:  # False only when no IM parameter exists (warned at freeze)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        return loss.detach()

    def _maybe_update_pos_weight(self, step: int) -> None:
        """At each epoch start after the first gated epoch: weights from last epoch's targets."""
        first_gated = self.params.warmup_epochs * self.ctx.steps_per_epoch
        if step > first_gated and step % max(self.ctx.steps_per_epoch, 1) == 0:
            self.pos_weight.copy_(pos_weights(self.exit_counts))
            self.exit_counts.zero_()

    # --- evaluation -------------------------------------------------------------------------
    @torch.no_grad()
    def eval_outputs(self, outputs: ExitOutputs) -> ExitOutputs:
        """Exit scores = the gates' probabilities (1 at the last exit, which takes everyone left).
        ``outputs`` may stop before the last exit (dynamic early exit): one score per exit given."""
        device = self.gates[0].weight.device
        scores = [
            torch.sigmoid(gate(uncertainty_features(z).to(device))).squeeze(1).to(z.device)
            for gate, z in zip(self.gates, outputs.logits)
        ]
        if len(outputs.logits) == self.model.num_exits:
            last = outputs.logits[-1]
            scores.append(torch.ones(last.shape[0], device=last.device))
        return ExitOutputs(outputs.logits, outputs.features, scores)

"""BoostNet: Boosted Dynamic Networks (Yu et al., AAAI 2023).

The exits form an additive model: with o_k the logits of exit k, the ensemble output is
E_k = o_k + gamma * E_{k-1} (E_0 = 0, gamma = ``ensemble_reweight``). Exit k is trained as a
boosting stage on top of a frozen ensemble of the earlier ones:
loss = sum_k CE(o_k + stopgrad(gamma * E_{k-1}), y). At evaluation every exit answers with E_k,
so the threshold calibration and the budgeted-batch policy see the ensembled softmax.

Gradient rescaling (IMTA's "gradient equilibrium", the official ``msdnet_ge``): the trunk
feature after block k feeds head k and the deeper blocks; the gradient from head k into it is
scaled by 1/(K-k) and the gradient coming back from the deeper blocks by (K-k-1)/(K-k) (0-based k).
Composed along the trunk, block k then receives the mean, not the sum, of the gradients of the
K-k heads that depend on it. This needs the trunk tensor between blocks, which the generic exit
contract does not expose, so an architecture opts in by implementing
``set_gradient_rescaling(enabled: bool)`` and calling ``gradient_equilibrium`` below around each
exit head (MSDNet does, on its coarsest scale as the official code). ``gradient_rescaling``:
``None`` (default) turns it on where the network implements the hook and off elsewhere, which is
what the official runs do (MSDNet with it, RANet without); ``true`` requires the hook and fails
clearly without it; ``false`` never rescales.

The official code also accepts a per-exit list for gamma and per-block weight decays; the
published scripts use one gamma (0.5) and one weight decay, which is what is implemented.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch.nn import functional as F

from models import ExitOutputs, MultiExitNetwork
from models.base import GRADIENT_RESCALING

from . import register_method
from .base import TrainContext, TrainingMethod

# --------------------------------------------------------------------------------------------
# The additive model
# --------------------------------------------------------------------------------------------


def ensemble_logits(logits: Sequence[torch.Tensor], gamma: float) -> list[torch.Tensor]:
    """E_k = o_k + gamma * E_{k-1}, E_0 = 0."""
    ensembles: list[torch.Tensor] = []
    for out in logits:
        ensembles.append(out if not ensembles else out + gamma * ensembles[-1])
    return ensembles


def boosting_loss(logits: Sequence[torch.Tensor], targets: torch.Tensor, gamma: float) -> torch.Tensor:
    """sum_k CE(o_k + stopgrad(gamma * E_{k-1}), y), in float32."""
    logits = [out.float() for out in logits]
    previous = ensemble_logits([out.detach() for out in logits], gamma)
    loss = F.cross_entropy(logits[0], targets)
    for k in range(1, len(logits)):
        loss = loss + F.cross_entropy(logits[k] + gamma * previous[k - 1], targets)
    return loss


@dataclass
class BoostNetParams:
    ensemble_reweight: float = 0.5
    gradient_rescaling: bool | None = None

    def validate(self) -> None:
        if self.ensemble_reweight < 0:
            raise ValueError(f"ensemble_reweight must be >= 0, got {self.ensemble_reweight}")


@register_method
class BoostNet(TrainingMethod):
    name = "boostnet"
    Params = BoostNetParams
    test_params = {"ensemble_reweight": 0.5}

    def __init__(self, model: MultiExitNetwork, params: BoostNetParams, ctx: TrainContext):
        super().__init__(model, params, ctx)
        self.gradient_rescaling = self._resolve_rescaling(model, params.gradient_rescaling)
        if GRADIENT_RESCALING in model.capabilities:
            model.set_gradient_rescaling(self.gradient_rescaling)

    @staticmethod
    def _resolve_rescaling(model: MultiExitNetwork, wanted: bool | None) -> bool:
        offered = GRADIENT_RESCALING in model.capabilities
        if wanted and not offered:
            raise ValueError(
                f"boostnet: gradient_rescaling is true but {type(model).__name__} does not offer "
                "gradient rescaling (capability 'gradient_rescaling', set_gradient_rescaling); set "
                "gradient_rescaling to false (as the official RANet runs) or null (rescale only where "
                "the architecture supports it)"
            )
        return offered if wanted is None else wanted

    def loss(self, outputs: ExitOutputs, targets: torch.Tensor, step: int = 0) -> torch.Tensor:
        return boosting_loss(outputs.logits, targets, self.params.ensemble_reweight)

    def eval_outputs(self, outputs: ExitOutputs) -> ExitOutputs:
        return ExitOutputs(
            logits=ensemble_logits(outputs.logits, self.params.ensemble_reweight),
            features=outputs.features,
            gates=outputs.gates,
        )

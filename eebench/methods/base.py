"""The interface a training method implements.

The training loop (``eebench.training``) owns the data, the epochs, the main optimizer over
``trainable_parameters()`` and its learning-rate schedule, checkpoints and logging. A method
decides what one step does. The default step is: forward every exit, ``loss()``, backward, step.
Methods with extra networks (a gater, a weight-prediction network) create them in ``__init__``,
list them in ``extra_modules()`` so they are checkpointed, and override ``train_step``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import nn

from models import ExitOutputs, MultiExitNetwork


@dataclass
class TrainContext:
    """What a method may need to know about the run it is part of."""

    exit_costs: torch.Tensor  # cumulative FLOPs per exit divided by the last exit's, shape (K,)
    num_classes: int
    epochs: int
    steps_per_epoch: int
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    autocast_dtype: torch.dtype | None = None  # bf16 on GPU, None on CPU
    lr: float = 0.1
    momentum: float = 0.9
    weight_decay: float = 1e-4

    @property
    def total_steps(self) -> int:
        return self.epochs * self.steps_per_epoch

    def autocast(self) -> contextlib.AbstractContextManager:
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.autocast_dtype)


class TrainingMethod:
    """A training method: what one step does, and what is evaluated.

    Subclasses set ``name`` and ``Params`` (a dataclass of the config keys with their defaults) and
    implement ``loss`` (or override ``train_step``); every other attribute has a declared default.
    """

    name: ClassVar[str]
    Params: ClassVar[type]
    test_params: ClassVar[dict[str, Any]] = {}  # a tiny setting the registry-wide tests train with
    # whether ``recipe.compile`` may compile the network's forward for this method; a method that
    # needs eager autograd of the network (double backward, per-parameter reachability) says no
    compilable: ClassVar[bool] = True
    # what the calibration thresholds: ``max_softmax`` of the evaluated logits, or ``gate`` (the
    # learned per-exit exit probabilities in [0, 1] in ``ExitOutputs.gates``: JEI-DNN's gates)
    exit_score: ClassVar[str] = "max_softmax"
    # capabilities the architecture must declare (``MultiExitNetwork.capabilities``); checked when
    # the config is read, so a method is refused on an architecture it cannot train
    requires: ClassVar[frozenset[str]] = frozenset()

    @classmethod
    def confidence_exit_threshold(cls, params: Any, num_exits: int) -> float:
        """The fixed threshold of the confidence-branch exit rule (EENets' evaluation): a sample
        leaves at the first exit whose gate (its confidence branch's output) is above it."""
        return 0.5

    def __init__(self, model: MultiExitNetwork, params: Any, ctx: TrainContext):
        self.model = model
        self.params = params
        self.ctx = ctx

    # --- what is trained -------------------------------------------------------------------
    def trainable_parameters(self) -> Iterator[nn.Parameter]:
        """Parameters of the network that the main optimizer updates (default: all)."""
        return (p for p in self.model.parameters() if p.requires_grad)

    def extra_modules(self) -> dict[str, nn.Module]:
        """Networks the method adds (checkpointed with the model, not part of the cache)."""
        return {}

    # --- one step ---------------------------------------------------------------------------
    def loss(self, outputs: ExitOutputs, targets: torch.Tensor, step: int = 0) -> torch.Tensor:
        """The loss of one batch; ``step`` is the global step (0-based), for losses that change
        during training."""
        raise NotImplementedError

    def train_step(
        self, images: torch.Tensor, targets: torch.Tensor, optimizer: torch.optim.Optimizer, step: int
    ) -> torch.Tensor:
        """One optimisation step; returns the (detached) loss without a host sync."""
        with self.ctx.autocast():
            outputs = self.model.forward_all(images)
            loss = self.loss(outputs, targets, step)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        return loss.detach()

    # --- evaluation -------------------------------------------------------------------------
    def eval_outputs(self, outputs: ExitOutputs) -> ExitOutputs:
        """Map the network's raw outputs to the ones that are evaluated (default: as they are).

        ``outputs`` may hold only exits 1..k (k <= K): dynamic early exit (``eebench.dynamic``)
        calls this on the exits run so far, so the result at exit j must depend on exits 1..j
        only, and have one entry per exit given."""
        return outputs

    # --- checkpointing ----------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {name: module.state_dict() for name, module in self.extra_modules().items()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for name, module in self.extra_modules().items():
            module.load_state_dict(state[name])

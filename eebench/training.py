"""The training loop shared by every method.

The loop owns the data (uint8 tensors on the training device, augmented per batch), the epochs,
the main optimizer and its learning-rate schedule, evaluation on val after each epoch, and a
checkpoint in a state directory after every epoch and on SIGTERM/SIGUSR1 (SLURM's preemption and
time-limit signals). A rerun resumes from that checkpoint and, on CPU, ends with the same weights
as an uninterrupted run: every random draw of an epoch comes from a generator seeded by
(seed, epoch), and mid-epoch checkpoints record the batch to continue from.
"""

from __future__ import annotations

import logging
import math
import signal
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from models import MultiExitNetwork

from . import distributed, imagefolder
from .augment import EpochPlan, crop_flip, epoch_plan, normalize
from .imagefolder import FolderImages
from .inference import pick_device, run_network
from .io import CorruptFileError, load_tensors, save_tensors
from .methods import TrainContext, TrainingMethod
from .recipe import Recipe

log = logging.getLogger("eebench.train")


class TrainingDiverged(RuntimeError):
    """The loss became NaN or infinite; the last good checkpoint is kept."""


def make_optimizer(recipe: Recipe, params: list[torch.nn.Parameter]) -> torch.optim.Optimizer | None:
    if not params:
        return None
    if recipe.optimizer == "sgd":
        return torch.optim.SGD(
            params, lr=recipe.lr, momentum=recipe.momentum, nesterov=recipe.nesterov, weight_decay=recipe.weight_decay
        )
    cls = torch.optim.Adam if recipe.optimizer == "adam" else torch.optim.AdamW
    return cls(params, lr=recipe.lr, weight_decay=recipe.weight_decay)


class _StopSignal:
    """Records SIGTERM/SIGUSR1 so the loop can checkpoint at the next batch boundary."""

    def __init__(self) -> None:
        self.received: int | None = None
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> _StopSignal:
        for sig in (signal.SIGTERM, signal.SIGUSR1):
            try:
                self._previous[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread
                pass
        return self

    def _handle(self, signum: int, _frame: Any) -> None:
        self.received = signum

    def __exit__(self, *exc: Any) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


@dataclass
class TrainData:
    train_images: torch.Tensor | FolderImages  # uint8 (N, C, H, W) in memory, or image files
    train_labels: torch.Tensor
    val_images: torch.Tensor | FolderImages
    val_labels: torch.Tensor
    mean: tuple[float, ...]
    std: tuple[float, ...]
    crop_padding: int
    hflip: bool


class _TrainBatches:
    """The augmented uint8 training batches of each epoch: in-memory images are cropped and
    flipped on the device from the epoch's plan; image files are decoded by DataLoader workers."""

    def __init__(self, data: TrainData, device: torch.device, seed: int) -> None:
        self.data, self.device, self.seed = data, device, seed
        self.in_memory = not isinstance(data.train_images, FolderImages)
        self.images = data.train_images.to(device) if self.in_memory else data.train_images

    def epoch(self, epoch: int, plan: EpochPlan, batches: list[torch.Tensor]) -> Iterator[torch.Tensor]:
        if not self.in_memory:
            yield from imagefolder.train_batches(self.images, [b.cpu() for b in batches], self.seed, epoch, self.device)
            return
        flips = plan.flips if self.data.hflip else torch.zeros_like(plan.flips)
        offsets, flips = plan.offsets.to(self.device), flips.to(self.device)
        for idx in batches:
            yield crop_flip(self.images[idx], offsets[idx], flips[idx], self.data.crop_padding)


def per_exit_accuracy(logits: torch.Tensor, labels: torch.Tensor) -> list[float]:
    return ((logits.argmax(-1) == labels[None]).double().mean(1) * 100).tolist()


@dataclass
class TrainResult:
    model: MultiExitNetwork
    method: TrainingMethod
    history: list[dict[str, Any]]
    resumed_from: tuple[int, int] | None  # (epoch, batch) the run continued from


def train(
    model: MultiExitNetwork,
    method_factory: Callable[[MultiExitNetwork, TrainContext], TrainingMethod],
    data: TrainData,
    recipe: Recipe,
    exit_costs: torch.Tensor,
    num_classes: int,
    seed: int,
    state_dir: str | Path,
    fingerprint: str,
    device: torch.device | None = None,
    on_epoch: Callable[[dict[str, Any]], None] | None = None,
    stop_after_batches: int | None = None,
) -> TrainResult:
    """Train ``model`` with the method ``method_factory`` builds; resumable from ``state_dir``.

    ``fingerprint`` identifies what is trained (cell config, data split, initial weights); a
    checkpoint with another fingerprint is stale and is not resumed from.
    ``stop_after_batches`` simulates a kill after that many batches (tests).
    """
    run = _TrainingRun(
        model,
        method_factory,
        data,
        recipe,
        exit_costs,
        num_classes,
        seed,
        Path(state_dir) / "checkpoint.pt",
        fingerprint,
        device or pick_device(),
    )
    resumed = run.resume()
    with _StopSignal() as stop:
        for epoch in range(run.start_epoch, recipe.epochs):
            mean_loss = run.train_epoch(epoch, stop, stop_after_batches)
            row = run.end_epoch(epoch, mean_loss)
            if on_epoch is not None:
                on_epoch(row)
    run.finish()
    return TrainResult(model, run.method, run.history, resumed)


class _TrainingRun:
    """The state of one training run: device, method, optimizer, progress, checkpoints."""

    def __init__(
        self,
        model: MultiExitNetwork,
        method_factory: Callable[[MultiExitNetwork, TrainContext], TrainingMethod],
        data: TrainData,
        recipe: Recipe,
        exit_costs: torch.Tensor,
        num_classes: int,
        seed: int,
        state_path: Path,
        fingerprint: str,
        device: torch.device,
    ) -> None:
        self.dctx, device = distributed.setup(device)  # [ddp] several processes under torchrun; no-op alone
        self.dctx.check_batch_size(recipe.batch_size)
        self.model, self.data, self.recipe, self.seed, self.device = model, data, recipe, seed, device
        self.state_path, self.fingerprint = state_path, fingerprint
        self.channels_last = recipe.uses_channels_last(device)
        recipe.apply_matmul_precision(device)
        model.to(device)
        if self.channels_last:
            model.to(memory_format=torch.channels_last)
        n_train = len(data.train_labels)
        self.steps_per_epoch = n_train // recipe.batch_size  # last partial batch dropped, as BN needs > 1
        if self.steps_per_epoch == 0:
            raise ValueError(f"batch size {recipe.batch_size} is larger than the training set ({n_train})")
        self.total_steps = recipe.epochs * self.steps_per_epoch
        ctx = TrainContext(
            exit_costs=exit_costs.to(device),
            num_classes=num_classes,
            epochs=recipe.epochs,
            steps_per_epoch=self.steps_per_epoch,
            device=device,
            autocast_dtype=recipe.autocast_dtype(device),
            lr=recipe.lr,
            momentum=recipe.momentum,
            weight_decay=recipe.weight_decay,
        )
        self.method = method_factory(model, ctx)
        for module in self.method.extra_modules().values():
            module.to(device)
        self.optimizer = make_optimizer(recipe, list(self.method.trainable_parameters()))
        self._compile()
        self.history: list[dict[str, Any]] = []
        self.start_epoch, self.start_batch, self.resumed_loss = 0, 0, 0.0
        self.batches_run = 0
        self.train_batches = _TrainBatches(data, device, seed)
        self.train_labels = data.train_labels.to(device)
        self.mean_t = torch.tensor(data.mean, device=device)
        self.std_t = torch.tensor(data.std, device=device)
        self.attached = self.dctx.attach(self.method, self.optimizer, device)  # [ddp] average gradients

    def _compile(self) -> None:
        if not self.recipe.compile:
            return
        if not self.method.compilable:
            log.warning(
                "recipe.compile: %s needs the network eager (see its class); training without torch.compile",
                self.method.name,
            )
            return
        # the network's forward (and, through AOTAutograd, its backward); method logic, optimizer and
        # learning-rate changes stay eager, so nothing recompiles as the lr moves
        self.model.forward_all = torch.compile(self.model.forward_all, mode=self.recipe.compile)

    def resume(self) -> tuple[int, int] | None:
        """Continue from the checkpoint if it is of this run; the (epoch, batch) resumed from."""
        if not self.state_path.exists():
            return None
        state = load_tensors(self.state_path, what="training checkpoint")
        if state.get("fingerprint") != self.fingerprint:
            log.warning("%s was made by another configuration; starting from scratch", self.state_path)
            return None
        self.model.load_state_dict(state["model"])
        self.method.load_state_dict(state["method"])
        if self.optimizer is not None:
            self.optimizer.load_state_dict(state["optimizer"])
        self.start_epoch, self.start_batch = int(state["epoch"]), int(state["batch"])
        self.history = list(state["history"])
        self.resumed_loss = float(state.get("loss_sum", 0.0))
        log.info("resuming from %s at epoch %d, batch %d", self.state_path, self.start_epoch + 1, self.start_batch)
        return self.start_epoch, self.start_batch

    def checkpoint(self, epoch: int, batch: int, loss_sum: float = 0.0) -> None:
        if not math.isfinite(loss_sum):  # never overwrite the last good checkpoint with diverged weights
            raise TrainingDiverged(
                f"training diverged in epoch {epoch + 1} (loss sum {loss_sum} after batch "
                f"{batch}); the last good checkpoint is kept in {self.state_path}"
            )
        if not self.dctx.is_main:  # [ddp] process 0 writes
            return
        save_tensors(
            self.state_path,
            {
                "fingerprint": self.fingerprint,
                "epoch": epoch,
                "batch": batch,
                "history": self.history,
                "loss_sum": loss_sum,
                "model": self.model.state_dict(),
                "method": self.method.state_dict(),
                "optimizer": self.optimizer.state_dict() if self.optimizer is not None else {},
            },
        )

    def train_epoch(self, epoch: int, stop: _StopSignal, stop_after_batches: int | None) -> float:
        """One epoch's steps (from the resumed batch); the mean loss. Checkpoints and exits with
        128 + the signal when a stop signal arrived."""
        recipe, dctx = self.recipe, self.dctx
        plan = epoch_plan(len(self.data.train_labels), self.data.crop_padding, self.seed, epoch)
        order = plan.order.to(self.device)
        self.model.train()
        first = self.start_batch if epoch == self.start_epoch else 0
        loss_sum = torch.full((), self.resumed_loss if first else 0.0, device=self.device, dtype=torch.float64)
        batches = [
            dctx.shard(order[b * recipe.batch_size : (b + 1) * recipe.batch_size])
            for b in range(first, self.steps_per_epoch)
        ]
        images = self.train_batches.epoch(epoch, plan, batches)
        for batch, idx in zip(range(first, self.steps_per_epoch), batches):
            if dctx.should_stop(stop.received is not None, batch, self.device) or (
                stop_after_batches is not None and self.batches_run >= stop_after_batches
            ):
                self._stop(epoch, batch, float(dctx.mean(loss_sum)), stop.received or signal.SIGTERM)
            loss_sum += self.train_batch(next(images), idx, epoch * self.steps_per_epoch + batch).double()
            self.batches_run += 1
        return float(dctx.mean(loss_sum)) / self.steps_per_epoch  # one host sync per epoch

    def train_batch(self, images: torch.Tensor, idx: torch.Tensor, step: int) -> torch.Tensor:
        """One optimisation step on the augmented uint8 batch ``images`` (labels: the training
        labels at ``idx``) at global ``step``; the detached loss, without a host sync."""
        x = normalize(images, self.mean_t, self.std_t)
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        if self.optimizer is not None:
            for group in self.optimizer.param_groups:
                group["lr"] = self.recipe.lr_at(step, self.total_steps, self.steps_per_epoch)
        return self.method.train_step(x, self.train_labels[idx], self.optimizer, step)

    def _stop(self, epoch: int, batch: int, loss_sum: float, signum: int) -> None:
        self.checkpoint(epoch, batch, loss_sum)
        if self.dctx.is_main:
            log.info(
                "stopped by %s: checkpoint written to %s at epoch %d, batch %d; a rerun resumes from it",
                signal.Signals(signum).name,
                self.state_path,
                epoch + 1,
                batch,
            )
        raise SystemExit(128 + signum)

    def end_epoch(self, epoch: int, mean_loss: float) -> dict[str, Any]:
        """Check the loss, evaluate every exit on val, checkpoint; the epoch's history row."""
        self.dctx.sync_buffers([self.model, *self.method.extra_modules().values()])  # [ddp] process 0's BN stats
        if not math.isfinite(mean_loss):
            raise TrainingDiverged(
                f"training diverged at epoch {epoch + 1}: mean loss {mean_loss}; "
                + (
                    f"the last good checkpoint is kept in {self.state_path}"
                    if self.state_path.exists()
                    else "no checkpoint had been written yet"
                )
                + "; lower the learning rate (a changed recipe starts the cell afresh)"
            )
        data, recipe = self.data, self.recipe
        val = run_network(
            self.model,
            data.val_images,
            data.mean,
            data.std,
            recipe.eval_batch_size,
            self.device,
            self.channels_last,
            with_features=False,
            transform=self.method.eval_outputs,
        )
        last_step = (epoch + 1) * self.steps_per_epoch - 1
        row = {
            "epoch": epoch + 1,
            "loss": mean_loss,
            "lr": recipe.lr_at(last_step, self.total_steps, self.steps_per_epoch),
        }
        row.update({f"val_acc_{k + 1}": a for k, a in enumerate(per_exit_accuracy(val["logits"], data.val_labels))})
        self.history.append(row)
        self.checkpoint(epoch + 1, 0)
        self.dctx.barrier()
        return row

    def finish(self) -> None:
        self.attached.detach()
        self.dctx.check_in_sync([self.model, *self.method.extra_modules().values()], self.device)


def load_weights(path: str | Path, expect_fingerprint: str | None = None) -> dict[str, Any]:
    """Final weights written by the train rule, checked against what is expected of them."""
    state = load_tensors(path, what="trained weights")
    if "model" not in state:
        raise CorruptFileError(f"{path}: not a weights file of this harness (no 'model' entry)")
    if expect_fingerprint is not None and state.get("fingerprint") != expect_fingerprint:
        raise CorruptFileError(
            f"{path}: weights were trained for another configuration "
            f"(fingerprint {state.get('fingerprint')!r}, expected {expect_fingerprint!r}); retrain"
        )
    return state

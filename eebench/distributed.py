"""Multi-GPU training: torch DistributedDataParallel (DDP) in processes started by torchrun.

The primitives under the training loop; ``eebench.launcher`` starts the processes. A training cell
that asks for several GPUs (config ``datasets.<name>.resources.gpus``) runs in N processes that
meet in one process group (NCCL on GPUs, gloo on CPU, so the same code is tested on a CPU-only
machine). Inside ``training.train``:

- every process draws the same epoch plan (seeded by seed and epoch) and takes its contiguous
  slice of each global batch, so the global batch size is the recipe's and the data each process
  sees does not depend on timing;
- gradients are averaged over the processes before each optimizer step: by DDP around the
  network's forward for methods that use the default ``train_step``, and for methods that write
  their own step (extra networks, several optimizers, meta-gradients) by averaging each
  optimizer's gradients right before it steps (what DDP does, at the optimizer instead of in
  backward);
- BatchNorm running statistics are taken from process 0 at each epoch end (DDP does the same
  before every forward), so every process holds the same weights when it evaluates and when the
  run ends, which is checked;
- only process 0 writes the checkpoint and the outputs; a stop signal (SIGTERM/SIGUSR1) seen by
  any process stops all of them at the same batch, where process 0 writes the checkpoint.

One process (no WORLD_SIZE, or WORLD_SIZE=1) is the unchanged single-device path.
Not bit-equal to one process on the whole batch: BatchNorm normalises each process's slice with
that slice's statistics (no SyncBatchNorm, as in the reference code), and the gradient sum is
reduced in another order.
"""

from __future__ import annotations

import logging
import os
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from .methods.base import TrainingMethod

log = logging.getLogger("eebench.distributed")

# Batches between checks whether any process received a stop signal (one tiny all-reduce each):
# a stop is honoured within this many batches, well inside SLURM's grace time before SIGKILL.
SIGNAL_CHECK_EVERY = 8


@dataclass(frozen=True)
class Distributed:
    """Where this process stands in a torchrun job (rank 0 of 1 when not launched by torchrun)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    # --- data ----------------------------------------------------------------------------------
    def shard(self, batch_indices: torch.Tensor) -> torch.Tensor:
        """This process's contiguous slice of a global batch."""
        if not self.enabled:
            return batch_indices
        return batch_indices.tensor_split(self.world_size)[self.rank]

    def check_batch_size(self, batch_size: int) -> None:
        if self.enabled and batch_size % self.world_size:
            raise ValueError(
                f"recipe.batch_size {batch_size} is not divisible by the {self.world_size} "
                f"training processes; choose a multiple of {self.world_size}"
            )

    # --- collectives (no-ops in one process) ---------------------------------------------------
    def should_stop(self, received: bool, batch: int, device: torch.device) -> bool:
        """Whether all processes stop before ``batch``: any of them received a stop signal.

        In one process this is ``received``; with several they agree every
        ``SIGNAL_CHECK_EVERY`` batches, so all stop at the same batch.
        """
        if not self.enabled:
            return received
        if batch % SIGNAL_CHECK_EVERY:
            return False
        flag = torch.tensor([1.0 if received else 0.0], device=device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())

    def mean(self, value: torch.Tensor) -> torch.Tensor:
        """The mean of ``value`` over the processes."""
        if not self.enabled:
            return value
        value = value.clone()
        dist.all_reduce(value)
        return value / self.world_size

    def barrier(self) -> None:
        if self.enabled:
            dist.barrier()

    def sync_buffers(self, modules: Iterable[nn.Module]) -> None:
        """Give every process process 0's buffers (BatchNorm running statistics)."""
        if not self.enabled:
            return
        for module in modules:
            for buffer in module.buffers():
                dist.broadcast(buffer, src=0)

    def check_in_sync(self, modules: Iterable[nn.Module], device: torch.device) -> None:
        """Raise if any process's parameters or buffers differ from process 0's."""
        if not self.enabled:
            return
        mismatched = 0
        for module in modules:
            for tensor in module.state_dict().values():
                reference = tensor.detach().clone()
                dist.broadcast(reference, src=0)
                mismatched += int(not torch.equal(reference, tensor))
        count = torch.tensor([float(mismatched)], device=device)
        dist.all_reduce(count)
        if count.item():
            raise RuntimeError(
                f"the {self.world_size} training processes ended with different weights "
                f"({int(count.item())} tensors differ from process 0's)"
            )
        log.info("all %d processes hold the same weights", self.world_size)

    # --- gradient averaging --------------------------------------------------------------------
    def attach(self, method: Any, optimizer: torch.optim.Optimizer | None, device: torch.device) -> _Attached:
        """Make ``method``'s optimisation steps average gradients over the processes.

        Call after the checkpoint is loaded and before training; ``detach()`` the result after.
        """
        return _Attached(self, method, optimizer, device)


class _ForwardAll(nn.Module):
    """The network's ``forward_all`` as a module's forward, which is what DDP wraps."""

    def __init__(self, network: nn.Module):
        super().__init__()
        self.network = network

    def forward(self, x: torch.Tensor, upto: int | None = None):
        return self.network.forward_all(x, upto)


class _DDPNetwork:
    """What a method sees as its network under DDP: a training forward goes through DDP (whose
    backward averages the gradients over processes); everything else is the network itself."""

    def __init__(self, network: nn.Module, ddp: DistributedDataParallel):
        self.__dict__.update(_network=network, _ddp=ddp)

    def forward_all(self, x: torch.Tensor, upto: int | None = None):
        if torch.is_grad_enabled() and self._network.training:
            return self._ddp(x, upto)
        return self._network.forward_all(x, upto)

    def __call__(self, x: torch.Tensor, upto: int | None = None):
        return self.forward_all(x, upto).logits

    def __getattr__(self, name: str) -> Any:
        return getattr(self._network, name)

    def __setattr__(self, name: str, value: Any) -> None:
        setattr(self._network, name, value)


class _Attached:
    def __init__(self, ctx: Distributed, method: Any, optimizer: torch.optim.Optimizer | None, device: torch.device):
        self.method = method
        self.network = method.model
        self.handles: list[Any] = []
        if not ctx.enabled:
            return
        self.world_size = ctx.world_size
        default_step = type(method).train_step is TrainingMethod.train_step and not method.extra_modules()
        if default_step:
            ddp = DistributedDataParallel(
                _ForwardAll(self.network), device_ids=[device.index] if device.type == "cuda" else None
            )
            method.model = _DDPNetwork(self.network, ddp)
            log.info("DDP over %d processes (%s)", ctx.world_size, dist.get_backend())
            return
        # the method writes its own step: start from process 0's state, average at every step
        for module in (self.network, *method.extra_modules().values()):
            for tensor in module.state_dict().values():
                dist.broadcast(tensor, src=0)
        optimizers = [o for o in vars(method).values() if isinstance(o, torch.optim.Optimizer)]
        if optimizer is not None:
            optimizers.append(optimizer)
        for opt in optimizers:
            self.handles.append(opt.register_step_pre_hook(self._average_gradients))
        log.info(
            "gradients averaged over %d processes at %d optimizer(s) (%s)",
            ctx.world_size,
            len(optimizers),
            dist.get_backend(),
        )

    def _average_gradients(self, optimizer: torch.optim.Optimizer, *_: Any) -> None:
        by_dtype: dict[torch.dtype, list[torch.Tensor]] = defaultdict(list)
        for group in optimizer.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    by_dtype[p.grad.dtype].append(p.grad)
        for grads in by_dtype.values():
            flat = torch._utils._flatten_dense_tensors(grads)
            dist.all_reduce(flat)
            flat /= self.world_size
            for grad, averaged in zip(grads, torch._utils._unflatten_dense_tensors(flat, grads)):
                grad.copy_(averaged)

    def detach(self) -> None:
        for handle in self.handles:
            handle.remove()
        self.method.model = self.network


def current() -> Distributed:
    """This process's place, from the environment torchrun sets."""
    return Distributed(
        rank=int(os.environ.get("RANK", 0)),
        world_size=int(os.environ.get("WORLD_SIZE", 1)),
        local_rank=int(os.environ.get("LOCAL_RANK", 0)),
    )


def setup(device: torch.device) -> tuple[Distributed, torch.device]:
    """Join the process group (once) when launched by torchrun; return the place and the device
    this process trains on (``cuda:LOCAL_RANK`` on GPUs)."""
    ctx = current()
    if not ctx.enabled:
        return ctx, device
    if device.type == "cuda":
        device = torch.device("cuda", ctx.local_rank)
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return ctx, device

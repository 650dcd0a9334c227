"""The training recipe (config key ``recipe``): optimiser, schedule, batch, and the numeric and
compilation switches of the training device."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .schedules import cosine

PRECISIONS = ("fp32", "tf32", "bf16")
COMPILE_MODES = (False, "default", "reduce-overhead")


@dataclass
class Recipe:
    """Defaults are MSDNet's CIFAR recipe, in fp32 as every reference implementation trains."""

    epochs: int = 300
    batch_size: int = 64
    optimizer: str = "sgd"  # sgd | adam | adamw
    lr: float = 0.1
    momentum: float = 0.9
    nesterov: bool = False
    weight_decay: float = 1e-4
    schedule: str = "multistep"  # multistep | cosine | constant
    milestones: list[float] = field(default_factory=lambda: [0.5, 0.75])  # fractions of the run
    gamma: float = 0.1
    lr_min: float = 0.0
    warmup_epochs: int = 0
    eval_batch_size: int = 256
    channels_last: str = "auto"  # auto (GPU only) | on | off
    precision: str = "fp32"  # fp32 | tf32 (TF32 matmuls and convolutions) | bf16 (autocast); GPU only
    compile: bool | str = False  # false | default | reduce-overhead (torch.compile mode of the forward)

    def validate(self) -> None:
        allowed = {
            "optimizer": ("sgd", "adam", "adamw"),
            "schedule": ("multistep", "cosine", "constant"),
            "channels_last": ("auto", "on", "off"),
            "precision": PRECISIONS,
        }
        for key, values in allowed.items():
            if getattr(self, key) not in values:
                raise ValueError(f"recipe.{key} = {getattr(self, key)!r}; allowed: {', '.join(values)}")
        if self.compile is True or self.compile not in COMPILE_MODES:
            raise ValueError(f"recipe.compile = {self.compile!r}; allowed: false, default, reduce-overhead")
        if self.epochs < 1 or self.batch_size < 2:
            raise ValueError(f"recipe needs epochs >= 1 and batch_size >= 2 (got {self.epochs}, {self.batch_size})")

    def lr_at(self, step: int, total_steps: int, steps_per_epoch: int) -> float:
        warmup = self.warmup_epochs * steps_per_epoch
        if step < warmup:
            return self.lr * (step + 1) / warmup
        progress = (step - warmup) / max(1, total_steps - warmup)
        if self.schedule == "cosine":
            return cosine(progress, self.lr, self.lr_min)
        if self.schedule == "multistep":
            return self.lr * self.gamma ** sum(progress >= m for m in self.milestones)
        return self.lr

    def uses_channels_last(self, device: torch.device) -> bool:
        return self.channels_last == "on" or (self.channels_last == "auto" and device.type == "cuda")

    def autocast_dtype(self, device: torch.device) -> torch.dtype | None:
        """bf16 autocast on a GPU when asked for; CPU training is always fp32."""
        return torch.bfloat16 if self.precision == "bf16" and device.type == "cuda" else None

    def apply_matmul_precision(self, device: torch.device) -> None:
        """TF32 for matmuls and cuDNN convolutions only with ``tf32``; ``fp32`` turns off the
        cuDNN TF32 that PyTorch enables by default, so fp32 means fp32."""
        if device.type != "cuda":
            return
        tf32 = self.precision == "tf32"
        torch.set_float32_matmul_precision("high" if tf32 else "highest")
        torch.backends.cudnn.allow_tf32 = tf32

"""Optimiser and learning-rate schedule of BLIP-2's pretraining recipe.

- AdamW, betas (0.9, 0.98), weight decay 0.05 on matrices only: parameters with fewer than two
  dimensions (biases, LayerNorm weights, the temperature) and any name containing "bias",
  "norm" or ".ln" are not decayed (LAVIS' rule; query_tokens, 3-D, are decayed as there).
- Linear warm-up from `warmup_lr` to `lr` over `warmup_steps`, then cosine decay to `min_lr`
  at `total_steps` (LAVIS decays per epoch; we decay per optimiser step, which is the same curve
  sampled finer and does not depend on how an epoch is defined for streamed data).
  `warmup_inclusive=True` counts the step being taken in the ramp instead: step s < warmup_steps
  trains at warmup_lr + (lr - warmup_lr) * (s + 1) / warmup_steps, so with warmup_lr=0 the first
  step trains at lr / warmup_steps and the last warm-up step at lr (the multiplier (s + 1) /
  warmup_steps of a torch LambdaLR, which the miniature's unimodal pretrainings use).

The schedule is a pure function of the step, so resuming needs only the step count.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

NO_DECAY_MARKERS = ("bias", "norm", ".ln")


def param_groups(named_params, weight_decay: float) -> list[dict]:
    """Split (name, param) pairs into a decayed and a non-decayed group (frozen ones dropped)."""
    decay, no_decay = [], []
    for name, p in named_params:
        if not p.requires_grad:
            continue
        lowered = name.lower()
        if p.ndim < 2 or any(m in lowered for m in NO_DECAY_MARKERS):
            no_decay.append(p)
        else:
            decay.append(p)
    if not decay and not no_decay:
        raise ValueError("no trainable parameters: everything is frozen")
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def build_optimizer(named_params, lr: float, weight_decay: float = 0.05, betas=(0.9, 0.98),
                    eps: float = 1e-8) -> torch.optim.AdamW:
    groups = param_groups(named_params, weight_decay)
    # foreach kernels on CUDA; on the CPU the default loop is as fast for small models
    return torch.optim.AdamW(groups, lr=lr, betas=tuple(betas), eps=eps)


@dataclass
class WarmupCosine:
    """lr(step) for step = 0, 1, ... (the step about to be taken)."""
    lr: float
    total_steps: int
    warmup_steps: int = 0
    warmup_lr: float = 1e-6
    min_lr: float = 0.0
    warmup_inclusive: bool = False  # True: the ramp is at (step + 1) / warmup_steps (see above)

    def __post_init__(self):
        if self.total_steps < 1:
            raise ValueError(f"total_steps must be >= 1, got {self.total_steps}")
        if not 0 <= self.min_lr <= self.lr:
            raise ValueError(f"need 0 <= min_lr ({self.min_lr}) <= lr ({self.lr})")

    def __call__(self, step: int) -> float:
        if step < self.warmup_steps:
            return self.warmup_lr + (self.lr - self.warmup_lr) * (step + int(self.warmup_inclusive)) / self.warmup_steps
        span = max(1, self.total_steps - self.warmup_steps)
        progress = min(1.0, (step - self.warmup_steps) / span)
        return self.min_lr + 0.5 * (self.lr - self.min_lr) * (1 + math.cos(math.pi * progress))

    def apply(self, optimizer: torch.optim.Optimizer, step: int) -> float:
        lr = self(step)
        for group in optimizer.param_groups:
            group["lr"] = lr
        return lr


__all__ = ["param_groups", "build_optimizer", "WarmupCosine"]

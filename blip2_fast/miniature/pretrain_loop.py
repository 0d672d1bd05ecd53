"""The training loop the miniature's three unimodal pretrainings share (`pretrain_vision`,
`pretrain_lm`, `pretrain_text_encoder`).

Optimiser and schedule are the training core's (`blip2_fast.training.optim`): AdamW with betas
(0.9, 0.98), weight decay on matrices only (`param_groups`), and `WarmupCosine` with a linear
warm-up that counts the step being taken (step s < warmup trains at lr * (s + 1) / warmup) and a
cosine down to MIN_LR_FRACTION * lr at `steps`. Gradients are clipped to a global norm of 1.
"""
from __future__ import annotations

import math
from typing import Callable, Iterable, Iterator

import torch
from tqdm import tqdm

from ..training.optim import WarmupCosine, build_optimizer

MIN_LR_FRACTION = 0.05  # the cosine ends at this fraction of the peak rate
CLIP_NORM = 1.0


def pretrain_loop(named_params: Iterable[tuple[str, torch.nn.Parameter]],
                  loss_of_batch: Callable[[object], torch.Tensor], batches: Iterator, steps: int, lr: float,
                  warmup: int, weight_decay: float, progress: bool = True, desc: str = "pretraining") -> list[float]:
    """Train for `steps` optimiser steps, one batch from `batches` per step (taken just before
    the step, so a lazily drawn stream is drawn in step order); return the per-step losses.

    Each step: lr from the schedule, loss = loss_of_batch(batch), zero_grad, backward, clip,
    AdamW step. The warm-up is min(warmup, steps) steps. A non-finite loss raises
    FloatingPointError after its step; a stream shorter than `steps` raises ValueError.
    """
    named = list(named_params)
    params = [p for _, p in named if p.requires_grad]  # clipped in the model's parameter order
    opt = build_optimizer(named, lr, weight_decay)
    schedule = WarmupCosine(lr, steps, min(warmup, steps), warmup_lr=0.0, min_lr=MIN_LR_FRACTION * lr,
                            warmup_inclusive=True)
    losses: list[float] = []
    for step in tqdm(range(steps), desc=desc, unit="step", disable=not progress):
        try:
            batch = next(batches)
        except StopIteration:
            raise ValueError(f"{desc}: the batch stream ended after {step} of {steps} steps") from None
        schedule.apply(opt, step)
        loss = loss_of_batch(batch)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, CLIP_NORM)
        opt.step()
        losses.append(float(loss.detach()))
        if not math.isfinite(losses[-1]):
            raise FloatingPointError(f"{desc} pretraining: loss is {losses[-1]} at step {step}")
    return losses


__all__ = ["pretrain_loop", "MIN_LR_FRACTION", "CLIP_NORM"]

"""Pretrain the miniature's image encoder (the ViT BLIP-2 keeps frozen) on the world's attributes.

The model is our `VisionModel(cfg.vision)`, so its state_dict is BLIP-2's `vision_model.*`
minus the prefix. Throw-away linear heads read its output tokens (after `post_layernorm`, i.e.
exactly what the Q-Former will cross-attend to):
- object count (one / two) from the CLS token;
- for each slot, shape (4), colour (6) and size (2): "single" from the mean of all 64 patch
  tokens, "left" / "right" from the means of patch columns 0-3 / 4-7. A slot that is absent
  (left/right in a one-object scene, single in a two-object one) is ignored.
Why region means rather than the CLS token alone: the Q-Former reads the image through
cross-attention, a weighted average of linearly projected tokens. Linear heads on averages of
the patch tokens of each half force every patch token to carry its object's attributes in a
linearly readable form, and the left/right split makes "which side" part of the tokens; a
CLS-only objective lets the patch tokens stay uninformative.

Data: scenes drawn with `blip2_fast.world` and rendered on the fly (seeded stream, one new
scene per sample, no repetition) at the resolutions given (default 64 px only; `(64, 224)`
alternates, 224 px downsized giving anti-aliased edges and thinner outlines), then preprocessed
exactly like inference (`images.preprocess`, bicubic resize to 64, CLIP mean/std). No flips or crops:
they would break "left"/"right" and the sizes.

Measured (2-core CPU, torch 2.13, 2 threads; mean shape accuracy of the three slots on 300-500
fresh 64 px scenes; colour, count and size are at 0.93-1.0 after a few hundred steps in every
run, shape is the hard part):
- batch 64, lr 2e-3: 500 steps 0.38, 800 steps 0.56; the same at patch 4 (257 tokens, width 64,
  twice the time per step) 0.50, and with an MLP of 8x the width 0.33: neither helps.
- batch 16, lr 1e-3 (the default): 2000 steps 0.52 against 0.38 for batch 64 on the same images
  -- updates matter more than images here; a 8000-step cosine run went 0.34, 0.51, 0.58, 0.66,
  0.73, 0.82, 0.87, 0.89 at each 1000 steps, most of the gain coming as the rate decays; lr 3e-4
  from the start is slower (0.41 at 2000 steps).
- the default, 14000 steps of batch 16 at lr 1e-3 (cosine), 868 s: shape 1.000 / 0.990 / 0.994
  (single / left / right), every attribute of the image right for 0.993 of 1000 fresh scenes.
  At 10000 steps it was 0.912 (shape 0.96 / 0.94 / 0.92, mostly small circles, stars and
  triangles confused), and the shipped model's captions followed: 0.905 against 0.960 on the
  recipe's 200 evaluation scenes (the frozen ViT is the captions' ceiling).
Training renders at 64 px only: the recipe's data sets and the evaluation are rendered at 64.
"""
from __future__ import annotations

import json
import logging
import os
import time

import torch
import torch.nn.functional as F
from torch import nn

from ..models.vision import VisionModel
from ..world import COLORS, SHAPES, SIZE_RANGE, Scene, render, sample_scene, scene_rng
from ..images import preprocess
from .preset import (image_spec, init_vision_positions_, init_weights_, miniature_vision_config, save_weights,
                     set_threads)
from .pretrain_loop import pretrain_loop

log = logging.getLogger("blip2_fast.miniature")

SLOTS = ("single", "left", "right")
ATTRS = {"shape": SHAPES, "color": tuple(COLORS), "size": tuple(SIZE_RANGE)}
TARGETS = ("count",) + tuple(f"{s}_{a}" for s in SLOTS for a in ATTRS)  # 10 columns
IGNORE = -100
WEIGHTS_FILE = "vision_model.safetensors"


def scene_targets(scene: Scene) -> list[int]:
    """The 10 class indices of `scene` in TARGETS order; IGNORE for absent slots."""
    objs = scene.objects
    by_slot = {"single": objs[0]} if len(objs) == 1 else {"left": objs[0], "right": objs[1]}
    row = [len(objs) - 1]
    for slot in SLOTS:
        obj = by_slot.get(slot)
        for attr, names in ATTRS.items():
            row.append(IGNORE if obj is None else names.index(getattr(obj, attr)))
    return row


def patch_targets(scene: Scene, grid: int) -> list[list[int]]:
    """Per patch (row-major, grid*grid rows) the [shape, colour, size] of the object whose
    bounding box holds the patch centre, or the background class (len(names)) of each."""
    rows = []
    for r in range(grid):
        for c in range(grid):
            x, y = (c + 0.5) / grid, (r + 0.5) / grid
            obj = next((o for o in scene.objects if o.bbox[0] <= x < o.bbox[2] and o.bbox[1] <= y < o.bbox[3]), None)
            rows.append([len(names) if obj is None else names.index(getattr(obj, a)) for a, names in ATTRS.items()])
    return rows


def render_batch(seed: int, split: str, start: int, n: int, resolutions=(64, 224)):
    """Samples start..start+n-1 of the (seed, split) stream: pixel_values (n, 3, 64, 64),
    targets (n, 10) and patch targets (n, grid*grid, 3). Sample i is rendered at
    resolutions[i % len(resolutions)]."""
    cfg = miniature_vision_config()
    grid = cfg.image_size // cfg.patch_size
    images, targets, dense = [], [], []
    for i in range(start, start + n):
        rng = scene_rng(seed, i, split)
        scene = sample_scene(rng)
        images.append(render(scene, resolutions[i % len(resolutions)], rng))
        targets.append(scene_targets(scene))
        dense.append(patch_targets(scene, grid))
    return (preprocess(images, image_spec()), torch.tensor(targets, dtype=torch.long),
            torch.tensor(dense, dtype=torch.long))


class AttributeHeads(nn.Module):
    """Linear read-outs of the tokens (B, 1 + g*g, E): count from CLS, slots from region means,
    and per patch the attributes of the object under it (or background)."""

    def __init__(self, width: int):
        super().__init__()
        self.count = nn.Linear(width, 2)
        n = sum(len(v) for v in ATTRS.values())
        self.slots = nn.ModuleDict({s: nn.Linear(width, n) for s in SLOTS})
        self.patch = nn.Linear(width, n + len(ATTRS))  # + one background class per attribute

    def forward(self, tokens: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor]:
        """(logits in TARGETS order: 10 tensors (B, classes), patch logits (B, g*g, n + 3))."""
        B, S, E = tokens.shape
        g = int(round((S - 1) ** 0.5))
        grid = tokens[:, 1:].reshape(B, g, g, E)  # (B, rows, cols, E)
        pooled = {"single": grid.mean((1, 2)), "left": grid[:, :, : g // 2].mean((1, 2)),
                  "right": grid[:, :, g // 2:].mean((1, 2))}
        out = [self.count(tokens[:, 0])]
        for slot in SLOTS:
            out.extend(self.slots[slot](pooled[slot]).split([len(v) for v in ATTRS.values()], dim=-1))
        return out, self.patch(tokens[:, 1:])


def attribute_loss(logits: list[torch.Tensor], targets: torch.Tensor, patch_logits: torch.Tensor | None = None,
                   patch_targets: torch.Tensor | None = None, patch_weight: float = 1.0) -> torch.Tensor:
    """Sum over the 10 targets of the mean cross-entropy over the samples where it is present,
    plus patch_weight x the per-patch cross-entropy summed over the 3 attributes."""
    total = logits[0].new_zeros(())
    for j, lg in enumerate(logits):
        t = targets[:, j]
        n = (t != IGNORE).sum().clamp(min=1)  # a slot absent from the whole batch adds 0, not NaN
        total = total + F.cross_entropy(lg.float(), t, ignore_index=IGNORE, reduction="sum") / n
    if patch_logits is not None and patch_weight:
        parts = patch_logits.float().split([len(v) + 1 for v in ATTRS.values()], dim=-1)
        for j, lg in enumerate(parts):
            total = total + patch_weight * F.cross_entropy(lg.reshape(-1, lg.shape[-1]), patch_targets[..., j].reshape(-1))
    return total


@torch.no_grad()
def evaluate(model: VisionModel, heads: AttributeHeads, seed: int, n: int, resolution: int,
             batch_size: int = 256) -> dict:
    """Accuracy per target (over the samples where it is present) and the fraction of images
    with every present target right, on n fresh scenes all rendered at `resolution`."""
    model.eval()
    correct = torch.zeros(len(TARGETS))
    present = torch.zeros(len(TARGETS))
    all_right = 0
    for start in range(0, n, batch_size):
        pixels, targets, _ = render_batch(seed, "vision_val", start, min(batch_size, n - start), (resolution,))
        preds = torch.stack([lg.argmax(-1) for lg in heads(model(pixels))[0]], 1)  # (b, 10)
        mask = targets != IGNORE
        ok = (preds == targets) & mask
        correct += ok.sum(0).float()
        present += mask.sum(0).float()
        all_right += int((ok | ~mask).all(1).sum())
    acc = {name: float(c / p) if p else float("nan") for name, c, p in zip(TARGETS, correct, present)}
    return {"per_target": acc, "image_all_correct": all_right / n,
            "attribute_accuracy": float(correct.sum() / present.sum())}


def _prefetched(seed: int, batch_size: int, resolutions, steps: int, fixed: bool):
    """Training batches, the next one rendered in a thread while the current one trains (Pillow
    and numpy's random generator release the GIL for most of the work, torch during ops)."""
    from concurrent.futures import ThreadPoolExecutor
    if fixed:
        batch = render_batch(seed, "vision_train", 0, batch_size, resolutions)
        for _ in range(steps):
            yield batch
        return
    with ThreadPoolExecutor(max_workers=1) as pool:
        job = pool.submit(render_batch, seed, "vision_train", 0, batch_size, resolutions)
        for step in range(steps):
            batch = job.result()
            if step + 1 < steps:
                job = pool.submit(render_batch, seed, "vision_train", (step + 1) * batch_size, batch_size, resolutions)
            yield batch


def pretrain_vision(out_dir: str, steps: int = 14000, batch_size: int = 16, seed: int = 0, lr: float = 1e-3,
                    warmup: int = 100, weight_decay: float = 0.05, n_val: int = 1000,
                    resolutions=(64,), patch_weight: float = 1.0, fixed_batch: bool = False,
                    progress: bool = True) -> dict:
    """Train the ViT plus heads, write out_dir/vision_model.safetensors (VisionModel keys) and
    out_dir/metrics.json; return the metrics (losses, validation accuracies, seconds).

    fixed_batch: train on the first batch over and over (a can-fail check that the loss goes
    down, for tests). The validation scenes come from another split and seed than training.
    """
    if steps < 1 or batch_size < 1:
        raise ValueError(f"steps ({steps}) and batch_size ({batch_size}) must be >= 1")
    set_threads()
    torch.manual_seed(seed)
    cfg = miniature_vision_config()
    model = init_vision_positions_(init_weights_(VisionModel(cfg)))
    heads = init_weights_(AttributeHeads(cfg.hidden_size))

    def loss_of_batch(batch):
        pixels, targets, dense = batch
        logits, patch_logits = heads(model(pixels))
        return attribute_loss(logits, targets, patch_logits, dense, patch_weight)

    t0 = time.perf_counter()
    model.train()
    losses = pretrain_loop(nn.ModuleList([model, heads]).named_parameters(), loss_of_batch,
                           _prefetched(seed, batch_size, resolutions, steps, fixed_batch), steps, lr, warmup,
                           weight_decay, progress, desc="vision")
    train_s = time.perf_counter() - t0
    t1 = time.perf_counter()
    val = {f"{r}px": evaluate(model, heads, seed + 1000, n_val, r) for r in (64, 224)}
    metrics = {"steps": steps, "batch_size": batch_size, "lr": lr, "images_seen": steps * batch_size,
               "train_seconds": train_s, "eval_seconds": time.perf_counter() - t1,
               "loss_first": losses[0], "loss_last": sum(losses[-10:]) / len(losses[-10:]),
               "losses": losses, "val": val}
    os.makedirs(out_dir, exist_ok=True)
    save_weights(model.state_dict(), os.path.join(out_dir, WEIGHTS_FILE))
    with open(os.path.join(out_dir, "metrics.json"), "w", encoding="utf-8") as f:
        json.dump(metrics, f, indent=1)
    log.info("vision: %d steps in %.0f s, attribute accuracy %s", steps, train_s,
             {k: round(v["attribute_accuracy"], 4) for k, v in val.items()})
    return metrics


def load_vision_model(folder: str) -> VisionModel:
    """The pretrained encoder from `folder` (strict: every VisionModel key, nothing else)."""
    from .preset import load_weights
    model = VisionModel(miniature_vision_config())
    model.load_state_dict(load_weights(os.path.join(folder, WEIGHTS_FILE)), strict=True)
    return model.eval()

"""Stage-1 loss pieces: ITC with a cross-rank gather, on-device hard-negative
sampling for ITM, and the ITG language-modelling loss.

Everything here stays on the device: no `.item()`, no host-side multinomial, no per-sample
Python loop, so a training step never waits on the host.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F


def world() -> tuple[int, int]:
    """(rank, world size); (0, 1) when torch.distributed is not initialised."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


class _GatherWithGrad(torch.autograd.Function):
    """all_gather along dim 0 whose backward returns this rank's slice of the summed gradient.

    Every rank's ITC loss depends on every rank's features, so the gradient for the local
    features is the sum over ranks of d(loss_r)/d(local): an all_reduce of the incoming
    gradient, then our slice. With DDP's gradient averaging this is exactly the gradient of the
    mean loss over ranks (a plain no-grad gather, as in LAVIS' ITC, drops the other ranks'
    terms). Requires the same shape on every rank.
    """

    @staticmethod
    def forward(ctx, x):
        rank, size = world()
        parts = [torch.empty_like(x) for _ in range(size)]
        dist.all_gather(parts, x.contiguous())
        ctx.rank, ctx.n = rank, x.shape[0]
        return torch.cat(parts, 0)

    @staticmethod
    def backward(ctx, grad):
        grad = grad.contiguous().clone()
        dist.all_reduce(grad)  # sum over ranks
        return grad[ctx.rank * ctx.n:(ctx.rank + 1) * ctx.n]


def gather_with_grad(x: torch.Tensor) -> torch.Tensor:
    """(B, ...) -> (world * B, ...), rank-major; identity in a single process."""
    if world()[1] == 1:
        return x
    return _GatherWithGrad.apply(x)


def itc_similarities(image_feats: torch.Tensor, text_feat: torch.Tensor, image_feats_all: torch.Tensor,
                     text_feat_all: torch.Tensor, temp: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """ITC logits: max over the Q queries of the cosine similarity, over the temperature.

    image_feats (B, Q, D), text_feat (B, D): this rank's normalised features;
    *_all: the same gathered over ranks (W*B, ...).
    Returns sim_i2t (B, W*B): local images vs all texts; sim_t2i (B, W*B): local texts vs all images.
    """
    sim_i2t = torch.einsum("bqd,nd->bqn", image_feats, text_feat_all).amax(dim=1) / temp
    sim_t2i = torch.einsum("bd,nqd->bnq", text_feat, image_feats_all).amax(dim=2) / temp
    return sim_i2t, sim_t2i


def itc_loss(sim_i2t: torch.Tensor, sim_t2i: torch.Tensor, rank: int = 0,
             label_smoothing: float = 0.0) -> torch.Tensor:
    """Symmetric cross-entropy; row b's positive is column rank * B + b."""
    B = sim_i2t.shape[0]
    targets = torch.arange(rank * B, rank * B + B, device=sim_i2t.device)
    return (F.cross_entropy(sim_i2t, targets, label_smoothing=label_smoothing)
            + F.cross_entropy(sim_t2i, targets, label_smoothing=label_smoothing)) / 2


@torch.no_grad()
def sample_negatives(sim_i2t: torch.Tensor, sim_t2i: torch.Tensor, generator: torch.Generator | None = None,
                     offset: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Hard negatives for ITM, one draw per row, all on the device.

    sim_i2t (B, N): this rank's images against all N texts; sim_t2i (B, N): this rank's texts
    against all N images (similarities over the temperature). Row b's positive is column
    offset + b (offset = rank * B when N gathers every rank's batch; N = B, offset 0 alone).
    Row b is drawn with probability softmax(sim[b]) restricted to the other columns (the
    positive is set to -inf before the softmax, which renormalises over the negatives).
    Returns (neg_text (B,): a text column for each image, neg_image (B,): an image column for each text).
    """
    B, N = sim_i2t.shape
    if N < 2:
        raise ValueError("ITM hard negatives need at least 2 pairs in the (global) batch")
    positive = torch.zeros(B, N, dtype=torch.bool, device=sim_i2t.device)
    positive[torch.arange(B, device=sim_i2t.device), offset + torch.arange(B, device=sim_i2t.device)] = True
    w_i2t = F.softmax(sim_i2t.float().masked_fill(positive, float("-inf")), dim=1)
    w_t2i = F.softmax(sim_t2i.float().masked_fill(positive, float("-inf")), dim=1)
    neg_text = torch.multinomial(w_i2t, 1, generator=generator).squeeze(1)
    neg_image = torch.multinomial(w_t2i, 1, generator=generator).squeeze(1)
    return neg_text, neg_image


def gather_no_grad(x: torch.Tensor) -> torch.Tensor:
    """(B, ...) -> (world * B, ...), rank-major, without gradient; identity in a single process."""
    if world()[1] == 1:
        return x
    parts = [torch.empty_like(x) for _ in range(world()[1])]
    dist.all_gather(parts, x.contiguous())
    return torch.cat(parts, 0)


def itg_loss(logits: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor,
             label_smoothing: float = 0.1) -> torch.Tensor:
    """Next-token cross-entropy on the text.

    logits (B, T-1, V): the LM head at text positions 0..T-2; target of position t is
    input_ids[:, t+1]; padded targets are ignored (-100). Mean over the real target tokens.
    Across data-parallel ranks the mean is over the tokens of all ranks (the local sum divided
    by the global count, times the world size, so that DDP's gradient averaging yields the
    gradient of the global mean): 2 processes x batch B then equal 1 process x batch 2B even
    when the ranks hold different numbers of tokens. The count is all-reduced on the device.
    """
    labels = input_ids[:, 1:].masked_fill(attention_mask[:, 1:] == 0, -100)
    flat_logits, flat_labels = logits.reshape(-1, logits.shape[-1]).float(), labels.reshape(-1)
    _, size = world()
    if size == 1:
        return F.cross_entropy(flat_logits, flat_labels, ignore_index=-100, label_smoothing=label_smoothing)
    total = F.cross_entropy(flat_logits, flat_labels, ignore_index=-100, label_smoothing=label_smoothing,
                            reduction="sum")
    count = (flat_labels != -100).sum().to(total.dtype)
    dist.all_reduce(count)
    return total * size / count.clamp_min(1)


__all__ = ["world", "gather_with_grad", "gather_no_grad", "itc_similarities", "itc_loss", "sample_negatives",
           "itg_loss"]

"""Unmasked cross-attention: the Q-Former's queries attending the image encoder's tokens.

Entry point: `cross_attention(q, k, v, scale=None)`, q (B, H, Lq, D), k/v (B, H, Lk, D), no mask
(every image token is real: Lk = 257 at 224 px, 677 at 364 px), scale defaulting to 1/sqrt(D).
Every backend has forward and backward (autograd).

Backends, in preference order, each with the list of reasons it refuses an input (xformers'
style; `cross_attention_backends(q, k, v)` returns the map, `dispatch.explain("cross_attention")`
the decision that served the latest call):
  flash_attn  flash-attn 2's `flash_attn_func` (importable, CUDA, fp16/bf16, head dim a multiple
              of 8 up to 256, compute capability >= 8.0);
  xformers    `xformers.ops.memory_efficient_attention` (importable, CUDA);
  triton      our kernel: the Q-Former's fused attention kernel in mode "bidirectional" with no
              padding and Lq != Lk (kernels/qformer_attention.py; one kernel, not a copy), on
              CUDA or forced with BLIP2_FAST_BACKEND=triton under TRITON_INTERPRET=1;
  torch       torch SDPA without a mask (always; on the CPU the only unforced choice).

"Whatever measures fastest": on CUDA, unless BLIP2_FAST_AUTOTUNE=0 or a backend is forced, the
first call for a (q shape, k shape, dtypes, devices, needs grad) key times every backend able to
serve it through the dispatch registry (kernels/dispatch.py: one warm-up call, which also keeps
Triton's compile time out of the clock, then a few calls between CUDA events; forward + backward
when gradients are needed) and caches the winner with that key. That first call synchronises the
device once per new shape (never inside CUDA-graph capture or torch.compile tracing, where the
preference order serves); later calls are a dict lookup. Never on the CPU.
`dispatch.explain("cross_attention", cross_attention_key(q, k, v))` shows the decision and its
timings.

What bounds it (estimates; GPU figures are not yet measured): 32 queries against 257 keys is
a 32x257 score tile per (batch, head): B=256, H=12, D=64 moves ~55 MB in 16-bit, mostly K and
V, for ~1.6 GFLOP, so the op is bound by reading K/V and by launch latency, not by the matrix
rate; what backends differ in is their fixed cost per launch and how they split 257 keys into
tiles, which is why the choice is measured rather than assumed.
"""
from __future__ import annotations

import functools
import math
import os

import torch
import torch.nn.functional as F

from . import dispatch
from .dispatch import device_reason, forced_backend
from .qformer_attention import qformer_attention_backends, qformer_attention_triton


# --------------------------------------------------------------------------------------------
# Optional libraries, imported on first use (xformers' import is slow) with the reason kept
# --------------------------------------------------------------------------------------------

@functools.lru_cache(maxsize=None)
def _flash_attn_func():
    try:
        from flash_attn import flash_attn_func
    except (ImportError, OSError) as err:  # OSError: a wheel built against another torch/CUDA
        return None, f"flash-attn not importable ({err})"
    return flash_attn_func, ""


@functools.lru_cache(maxsize=None)
def _xformers_ops():
    try:
        import xformers.ops as xops
    except (ImportError, OSError) as err:
        return None, f"xformers not importable ({err})"
    return xops, ""


# --------------------------------------------------------------------------------------------
# Backends: refusal reasons and calls (all take and return (B, H, L, D))
# --------------------------------------------------------------------------------------------

def _cuda_reasons(q, k, v) -> list[str]:
    devices = {t.device for t in (q, k, v)}
    if len(devices) > 1:
        return [f"tensors on several devices {sorted(map(str, devices))}"]
    if q.device.type != "cuda":
        return [device_reason(q.device, "needs CUDA")]
    return []


def _flash_attn_reasons(q, k, v) -> list[str]:
    fn, why = _flash_attn_func()
    reasons = [why] if fn is None else []
    reasons += _cuda_reasons(q, k, v)
    if q.dtype not in (torch.float16, torch.bfloat16):
        reasons.append(f"dtype {q.dtype} (flash-attn: fp16, bf16)")
    D = q.shape[-1]
    if D % 8 != 0 or D > 256:
        reasons.append(f"head dim {D} (flash-attn: a multiple of 8, at most 256)")
    if q.is_cuda and torch.cuda.get_device_capability(q.device) < (8, 0):
        reasons.append(f"compute capability {torch.cuda.get_device_capability(q.device)} < (8, 0)")
    return reasons


def _xformers_reasons(q, k, v) -> list[str]:
    xops, why = _xformers_ops()
    reasons = [why] if xops is None else []
    reasons += _cuda_reasons(q, k, v)
    if q.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        reasons.append(f"dtype {q.dtype} (xformers: fp16, bf16, fp32)")
    return reasons


def _run_flash_attn(q, k, v, scale):
    fn, _ = _flash_attn_func()
    # flash-attn wants (B, L, H, D) with a contiguous last dim: the transposes are free views
    return fn(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), softmax_scale=scale).transpose(1, 2)


def _run_xformers(q, k, v, scale):
    xops, _ = _xformers_ops()
    return xops.memory_efficient_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                           scale=scale).transpose(1, 2)


def _run_triton(q, k, v, scale):
    return qformer_attention_triton(q, k, v, "bidirectional", 0, None, scale)


def _run_torch(q, k, v, scale):
    return F.scaled_dot_product_attention(q, k, v, scale=scale)


_RUN = {"flash_attn": _run_flash_attn, "xformers": _run_xformers, "triton": _run_triton, "torch": _run_torch}


def cross_attention_backends(q, k, v) -> dict[str, list[str]]:
    """{backend: reasons it refuses this input}, in preference order (an empty list: it can serve)."""
    if q.dtype != k.dtype or q.dtype != v.dtype:
        mixed = [f"q, k, v dtypes differ ({q.dtype}, {k.dtype}, {v.dtype})"]
    else:
        mixed = []
    return {
        "flash_attn": _flash_attn_reasons(q, k, v) + mixed,
        "xformers": _xformers_reasons(q, k, v) + mixed,
        "triton": qformer_attention_backends(q, k, v)["triton"],  # the same kernel, the same limits
        "torch": [],
    }


# --------------------------------------------------------------------------------------------
# Per-shape autotune (CUDA only), run by the dispatch registry
# --------------------------------------------------------------------------------------------

def _autotune_mode(q) -> str | None:
    """None off CUDA; on CUDA "on", "off" (BLIP2_FAST_AUTOTUNE=0 or a forced backend) or "paused"
    (CUDA-graph capture or torch.compile tracing: timing synchronises and launches extra work, so
    the preference order serves, cached under its own key until timing is possible again)."""
    if not q.is_cuda:
        return None
    if os.environ.get("BLIP2_FAST_AUTOTUNE", "1").strip() == "0" or forced_backend() is not None:
        return "off"
    if torch.cuda.is_current_stream_capturing() or torch.compiler.is_compiling():
        return "paused"
    return "on"


def _autotune_enabled(q) -> bool:
    return _autotune_mode(q) == "on"


def _timing_plan(usable, q, k, v, scale, needs_grad):
    """The registry's timing hook: every able backend on this call's shapes, or None (no autotune)."""
    if not _autotune_enabled(q):
        return None
    return q.device, {name: _timed_step(name, q, k, v, scale, needs_grad) for name in usable}


def _timed_step(name, q, k, v, scale, needs_grad):
    """One call of backend `name` as the real call will run it: forward, plus backward when needed."""
    run = _RUN[name]
    if not needs_grad:
        def forward():
            with torch.no_grad():
                return run(q, k, v, scale)
        return forward
    qq, kk, vv = (t.detach().requires_grad_() for t in (q, k, v))
    grad = torch.randn_like(q)

    def forward_backward():
        with torch.enable_grad():
            out = run(qq, kk, vv, scale)
            torch.autograd.grad(out, (qq, kk, vv), grad)
        return out.detach()
    return forward_backward


def _needs_grad(q, k, v) -> bool:
    return torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad)


def _key(q, k, v, needs_grad: bool) -> tuple:
    return (q.shape, k.shape, q.dtype, k.dtype, v.dtype, q.device, k.device, v.device, needs_grad, _autotune_mode(q))


def cross_attention_key(q, k, v) -> tuple:
    """The dispatch key of `cross_attention(q, k, v)`: shapes (the autotune winner is per shape),
    dtypes, devices, whether gradients are needed, and the autotune mode."""
    return _key(q, k, v, _needs_grad(q, k, v))


_DISPATCH = dispatch.register("cross_attention", tuple(_RUN),
                              lambda q, k, v, scale, needs_grad: cross_attention_backends(q, k, v),
                              timing=lambda usable, *args: _timing_plan(usable, *args))


# --------------------------------------------------------------------------------------------
# Reference and entry point
# --------------------------------------------------------------------------------------------

def cross_attention_ref(q, k, v, scale=None):
    """Plain torch in the inputs' dtype: softmax(q kT * scale) v."""
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
    return torch.matmul(torch.softmax(torch.matmul(q, k.transpose(-1, -2)) * scale, dim=-1), v)


def cross_attention(q, k, v, scale=None):
    """Cross-attention without a mask. q (B, H, Lq, D), k and v (B, H, Lk, D) -> (B, H, Lq, D).

    Backend per call (module docstring): the measured fastest on CUDA, else the first in
    flash_attn, xformers, triton, torch that can serve; BLIP2_FAST_BACKEND=torch|triton forces one.
    """
    if q.dim() != 4 or k.dim() != 4 or k.shape != v.shape or k.shape[:2] != q.shape[:2] or k.shape[3] != q.shape[3]:
        raise ValueError(f"q must be (B, H, Lq, D) and k, v (B, H, Lk, D) with the same B, H, D; "
                         f"got {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
    needs_grad = _needs_grad(q, k, v)
    name, _ = _DISPATCH.select(_key(q, k, v, needs_grad), q, k, v, scale, needs_grad)
    return _RUN[name](q, k, v, scale)

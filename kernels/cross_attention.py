"""Unmasked cross-attention: the Q-Former's queries attending the image encoder's tokens.

Entry point: `cross_attention(q, k, v, scale=None)`, q (B, H, Lq, D), k/v (B, H, Lk, D), no mask
(every image token is real: Lk = 257 at 224 px, 677 at 364 px), scale defaulting to 1/sqrt(D).
Every backend has forward and backward (autograd).

Backends, in preference order, each with the list of reasons it refuses an input (xformers'
style; `cross_attention_backends(q, k, v)` returns the map, `dispatch.explain("cross_attention")`
the last decision):
  flash_attn  flash-attn 2's `flash_attn_func` (importable, CUDA, fp16/bf16, head dim a multiple
              of 8 up to 256, compute capability >= 8.0);
  xformers    `xformers.ops.memory_efficient_attention` (importable, CUDA);
  triton      our kernel: the Q-Former's fused attention kernel in mode "bidirectional" with no
              padding and Lq != Lk (kernels/qformer_attention.py; one kernel, not a copy), on
              CUDA or forced with BLIP2_FAST_BACKEND=triton under TRITON_INTERPRET=1;
  torch       torch SDPA without a mask (always; on the CPU the only unforced choice).

"Whatever measures fastest": on CUDA, unless BLIP2_FAST_AUTOTUNE=0 or a backend is forced, the
first call for a (q shape, k shape, dtype, device, needs grad) key times every backend able to
serve it (one warm-up call, which also keeps Triton's compile time out of the clock, then a few
calls between CUDA events; forward + backward when gradients are needed) and remembers the
winner, which the dispatch then prefers. That first call synchronises the device once per new
shape (never inside CUDA-graph capture or torch.compile tracing, where the preference order
serves); later calls add a dict lookup. Never on the CPU. `cross_attention_autotune_cache()`
shows the winners.

What bounds it (estimates; GPU figures are not yet measured): 32 queries against 257 keys is
a 32x257 score tile per (batch, head): B=256, H=12, D=64 moves ~55 MB in 16-bit, mostly K and
V, for ~1.6 GFLOP, so the op is bound by reading K/V and by launch latency, not by the matrix
rate; what backends differ in is their fixed cost per launch and how they split 257 keys into
tiles, which is why the choice is measured rather than assumed.
"""
from __future__ import annotations

import functools
import logging
import math
import os

import torch
import torch.nn.functional as F

from .dispatch import choose, forced_backend
from .qformer_attention import qformer_attention_backends, qformer_attention_triton

log = logging.getLogger("blip2_fast.kernels")

_autotune_winners: dict[tuple, str] = {}
_TIMING_REPS = 5


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
    if any(d.type != "cuda" for d in devices):
        return [f"tensors on {sorted(map(str, devices))} (needs CUDA)"]
    if len(devices) > 1:
        return [f"tensors on several devices {sorted(map(str, devices))}"]
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
# Per-shape autotune (CUDA only)
# --------------------------------------------------------------------------------------------

def cross_attention_autotune_cache() -> dict[tuple, str]:
    """A copy of the measured winners: {(q shape, k shape, dtype, device index, needs grad): backend}."""
    return dict(_autotune_winners)


def _autotune_enabled(q) -> bool:
    if not q.is_cuda or os.environ.get("BLIP2_FAST_AUTOTUNE", "1").strip() == "0" or forced_backend() is not None:
        return False
    # timing synchronises and launches extra work: never while a graph is captured or traced
    return not torch.cuda.is_current_stream_capturing() and not torch.compiler.is_compiling()


def _pick_fastest(key: tuple, names: list[str], time_ms) -> str:
    """Time each backend with `time_ms(name) -> ms`, remember and return the fastest.

    A backend that fails while timed is skipped with a warning (it would fail the real call too).
    """
    timings = {}
    for name in names:
        try:
            timings[name] = time_ms(name)
        except (RuntimeError, ValueError, NotImplementedError) as err:
            log.warning("cross_attention autotune %s: backend %s failed while timed (%s); skipped", key, name, err)
    if not timings:
        return names[0]
    winner = min(timings, key=timings.get)
    _autotune_winners[key] = winner
    log.info("cross_attention autotune %s: %s -> %s",
             key, ", ".join(f"{n} {t:.4f} ms" for n, t in timings.items()), winner)
    return winner


def _time_on_cuda(name: str, q, k, v, scale: float, needs_grad: bool) -> float:
    """Mean ms of one call (forward, or forward + backward) after a warm-up call, with CUDA events."""
    run = _RUN[name]
    qq, kk, vv = (t.detach().requires_grad_(needs_grad) for t in (q, k, v))
    grad = torch.randn_like(q) if needs_grad else None

    def step():
        out = run(qq, kk, vv, scale)
        if needs_grad:
            torch.autograd.grad(out, (qq, kk, vv), grad)

    with torch.enable_grad() if needs_grad else torch.no_grad():
        step()  # warm-up: Triton compile, library initialisation, allocator
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        torch.cuda.synchronize(q.device)
        start.record()
        for _ in range(_TIMING_REPS):
            step()
        end.record()
        end.synchronize()
    return start.elapsed_time(end) / _TIMING_REPS


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
    backends = cross_attention_backends(q, k, v)
    order = list(backends)
    able = [name for name in order if not backends[name]]
    if len(able) > 1 and _autotune_enabled(q):
        needs_grad = torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v))
        key = (tuple(q.shape), tuple(k.shape), q.dtype, q.device.index, needs_grad)
        winner = _autotune_winners.get(key)
        if winner is None:
            winner = _pick_fastest(key, able, lambda name: _time_on_cuda(name, q, k, v, scale, needs_grad))
        order = [winner] + [name for name in order if name != winner]
    name = choose("cross_attention", [(name, backends[name]) for name in order])
    return _RUN[name](q, k, v, scale)

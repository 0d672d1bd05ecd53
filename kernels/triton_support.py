"""What every Triton op file shares: the optional import, the launch device, tile-size helpers.

Triton is optional (off Linux it may be missing). Importing this module never fails: without
Triton, `triton` is None, `tl.constexpr` exists so kernel signatures still evaluate when the
module is imported, and `jit` returns the function unchanged; `triton_usable()` then names the
import error as the refusal reason, so the dispatcher never picks a Triton backend.
"""
from __future__ import annotations

import contextlib
import os

import torch

from .dispatch import device_reason, forced_backend

try:
    import triton
    import triton.language as tl
    jit = triton.jit
    TRITON_IMPORT_ERROR: str | None = None
except ImportError as _err:
    triton = None
    TRITON_IMPORT_ERROR = f"triton is not importable ({_err})"

    class tl:  # noqa: N801 - the one name the kernel signatures evaluate when defined
        constexpr = None

    def jit(fn=None, **_kw):
        return fn if fn is not None else (lambda f: f)


def triton_usable(*tensors) -> list[str]:
    """Reasons our Triton kernels cannot run on these tensors (empty list: they can)."""
    if TRITON_IMPORT_ERROR is not None:
        return [TRITON_IMPORT_ERROR]
    # On the CPU the interpreter is a correctness tool, far slower than torch: it serves only
    # when asked for by name (BLIP2_FAST_BACKEND=triton with TRITON_INTERPRET=1).
    interpret_ok = os.environ.get("TRITON_INTERPRET") == "1" and forced_backend() == "triton"
    for t in tensors:
        if t is not None and t.device.type != "cuda" and not interpret_ok:
            return [device_reason(t.device, "Triton needs CUDA; on the CPU only "
                                            "BLIP2_FAST_BACKEND=triton with TRITON_INTERPRET=1")]
    return []


def on_device(t: torch.Tensor):
    """The context every launch runs in: `t`'s CUDA device made current, so a kernel for a tensor
    on cuda:1 is launched on cuda:1 (Triton and the CUDA library launch on the current device).
    Off CUDA (the interpreter) there is nothing to select."""
    return torch.cuda.device(t.device) if t.device.type == "cuda" else contextlib.nullcontext()


def next_power_of_2(n: int) -> int:
    """The smallest power of two >= n (1 for n <= 1)."""
    return 1 if n <= 1 else 1 << (n - 1).bit_length()


def largest_pow2_block_dividing(group: int, want: int, floor: int = 16) -> int:
    """The largest power of two <= `want` that divides `group` (any when group is 0), at least
    `floor`: a K tile that never straddles two scale groups."""
    block = want
    while group and group % block:
        block //= 2
    return max(block, floor)

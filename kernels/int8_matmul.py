"""int8 weight-only linear (W8A16): y = x @ (q * s)^T + b, for the frozen LLM.

Entry point: `int8_linear(x, weight_int8, scale, bias=None)`; x (..., K) float32 / bfloat16 /
float16, weight_int8 (N, K) int8, scale (N,) (per output channel) or (N, K // G) (groups of G
consecutive inputs), bias (N,) or None; returns (..., N) in x's dtype. Gradients flow to x and
bias (the weights are frozen). `quantize_weight(w, group_size=None)` makes (q, s) symmetrically
(q = round(w / s) in [-127, 127], s = absmax / 127 per row or group); `int8_linear_ref` is the
float64 reference of the dequantised product.

Backends, in preference order (registered with kernels/dispatch.py; `dispatch.explain("int8_linear")`
says which served the latest call and why the others refused):
  triton:splitk  CUDA, M <= 16 (decode). Grid (N / BLOCK_N, SPLIT_K): each program streams a
                 BLOCK_N x (K / SPLIT_K) slab of int8 weights, converts the tile to the
                 activation dtype in registers right after the load (exact: |q| <= 127 fits every
                 float format) and runs tl.dot against the <= 16 activation rows padded to 16,
                 accumulating in fp32. SPLIT_K is chosen so the grid covers ~2 waves of SMs even
                 for N = 2560; partial sums go to an fp32 (SPLIT_K, M, N) buffer that a second
                 small kernel reduces in a fixed order (deterministic, no atomics) while applying
                 per-channel scales, bias and the cast.
  triton:gemm    CUDA, any M (prefill, batched decode). Tiled BLOCK_M x BLOCK_N with grouped
                 program order (GROUP_M row blocks reuse a weight column block from L2), the
                 int8 tile dequantised in the load as above, fp32 accumulation, per-channel scale
                 and bias in the epilogue. Group scales: BLOCK_K divides G, so each K step has one
                 scale per column and `acc += dot(x, q) * s` stays exact in fp32.
                 fp32 activations use IEEE-precision dots (not TF32), matching the CPU paths.
  native:cuda    CUDA without Triton: csrc/int8_gemm_cuda.cu (warp per output channel).
  native:gemv    CPU: the C library of csrc/int8_gemm*.cpp (see its sources for the algorithms),
                 weights dequantised in registers right after the load, up to 4 activation rows
                 per pass; AVX-512 / AVX2 / scalar chosen at run time by the library, OpenMP with
                 torch's thread count.
  native:gemm    CPU, M > 4: the library's packed BLIS-style GEMM (dequantised panels).
  torch:int8pack CPU, bf16 / fp16 activations, per-channel scales, K % 16 == 0:
                 torch._weight_int8pack_mm.
  torch:dequant  everywhere: F.linear(x, (q * s).to(x.dtype), b). Always available.
On the CPU, when several backends can serve, the dispatch registry times each once per key
(`int8_linear_key`: device, dtype, M bucket (exact up to 16, then powers of two), N, K, group,
bias, weight contiguity, threads) on the actual call and caches the fastest; the slower ones are
reported as refused with their measured times, and later calls with that key are one dict
lookup. BLIP2_FAST_BACKEND=torch|triton forces a family ("native" is a family of its own:
BLIP2_FAST_BACKEND=torch means plain torch).

Why these choices (the measurements, with machine and command: bench/results/int8_matmul_cpu.md):
  * int8 weights dequantised in registers: decode is bound by the weight stream, which int8 cuts
    4x against fp32 (2x against bf16); native:gemv measured 2.1-5.6x faster than fp32 F.linear
    at M = 1 on two threads (less on one).
  * torch:int8pack is refused for fp32 activations without timing (it measured 2-6x slower than
    the fp32 matmul, and timing it at prefill sizes would cost seconds) and for K % 16 != 0
    (torch 2.13 segfaults or returns NaN there).
  * native:gemm is timed against the GEMV only above 4 rows: which wins depends on the CPU (on
    Zen 4 the GEMV did up to M = 128).

Limits: weight (N, K) int8 with K >= 1; Triton and native need G % 16 == 0 for group scales
(other G go to torch:dequant); the native CPU library wants a contiguous weight (any other is
served by torch). GPU tile sizes and SPLIT_K are heuristics, not yet measured on a GPU (none was
available while this was written); under the interpreter bf16 dots run in fp32 (see _upcast).
The backward is a dense matmul with the dequantised weight (no fused int8 backward kernel).
Every configuration the launchers pick compiles for sm_80 and sm_90 (tests/kernels/
test_aot_compile.py; bench/results/aot_compile.md): the 16-bit kernels spill at most 68 bytes per
thread, while the fp32-activation GEMM (FMA dots) spills 1-18 KB per thread on both.
"""
from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

from . import dispatch, native
from .dispatch import device_reason
from .triton_support import jit, largest_pow2_block_dividing, next_power_of_2, on_device, tl, triton, triton_usable


FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_DTYPE_CODE = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}
SPLITK_MAX_M = 16  # the split-K kernel pads the activation rows to one 16-row dot tile
GEMV_ONLY_M = 4  # up to this many rows the native GEMM is not even timed (its packing cannot pay)
_OP = "int8_linear"


# --------------------------------------------------------------------------------- quantisation

def quantize_weight(w: torch.Tensor, group_size: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric int8 quantisation of a (N, K) weight: returns (q int8 (N, K), scale float32).

    scale is (N,) per output channel, or (N, K // group_size) when group_size is given (it must
    divide K). s = absmax / 127 (rows or groups that are all zero get s = 1), q = round(w / s)
    clamped to [-127, 127] (-128 is never used, so -q never overflows). Works on the meta
    device (shapes only), so a loader can quantise a model skeleton.
    """
    if w.dim() != 2:
        raise ValueError(f"quantize_weight: weight must be 2-D (out_features, in_features), got shape {tuple(w.shape)}")
    if not w.is_floating_point():
        raise TypeError(f"quantize_weight: weight must be a float tensor, got {w.dtype}")
    n, k = w.shape
    wf = w.to(torch.float32)
    if group_size:
        if group_size < 0 or k % group_size != 0:
            raise ValueError(f"quantize_weight: group_size {group_size} must be a positive divisor of "
                             f"in_features {k} (weight shape {tuple(w.shape)})")
        wf = wf.reshape(n, k // group_size, group_size)
        absmax = wf.abs().amax(dim=-1)  # (N, G)
    else:
        absmax = wf.abs().amax(dim=-1, keepdim=True)  # (N, 1)
    if w.device.type != "meta" and w.numel() and not bool(torch.isfinite(absmax).all()):
        bad = (~torch.isfinite(absmax)).nonzero()[0].tolist()
        raise ValueError(f"quantize_weight: weight of shape {tuple(w.shape)} has a non-finite value (row {bad[0]})")
    scale = torch.where(absmax > 0, absmax / 127.0, torch.ones_like(absmax))
    q = torch.round(wf / (scale[..., None] if group_size else scale)).clamp_(-127, 127).to(torch.int8)
    return q.reshape(n, k), (scale if group_size else scale.reshape(n))


def _group_size(weight: torch.Tensor, scale: torch.Tensor) -> int:
    """0 for per-channel scales, else the group size G implied by scale (N, K // G)."""
    if scale.dim() == 1 or (scale.dim() == 2 and scale.shape[1] == 1):
        return 0
    return weight.shape[1] // scale.shape[1]


def dequantize_weight(weight: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """(q * s) as a (N, K) tensor of `dtype`; the product is formed in fp32 (float64 when dtype
    is float64) and rounded once."""
    wide = torch.float64 if dtype == torch.float64 else torch.float32
    q = weight.to(wide)
    s = scale.to(wide)
    if _group_size(weight, scale):
        n, k = weight.shape
        return (q.reshape(n, s.shape[1], -1) * s[..., None]).reshape(n, k).to(dtype)
    return (q * s.reshape(-1, 1)).to(dtype)


def int8_linear_ref(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """float64 reference: x @ (q * s)^T + b, every operand promoted to float64."""
    w = dequantize_weight(weight, scale, torch.float64)  # exact: int8 x fp32 fits in float64
    y = x.double() @ w.t()
    return y + bias.double() if bias is not None else y


# ------------------------------------------------------------------------------- Triton kernels

@jit
def _dequant_tile_dot(acc, x, w_int8, s_ptr, offs_n, mask_n, k0, stride_sn, stride_sg,
                      GROUP_SIZE: tl.constexpr, INPUT_PRECISION: tl.constexpr, UPCAST: tl.constexpr):
    """acc += x @ dequant(w) for one K tile. int8 -> activation dtype is exact; the scale is applied
    per tile for group-wise scales, else once in the caller's epilogue. Through fp32: Triton 3.9's
    interpreter converts int8 -> bf16 wrongly (bit reinterpretation), and on GPUs int8 -> bf16 is
    an int -> fp32 -> bf16 conversion anyway."""
    w = w_int8.to(tl.float32).to(x.dtype)
    if UPCAST:
        x = x.to(tl.float32)
        w = w.to(tl.float32)
    if GROUP_SIZE > 0:
        s = tl.load(s_ptr + offs_n * stride_sn + (k0 // GROUP_SIZE) * stride_sg, mask=mask_n, other=0.0)
        acc += tl.dot(x, w, input_precision=INPUT_PRECISION) * s.to(tl.float32)[None, :]
    else:
        acc = tl.dot(x, w, acc, input_precision=INPUT_PRECISION)
    return acc


@jit
def _int8_gemm_kernel(
    x_ptr, w_ptr, s_ptr, b_ptr, y_ptr,
    M, N, K,
    stride_xm, stride_xk, stride_wn, stride_wk, stride_sn, stride_sg, stride_ym, stride_yn,
    GROUP_SIZE: tl.constexpr,  # 0: scale (N,) applied in the epilogue; else scale (N, K // G)
    HAS_BIAS: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
    UPCAST: tl.constexpr,  # interpreter only: bf16 dots in fp32 (see _upcast)
):
    """Tiled GEMM, one program per BLOCK_M x BLOCK_N output tile in grouped order: int8 weight
    tiles converted to the activation dtype in registers, fp32 accumulation, the scale (per
    channel: in the epilogue; per group: every K step) and bias applied in fp32, one cast at the
    store. Limits: BLOCK_K divides the group size."""
    pid = tl.program_id(0)
    num_pid_m = tl.cdiv(M, BLOCK_M)
    num_pid_n = tl.cdiv(N, BLOCK_N)
    # Grouped order: GROUP_M consecutive programs share a weight column block while it is in L2.
    num_pid_in_group = GROUP_M * num_pid_n
    first_pid_m = (pid // num_pid_in_group) * GROUP_M
    group_size_m = tl.minimum(num_pid_m - first_pid_m, GROUP_M)
    pid_m = first_pid_m + (pid % num_pid_in_group) % group_size_m
    pid_n = (pid % num_pid_in_group) // group_size_m

    offs_m = (pid_m * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    offs_n = (pid_n * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)
    offs_k = tl.arange(0, BLOCK_K).to(tl.int64)
    mask_m = offs_m < M
    mask_n = offs_n < N
    x_ptrs = x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :] * stride_xk
    w_ptrs = w_ptr + offs_k[:, None] * stride_wk + offs_n[None, :] * stride_wn  # (BLOCK_K, BLOCK_N)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        mask_k = (k0 + offs_k) < K
        x = tl.load(x_ptrs, mask=mask_m[:, None] & mask_k[None, :], other=0.0)
        w = tl.load(w_ptrs, mask=mask_k[:, None] & mask_n[None, :], other=0)
        acc = _dequant_tile_dot(acc, x, w, s_ptr, offs_n, mask_n, k0, stride_sn, stride_sg,
                                GROUP_SIZE, INPUT_PRECISION, UPCAST)
        x_ptrs += BLOCK_K * stride_xk
        w_ptrs += BLOCK_K * stride_wk
    if GROUP_SIZE == 0:
        s = tl.load(s_ptr + offs_n * stride_sn, mask=mask_n, other=0.0)
        acc = acc * s.to(tl.float32)[None, :]
    if HAS_BIAS:
        acc += tl.load(b_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)[None, :]
    y_ptrs = y_ptr + offs_m[:, None] * stride_ym + offs_n[None, :] * stride_yn
    tl.store(y_ptrs, acc.to(y_ptr.dtype.element_ty), mask=mask_m[:, None] & mask_n[None, :])


@jit
def _int8_splitk_kernel(
    x_ptr, w_ptr, s_ptr, p_ptr,
    M, N, K, K_PER_SPLIT,
    stride_xm, stride_xk, stride_wn, stride_wk, stride_sn, stride_sg,
    GROUP_SIZE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
    UPCAST: tl.constexpr,
):
    """Split-K GEMV for up to BLOCK_M (16) activation rows: program (n block, split) streams its
    BLOCK_N x K_PER_SPLIT slab of weights and stores an fp32 partial into (SPLIT_K, M, N); group
    scales are applied here, per-channel scales by the reduction."""
    pid_n = tl.program_id(0)
    pid_s = tl.program_id(1)
    offs_m = tl.arange(0, BLOCK_M).to(tl.int64)  # BLOCK_M >= M: all activation rows at once
    offs_n = (pid_n * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)
    mask_m = offs_m < M
    mask_n = offs_n < N
    k_begin = pid_s.to(tl.int64) * K_PER_SPLIT
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(k_begin, k_begin + K_PER_SPLIT, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        mask_k = offs_k < K
        x = tl.load(x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :] * stride_xk,
                    mask=mask_m[:, None] & mask_k[None, :], other=0.0)
        w = tl.load(w_ptr + offs_k[:, None] * stride_wk + offs_n[None, :] * stride_wn,
                    mask=mask_k[:, None] & mask_n[None, :], other=0)
        acc = _dequant_tile_dot(acc, x, w, s_ptr, offs_n, mask_n, k0, stride_sn, stride_sg,
                                GROUP_SIZE, INPUT_PRECISION, UPCAST)
    # partials: (SPLIT_K, M, N) fp32, contiguous
    p_ptrs = p_ptr + pid_s.to(tl.int64) * M * N + offs_m[:, None] * N + offs_n[None, :]
    tl.store(p_ptrs, acc, mask=mask_m[:, None] & mask_n[None, :])


@jit
def _int8_splitk_reduce_kernel(
    p_ptr, s_ptr, b_ptr, y_ptr,
    M, N, SPLIT_K, stride_sn, stride_ym, stride_yn,
    PER_CHANNEL: tl.constexpr, HAS_BIAS: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """Sums the SPLIT_K partials of one row and BLOCK_N columns in a fixed order (deterministic,
    no atomics), then applies per-channel scales and bias and casts to y's dtype."""
    m = tl.program_id(0).to(tl.int64)
    offs_n = (tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)
    mask_n = offs_n < N
    acc = tl.zeros((BLOCK_N,), dtype=tl.float32)
    for i in range(0, SPLIT_K):  # fixed order: the result does not depend on scheduling
        acc += tl.load(p_ptr + i * M * N + m * N + offs_n, mask=mask_n, other=0.0)
    if PER_CHANNEL:
        acc = acc * tl.load(s_ptr + offs_n * stride_sn, mask=mask_n, other=0.0).to(tl.float32)
    if HAS_BIAS:
        acc += tl.load(b_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)
    tl.store(y_ptr + m * stride_ym + offs_n * stride_yn, acc.to(y_ptr.dtype.element_ty), mask=mask_n)


# ------------------------------------------------------------------------------------ launchers

def _check(x2d: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None) -> int:
    """Validate an (M, K) activation against (N, K) int8 weights; returns the group size (0 = per channel)."""
    if weight.dtype != torch.int8 or weight.dim() != 2:
        raise TypeError(f"{_OP}: weight must be a 2-D int8 tensor (N, K), got {weight.dtype} of shape {tuple(weight.shape)}")
    n, k = weight.shape
    if x2d.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{_OP}: x must be float32, bfloat16 or float16, got {x2d.dtype}")
    if x2d.shape[-1] != k:
        raise ValueError(f"{_OP}: x has {x2d.shape[-1]} features (shape {tuple(x2d.shape)}) but weight "
                         f"{tuple(weight.shape)} expects K = {k}")
    if not scale.is_floating_point():
        raise TypeError(f"{_OP}: scale must be a float tensor, got {scale.dtype}")
    ok = (scale.dim() == 1 and scale.shape[0] == n) or (
        scale.dim() == 2 and scale.shape[0] == n and scale.shape[1] >= 1 and k % scale.shape[1] == 0)
    if not ok:
        raise ValueError(f"{_OP}: scale of shape {tuple(scale.shape)} does not fit weight {tuple(weight.shape)}: "
                         f"expected ({n},) per channel or ({n}, K // G) with G dividing K = {k}")
    if bias is not None and (bias.dim() != 1 or bias.shape[0] != n or not bias.is_floating_point()):
        raise ValueError(f"{_OP}: bias must be a float ({n},) tensor, got {bias.dtype} of shape {tuple(bias.shape)}")
    dev = x2d.device
    if weight.device != dev or scale.device != dev or (bias is not None and bias.device != dev):
        devices = {str(t.device) for t in (x2d, weight, scale, bias) if t is not None}
        raise ValueError(f"{_OP}: tensors on different devices: {sorted(devices)}")
    return _group_size(weight, scale)


def _sm_count(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 4  # the interpreter: a few programs are enough to exercise the split


def _precision(dtype: torch.dtype, upcast: bool) -> str:
    return "ieee" if dtype == torch.float32 or upcast else "tf32"  # ignored for 16-bit inputs


def _upcast(dtype: torch.dtype, on_gpu: bool) -> bool:
    """Triton 3.9's interpreter computes bf16 x bf16 tl.dot wrongly (errors ~1e10 on N(0, 1)
    inputs; fp16 and fp32 are exact), so under the interpreter bf16 tiles are widened to fp32
    before the dot: the same products and fp32 accumulation the GPU's bf16 MMA computes."""
    return not on_gpu and dtype == torch.bfloat16


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


# Launch choices as pure functions of the call's shape class (dtype, M, group size, bias): the
# launchers below and the ahead-of-time compile test (tests/kernels/test_aot_compile.py) use the
# same code. Each returns every constexpr and launch option of its kernel. `on_gpu` False is the
# interpreter, where small tiles keep the CPU emulation fast. Heuristics, not yet measured on a GPU.

def _dot_flags(dtype: torch.dtype, on_gpu: bool) -> dict:
    upcast = _upcast(dtype, on_gpu)
    return dict(INPUT_PRECISION=_precision(dtype, upcast), UPCAST=upcast)


def gemm_config(dtype: torch.dtype, m: int, group: int, has_bias: bool, on_gpu: bool,
                block_m=None, block_n=None, block_k=None) -> dict:
    """The tiled GEMM for M rows and group size `group` (0: per-channel scales): BLOCK_M/N/K
    (BLOCK_K divides the group: one scale per K step), GROUP_M, the dot flags and, on a GPU,
    num_warps and num_stages (8 warps and 3 stages for the 128-row tiles of prefill)."""
    bm = block_m or (16 if not on_gpu else (64 if m <= 64 else 128))
    bn = block_n or (128 if on_gpu else 32)
    bk = largest_pow2_block_dividing(group, block_k or (64 if on_gpu else 32))
    extra = {"num_warps": 4 if bm <= 64 else 8, "num_stages": 4 if bm <= 64 else 3} if on_gpu else {}
    return dict(GROUP_SIZE=group, HAS_BIAS=bool(has_bias), BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, GROUP_M=8,
                **_dot_flags(dtype, on_gpu), **extra)


def splitk_config(dtype: torch.dtype, group: int, on_gpu: bool, block_n=None, block_k=None) -> dict:
    """The split-K GEMV: BLOCK_M 16 (all <= 16 activation rows in one dot tile), BLOCK_N,
    BLOCK_K dividing the group, the dot flags and, on a GPU, num_warps and num_stages. SPLIT_K is
    a run-time argument (`splitk_split`), not part of the compiled kernel."""
    extra = {"num_warps": 4, "num_stages": 4} if on_gpu else {}
    return dict(GROUP_SIZE=group, BLOCK_M=16, BLOCK_N=block_n or (64 if on_gpu else 32),
                BLOCK_K=largest_pow2_block_dividing(group, block_k or (128 if on_gpu else 32)),
                **_dot_flags(dtype, on_gpu), **extra)


def splitk_split(n: int, k: int, block_n: int, block_k: int, sm_count: int, split_k=None) -> tuple[int, int]:
    """(SPLIT_K, K_PER_SPLIT): about two waves of programs over the SMs, never a split below one
    K step, K_PER_SPLIT a multiple of BLOCK_K (so a split never straddles a scale group)."""
    if split_k is None:
        split_k = max(1, min(_cdiv(2 * sm_count, _cdiv(n, block_n)), _cdiv(k, block_k), 64))
    k_per_split = _cdiv(_cdiv(k, split_k), block_k) * block_k
    return _cdiv(k, k_per_split), k_per_split


def splitk_reduce_config(group: int, has_bias: bool, on_gpu: bool) -> dict:
    """The split-K reduction: per-channel scales applied here (group 0), bias, and BLOCK_N
    columns per program (num_warps is Triton's default, 4)."""
    return dict(PER_CHANNEL=group == 0, HAS_BIAS=bool(has_bias), BLOCK_N=128 if on_gpu else 32)


def int8_linear_triton_gemm(x2d, weight, scale, bias=None, block_m=None, block_n=None, block_k=None):
    """Tiled Triton GEMM (any M). Asserts shapes, dtypes, devices; returns (M, N) in x's dtype."""
    return _triton_gemm(x2d, weight, scale, bias, _check(x2d, weight, scale, bias), block_m, block_n, block_k)


def _triton_gemm(x2d, weight, scale, bias, group, block_m=None, block_n=None, block_k=None):
    assert group == 0 or group % 16 == 0, f"{_OP}: Triton needs G % 16 == 0, got G = {group}"
    m, k = x2d.shape
    n = weight.shape[0]
    y = torch.empty((m, n), dtype=x2d.dtype, device=x2d.device)
    meta = gemm_config(x2d.dtype, m, group, bias is not None, x2d.device.type == "cuda", block_m, block_n, block_k)
    s2 = scale.reshape(n, -1)
    grid = (triton.cdiv(m, meta["BLOCK_M"]) * triton.cdiv(n, meta["BLOCK_N"]),)
    with on_device(x2d):
        _int8_gemm_kernel[grid](
            x2d, weight, s2, bias if bias is not None else s2, y, m, n, k,
            x2d.stride(0), x2d.stride(1), weight.stride(0), weight.stride(1), s2.stride(0), s2.stride(1),
            y.stride(0), y.stride(1), **meta)
    return y


def int8_linear_triton_splitk(x2d, weight, scale, bias=None, split_k=None, block_n=None, block_k=None):
    """Split-K Triton GEMV for M <= 16 plus a deterministic reduction; returns (M, N)."""
    return _triton_splitk(x2d, weight, scale, bias, _check(x2d, weight, scale, bias), split_k, block_n, block_k)


def _triton_splitk(x2d, weight, scale, bias, group, split_k=None, block_n=None, block_k=None):
    assert group == 0 or group % 16 == 0, f"{_OP}: Triton needs G % 16 == 0, got G = {group}"
    m, k = x2d.shape
    assert 1 <= m <= SPLITK_MAX_M, f"{_OP}: the split-K kernel serves 1 <= M <= {SPLITK_MAX_M}, got M = {m}"
    n = weight.shape[0]
    on_gpu = x2d.device.type == "cuda"
    meta = splitk_config(x2d.dtype, group, on_gpu, block_n, block_k)
    split_k, k_per_split = splitk_split(n, k, meta["BLOCK_N"], meta["BLOCK_K"], _sm_count(x2d.device), split_k)
    part = torch.empty((split_k, m, n), dtype=torch.float32, device=x2d.device)
    s2 = scale.reshape(n, -1)
    y = torch.empty((m, n), dtype=x2d.dtype, device=x2d.device)
    reduce_meta = splitk_reduce_config(group, bias is not None, on_gpu)
    with on_device(x2d):
        _int8_splitk_kernel[(triton.cdiv(n, meta["BLOCK_N"]), split_k)](
            x2d, weight, s2, part, m, n, k, k_per_split,
            x2d.stride(0), x2d.stride(1), weight.stride(0), weight.stride(1), s2.stride(0), s2.stride(1), **meta)
        _int8_splitk_reduce_kernel[(m, triton.cdiv(n, reduce_meta["BLOCK_N"]))](
            part, s2, bias if bias is not None else s2, y, m, n, split_k, s2.stride(0), y.stride(0), y.stride(1),
            **reduce_meta)
    return y


def int8_linear_native(x2d, weight, scale, bias=None, isa: str | None = None, algo: str | None = None,
                       num_threads: int | None = None):
    """The CPU library (csrc/int8_gemm*.cpp). isa: None (best) | "avx512" | "avx2" | "scalar";
    algo: None (by M) | "gemv" | "gemm"; threads default to torch.get_num_threads()."""
    return _native(x2d, weight, scale, bias, _check(x2d, weight, scale, bias), isa, algo, num_threads)


_ALGO_CODE = {None: -1, "gemv": 0, "gemm": 1}
_lib = None  # the CPU library once loaded: saves the loader's lock on every decode step


def _native(x2d, weight, scale, bias, group, isa=None, algo=None, num_threads=None):
    global _lib
    lib = _lib or native.load()
    if lib is None:
        raise RuntimeError(f"{_OP}: native library unavailable: {native.unavailable_reason()}")
    _lib = lib
    assert x2d.device.type == "cpu", f"{_OP}: the native CPU library got a tensor on {x2d.device}"
    assert weight.is_contiguous(), f"{_OP}: the native library needs a contiguous weight, strides {weight.stride()}"
    # This is the decode hot path (a ctypes call costs ~2 us of the ~6 us spent here): convert
    # or copy only what needs it.
    if x2d.stride(1) != 1:
        x2d = x2d.contiguous()
    m, k = x2d.shape
    n = weight.shape[0]
    s = scale if scale.dtype == torch.float32 and scale.is_contiguous() else scale.to(torch.float32).contiguous()
    if bias is not None and bias.stride(0) != 1:
        bias = bias.contiguous()
    code = _DTYPE_CODE[x2d.dtype]
    y = torch.empty((m, n), dtype=x2d.dtype)
    if m == 0:
        return y
    code = lib.b2f_int8_linear(
        x2d.data_ptr(), code, x2d.stride(0), weight.data_ptr(), s.data_ptr(), group,
        None if bias is None else bias.data_ptr(), 0 if bias is None else _DTYPE_CODE[bias.dtype],
        y.data_ptr(), code, n, m, n, k, num_threads or torch.get_num_threads(),
        native.ISA_CODES[isa] if isa else -1, _ALGO_CODE[algo])
    if code != 0:
        raise RuntimeError(f"{_OP}: native library error {code} ({lib.b2f_strerror(code).decode()}) for "
                           f"x {tuple(x2d.shape)} {x2d.dtype}, weight {tuple(weight.shape)}, scale {tuple(scale.shape)}, isa={isa}")
    return y


def int8_linear_native_cuda(x2d, weight, scale, bias=None):
    """The CUDA library (csrc/int8_gemm_cuda.cu), for CUDA tensors when Triton is unavailable."""
    return _native_cuda(x2d, weight, scale, bias, _check(x2d, weight, scale, bias))


def _native_cuda(x2d, weight, scale, bias, group):
    lib = native.load_cuda()
    if lib is None:
        raise RuntimeError(f"{_OP}: CUDA library unavailable: {native.unavailable_reason(native.CUDA_LIB)}")
    if x2d.stride(-1) != 1:
        x2d = x2d.contiguous()
    m, k = x2d.shape
    n = weight.shape[0]
    s = scale.to(torch.float32).contiguous()
    b = bias.to(x2d.dtype).contiguous() if bias is not None else None
    w = weight.contiguous()
    y = torch.empty((m, n), dtype=x2d.dtype, device=x2d.device)
    with on_device(x2d):  # the library sets this device too; torch's current device must agree
        code = lib.b2f_cuda_int8_linear(
            x2d.data_ptr(), _DTYPE_CODE[x2d.dtype], x2d.stride(0), w.data_ptr(), s.data_ptr(), group,
            b.data_ptr() if b is not None else None, y.data_ptr(), y.stride(0), m, n, k,
            torch.cuda.current_device(), torch.cuda.current_stream().cuda_stream)
    if code != 0:
        raise RuntimeError(f"{_OP}: CUDA library error {code} ({lib.b2f_cuda_strerror(code).decode()})")
    return y


def int8_linear_int8pack(x2d, weight, scale, bias=None):
    """torch._weight_int8pack_mm (per-channel scales, cast to x's dtype as the op requires)."""
    return _int8pack(x2d, weight, scale, bias, _check(x2d, weight, scale, bias))


def _int8pack(x2d, weight, scale, bias, group):
    y = torch._weight_int8pack_mm(x2d.contiguous(), weight.contiguous(), scale.reshape(-1).to(x2d.dtype))
    return y + bias.to(y.dtype) if bias is not None else y


def int8_linear_dequant(x2d, weight, scale, bias=None):
    """Dequantise to x's dtype, then F.linear: the always-available torch path."""
    return _dequant(x2d, weight, scale, bias, _check(x2d, weight, scale, bias))


def _dequant(x2d, weight, scale, bias, group):
    return F.linear(x2d, dequantize_weight(weight, scale, x2d.dtype), bias.to(x2d.dtype) if bias is not None else None)


# Unchecked runners (x2d, weight, scale, bias, group): int8_linear validates once per call.
_RUNNERS = {
    "triton:splitk": _triton_splitk,
    "triton:gemm": _triton_gemm,
    "native:cuda": _native_cuda,
    "native:gemv": lambda x2d, weight, scale, bias, group: _native(x2d, weight, scale, bias, group, algo="gemv"),
    "native:gemm": lambda x2d, weight, scale, bias, group: _native(x2d, weight, scale, bias, group, algo="gemm"),
    "torch:int8pack": _int8pack,
    "torch:dequant": _dequant,
}


# ------------------------------------------------------------------------------------- dispatch

BACKENDS = ("triton:splitk", "triton:gemm", "native:cuda", "native:gemv", "native:gemm", "torch:int8pack",
            "torch:dequant")


def int8_linear_backends(x2d, weight, scale, bias=None) -> list[tuple[str, list[str]]]:
    """Backends in order of preference, each with the reasons it refuses this input (none = usable)."""
    return _backends(x2d, weight, scale, bias, _check(x2d, weight, scale, bias))


def _backends(x2d, weight, scale, bias, group):
    m = x2d.shape[0]
    group_reason = [f"group size {group} is not a multiple of 16"] if group % 16 else []
    triton_reasons = triton_usable(x2d, weight, scale, bias) + group_reason
    native_cpu = _native_cpu_reasons(x2d, weight) + group_reason
    # Above a few rows both native algorithms are timed: which wins depends on the CPU (on
    # Zen 4 the GEMV's in-register dequantisation runs beside the FMAs and wins up to M = 128).
    small = [f"M = {m} <= {GEMV_ONLY_M}: the GEMV kernel serves decode shapes"] if m <= GEMV_ONLY_M else []
    return [
        ("triton:splitk", triton_reasons + ([f"M = {m} > {SPLITK_MAX_M}"] if m > SPLITK_MAX_M else [])),
        ("triton:gemm", list(triton_reasons)),
        ("native:cuda", _native_cuda_reasons(x2d)),
        ("native:gemv", native_cpu),
        ("native:gemm", native_cpu + small if x2d.device.type == "cpu" else list(native_cpu)),
        ("torch:int8pack", _int8pack_reasons(x2d, group)),
        ("torch:dequant", []),
    ]


def _native_cuda_reasons(x2d) -> list[str]:
    if x2d.device.type != "cuda":
        return [device_reason(x2d.device, "the CUDA library needs CUDA")]
    return [] if native.load_cuda() is not None else [native.unavailable_reason(native.CUDA_LIB)]


def _native_cpu_reasons(x2d, weight) -> list[str]:
    if x2d.device.type != "cpu":
        return [device_reason(x2d.device, "the native library runs on the CPU")]
    reasons = [] if native.load() is not None else [str(native.unavailable_reason())]
    if not weight.is_contiguous():
        reasons.append(f"weight not contiguous (strides {weight.stride()})")
    return reasons


def _int8pack_reasons(x2d, group) -> list[str]:
    if x2d.device.type != "cpu":
        return [device_reason(x2d.device, "torch's int8pack serves the CPU here")]
    reasons = []
    if not hasattr(torch, "_weight_int8pack_mm"):
        reasons.append("torch._weight_int8pack_mm missing in this torch")
    if group:
        reasons.append("group-wise scales (int8pack takes one scale per channel)")
    if x2d.shape[1] % 16:
        reasons.append(f"K = {x2d.shape[1]} is not a multiple of 16 (torch 2.13's CPU int8pack kernel "
                       "segfaults for K = 3, 17, 33, 123 and returns NaN for K = 8)")
    if x2d.dtype == torch.float32:
        reasons.append("float32 activations: torch's int8pack float32 kernel measured 2-6x slower than the fp32 matmul")
    return reasons


def _timing_plan(usable, x2d, weight, scale, bias, group):
    """The registry's timing hook: on the CPU, every usable non-Triton backend on the real inputs.
    The interpreter (a forced Triton family on the CPU) is a correctness tool whose speed means
    nothing, so Triton keeps the preference order."""
    timed = [name for name in usable if not name.startswith("triton")]
    if x2d.device.type != "cpu" or len(timed) < 2:
        return None
    return x2d.device, {name: functools.partial(_RUNNERS[name], x2d, weight, scale, bias, group) for name in timed}


_DISPATCH = dispatch.register(_OP, BACKENDS, lambda *args: _backends(*args),
                              timing=lambda usable, *args: _timing_plan(usable, *args))


def _m_bucket(m: int) -> int:
    return m if m <= 16 else next_power_of_2(m)


def _key(x2d, weight, group, has_bias) -> tuple:
    # Everything the backend reasons and timings depend on, so a cached decision is the one a
    # full pass would make (the registry adds the environment).
    return (x2d.device, x2d.dtype, _m_bucket(x2d.shape[0]), weight.shape[0], weight.shape[1], group,
            has_bias, weight.is_contiguous(), torch.get_num_threads())


def int8_linear_key(x, weight, scale, bias=None) -> tuple:
    """The dispatch key of `int8_linear(x, weight, scale, bias)`, for dispatch.explain("int8_linear", key)."""
    x2d = x if x.dim() == 2 else x.reshape(-1, x.shape[-1])
    return _key(x2d, weight, _check(x2d, weight, scale, bias), bias is not None)


def _forward(x2d, weight, scale, bias, group):
    backend, out = _DISPATCH.select(_key(x2d, weight, group, bias is not None), x2d, weight, scale, bias, group)
    # a call that was just timed already holds the winner's output
    return out if out is not None else _RUNNERS[backend](x2d, weight, scale, bias, group)


class Int8LinearFn(torch.autograd.Function):
    """Gradient to x (and bias); the int8 weights and scales are frozen. The backward is
    dy @ dequantize(q, s): one dense matmul in dy's dtype, so it uses cuBLAS / MKL."""

    @staticmethod
    def forward(ctx, x2d, weight, scale, bias, group):
        ctx.save_for_backward(weight, scale)
        ctx.has_bias = bias is not None
        return _forward(x2d, weight, scale, bias, group)

    @staticmethod
    def backward(ctx, dy):
        weight, scale = ctx.saved_tensors
        dx = db = None
        if ctx.needs_input_grad[0]:
            dx = dy @ dequantize_weight(weight, scale, dy.dtype)
        if ctx.has_bias and ctx.needs_input_grad[3]:
            db = dy.sum(0)
        return dx, None, None, db, None


def int8_linear(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """y = x @ (weight * scale)^T + bias with int8 `weight` (N, K); see the module docstring."""
    if x.dim() == 0:
        raise ValueError(f"{_OP}: x must have a feature dimension, got a 0-d tensor")
    x2d = x if x.dim() == 2 else x.reshape(-1, x.shape[-1])  # a reshape costs ~1 us: skip it when 2-D
    group = _check(x2d, weight, scale, bias)
    if x2d.shape[0] == 0:
        return x.new_empty((*x.shape[:-1], weight.shape[0]))
    if torch.is_grad_enabled() and (x.requires_grad or (bias is not None and bias.requires_grad)):
        y = Int8LinearFn.apply(x2d, weight, scale, bias, group)
    else:
        y = _forward(x2d, weight, scale, bias, group)
    return y if x.dim() == 2 else y.reshape(*x.shape[:-1], weight.shape[0])

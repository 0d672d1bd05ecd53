"""Fused masked attention for the Q-Former's self-attention (the three BLIP-2 mask modes).

Entry point: `qformer_attention(q, k, v, mode, num_query, key_padding_mask=None, scale=None)`,
q/k/v (B, H, L, D) with L = num_query + T: the learned queries first, then T >= 0 text tokens.

Modes (Q = query rows/keys, T = text rows/keys):
  unimodal       (ITC)  Q attends Q only; T attends T only
  causal         (ITG)  Q attends Q only; the text row at position i attends all of Q and the text
                        keys at positions <= i. With queries first this is "key j < max(NQ, i+1)".
  bidirectional  (ITM)  all attend all
`key_padding_mask` (B, L), nonzero = may be attended, removes keys (columns) in every mode. A row
left with no key at all (e.g. the text rows of a fully padded text in unimodal mode) outputs
exactly 0, and its gradients are 0: never NaN, never the uniform average an additive -inf/min
mask would give.

Algorithm (Triton backend). Flash-attention style, one program per (batch*head, block of rows):
  * the row tile of Q stays in registers/SRAM; K/V tiles stream through it with an online
    softmax (running max and sum in fp32, base-2 exponentials with log2(e) folded into the
    scale); the accumulator is fp32 whatever the input dtype; P is cast to the input dtype for
    the P@V product, as flash-attention does;
  * the mask is never materialised: it is computed from row/column indices inside the kernel
    (mode, num_query) and the padding is read as a 1-D per-key byte vector;
  * fully masked tiles are skipped: the key loop of a row block runs only over the keys its mode
    can reach (a pure-query block in unimodal/causal mode never visits text keys, a pure-text
    block in unimodal mode never visits query keys, causal stops at the block's last row), and
    the range is trimmed to [first, last] valid key of the padding vector, so right-padded text
    (BLIP-2's tokenizer pads on the right) costs no tile beyond the last real token. A padded
    hole inside the range is handled by the mask, not skipped;
  * the forward writes the output and the per-row log-sum-exp (fp32, base 2; 0 for a fully
    masked row so that the backward's exp2(s - lse) of masked -inf scores stays 0);
  * backward is one launch: programs with the low column ids own a key block and accumulate
    dK, dV over the row blocks that can see it; the others own a row block and accumulate dQ
    over its keys. Both recompute P from Q, K and the saved lse and compute
    delta = rowsum(dO * O) in place, so there are no atomics, no extra pre-processing launch,
    and the result is deterministic.
  * int64 offsets everywhere a stride is multiplied; general strides for B, H and L (the last
    dim must be contiguous), so q/k/v may be head-transposed views of (B, L, H, D) projections.
    The output is allocated as (B, L, H, D) and returned as its (B, H, L, D) view, so the usual
    `out.transpose(1, 2).reshape(B, L, H * D)` that follows is free.

Limits. Triton backend: fp16, bf16, fp32 (fp32 dots in IEEE precision unless torch allows TF32
for matmuls, to match what plain PyTorch does), head dim 1..128 (non powers of two are padded to
the next power of two, at least 16, inside the kernel by masked loads); q, k, v on one CUDA device
(or CPU under TRITON_INTERPRET=1 when forced). Anything else (D > 128, other dtypes) goes to the
torch path, which is torch SDPA with the explicit boolean mask from `qformer_mask` (then the rows
with no key zeroed); it supports autograd and matches transformers' fp32 eager attention to ~1e-6.

What bounds it (estimates, not measurements: GPU figures are not yet measured). The Q-Former's
shapes are tiny: stage 1 is B=64..256, H=12, L=32+32, D=64, so one (batch, head) is a 64x64
score tile. At B=256 the forward moves ~50 MB (q, k, v, o in 16-bit) against ~3 GFLOP, i.e.
~10 us of HBM traffic on an H100/H200 class GPU against ~5 us of tensor-core time: memory and
launch latency (a few us per launch), not the matrix rate, bound it. At inference (B=1, 32
queries, no text) the whole op is ~0.2 MB and is pure launch latency. The gain over eager
attention therefore comes from doing it in one launch (two for fwd+bwd) without reading a
(B, 1, L, L) mask or writing the (B, H, L, L) scores and probabilities, not from faster matmuls.
Tile sizes (32x32 up to L = 128, 64 beyond except fp32 with D > 64; 4 warps) are reasoned for
these shapes: 32-row blocks keep the 32 queries and the text in separate blocks so the mode-based
skip applies, and L = 64 gives B*H*2 programs, plenty for 132 SMs. Every configuration
`launch_config` can return compiles for sm_80 and sm_90 (tests/kernels/test_aot_compile.py, Triton
3.9's ptxas, no GPU; bench/results/aot_compile.md): the bf16 L=64 forward takes 14 KB of shared
memory and 80-103 registers, the backward 22 KB and 123-140 registers, no spills; the 16-bit
backward with 64x64 tiles (L > 128) spills up to ~1 KB per thread, and fp32 in IEEE precision (FMA
dots) spills in most backward tiles, 45-55 KB per thread with 64x64 tiles at D 64. Speed is to be
measured and the tiles re-tuned on a GPU.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from . import dispatch
from .triton_support import jit, next_power_of_2, on_device, tl, triton, triton_usable


MODES = ("unimodal", "causal", "bidirectional")
_MODE_ID = {name: i for i, name in enumerate(MODES)}
_TRITON_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_MAX_TRITON_HEAD_DIM = 128  # a 128-wide fp32 accumulator per 64-row tile; beyond it SRAM/registers run out
_LOG2E = 1.4426950408889634


# --------------------------------------------------------------------------------------------
# Triton kernels
# --------------------------------------------------------------------------------------------

@jit
def _allowed(rows, cols, NQ, LQ, LK, MODE: tl.constexpr):
    """The structural mask for broadcast-shaped row and column indices (padding is separate)."""
    ok = (rows < LQ) & (cols < LK)
    if MODE == 0:  # unimodal: a query sees queries, a text token sees text
        ok = ok & ((rows < NQ) == (cols < NQ))
    elif MODE == 1:  # causal: queries come first, so "all queries, text <= own position" is j < max(NQ, i+1)
        ok = ok & ((cols < NQ) | (cols <= rows))
    return ok


@jit
def _key_range(m0, m1, NQ, LK, MODE: tl.constexpr):
    """[lo, hi): the keys that rows m0..m1-1 (m1 exclusive, already clipped to LQ) can attend."""
    if MODE == 0:
        lo = tl.where(m0 >= NQ, NQ, 0)
        hi = tl.where(m1 <= NQ, NQ, LK)
    elif MODE == 1:
        lo = m0 * 0
        hi = tl.minimum(tl.maximum(m1, NQ), LK)
    else:
        lo = m0 * 0
        hi = m0 * 0 + LK
    return lo, hi


@jit
def _query_range(n0, n1, NQ, LQ, MODE: tl.constexpr):
    """[lo, hi): the rows that can attend keys n0..n1-1 (n1 exclusive, already clipped to LK)."""
    if MODE == 0:
        lo = tl.where(n0 >= NQ, NQ, 0)
        hi = tl.where(n1 <= NQ, NQ, LQ)
    elif MODE == 1:
        # a query key is seen by every row; a text key j only by text rows i >= j
        lo = tl.where(n0 < NQ, 0, n0)
        hi = n0 * 0 + LQ
    else:
        lo = n0 * 0
        hi = n0 * 0 + LQ
    return lo, hi


@jit
def _trim_to_padding(lo, hi, pad_row, LK, BLOCK_N: tl.constexpr):
    """Narrow [lo, hi) to [first, last] valid key of the padding vector (a byte per key)."""
    first = LK + 0
    last = LK * 0  # exclusive
    for start in range(0, LK, BLOCK_N):
        offs = start + tl.arange(0, BLOCK_N)
        ok = tl.load(pad_row + offs, mask=offs < LK, other=0) != 0
        first = tl.minimum(first, tl.min(tl.where(ok, offs, LK), 0))
        last = tl.maximum(last, tl.max(tl.where(ok, offs + 1, 0), 0))
    return tl.maximum(lo, first), tl.minimum(hi, last)


@jit(do_not_specialize=["NQ", "LQ", "LK"])
def _qformer_attn_fwd_kernel(
    Q, K, V, O, LSE, PAD,
    stride_qb, stride_qh, stride_qm,
    stride_kb, stride_kh, stride_kn,
    stride_vb, stride_vh, stride_vn,
    stride_ob, stride_oh, stride_om,
    stride_pb,
    H, NQ, LQ, LK, qk_scale,
    MODE: tl.constexpr, HAS_PAD: tl.constexpr, HEAD_DIM: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, PRECISION: tl.constexpr,
):
    """Forward: one program per (batch*head, BLOCK_M rows). Online softmax over the key tiles the
    mode and the padding let these rows reach (module docstring), fp32 accumulator; writes O and
    the base-2 log-sum-exp per row (0 for a row with no key, which outputs 0). Limits: head dim
    <= BLOCK_D <= 128, the last dim of every tensor contiguous."""
    pid_bh = tl.program_id(0)
    b = (pid_bh // H).to(tl.int64)
    h = (pid_bh % H).to(tl.int64)
    m0 = tl.program_id(1) * BLOCK_M
    offs_m = m0 + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < HEAD_DIM
    row_ok = offs_m < LQ

    q = tl.load(Q + b * stride_qb + h * stride_qh + offs_m[:, None].to(tl.int64) * stride_qm + offs_d[None, :],
                mask=row_ok[:, None] & d_ok[None, :], other=0.0)
    k_base = K + b * stride_kb + h * stride_kh
    v_base = V + b * stride_vb + h * stride_vh

    lo, hi = _key_range(m0, tl.minimum(m0 + BLOCK_M, LQ), NQ, LK, MODE)
    pad_row = PAD + b * stride_pb
    if HAS_PAD:
        lo, hi = _trim_to_padding(lo, hi, pad_row, LK, BLOCK_N)

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    for start_n in range(lo, hi, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        col_ok = offs_n < LK
        keep = _allowed(offs_m[:, None], offs_n[None, :], NQ, LQ, LK, MODE)
        if HAS_PAD:
            keep = keep & (tl.load(pad_row + offs_n, mask=col_ok, other=0) != 0)[None, :]
        # K is loaded transposed (BLOCK_D, BLOCK_N) so the score tile is a plain q @ kT
        kT = tl.load(k_base + offs_n[None, :].to(tl.int64) * stride_kn + offs_d[:, None],
                     mask=col_ok[None, :] & d_ok[:, None], other=0.0)
        s = tl.dot(q, kT, input_precision=PRECISION) * qk_scale
        s = tl.where(keep, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        # a row with no allowed key so far keeps max -inf: shift by 0 instead so that
        # exp2(-inf - (-inf)) never produces NaN; its p and alpha are then exactly 0
        m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.math.exp2(s - m_use[:, None])
        alpha = tl.math.exp2(m_i - m_use)
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(v_base + offs_n[:, None].to(tl.int64) * stride_vn + offs_d[None, :],
                    mask=col_ok[:, None] & d_ok[None, :], other=0.0)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
        m_i = m_new

    has_key = l_i > 0.0
    l_safe = tl.where(has_key, l_i, 1.0)
    out = acc / l_safe[:, None]  # a row with no key has acc == 0: it outputs exactly 0
    tl.store(O + b * stride_ob + h * stride_oh + offs_m[:, None].to(tl.int64) * stride_om + offs_d[None, :],
             out.to(O.dtype.element_ty), mask=row_ok[:, None] & d_ok[None, :])
    lse = tl.where(has_key, m_i + tl.math.log2(l_safe), 0.0)
    tl.store(LSE + pid_bh.to(tl.int64) * LQ + offs_m, lse, mask=row_ok)


@jit(do_not_specialize=["NQ", "LQ", "LK", "NUM_KV_BLOCKS"])
def _qformer_attn_bwd_kernel(
    Q, K, V, O, DO, LSE, PAD, DQ, DK, DV,
    stride_qb, stride_qh, stride_qm,
    stride_kb, stride_kh, stride_kn,
    stride_vb, stride_vh, stride_vn,
    stride_ob, stride_oh, stride_om,
    stride_dob, stride_doh, stride_dom,
    stride_dqb, stride_dqh, stride_dqm,
    stride_dkb, stride_dkh, stride_dkn,
    stride_dvb, stride_dvh, stride_dvn,
    stride_pb,
    H, NQ, LQ, LK, NUM_KV_BLOCKS, qk_scale, sm_scale,
    MODE: tl.constexpr, HAS_PAD: tl.constexpr, HEAD_DIM: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, PRECISION: tl.constexpr,
):
    """Backward in one launch: programs [0, NUM_KV_BLOCKS) own a key block and accumulate dK, dV
    over the row blocks that can see it; the others own a row block and accumulate dQ over its
    keys. Both recompute P from Q, K and the saved LSE and form delta = rowsum(dO * O) in place:
    no atomics, no pre-processing launch, deterministic. Same limits as the forward."""
    pid_bh = tl.program_id(0)
    pid = tl.program_id(1)
    b = (pid_bh // H).to(tl.int64)
    h = (pid_bh % H).to(tl.int64)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < HEAD_DIM
    q_base = Q + b * stride_qb + h * stride_qh
    k_base = K + b * stride_kb + h * stride_kh
    v_base = V + b * stride_vb + h * stride_vh
    o_base = O + b * stride_ob + h * stride_oh
    do_base = DO + b * stride_dob + h * stride_doh
    lse_base = LSE + pid_bh.to(tl.int64) * LQ
    pad_row = PAD + b * stride_pb

    if pid < NUM_KV_BLOCKS:
        # ---- dK, dV for one key block, over every row block that can see it ----
        n0 = pid * BLOCK_N
        offs_n = n0 + tl.arange(0, BLOCK_N)
        col_ok = offs_n < LK
        kv_mask = col_ok[:, None] & d_ok[None, :]
        k = tl.load(k_base + offs_n[:, None].to(tl.int64) * stride_kn + offs_d[None, :], mask=kv_mask, other=0.0)
        v = tl.load(v_base + offs_n[:, None].to(tl.int64) * stride_vn + offs_d[None, :], mask=kv_mask, other=0.0)
        lo, hi = _query_range(n0, tl.minimum(n0 + BLOCK_N, LK), NQ, LQ, MODE)
        if HAS_PAD:
            key_pad = tl.load(pad_row + offs_n, mask=col_ok, other=0) != 0
            # a fully padded key block is seen by no row: its dK and dV are 0, skip the loop
            hi = tl.where(tl.max(key_pad.to(tl.int32), 0) > 0, hi, lo)
        dk = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
        dv = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
        for start_m in range(lo, hi, BLOCK_M):
            offs_m = start_m + tl.arange(0, BLOCK_M)
            row_ok = offs_m < LQ
            rd_mask = row_ok[:, None] & d_ok[None, :]
            row_off = offs_m[:, None].to(tl.int64)
            q = tl.load(q_base + row_off * stride_qm + offs_d[None, :], mask=rd_mask, other=0.0)
            do = tl.load(do_base + row_off * stride_dom + offs_d[None, :], mask=rd_mask, other=0.0)
            o = tl.load(o_base + row_off * stride_om + offs_d[None, :], mask=rd_mask, other=0.0)
            delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)
            lse = tl.load(lse_base + offs_m, mask=row_ok, other=0.0)
            # transposed tiles (keys x rows) so dV and dK accumulate without transposing P
            keep = _allowed(offs_m[None, :], offs_n[:, None], NQ, LQ, LK, MODE)
            if HAS_PAD:
                keep = keep & key_pad[:, None]
            sT = tl.dot(k, tl.trans(q), input_precision=PRECISION) * qk_scale
            pT = tl.where(keep, tl.math.exp2(sT - lse[None, :]), 0.0)
            dv += tl.dot(pT.to(do.dtype), do, input_precision=PRECISION)
            dpT = tl.dot(v, tl.trans(do), input_precision=PRECISION)
            dsT = pT * (dpT - delta[None, :])
            dk += tl.dot(dsT.to(q.dtype), q, input_precision=PRECISION)
        dk = dk * sm_scale
        tl.store(DK + b * stride_dkb + h * stride_dkh + offs_n[:, None].to(tl.int64) * stride_dkn + offs_d[None, :],
                 dk.to(DK.dtype.element_ty), mask=kv_mask)
        tl.store(DV + b * stride_dvb + h * stride_dvh + offs_n[:, None].to(tl.int64) * stride_dvn + offs_d[None, :],
                 dv.to(DV.dtype.element_ty), mask=kv_mask)
    else:
        # ---- dQ for one row block, over the keys it can attend (same range as the forward) ----
        m0 = (pid - NUM_KV_BLOCKS) * BLOCK_M
        offs_m = m0 + tl.arange(0, BLOCK_M)
        row_ok = offs_m < LQ
        rd_mask = row_ok[:, None] & d_ok[None, :]
        row_off = offs_m[:, None].to(tl.int64)
        q = tl.load(q_base + row_off * stride_qm + offs_d[None, :], mask=rd_mask, other=0.0)
        do = tl.load(do_base + row_off * stride_dom + offs_d[None, :], mask=rd_mask, other=0.0)
        o = tl.load(o_base + row_off * stride_om + offs_d[None, :], mask=rd_mask, other=0.0)
        delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)
        lse = tl.load(lse_base + offs_m, mask=row_ok, other=0.0)
        lo, hi = _key_range(m0, tl.minimum(m0 + BLOCK_M, LQ), NQ, LK, MODE)
        if HAS_PAD:
            lo, hi = _trim_to_padding(lo, hi, pad_row, LK, BLOCK_N)
        dq = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
        for start_n in range(lo, hi, BLOCK_N):
            offs_n = start_n + tl.arange(0, BLOCK_N)
            col_ok = offs_n < LK
            kv_mask = col_ok[:, None] & d_ok[None, :]
            k = tl.load(k_base + offs_n[:, None].to(tl.int64) * stride_kn + offs_d[None, :], mask=kv_mask, other=0.0)
            v = tl.load(v_base + offs_n[:, None].to(tl.int64) * stride_vn + offs_d[None, :], mask=kv_mask, other=0.0)
            keep = _allowed(offs_m[:, None], offs_n[None, :], NQ, LQ, LK, MODE)
            if HAS_PAD:
                keep = keep & (tl.load(pad_row + offs_n, mask=col_ok, other=0) != 0)[None, :]
            s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale
            p = tl.where(keep, tl.math.exp2(s - lse[:, None]), 0.0)
            dp = tl.dot(do, tl.trans(v), input_precision=PRECISION)
            ds = p * (dp - delta[:, None])
            dq += tl.dot(ds.to(k.dtype), k, input_precision=PRECISION)
        dq = dq * sm_scale
        tl.store(DQ + b * stride_dqb + h * stride_dqh + row_off * stride_dqm + offs_d[None, :],
                 dq.to(DQ.dtype.element_ty), mask=rd_mask)


# --------------------------------------------------------------------------------------------
# Launchers
# --------------------------------------------------------------------------------------------

def tile_config(lq: int, lk: int, head_dim: int, elem_bytes: int) -> dict:
    """Tile sizes and launch options for the Q-Former's small shapes (reasoned, not yet measured
    on a GPU): BLOCK_M (rows), BLOCK_N (keys), BLOCK_D (head dim padded), num_warps, num_stages."""
    # 32-row blocks keep the 32 queries and the text apart, so the mode's tile skip applies; tl.dot
    # needs every dimension >= 16. 64-wide tiles only for long sequences, and not for fp32 with a
    # 128 head dim: compiled for sm_90 that backward asks ~180 KB of shared memory (more than an
    # A100 has), against ~86 KB with 32-wide tiles.
    block_d = max(16, next_power_of_2(head_dim))
    wide_ok = elem_bytes * block_d <= 256
    return dict(BLOCK_M=64 if lq > 128 and wide_ok else 32, BLOCK_N=64 if lk > 128 and wide_ok else 32,
                BLOCK_D=block_d, num_warps=4, num_stages=2)


def dot_precision(dtype: torch.dtype, allow_tf32: bool | None = None) -> str:
    """tl.dot's input_precision. fp32 dots follow torch's own matmul setting (allow_tf32 None:
    read torch.backends.cuda.matmul.allow_tf32), so "fp32" means what plain PyTorch computes."""
    if allow_tf32 is None:
        allow_tf32 = torch.backends.cuda.matmul.allow_tf32
    return "tf32" if dtype == torch.float32 and allow_tf32 else "ieee"


def launch_config(dtype: torch.dtype, lq: int, lk: int, head_dim: int, mode_id: int, has_pad: bool,
                  allow_tf32: bool | None = None) -> dict:
    """Every compile-time choice the forward and backward launchers make for one call: the
    kernels' constexprs (MODE, HAS_PAD, HEAD_DIM, PRECISION, BLOCK_M/N/D) and the launch options
    (num_warps, num_stages). A pure function of the call's shape class, so the ahead-of-time
    compile test (tests/kernels/test_aot_compile.py) enumerates exactly what the launchers pick."""
    return dict(MODE=mode_id, HAS_PAD=bool(has_pad), HEAD_DIM=head_dim, PRECISION=dot_precision(dtype, allow_tf32),
                **tile_config(lq, lk, head_dim, dtype.itemsize))


def _check_qkv(q, k, v, mode_id: int, num_query: int, pad) -> None:
    """The launcher's contract; raises ValueError naming what is wrong."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        if t.dim() != 4:
            raise ValueError(f"{name} must be (B, H, L, D), got shape {tuple(t.shape)}")
        if t.dtype not in _TRITON_DTYPES:
            raise ValueError(f"{name}: dtype {t.dtype} not supported (fp16, bf16, fp32)")
        if t.dtype != q.dtype:
            raise ValueError(f"q, k, v must share a dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
        if t.device != q.device:
            raise ValueError(f"q, k, v must be on one device, got {q.device}, {k.device}, {v.device}")
        if t.stride(-1) != 1:
            raise ValueError(f"{name}: the head dim must be contiguous (stride 1), got strides {t.stride()}")
    B, H, LQ, D = q.shape
    if k.shape != v.shape or k.shape[0] != B or k.shape[1] != H or k.shape[3] != D:
        raise ValueError(f"k and v must be (B, H, Lk, D) = ({B}, {H}, Lk, {D}), got {tuple(k.shape)}, {tuple(v.shape)}")
    if mode_id != _MODE_ID["bidirectional"] and k.shape[2] != LQ:
        raise ValueError(f"mode {MODES[mode_id]} is self-attention: q and k need the same length, got {LQ}, {k.shape[2]}")
    if not 0 <= num_query <= LQ:
        raise ValueError(f"num_query must be in [0, L={LQ}], got {num_query}")
    if not 1 <= D <= _MAX_TRITON_HEAD_DIM:
        raise ValueError(f"head dim {D} not supported by the Triton kernel (1..{_MAX_TRITON_HEAD_DIM})")
    if pad is not None:
        if pad.dtype != torch.uint8 or pad.dim() != 2 or pad.shape[0] not in (1, B) or pad.shape[1] != k.shape[2]:
            raise ValueError(f"padding vector must be uint8 (B or 1, Lk), got {pad.dtype} {tuple(pad.shape)}")
        if pad.device != q.device or pad.stride(-1) != 1:
            raise ValueError("padding vector must be on q's device with a contiguous key dim")


def _qformer_attn_fwd(q, k, v, mode_id: int, num_query: int, pad, scale: float):
    """Launch the forward. Returns (out (B, H, Lq, D) view of a (B, Lq, H, D) buffer, lse (B*H, Lq) fp32)."""
    _check_qkv(q, k, v, mode_id, num_query, pad)
    B, H, LQ, D = q.shape
    LK = k.shape[2]
    out = torch.empty((B, LQ, H, D), device=q.device, dtype=q.dtype).transpose(1, 2)
    lse = torch.empty((B * H, LQ), device=q.device, dtype=torch.float32)
    if out.numel() == 0:
        return out, lse
    meta = launch_config(q.dtype, LQ, LK, D, mode_id, pad is not None)
    grid = (B * H, triton.cdiv(LQ, meta["BLOCK_M"]))
    with on_device(q):
        _qformer_attn_fwd_kernel[grid](
            q, k, v, out, lse, pad if pad is not None else q,
            q.stride(0), q.stride(1), q.stride(2),
            k.stride(0), k.stride(1), k.stride(2),
            v.stride(0), v.stride(1), v.stride(2),
            out.stride(0), out.stride(1), out.stride(2),
            pad.stride(0) if pad is not None and pad.shape[0] > 1 else 0,
            H, num_query, LQ, LK, scale * _LOG2E, **meta,
        )
    return out, lse


def _qformer_attn_bwd(do, q, k, v, out, lse, mode_id: int, num_query: int, pad, scale: float):
    """Launch the backward (one kernel: dK/dV programs, then dQ programs). Returns (dq, dk, dv)."""
    _check_qkv(q, k, v, mode_id, num_query, pad)
    if do.shape != out.shape or do.dtype != out.dtype or do.stride(-1) != 1:
        raise ValueError(f"grad of the output must be {tuple(out.shape)} {out.dtype} with a contiguous head dim, "
                         f"got {tuple(do.shape)} {do.dtype} strides {do.stride()}")
    B, H, LQ, D = q.shape
    LK = k.shape[2]
    dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    if q.numel() == 0 or k.numel() == 0:
        return dq.zero_(), dk.zero_(), dv.zero_()
    meta = launch_config(q.dtype, LQ, LK, D, mode_id, pad is not None)
    num_kv_blocks = triton.cdiv(LK, meta["BLOCK_N"])
    grid = (B * H, num_kv_blocks + triton.cdiv(LQ, meta["BLOCK_M"]))
    with on_device(q):
        _qformer_attn_bwd_kernel[grid](
            q, k, v, out, do, lse, pad if pad is not None else q, dq, dk, dv,
            q.stride(0), q.stride(1), q.stride(2),
            k.stride(0), k.stride(1), k.stride(2),
            v.stride(0), v.stride(1), v.stride(2),
            out.stride(0), out.stride(1), out.stride(2),
            do.stride(0), do.stride(1), do.stride(2),
            dq.stride(0), dq.stride(1), dq.stride(2),
            dk.stride(0), dk.stride(1), dk.stride(2),
            dv.stride(0), dv.stride(1), dv.stride(2),
            pad.stride(0) if pad is not None and pad.shape[0] > 1 else 0,
            H, num_query, LQ, LK, num_kv_blocks, scale * _LOG2E, scale, **meta,
        )
    return dq, dk, dv


def _pad_vector(key_padding_mask):
    """(B, L) bool/int, nonzero = may be attended -> uint8 (B, L) the kernels read a byte per key."""
    if key_padding_mask is None:
        return None
    pad = key_padding_mask if key_padding_mask.dtype == torch.bool else key_padding_mask.ne(0)
    if pad.stride(-1) != 1:
        pad = pad.contiguous()
    return pad.view(torch.uint8)


# --------------------------------------------------------------------------------------------
# Autograd
# --------------------------------------------------------------------------------------------

class QFormerAttnFn(torch.autograd.Function):
    """Triton forward and backward. Also serves unmasked cross-attention (mode "bidirectional",
    num_query 0, no padding, Lq != Lk allowed); see kernels/cross_attention.py."""

    @staticmethod
    def forward(ctx, q, k, v, mode, num_query, key_padding_mask=None, scale=None):
        mode_id = _mode_id(mode)
        scale = _default_scale(q, scale)
        q, k, v = (t if t.stride(-1) == 1 else t.contiguous() for t in (q, k, v))
        pad = _pad_vector(key_padding_mask)
        out, lse = _qformer_attn_fwd(q, k, v, mode_id, int(num_query), pad, scale)
        ctx.save_for_backward(q, k, v, out, lse, pad)
        ctx.mode_id, ctx.num_query, ctx.scale = mode_id, int(num_query), scale
        return out

    @staticmethod
    def backward(ctx, dout):
        q, k, v, out, lse, pad = ctx.saved_tensors
        if dout.stride(-1) != 1:  # e.g. the stride-0 grad of out.sum()
            dout = dout.contiguous()
        dq, dk, dv = _qformer_attn_bwd(dout, q, k, v, out, lse, ctx.mode_id, ctx.num_query, pad, ctx.scale)
        return dq, dk, dv, None, None, None, None


qformer_attention_triton = QFormerAttnFn.apply


# --------------------------------------------------------------------------------------------
# Masks, references, the torch path and the dispatching entry point
# --------------------------------------------------------------------------------------------

def _mode_id(mode: str) -> int:
    if mode not in _MODE_ID:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    return _MODE_ID[mode]


def _default_scale(q, scale):
    return 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)


def qformer_mask(mode: str, num_query: int, L: int, key_padding_mask=None, device=None) -> torch.Tensor:
    """The explicit boolean mask, True = may attend: (B or 1, 1, L, L) for SDPA-style broadcasting.

    Rows are attending positions, columns attended keys; queries are positions 0..num_query-1.
    """
    _mode_id(mode)
    if not 0 <= num_query <= L:
        raise ValueError(f"num_query must be in [0, L={L}], got {num_query}")
    if device is None and key_padding_mask is not None:
        device = key_padding_mask.device
    i = torch.arange(L, device=device)[:, None]
    j = torch.arange(L, device=device)[None, :]
    if mode == "unimodal":
        mask = (i < num_query) == (j < num_query)
    elif mode == "causal":
        mask = (j < num_query) | (j <= i)
    else:
        mask = torch.ones(L, L, dtype=torch.bool, device=device)
    mask = mask[None, None]
    if key_padding_mask is not None:
        if key_padding_mask.dim() != 2 or key_padding_mask.shape[-1] != L:
            raise ValueError(f"key_padding_mask must be (B, L={L}), got {tuple(key_padding_mask.shape)}")
        mask = mask & key_padding_mask.ne(0)[:, None, None, :]
    return mask


def qformer_attention_ref(q, k, v, mode: str, num_query: int, key_padding_mask=None, scale=None):
    """Plain torch in the inputs' dtype: explicit mask, softmax, rows with no key set to 0."""
    L = q.shape[-2]
    mask = qformer_mask(mode, num_query, L, key_padding_mask, device=q.device)
    scores = torch.matmul(q, k.transpose(-1, -2)) * _default_scale(q, scale)
    rows_ok = mask.any(-1, keepdim=True)
    # a row with no key would be softmax over all -inf (NaN): give it zeros, then zero its output
    scores = scores.masked_fill(~mask, float("-inf")).masked_fill(~rows_ok, 0.0)
    probs = torch.softmax(scores, dim=-1).masked_fill(~rows_ok, 0.0)
    return torch.matmul(probs, v)


def _mask_is_trivial(mode: str, num_query: int, L: int) -> bool:
    """True when the mode's structural mask lets every row attend every key."""
    return mode == "bidirectional" or num_query == L or (mode == "unimodal" and num_query == 0)


def _qformer_attention_torch(q, k, v, mode, num_query, key_padding_mask, scale):
    L = q.shape[-2]
    if key_padding_mask is None:
        if _mask_is_trivial(mode, num_query, L):
            return F.scaled_dot_product_attention(q, k, v, scale=scale)  # no mask: SDPA's fastest kernels
        # without padding every row keeps at least one key (queries see queries, text sees itself)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=qformer_mask(mode, num_query, L, device=q.device),
                                              scale=scale)
    mask = qformer_mask(mode, num_query, L, key_padding_mask, device=q.device)
    rows_ok = mask.any(-1, keepdim=True)
    # rows with no key attend everything (finite, whatever the SDPA backend) and are zeroed after;
    # masked_fill also zeroes their gradients
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask | ~rows_ok, scale=scale)
    return out.masked_fill(~rows_ok, 0.0)


def qformer_attention_backends(q, k, v, key_padding_mask=None) -> dict[str, list[str]]:
    """{backend: reasons it refuses this input} in preference order (an empty list: it can serve)."""
    reasons = list(triton_usable(q, k, v, key_padding_mask))
    if q.dtype not in _TRITON_DTYPES:
        reasons.append(f"dtype {q.dtype} (Triton kernel: fp16, bf16, fp32)")
    if not (q.dtype == k.dtype == v.dtype):
        reasons.append("q, k, v dtypes differ")
    if not 1 <= q.shape[-1] <= _MAX_TRITON_HEAD_DIM:
        reasons.append(f"head dim {q.shape[-1]} > {_MAX_TRITON_HEAD_DIM}")
    devices = {t.device for t in (q, k, v, key_padding_mask) if t is not None}
    if len(devices) > 1:
        reasons.append(f"tensors on several devices {sorted(map(str, devices))}")
    return {"triton": reasons, "torch": []}


def qformer_attention_key(q, k, v, key_padding_mask=None) -> tuple:
    """The dispatch key of a call: everything qformer_attention_backends depends on (dtypes,
    head dim, devices); the batch and sequence sizes do not change the decision."""
    return (q.device, q.dtype, k.dtype, v.dtype, q.shape[-1], k.device, v.device,
            None if key_padding_mask is None else key_padding_mask.device)


_DISPATCH = dispatch.register("qformer_attention", ("triton", "torch"),
                              lambda q, k, v, pad: qformer_attention_backends(q, k, v, pad))


def qformer_attention(q, k, v, mode: str, num_query: int, key_padding_mask=None, scale=None):
    """Masked self-attention of the Q-Former. q, k, v (B, H, L, D), L = num_query + T; returns (B, H, L, D).

    mode: "unimodal" | "causal" | "bidirectional" (module docstring); key_padding_mask: optional
    (B, L) bool/int, nonzero = may be attended; scale defaults to 1/sqrt(D). Rows with no key
    output 0. Dispatch (kernels/dispatch.py, one decision per qformer_attention_key): the Triton
    kernel on CUDA, else torch SDPA with the explicit mask; BLIP2_FAST_BACKEND=torch|triton forces one.
    """
    _mode_id(mode)
    if q.dim() != 4 or k.shape != q.shape or v.shape != q.shape:
        raise ValueError(f"q, k, v must all be (B, H, L, D), got {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    B, H, L, D = q.shape
    if not 0 <= num_query <= L:
        raise ValueError(f"num_query must be in [0, L={L}], got {num_query}")
    if key_padding_mask is not None and (key_padding_mask.dim() != 2 or key_padding_mask.shape[0] not in (1, B)
                                         or key_padding_mask.shape[1] != L):
        raise ValueError(f"key_padding_mask must be (B={B} or 1, L={L}), got {tuple(key_padding_mask.shape)}")
    scale = _default_scale(q, scale)
    backend, _ = _DISPATCH.select(qformer_attention_key(q, k, v, key_padding_mask), q, k, v, key_padding_mask)
    if backend == "triton":
        return qformer_attention_triton(q, k, v, mode, num_query, key_padding_mask, scale)
    return _qformer_attention_torch(q, k, v, mode, num_query, key_padding_mask, scale)

"""Attention microbenchmarks: our Q-Former self-attention and cross-attention against the
alternatives, same inputs, same run (CUDA only; on the CPU every case skips with a reason).

Cases (bf16, 12 heads, head dim 64: the Q-Former's attention):
  self   stage-1 training shapes: batch 64 / 256, 32 queries + 32 text tokens, each mode
         (unimodal, causal, bidirectional), without and with ragged right-padded text;
         passes fwd, bwd (backward of a retained graph), fwd+bwd
  infer  inference: 32 queries, no text, batch 1 / 8 / 64 / 256, forward without autograd
  cross  queries against ViT-g's 257 image tokens: batch 1 / 64 / 256, fwd, bwd, fwd+bwd
Implementations: ours (the dispatched entry point), sdpa_mask (torch SDPA with the explicit
boolean mask), sdpa_best (SDPA without a mask where the mode allows: bidirectional or no text
without padding, unimodal without padding as two unmasked calls), flex (torch.compile'd
FlexAttention with a block mask), flash_attn / xformers where installed (xformers with the mask
as an additive bias), eager (matmul, additive mask, softmax, matmul, as transformers' eager
attention), and for cross-attention our Triton kernel forced (triton) beside the autotuned entry.

Timing: an untimed first call (compile, autotune), warm-up, then rounds of n calls each (n
chosen so a round lasts ~2 ms: single calls of a few microseconds would measure the clock and
the synchronisation), the device synchronised before each round's clock starts and before it
stops. Reported per call in benchmark.extra_info: ms, TFLOP/s (useful FLOPs: 4*D per allowed
(query, key) pair forward, x2.5 backward, x3.5 both), and ratio = eager's time / this time
(> 1: faster than eager), eager being timed the same way in the same test; one row per case
in bench/results/<device>.jsonl (bench/harness.py) unless --no-record or --quick.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("pytest_benchmark")
harness = pytest.importorskip("harness", reason="bench/harness.py (result rows) is missing")

CUDA = torch.cuda.is_available()
pytestmark = pytest.mark.skipif(not CUDA, reason="attention kernels are benchmarked on CUDA only "
                                                 "(on the CPU the Triton kernel runs in the interpreter)")


import blip2_fast.kernels.qformer_attention as qa
import blip2_fast.kernels.cross_attention as ca
import blip2_fast.kernels.dispatch as dispatch

DTYPE = torch.bfloat16
HEADS, HEAD_DIM, NUM_QUERY, TEXT_LEN, IMAGE_TOKENS = 12, 64, 32, 32, 257
ROUND_SECONDS = 2e-3
PASS_FACTOR = {"fwd": 1.0, "bwd": 2.5, "fwd+bwd": 3.5}  # matmuls: 2 forward, 5 backward


@dataclass(frozen=True)
class Case:
    kind: str  # self | infer | cross
    batch: int
    mode: str = "bidirectional"
    padded: bool = False
    text: int = TEXT_LEN
    keys: int = IMAGE_TOKENS

    @property
    def id(self) -> str:
        if self.kind == "cross":
            return f"cross-b{self.batch}-lk{self.keys}"
        if self.kind == "infer":
            return f"infer-b{self.batch}"
        return f"self-{self.mode}-b{self.batch}-{'pad' if self.padded else 'nopad'}"


SELF_CASES = [Case("self", b, mode, padded) for b in (64, 256) for mode in qa.MODES for padded in (False, True)]
INFER_CASES = [Case("infer", b, text=0) for b in (1, 8, 64, 256)]
CROSS_CASES = [Case("cross", b) for b in (1, 64, 256)]
SELF_IMPLS = ["ours", "sdpa_mask", "sdpa_best", "flex", "flash_attn", "xformers", "eager"]
CROSS_IMPLS = ["ours", "triton", "sdpa_best", "flex", "flash_attn", "xformers", "eager"]


# ---------------------------------------------------------------------------------------------
# inputs and implementations
# ---------------------------------------------------------------------------------------------

def make_inputs(case: Case, requires_grad: bool):
    gen = torch.Generator(device="cuda").manual_seed(0)
    L = NUM_QUERY + case.text

    def rand(length):
        return torch.randn(case.batch, HEADS, length, HEAD_DIM, device="cuda", dtype=DTYPE, generator=gen)

    q = rand(L if case.kind != "cross" else NUM_QUERY)
    k, v = (rand(case.keys if case.kind == "cross" else L) for _ in range(2))
    for t in (q, k, v):
        t.requires_grad_(requires_grad)
    pad = None
    if case.padded:  # right-padded text, 8..32 real tokens ([CLS] always there)
        lengths = torch.randint(8, case.text + 1, (case.batch,), device="cuda", generator=gen)
        pad = torch.arange(L, device="cuda")[None, :] < (NUM_QUERY + lengths)[:, None]
    return q, k, v, pad


def _mask_needed(case: Case, pad) -> bool:
    return case.kind != "cross" and (pad is not None or not qa._mask_is_trivial(case.mode, NUM_QUERY, NUM_QUERY + case.text))


def _flex_fn(case: Case, q, k, v, pad):
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    compiled = torch.compile(flex_attention)
    if case.kind == "cross":
        return lambda: compiled(q, k, v)
    nq, mode = NUM_QUERY, case.mode

    def mask_mod(b, h, i, j):
        if mode == "unimodal":
            ok = (i < nq) == (j < nq)
        elif mode == "causal":
            ok = (j < nq) | (j <= i)
        else:
            ok = j >= 0
        return ok & pad[b, j] if pad is not None else ok

    L = q.shape[2]
    block_mask = create_block_mask(mask_mod, q.shape[0] if pad is not None else None, None, L, L, device=q.device)
    return lambda: compiled(q, k, v, block_mask=block_mask)


def implementation(name: str, case: Case, q, k, v, pad):
    """A zero-argument callable computing the attention output, or a string saying why not."""
    scale = HEAD_DIM ** -0.5
    needs_mask = _mask_needed(case, pad)
    L = q.shape[2]
    mask = qa.qformer_mask(case.mode, NUM_QUERY, L, pad, device=q.device) if case.kind != "cross" else None
    if name == "ours":
        if case.kind == "cross":
            return lambda: ca.cross_attention(q, k, v)
        return lambda: qa.qformer_attention(q, k, v, case.mode, NUM_QUERY, pad)
    if name == "triton":
        return lambda: ca._run_triton(q, k, v, scale)
    if name == "sdpa_mask":
        return lambda: F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    if name == "sdpa_best":
        if not needs_mask:
            return lambda: F.scaled_dot_product_attention(q, k, v)
        if case.mode == "unimodal" and pad is None:
            n = NUM_QUERY
            return lambda: torch.cat([F.scaled_dot_product_attention(q[:, :, :n], k[:, :, :n], v[:, :, :n]),
                                      F.scaled_dot_product_attention(q[:, :, n:], k[:, :, n:], v[:, :, n:])], dim=2)
        return "this mode with this padding needs an explicit mask (covered by sdpa_mask)"
    if name == "flex":
        return _flex_fn(case, q, k, v, pad)
    if name == "flash_attn":
        reasons = ca.cross_attention_backends(q, k, v)["flash_attn"]
        if needs_mask:
            reasons = reasons + ["flash-attn has no arbitrary mask"]
        return "; ".join(reasons) if reasons else (lambda: ca._run_flash_attn(q, k, v, scale))
    if name == "xformers":
        reasons = ca.cross_attention_backends(q, k, v)["xformers"]
        if reasons:
            return "; ".join(reasons)
        if not needs_mask:
            return lambda: ca._run_xformers(q, k, v, scale)
        xops, _ = ca._xformers_ops()
        # additive bias, (B, H, L, L) view; xformers wants the last dim 8-aligned, as L = 64 / 32 is
        bias = torch.zeros(mask.shape, device=q.device, dtype=q.dtype).masked_fill(~mask, float("-inf"))
        bias = bias.expand(q.shape[0], HEADS, L, L)
        return lambda: xops.memory_efficient_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                                       attn_bias=bias, scale=scale).transpose(1, 2)
    if name == "eager":
        additive = None
        if mask is not None and needs_mask:
            additive = (~mask).to(q.dtype) * torch.finfo(q.dtype).min

        def eager():
            scores = torch.matmul(q, k.transpose(-1, -2)) * scale
            if additive is not None:
                scores = scores + additive
            return torch.matmul(torch.softmax(scores, dim=-1), v)
        return eager
    raise ValueError(name)


def useful_flops(case: Case, q, k, pad) -> float:
    """4*D per allowed (query, key) pair: the two matmuls of the forward, masked pairs not counted."""
    if case.kind == "cross":
        pairs = q.shape[0] * q.shape[2] * k.shape[2]
    else:
        mask = qa.qformer_mask(case.mode, NUM_QUERY, q.shape[2], pad, device=q.device)
        pairs = int(mask.expand(q.shape[0], 1, -1, -1).sum().item())
    return 4.0 * HEAD_DIM * HEADS * pairs


# ---------------------------------------------------------------------------------------------
# timing
# ---------------------------------------------------------------------------------------------

def step_for(pass_name: str, fn, q, k, v):
    """The callable to time for one pass: fn's forward, the backward of one retained graph, or both."""
    if pass_name == "fwd":
        return fn
    inputs = [t for t in (q, k, v) if t.requires_grad]
    if pass_name == "fwd+bwd":
        grad = None

        def fwd_bwd():
            nonlocal grad
            out = fn()
            grad = torch.ones_like(out) if grad is None else grad
            return torch.autograd.grad(out, inputs, grad)
        return fwd_bwd
    out = fn()
    grad = torch.randn_like(out)
    return lambda: torch.autograd.grad(out, inputs, grad, retain_graph=True)


def calls_per_round(step) -> int:
    """Calls that fill about ROUND_SECONDS, from one synchronised call after the warm-up."""
    torch.cuda.synchronize()
    start = time.perf_counter()
    step()
    torch.cuda.synchronize()
    return max(1, min(1000, math.ceil(ROUND_SECONDS / max(time.perf_counter() - start, 1e-7))))


def time_per_call(step, n: int, rounds: int) -> float:
    """Median seconds per call over `rounds` synchronised rounds of n calls (the eager baseline)."""
    times = []
    for _ in range(rounds):
        torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(n):
            step()
        torch.cuda.synchronize()
        times.append((time.perf_counter() - start) / n)
    return harness.median(times)


def run_case(benchmark, bench_options, case: Case, impl: str, pass_name: str):
    train = pass_name != "fwd" or case.kind == "self"
    q, k, v, pad = make_inputs(case, requires_grad=train)
    context = torch.enable_grad() if train else torch.no_grad()
    with context:
        fn = implementation(impl, case, q, k, v, pad)
        if isinstance(fn, str):
            pytest.skip(f"{impl}: {fn}")
        eager = implementation("eager", case, q, k, v, pad)
        step, eager_step = step_for(pass_name, fn, q, k, v), step_for(pass_name, eager, q, k, v)
        for s in (step, eager_step):  # untimed first calls: compile, autotune; then warm-up
            for _ in range(3):
                s()
        n, n_eager = calls_per_round(step), calls_per_round(eager_step)
        rounds = bench_options["rounds"]

        def round_of_calls():
            for _ in range(n):
                step()
            torch.cuda.synchronize()

        benchmark.group = f"{case.id}-{pass_name}"
        benchmark.pedantic(round_of_calls, setup=torch.cuda.synchronize, rounds=rounds,
                           warmup_rounds=bench_options["warmup_rounds"])
        if benchmark.stats is not None:
            seconds = benchmark.stats.stats.median / n
        else:  # --benchmark-disable: pytest-benchmark ran it once without timing
            seconds = time_per_call(step, n, rounds)
        eager_seconds = time_per_call(eager_step, n_eager, rounds)
    flops = useful_flops(case, q, k, pad) * PASS_FACTOR[pass_name]
    row = {"bench": "attention", "case": case.id, "impl": impl, "pass": pass_name, "dtype": str(DTYPE),
           "ms": seconds * 1e3, "tflops": flops / seconds / 1e12, "eager_ms": eager_seconds * 1e3,
           "ratio": eager_seconds / seconds, "calls_per_round": n, "rounds": rounds,
           "chosen": dispatch.explain("cross_attention" if case.kind == "cross" else "qformer_attention").get("chosen")
           if impl == "ours" else impl, "quick": bench_options["quick"]}
    benchmark.extra_info.update(row)
    if bench_options["record"]:
        harness.append_result({**row, "device": harness.device_info("cuda"), "telemetry": harness.gpu_telemetry(0)},
                              bench_options["results_dir"])
    print(f"\n{case.id} {pass_name} {impl}: {seconds * 1e6:.1f} us, {row['tflops']:.1f} TFLOP/s, "
          f"x{row['ratio']:.2f} vs eager")


@pytest.mark.parametrize("impl", SELF_IMPLS)
@pytest.mark.parametrize("pass_name", list(PASS_FACTOR))
@pytest.mark.parametrize("case", SELF_CASES, ids=lambda c: c.id)
def test_self_attention(benchmark, bench_options, case, pass_name, impl):
    run_case(benchmark, bench_options, case, impl, pass_name)


@pytest.mark.parametrize("impl", SELF_IMPLS)
@pytest.mark.parametrize("case", INFER_CASES, ids=lambda c: c.id)
def test_inference_self_attention(benchmark, bench_options, case, impl):
    run_case(benchmark, bench_options, case, impl, "fwd")


@pytest.mark.parametrize("impl", CROSS_IMPLS)
@pytest.mark.parametrize("pass_name", list(PASS_FACTOR))
@pytest.mark.parametrize("case", CROSS_CASES, ids=lambda c: c.id)
def test_cross_attention(benchmark, bench_options, case, pass_name, impl):
    run_case(benchmark, bench_options, case, impl, pass_name)

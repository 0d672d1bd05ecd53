"""kernels/cross_attention.py: every backend against a float64 reference, the refusal reasons,
and the per-shape autotune (CUDA only; its bookkeeping is checked on the CPU with a fake clock).

Two-tier tolerance as in test_qformer_attention.py: error vs the fp64 reference at most twice
plain PyTorch's error in the same precision, plus a floor of a few ulps of the dtype.
"""

import pytest
import torch


import blip2_fast.kernels.cross_attention as ca
import blip2_fast.kernels.dispatch as dispatch

from twotier import CUDA, DEVICE, NAMES, assert_two_tier, fwd_bwd

# (B, H, Lq, Lk, D): 32 queries against ViT-g's 257 tokens, odd lengths, a single key
SHAPES = [
    (2, 3, 32, 257, 64),
    (1, 2, 5, 17, 32),
    (3, 1, 32, 33, 64),
    (2, 2, 7, 1, 32),
]


def make_inputs(B, H, Lq, Lk, D, dtype, device, seed=0):
    gen = torch.Generator().manual_seed(seed)
    q, dout = (torch.randn(B, H, Lq, D, generator=gen).to(device=device, dtype=dtype) for _ in range(2))
    k, v = (torch.randn(B, H, Lk, D, generator=gen).to(device=device, dtype=dtype) for _ in range(2))
    return q, k, v, dout


def check(q, k, v, dout, dtype, fn=None, scale=None):
    tested = fwd_bwd(fn or ca.cross_attention, q, k, v, dout, scale)
    eager = fwd_bwd(ca.cross_attention_ref, q, k, v, dout, scale)
    ref = fwd_bwd(ca.cross_attention_ref, q.double(), k.double(), v.double(), dout.double(), scale)
    assert_two_tier(NAMES, tested, eager, ref, dtype)


@pytest.mark.parametrize("backend", ["triton", "torch"], indirect=True)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "B{}H{}Lq{}Lk{}D{}".format(*s))
def test_fp32_matches_fp64_reference(backend, shape):
    check(*make_inputs(*shape, torch.float32, DEVICE), torch.float32)
    assert dispatch.explain("cross_attention")["chosen"] == backend


@pytest.mark.parametrize("backend", ["triton"], indirect=True)
def test_strided_kv_and_explicit_scale(backend):
    """k, v as head-transposed views of one (B, Lk, 2, H, D) projection of the image tokens."""
    B, H, Lq, Lk, D = 2, 3, 7, 19, 32
    kv = torch.randn(B, Lk, 2, H, D, device=DEVICE)
    k, v = kv[:, :, 0].transpose(1, 2), kv[:, :, 1].transpose(1, 2)
    q, dout = torch.randn(B, H, Lq, D, device=DEVICE), torch.randn(B, H, Lq, D, device=DEVICE)
    check(q, k, v, dout, torch.float32, scale=0.3)


def test_the_check_can_fail():
    q, k, v, dout = make_inputs(1, 2, 5, 17, 32, torch.float32, "cpu")
    with pytest.raises(AssertionError):  # a wrong scale must not pass
        check(q, k, v, dout, torch.float32, fn=lambda *a: ca.cross_attention_ref(*a[:3], 0.2))


# ---------------------------------------------------------------------------------------------
# refusal reasons and dispatch
# ---------------------------------------------------------------------------------------------

def test_backends_on_cpu_say_why_they_refuse(monkeypatch):
    monkeypatch.delenv("BLIP2_FAST_BACKEND", raising=False)
    q, k, v, _ = make_inputs(1, 2, 5, 17, 32, torch.float32, "cpu")
    backends = ca.cross_attention_backends(q, k, v)
    assert list(backends) == ["flash_attn", "xformers", "triton", "torch"]
    assert backends["torch"] == []
    for name in ("flash_attn", "xformers", "triton"):
        assert any("CUDA" in r or "not importable" in r for r in backends[name]), (name, backends[name])
    assert any("dtype" in r for r in backends["flash_attn"])  # fp32 is not a flash-attn dtype
    ca.cross_attention(q, k, v)
    decision = dispatch.explain("cross_attention")
    assert decision["chosen"] == "torch" and set(decision["refused"]) == {"flash_attn", "xformers", "triton"}


def test_flash_attn_refuses_odd_head_dims():
    q, k, v, _ = make_inputs(1, 1, 4, 9, 12, torch.float16, "cpu")
    assert any("head dim 12" in r for r in ca.cross_attention_backends(q, k, v)["flash_attn"])


def test_forced_triton_on_cpu_without_interpreter_refuses(monkeypatch):
    monkeypatch.setenv("BLIP2_FAST_BACKEND", "triton")
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    q, k, v, _ = make_inputs(1, 1, 4, 9, 16, torch.float32, "cpu")
    with pytest.raises(dispatch.BackendRefused, match="CUDA"):
        ca.cross_attention(q, k, v)


def test_bad_shapes_raise():
    q, k, v, _ = make_inputs(2, 2, 4, 9, 16, torch.float32, "cpu")
    with pytest.raises(ValueError, match="same B, H, D"):
        ca.cross_attention(q, k[:1], v[:1])
    with pytest.raises(ValueError, match="same B, H, D"):
        ca.cross_attention(q, k, v[:, :, :5])


# ---------------------------------------------------------------------------------------------
# autotune
# ---------------------------------------------------------------------------------------------

def test_autotune_never_runs_on_cpu(monkeypatch):
    monkeypatch.delenv("BLIP2_FAST_BACKEND", raising=False)
    monkeypatch.setenv("BLIP2_FAST_AUTOTUNE", "1")
    dispatch.clear_decisions("cross_attention")
    q, k, v, _ = make_inputs(1, 2, 5, 17, 32, torch.float32, "cpu")
    assert not ca._autotune_enabled(q)
    timed = []
    monkeypatch.setattr(dispatch, "time_backends", lambda *args: timed.append(args))
    ca.cross_attention(q, k, v)
    assert timed == [] and dispatch.explain("cross_attention")["timings"] is None


def test_autotune_keeps_the_fastest_once_per_key_and_skips_failures(monkeypatch):
    """The registry's timing on made-up backends and a fake clock (each timed run returns its
    time): the fastest wins, a failing backend is recorded, and the key is never timed again."""
    monkeypatch.delenv("BLIP2_FAST_BACKEND", raising=False)
    dispatch.clear_decisions("cross_attention")
    fake_s = {"xformers": 0.2, "triton": 0.15, "torch": 0.3}  # above the timing budget: one run each
    calls = []

    def fake_backend(name):
        def run(q, k, v, scale):
            calls.append(name)
            if name == "flash_attn":
                raise RuntimeError("no kernel image for this device")
            return fake_s[name]
        return run

    for name in ca._RUN:
        monkeypatch.setitem(ca._RUN, name, fake_backend(name))
    monkeypatch.setattr(ca, "cross_attention_backends", lambda q, k, v: {name: [] for name in ca._RUN})
    monkeypatch.setattr(ca, "_autotune_enabled", lambda q: True)
    monkeypatch.setattr(dispatch, "_clock", lambda run, cuda: (run(),) * 2)
    q, k, v, _ = make_inputs(1, 2, 5, 17, 32, torch.float32, "cpu")
    ca.cross_attention(q, k, v)
    assert calls == ["flash_attn", "xformers", "triton", "torch", "triton"]  # each timed once, then the call
    decision = dispatch.explain("cross_attention", ca.cross_attention_key(q, k, v))
    assert decision["chosen"] == "triton"
    assert decision["timings"]["flash_attn"] == "failed: no kernel image for this device"
    assert decision["refused"]["flash_attn"] == ["failed: no kernel image for this device"]
    assert any("measured slower" in r for r in decision["refused"]["torch"])
    calls.clear()
    ca.cross_attention(q, k, v)
    assert calls == ["triton"]


def test_autotune_can_be_switched_off(monkeypatch):
    monkeypatch.setenv("BLIP2_FAST_AUTOTUNE", "0")
    q = torch.empty(1, 1, 1, 16)
    assert not ca._autotune_enabled(q)


# ---------------------------------------------------------------------------------------------
# CUDA only: every able backend in fp16/bf16, and the autotune picking one
# ---------------------------------------------------------------------------------------------

needs_cuda = pytest.mark.skipif(not CUDA, reason="fp16/bf16 backends are checked on CUDA only")


@needs_cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("shape", [(16, 12, 32, 257, 64), (3, 5, 32, 677, 64), (2, 3, 7, 17, 128)],
                         ids=lambda s: "B{}H{}Lq{}Lk{}D{}".format(*s))
def test_every_able_backend_on_cuda(shape, dtype, monkeypatch):
    monkeypatch.delenv("BLIP2_FAST_BACKEND", raising=False)
    q, k, v, dout = make_inputs(*shape, dtype, "cuda")
    backends = ca.cross_attention_backends(q, k, v)
    assert backends["triton"] == [] and backends["torch"] == []
    for name, reasons in backends.items():
        if not reasons:
            check(q, k, v, dout, dtype, fn=ca._RUN[name], scale=shape[-1] ** -0.5)


@needs_cuda
def test_autotune_on_cuda_caches_a_winner(monkeypatch):
    monkeypatch.delenv("BLIP2_FAST_BACKEND", raising=False)
    monkeypatch.setenv("BLIP2_FAST_AUTOTUNE", "1")
    dispatch.clear_decisions("cross_attention")
    q, k, v, dout = make_inputs(4, 12, 32, 257, 64, torch.bfloat16, "cuda")
    check(q, k, v, dout, torch.bfloat16)
    decision, = dispatch.decisions("cross_attention")
    assert decision["key"][-2] is True and decision["key"][-1] == "on"  # needs grad, timed
    assert decision["timings"] and decision["chosen"] == min(
        (n for n, t in decision["timings"].items() if not isinstance(t, str)), key=decision["timings"].get)
    assert dispatch.explain("cross_attention") == decision

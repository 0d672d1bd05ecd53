"""The dispatch registry (kernels/dispatch.py) as the three ops use it: explain() reports what
served a call, cached or fresh; a forced family that refuses names every reason; refusal reasons
are computed once per key; one registry cache serves every op; a refusal is logged once; the
shared timing helper; every Triton/CUDA launch goes through the device helper."""
import contextlib
import logging
import math
import types
from collections import Counter

import pytest
import torch

import blip2_fast.kernels.cross_attention as ca
import blip2_fast.kernels.dispatch as dispatch
import blip2_fast.kernels.int8_matmul as im
import blip2_fast.kernels.qformer_attention as qa
import blip2_fast.kernels.triton_support as ts

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
OPS = ("qformer_attention", "cross_attention", "int8_linear")
ON_CPU = "tensor on cpu (Triton needs CUDA"
needs_triton = pytest.mark.skipif(ts.TRITON_IMPORT_ERROR is not None, reason=str(ts.TRITON_IMPORT_ERROR))


@pytest.fixture(autouse=True)
def _fresh(monkeypatch):
    monkeypatch.delenv("BLIP2_FAST_BACKEND", raising=False)
    dispatch.clear_decisions()
    yield
    dispatch.clear_decisions()


@pytest.fixture
def interpreter(monkeypatch):
    """Forced Triton that can run here: compiled on CUDA, else the interpreter (tests/conftest.py)."""
    if ts.TRITON_IMPORT_ERROR is not None:
        pytest.skip(ts.TRITON_IMPORT_ERROR)
    if not CUDA:
        monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setenv("BLIP2_FAST_BACKEND", "triton")


def qkv(B, H, L, D, dtype=torch.float32, Lk=None, device="cpu"):
    g = torch.Generator().manual_seed(1000 * B + 10 * L + D)
    q = torch.randn(B, H, L, D, generator=g).to(device, dtype)
    k, v = (torch.randn(B, H, Lk or L, D, generator=g).to(device, dtype) for _ in range(2))
    return q, k, v


def int8_inputs(m, n, k, group=None, dtype=torch.float32, device="cpu"):
    g = torch.Generator().manual_seed(m * n + k)
    q, s = im.quantize_weight(torch.randn(n, k, generator=g) / math.sqrt(k), group)
    return torch.randn(m, k, generator=g).to(device, dtype), q.to(device), s.to(device)


def attention_call(op, shape, dtype):
    """(a call of the attention op on CPU tensors of `dtype`, its dispatch key)."""
    B, H, L, D = shape
    if op == "qformer_attention":
        q, k, v = qkv(B, H, L, D, dtype)
        return (lambda: qa.qformer_attention(q, k, v, "causal", 2)), qa.qformer_attention_key(q, k, v)
    q, k, v = qkv(B, H, 3, D, dtype, Lk=L)
    return (lambda: ca.cross_attention(q, k, v)), ca.cross_attention_key(q, k, v)


# ------------------------------------------------------------------------------------ explain

@pytest.mark.parametrize("op", ["qformer_attention", "cross_attention"])
@pytest.mark.parametrize("shape", [(1, 2, 5, 17), (3, 1, 17, 33), (2, 3, 7, 123)],
                         ids=lambda s: "B{}H{}L{}D{}".format(*s))
def test_explain_reports_the_decision_behind_each_attention_call(op, shape):
    """fp32 and fp64 calls have different keys (Triton also refuses fp64); after a cached fp32
    call, explain(op) is the fp32 decision, not the latest fresh one (fp64)."""
    call32, key32 = attention_call(op, shape, torch.float32)
    call64, key64 = attention_call(op, shape, torch.float64)
    call32()
    call64()
    call32()  # served from the cache
    assert key32 != key64
    latest = dispatch.explain(op)
    assert latest == dispatch.explain(op, key32)
    assert latest["key"] == key32 and latest["chosen"] == "torch"
    assert not any("dtype" in r for r in latest["refused"]["triton"])
    assert any("dtype torch.float64" in r for r in dispatch.explain(op, key64)["refused"]["triton"])
    assert dispatch.explain(op, ("no such key",)) == {}


@pytest.mark.parametrize("m,n,k", [(1, 37, 123), (3, 70, 257), (17, 33, 96)])
def test_explain_key_names_the_int8_backend_that_ran(monkeypatch, m, n, k):
    served = []
    for name, run in list(im._RUNNERS.items()):
        monkeypatch.setitem(im._RUNNERS, name, (lambda name, run: lambda *a: served.append(name) or run(*a))(name, run))
    x32, w, s = int8_inputs(m, n, k)
    x16 = x32.to(torch.bfloat16)
    key32, key16 = im.int8_linear_key(x32, w, s), im.int8_linear_key(x16, w, s)
    im.int8_linear(x32, w, s)  # fresh (maybe timed: several backends run)
    im.int8_linear(x16, w, s)
    for x, key in ((x32, key32), (x16, key16), (x32, key32)):  # cached: exactly the chosen backend runs
        served.clear()
        im.int8_linear(x, w, s)
        assert served == [dispatch.explain("int8_linear", key)["chosen"]]
        assert dispatch.explain("int8_linear")["key"] == key


# ---------------------------------------------------------------------------- forced refusals

@pytest.mark.parametrize("m,n,k", [(1, 5, 3), (17, 37, 123)])
def test_forced_triton_without_interpreter_names_every_triton_backend(monkeypatch, m, n, k):
    monkeypatch.setenv("BLIP2_FAST_BACKEND", "triton")
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    x, w, s = int8_inputs(m, n, k)
    with pytest.raises(dispatch.BackendRefused) as err:
        im.int8_linear(x, w, s)
    reason = ts.TRITON_IMPORT_ERROR or ON_CPU
    assert f"triton:splitk: {reason}" in str(err.value) and f"triton:gemm: {reason}" in str(err.value)
    assert ("M = 17 > 16" in str(err.value)) == (m > 16)


@pytest.mark.parametrize("m", [1, 5, 19])
def test_forced_triton_refusing_a_group_size_says_so_for_each_backend(interpreter, m):
    x, w, s = int8_inputs(m, 24, 40, group=8, device=DEVICE)
    with pytest.raises(dispatch.BackendRefused) as err:
        im.int8_linear(x, w, s)
    for name in ("triton:splitk", "triton:gemm"):
        assert f"{name}: group size 8 is not a multiple of 16" in str(err.value)


@pytest.mark.parametrize("op", ["qformer_attention", "cross_attention"])
def test_forced_triton_attention_names_its_reasons(interpreter, op):
    call, _ = attention_call(op, (1, 2, 5, 17), torch.float64)
    with pytest.raises(dispatch.BackendRefused, match=r"every triton backend refused: triton: .*dtype torch\.float64"):
        call()


# ------------------------------------------------------------------- reasons once, one cache

@pytest.mark.parametrize("D", [5, 17, 123])
def test_qformer_reasons_are_computed_once_per_key(monkeypatch, D):
    calls = []
    real = qa.qformer_attention_backends
    monkeypatch.setattr(qa, "qformer_attention_backends", lambda *a: calls.append(a) or real(*a))
    for B, L in ((1, 5), (3, 17), (2, 9)):  # batch and length are not part of the key
        q, k, v = qkv(B, 2, L, D)
        for mode in qa.MODES:
            qa.qformer_attention(q, k, v, mode, 2)
    assert len(calls) == 1
    q, k, v = qkv(1, 2, 5, D, torch.float64)  # a new key: decided once more
    qa.qformer_attention(q, k, v, "causal", 2)
    qa.qformer_attention(q, k, v, "unimodal", 2)
    assert len(calls) == 2
    monkeypatch.setenv("BLIP2_FAST_BACKEND", "torch")  # the environment is part of the key
    qa.qformer_attention(q, k, v, "causal", 2)
    assert len(calls) == 3 and dispatch.explain("qformer_attention")["forced"] == "torch"


def test_one_registry_cache_serves_all_three_ops(monkeypatch):
    counts = Counter()

    def counted(op, fn):
        return lambda *a: counts.update([op]) or fn(*a)

    monkeypatch.setattr(qa, "qformer_attention_backends", counted("qformer_attention", qa.qformer_attention_backends))
    monkeypatch.setattr(ca, "cross_attention_backends", counted("cross_attention", ca.cross_attention_backends))
    monkeypatch.setattr(im, "_backends", counted("int8_linear", im._backends))
    q, k, v = qkv(2, 3, 7, 17)
    x, w, s = int8_inputs(3, 37, 123)

    def call_all():
        qa.qformer_attention(q, k, v, "unimodal", 3)
        ca.cross_attention(q[:, :, :5], k, v)
        im.int8_linear(x, w, s)

    call_all()
    call_all()
    assert counts == {op: 1 for op in OPS}
    assert sorted(d["op"] for d in dispatch.decisions()) == sorted(OPS)
    for op in OPS:
        assert dispatch.decisions(op) == [dispatch.explain(op)]
    dispatch.clear_decisions()  # one call forgets the decisions of every op
    assert dispatch.decisions() == [] and all(dispatch.explain(op) == {} for op in OPS)
    call_all()
    assert counts == {op: 2 for op in OPS}


@needs_triton
def test_a_refusal_is_logged_once_at_debug_for_the_device_else_info(monkeypatch, caplog):
    monkeypatch.setattr(dispatch, "_logged", set())
    caplog.set_level(logging.DEBUG, logger="blip2_fast.kernels")
    for dtype in (torch.float32, torch.float64):
        for D in (5, 17):  # two keys, the same reasons: one record
            q, k, v = qkv(1, 2, 5, D, dtype)
            qa.qformer_attention(q, k, v, "causal", 2)
            qa.qformer_attention(q, k, v, "causal", 2)
    records = [r for r in caplog.records if r.getMessage().startswith("qformer_attention: backend triton refused")]
    assert [r.levelno for r in records] == [logging.DEBUG, logging.INFO]
    assert ON_CPU in records[0].getMessage() and "dtype torch.float64" in records[1].getMessage()


# ------------------------------------------------------------------------------------- timing

def test_time_backends_keeps_the_fastest_and_reports_failures(monkeypatch):
    counts = Counter()

    def run(name, seconds):
        counts[name] += 1
        if seconds is None:
            raise RuntimeError("no kernel for this input")
        return seconds

    monkeypatch.setattr(dispatch, "_clock", lambda fn, cuda: (fn(),) * 2)
    runs = {"fast": lambda: run("fast", 0.001), "slow": lambda: run("slow", 0.004),
            "broken": lambda: run("broken", None)}
    timing = dispatch.time_backends("toy", runs, torch.device("cpu"))
    assert timing.winner == "fast" and timing.output == 0.001
    assert timing.seconds == {"fast": 0.001, "slow": 0.004, "broken": "failed: no kernel for this input"}
    # fast: its first call, then three more within the budget; slow: 3x the best on its first call
    assert counts == {"fast": 4, "slow": 1, "broken": 1}
    with pytest.raises(RuntimeError, match="every backend failed"):
        dispatch.time_backends("toy", {"broken": runs["broken"]}, torch.device("cpu"))


# ------------------------------------------------------------------------------ launch device

def test_on_device_selects_the_tensors_cuda_device():
    assert isinstance(ts.on_device(torch.empty(1)), contextlib.nullcontext)
    guard = ts.on_device(types.SimpleNamespace(device=torch.device("cuda", 1)))
    assert isinstance(guard, torch.cuda.device) and guard.idx == 1


def test_every_launcher_runs_under_the_device_helper(interpreter, monkeypatch):
    entered = []

    def recording(t):
        entered.append(t.device)
        return ts.on_device(t)

    monkeypatch.setattr(qa, "on_device", recording)
    monkeypatch.setattr(im, "on_device", recording)
    q, k, v = (t.requires_grad_() for t in qkv(1, 2, 5, 17, device=DEVICE))
    qa.qformer_attention(q, k, v, "causal", 2).sum().backward()  # forward and backward launches
    x, w, s = int8_inputs(3, 24, 40, device=DEVICE)
    im.int8_linear_triton_splitk(x, w, s)
    im.int8_linear_triton_gemm(x, w, s)
    assert entered == [q.device] * 4


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA devices")
def test_launches_on_the_second_gpu_while_the_first_is_current(monkeypatch):
    monkeypatch.setenv("BLIP2_FAST_BACKEND", "triton")
    torch.cuda.set_device(0)
    q, k, v = qkv(2, 3, 9, 17, device="cuda:1")
    out = qa.qformer_attention(q, k, v, "causal", 4)
    ref = qa.qformer_attention_ref(q.double(), k.double(), v.double(), "causal", 4)
    assert out.device == q.device and (out.double() - ref).abs().max().item() < 1e-4
    x, w, s = int8_inputs(3, 37, 123, device="cuda:1")
    y = im.int8_linear(x, w, s)
    assert (y.double().cpu() - im.int8_linear_ref(x.cpu(), w.cpu(), s.cpu())).abs().max().item() < 1e-3
    assert torch.cuda.current_device() == 0


# ------------------------------------------------------------------------------ tile helpers

@pytest.mark.parametrize("n,expected", [(0, 1), (1, 1), (2, 2), (3, 4), (5, 8), (17, 32), (123, 128), (257, 512)])
def test_next_power_of_2(n, expected):
    assert ts.next_power_of_2(n) == expected


@pytest.mark.parametrize("group,want,expected", [(0, 64, 64), (16, 64, 16), (48, 64, 16), (96, 128, 32), (8, 32, 16)])
def test_largest_pow2_block_dividing(group, want, expected):
    assert ts.largest_pow2_block_dividing(group, want) == expected

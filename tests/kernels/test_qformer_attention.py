"""kernels/qformer_attention.py against a float64 reference built from an explicit mask.

The Triton kernel runs compiled where CUDA is present and under TRITON_INTERPRET=1 on the CPU
(tests/conftest.py sets it before triton is imported); interpreter cases are kept small
(B, H <= 3). Two-tier tolerance (flash-attention's tests): the error of the tested path against
the fp64 reference is at most twice the error of plain PyTorch eager in the same precision,
plus a floor of a few units in the last place of that dtype.
"""
import math

import pytest
import torch


import blip2_fast.kernels.qformer_attention as qa
import blip2_fast.kernels.dispatch as dispatch

from twotier import CUDA, DEVICE, NAMES, assert_two_tier, fwd_bwd

# (B, H, num_query, T, D): text lengths 0, 1, 17, 32, 35; query counts 32 and odd; odd B and H
SHAPES = [
    (2, 3, 32, 32, 64),
    (3, 1, 5, 17, 32),
    (1, 2, 7, 0, 64),
    (3, 2, 32, 1, 64),  # a text-only row block whose only key tile holds one key
    (2, 1, 32, 35, 32),
]


# ---------------------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------------------

def make_padding(B, num_query, T, kind, device):
    """None; "text": ragged text lengths, batch row 0 with its text fully padded; "all": batch row 0
    with every key padded (queries too) and row 1 (if any) with its text fully padded."""
    if kind is None:
        return None
    pad = torch.ones(B, num_query + T, dtype=torch.bool)
    gen = torch.Generator().manual_seed(B * 1000 + T)
    for b in range(B):
        valid = 0 if b == 0 else int(torch.randint(1, T + 1, (1,), generator=gen)) if T else 0
        pad[b, num_query + valid:] = False
    if kind == "all":
        pad[0] = False
        if B > 1:
            pad[1, num_query:] = False
    return pad.to(device)


def make_inputs(B, H, num_query, T, D, dtype, device, seed=0):
    gen = torch.Generator().manual_seed(seed)
    L = num_query + T
    q, k, v, dout = (torch.randn(B, H, L, D, generator=gen).to(device=device, dtype=dtype) for _ in range(4))
    return q, k, v, dout


def reference_fp64(q, k, v, dout, *args):
    return fwd_bwd(qa.qformer_attention_ref, q.double(), k.double(), v.double(), dout.double(), *args)


def check_against_reference(B, H, num_query, T, D, mode, pad_kind, dtype, device, fn=None):
    q, k, v, dout = make_inputs(B, H, num_query, T, D, dtype, device)
    pad = make_padding(B, num_query, T, pad_kind, device)
    tested = fwd_bwd(fn or qa.qformer_attention, q, k, v, dout, mode, num_query, pad)
    eager = fwd_bwd(qa.qformer_attention_ref, q, k, v, dout, mode, num_query, pad)
    ref = reference_fp64(q, k, v, dout, mode, num_query, pad)
    assert_two_tier(NAMES, tested, eager, ref, dtype)
    return tested, ref


# ---------------------------------------------------------------------------------------------
# the mask itself, against the rules of the module docstring written out as loops
# ---------------------------------------------------------------------------------------------

def table_mask(mode, num_query, L, pad):
    m = torch.zeros(pad.shape[0], L, L, dtype=torch.bool)
    for b in range(pad.shape[0]):
        for i in range(L):
            for j in range(L):
                i_query, j_query = i < num_query, j < num_query
                if mode == "unimodal":
                    ok = i_query == j_query
                elif mode == "causal":
                    ok = j_query if i_query else (j_query or j <= i)
                else:
                    ok = True
                m[b, i, j] = ok and bool(pad[b, j])
    return m


@pytest.mark.parametrize("mode", qa.MODES)
@pytest.mark.parametrize("num_query,T", [(3, 4), (0, 5), (4, 0)])
def test_mask_matches_the_table(mode, num_query, T):
    L = num_query + T
    pad = torch.ones(2, L, dtype=torch.int64)
    pad[1, L - 2:] = 0
    expected = table_mask(mode, num_query, L, pad)
    assert torch.equal(qa.qformer_mask(mode, num_query, L, pad)[:, 0], expected)
    assert torch.equal(qa.qformer_mask(mode, num_query, L)[0, 0], table_mask(mode, num_query, L, torch.ones(1, L))[0])


# ---------------------------------------------------------------------------------------------
# Triton kernel and torch path against the fp64 reference, fp32
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("backend", ["triton", "torch"], indirect=True)
@pytest.mark.parametrize("pad_kind", [None, "text"])
@pytest.mark.parametrize("mode", qa.MODES)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "B{}H{}Q{}T{}D{}".format(*s))
def test_fp32_matches_fp64_reference(backend, shape, mode, pad_kind):
    check_against_reference(*shape, mode, pad_kind, torch.float32, DEVICE)
    assert dispatch.explain("qformer_attention")["chosen"] == backend


@pytest.mark.parametrize("backend", ["triton", "torch"], indirect=True)
@pytest.mark.parametrize("mode", qa.MODES)
def test_fully_masked_rows_give_zeros_not_nan(backend, mode):
    B, H, NQ, T, D = 3, 2, 5, 6, 32
    q, k, v, dout = make_inputs(B, H, NQ, T, D, torch.float32, DEVICE)
    pad = make_padding(B, NQ, T, "all", DEVICE)  # batch 0: no key at all; batch 1: no text key
    out, dq, dk, dv = fwd_bwd(qa.qformer_attention, q, k, v, dout, mode, NQ, pad)
    for t in (out, dq, dk, dv):
        assert torch.isfinite(t).all()
    # batch 0: every row is fully masked; nothing attends any key
    for t in (out, dq, dk, dv):
        assert torch.count_nonzero(t[0]) == 0
    # batch 1: padded text keys receive no gradient; in unimodal mode the text rows see no key
    assert torch.count_nonzero(dk[1, :, NQ:]) == 0 and torch.count_nonzero(dv[1, :, NQ:]) == 0
    if mode == "unimodal":
        assert torch.count_nonzero(out[1, :, NQ:]) == 0 and torch.count_nonzero(dq[1, :, NQ:]) == 0
    else:
        assert torch.count_nonzero(out[1, :, NQ:]) > 0  # text rows still see the queries
    ref = reference_fp64(q, k, v, dout, mode, NQ, pad)
    eager = fwd_bwd(qa.qformer_attention_ref, q, k, v, dout, mode, NQ, pad)
    assert_two_tier(NAMES, [out, dq, dk, dv], eager, ref, torch.float32)


@pytest.mark.parametrize("backend", ["triton"], indirect=True)
@pytest.mark.parametrize("D", [24, 16])
def test_head_dim_not_a_power_of_two_or_minimal(backend, D):
    check_against_reference(2, 1, 7, 9, D, "causal", "text", torch.float32, DEVICE)


@pytest.mark.parametrize("backend", ["triton", "torch"], indirect=True)
def test_strided_inputs_and_output_layout(backend):
    """q, k, v as head-transposed views of one fused (B, L, 3, H, D) projection; the output is a
    (B, H, L, D) view whose transpose(1, 2) is contiguous, so merging the heads is free."""
    B, H, NQ, T, D = 2, 3, 7, 9, 32
    L = NQ + T
    qkv = torch.randn(B, L, 3, H, D, device=DEVICE)
    q, k, v = (qkv[:, :, i].transpose(1, 2) for i in range(3))
    dout = torch.randn(B, H, L, D, device=DEVICE)
    pad = make_padding(B, NQ, T, "text", DEVICE)
    tested = fwd_bwd(qa.qformer_attention, q, k, v, dout, "causal", NQ, pad)
    eager = fwd_bwd(qa.qformer_attention_ref, q, k, v, dout, "causal", NQ, pad)
    assert_two_tier(NAMES, tested, eager, reference_fp64(q, k, v, dout, "causal", NQ, pad), torch.float32)
    if backend == "triton":
        out = qa.qformer_attention(q, k, v, "causal", NQ, pad)
        assert out.transpose(1, 2).is_contiguous()


@pytest.mark.parametrize("backend", ["triton", "torch"], indirect=True)
def test_stride0_output_grad_and_broadcast_padding(backend):
    """out.sum() gives a stride-0 gradient; a (1, L) int padding row broadcasts over the batch."""
    B, H, NQ, T, D = 3, 1, 5, 4, 16
    q, k, v, _ = make_inputs(B, H, NQ, T, D, torch.float32, DEVICE)
    pad = torch.tensor([[1] * (NQ + 2) + [0] * (T - 2)], device=DEVICE)
    dout = torch.ones(B, H, NQ + T, D, device=DEVICE).expand(B, H, NQ + T, D)
    tested = fwd_bwd(qa.qformer_attention, q, k, v, dout, "bidirectional", NQ, pad)
    eager = fwd_bwd(qa.qformer_attention_ref, q, k, v, dout, "bidirectional", NQ, pad)
    assert_two_tier(NAMES, tested, eager, reference_fp64(q, k, v, dout, "bidirectional", NQ, pad), torch.float32)


@pytest.mark.parametrize("backend", ["triton"], indirect=True)
def test_explicit_scale(backend):
    q, k, v, dout = make_inputs(2, 2, 5, 3, 32, torch.float32, DEVICE)
    tested = fwd_bwd(qa.qformer_attention, q, k, v, dout, "unimodal", 5, None, 0.37)
    ref = reference_fp64(q, k, v, dout, "unimodal", 5, None, 0.37)
    eager = fwd_bwd(qa.qformer_attention_ref, q, k, v, dout, "unimodal", 5, None, 0.37)
    assert_two_tier(NAMES, tested, eager, ref, torch.float32)


def test_the_check_can_fail():
    """The two-tier check rejects a result computed with the wrong mode (so the tests can fail)."""
    q, k, v, dout = make_inputs(2, 2, 5, 6, 32, torch.float32, "cpu")
    wrong = fwd_bwd(qa.qformer_attention_ref, q, k, v, dout, "bidirectional", 5, None)
    eager = fwd_bwd(qa.qformer_attention_ref, q, k, v, dout, "causal", 5, None)
    with pytest.raises(AssertionError):
        assert_two_tier(NAMES, wrong, eager, reference_fp64(q, k, v, dout, "causal", 5, None), torch.float32)


# ---------------------------------------------------------------------------------------------
# parity of the torch path (the CPU default) with transformers' fp32 eager attention
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("backend", ["torch", "triton"], indirect=True)
@pytest.mark.parametrize("mode", qa.MODES)
def test_parity_with_transformers_qformer_attention(backend, mode):
    blip_2 = pytest.importorskip("transformers.models.blip_2.modeling_blip_2")
    from transformers import Blip2QFormerConfig

    B, NQ, T, H, D = 2, 7, 9, 2, 32
    config = Blip2QFormerConfig(hidden_size=H * D, num_attention_heads=H, intermediate_size=4 * H * D,
                                num_hidden_layers=1, attention_probs_dropout_prob=0.0)
    config._attn_implementation = "eager"
    torch.manual_seed(0)
    module = blip_2.Blip2QFormerMultiHeadAttention(config).eval()
    hidden = torch.randn(B, NQ + T, H * D)
    pad = make_padding(B, NQ, T, "text", "cpu")
    pad[0, NQ:NQ + 2] = True  # every row keeps a key: the additive mask's fully masked rows differ by design
    mask = qa.qformer_mask(mode, NQ, NQ + T, pad)
    additive = (~mask).float() * torch.finfo(torch.float32).min  # transformers' extended attention mask
    with torch.no_grad():
        expected, _ = module(hidden, attention_mask=additive)
        q, k, v = (lin(hidden).view(B, NQ + T, H, D).transpose(1, 2) for lin in (module.query, module.key, module.value))
        ours = qa.qformer_attention(q, k, v, mode, NQ, pad).transpose(1, 2).reshape(B, NQ + T, H * D)
    assert (ours - expected).abs().max().item() <= 1e-4


# ---------------------------------------------------------------------------------------------
# dispatch: refusals name their reasons
# ---------------------------------------------------------------------------------------------

def test_cpu_tensors_take_the_torch_path_and_say_why(monkeypatch):
    monkeypatch.delenv("BLIP2_FAST_BACKEND", raising=False)
    q, k, v, _ = make_inputs(1, 2, 5, 3, 32, torch.float32, "cpu")
    backends = qa.qformer_attention_backends(q, k, v)
    assert list(backends) == ["triton", "torch"] and backends["torch"] == []
    assert any("CUDA" in reason for reason in backends["triton"])
    qa.qformer_attention(q, k, v, "causal", 5)
    decision = dispatch.explain("qformer_attention")
    assert decision["chosen"] == "torch" and decision["refused"]["triton"]


def test_forced_triton_on_cpu_without_interpreter_refuses(monkeypatch):
    monkeypatch.setenv("BLIP2_FAST_BACKEND", "triton")
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    q, k, v, _ = make_inputs(1, 1, 5, 3, 32, torch.float32, "cpu")
    with pytest.raises(dispatch.BackendRefused, match="CUDA"):
        qa.qformer_attention(q, k, v, "causal", 5)


@pytest.mark.parametrize("backend", ["triton"], indirect=True)
def test_forced_triton_refuses_large_head_dim_with_a_reason(backend):
    q, k, v, _ = make_inputs(1, 1, 4, 0, 256, torch.float32, DEVICE)
    with pytest.raises(dispatch.BackendRefused, match="head dim 256"):
        qa.qformer_attention(q, k, v, "bidirectional", 4)


def test_invalid_inputs_raise_clear_errors():
    q, k, v, _ = make_inputs(2, 1, 4, 3, 16, torch.float32, "cpu")
    with pytest.raises(ValueError, match="mode"):
        qa.qformer_attention(q, k, v, "full", 4)
    with pytest.raises(ValueError, match="num_query"):
        qa.qformer_attention(q, k, v, "causal", 8)
    with pytest.raises(ValueError, match="key_padding_mask"):
        qa.qformer_attention(q, k, v, "causal", 4, torch.ones(2, 6, dtype=torch.bool))
    with pytest.raises(ValueError, match="dtype"):
        qa._qformer_attn_fwd(q, k.double(), v, 1, 4, None, 0.25)
    with pytest.raises(ValueError, match="contiguous"):
        qa._qformer_attn_fwd(q, k.transpose(-1, -2), v, 1, 4, None, 0.25)
    with pytest.raises(ValueError, match="same length"):
        qa._qformer_attn_fwd(q, k[:, :, :5], v[:, :, :5], 1, 4, None, 0.25)


# ---------------------------------------------------------------------------------------------
# CUDA only: low precision, larger shapes, int64 offsets
# ---------------------------------------------------------------------------------------------

needs_cuda = pytest.mark.skipif(not CUDA, reason="fp16/bf16 kernels are checked compiled on CUDA only")


@needs_cuda
@pytest.mark.parametrize("backend", ["triton", "torch"], indirect=True)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("pad_kind", [None, "text"])
@pytest.mark.parametrize("mode", qa.MODES)
@pytest.mark.parametrize("shape", [(8, 12, 32, 32, 64), (5, 3, 7, 35, 128), (3, 12, 32, 0, 64), (2, 4, 32, 200, 64)],
                         ids=lambda s: "B{}H{}Q{}T{}D{}".format(*s))
def test_low_precision_on_cuda(backend, shape, mode, pad_kind, dtype):
    check_against_reference(*shape, mode, pad_kind, dtype, "cuda")


@needs_cuda
@pytest.mark.parametrize("backend", ["triton"], indirect=True)
def test_int64_offsets_on_cuda(backend):
    """More than 2**31 elements per tensor: offsets computed in int32 would wrap."""
    B, H, NQ, T, D = 8200, 16, 64, 64, 128
    if torch.cuda.get_device_properties(0).total_memory < 48 * 2**30:
        pytest.skip("needs ~30 GB of GPU memory")
    assert B * H * (NQ + T) * D > 2**31
    q, k, v = (torch.randn(B, H, NQ + T, D, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    with torch.no_grad():
        out = qa.qformer_attention(q, k, v, "causal", NQ)
        last = slice(B - 2, B)
        ref = qa.qformer_attention_ref(q[last].double(), k[last].double(), v[last].double(), "causal", NQ)
    assert (out[last].double() - ref).abs().max().item() < 2e-2
    del q, k, v, out
    torch.cuda.empty_cache()


def test_default_scale_is_inverse_sqrt_head_dim():
    q = torch.randn(1, 1, 3, 16)
    assert qa._default_scale(q, None) == pytest.approx(1 / math.sqrt(16))

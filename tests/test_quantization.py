"""blip2_fast.quantization: quantize_, Int8Linear / Int8Embedding, the checkpoint format and the
streaming-loader helpers, on a toy decoder built here (quantize_ is generic over nn.Linear)."""
from __future__ import annotations

import math
import sys

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from blip2_fast.kernels import int8_matmul as im
from blip2_fast.quantization import (Int8Embedding, Int8Linear, Int8StateDictError, Int8WeightOnlyConfig,
                                     QuantizationError, check_int8_state_dict, quantize_,
                                     quantize_tensor_for_loading)

VOCAB, WIDTH, FFN = 96, 64, 160


class Layer(nn.Module):
    def __init__(self):
        super().__init__()
        self.self_attn = nn.ModuleDict({n: nn.Linear(WIDTH, WIDTH) for n in ("q_proj", "k_proj", "v_proj", "out_proj")})
        self.fc1 = nn.Linear(WIDTH, FFN)
        self.fc2 = nn.Linear(FFN, WIDTH, bias=False)
        self.norm = nn.LayerNorm(WIDTH)

    def forward(self, h):
        a = self.self_attn
        q, k, v = a["q_proj"](h), a["k_proj"](h), a["v_proj"](h)
        att = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(WIDTH), dim=-1) @ v
        h = self.norm(h + a["out_proj"](att))
        return h + self.fc2(F.gelu(self.fc1(h)))


class ToyDecoder(nn.Module):
    """OPT-like: token + position embeddings, 2 layers, lm_head tied to the token embedding."""

    def __init__(self, device=None):
        super().__init__()
        with torch.device(device or "cpu"):
            self.embed_tokens = nn.Embedding(VOCAB, WIDTH)
            self.embed_positions = nn.Embedding(32, WIDTH)
            self.layers = nn.ModuleList([Layer() for _ in range(2)])
            self.lm_head = nn.Linear(WIDTH, VOCAB, bias=False)
        self.lm_head.weight = self.embed_tokens.weight

    def forward(self, ids):
        h = self.embed_tokens(ids) + self.embed_positions(torch.arange(ids.shape[-1]))
        for layer in self.layers:
            h = layer(h)
        return self.lm_head(h)


@pytest.fixture
def toy():
    torch.manual_seed(0)
    return ToyDecoder().eval()


def sqnr_db(y, ref) -> float:
    y, ref = y.detach(), ref.detach().double()
    return 10 * math.log10(float((ref ** 2).sum()) / float(((y.double() - ref) ** 2).sum()))


def linears(model):
    return {n: type(m).__name__ for n, m in model.named_modules() if isinstance(m, (nn.Linear, Int8Linear, nn.Embedding, Int8Embedding))}


# --------------------------------------------------------------------------------------- quantize_

def test_default_quantizes_every_linear_but_lm_head(toy):
    ids = torch.randint(0, VOCAB, (2, 12))
    with torch.no_grad():
        ref = toy(ids)
        quantize_(toy, Int8WeightOnlyConfig())
        out = toy(ids)
    kinds = linears(toy)
    assert kinds["lm_head"] == "Linear" and kinds["embed_tokens"] == "Embedding"
    assert kinds["embed_positions"] == "Embedding"
    quantized = [n for n, k in kinds.items() if k == "Int8Linear"]
    assert len(quantized) == 12 and all(n.startswith("layers.") for n in quantized)
    assert toy.layers[0].fc2.bias is None and toy.layers[0].fc1.bias is not None
    assert sqnr_db(out, ref) >= 30.0  # end to end through 12 quantised layers


def test_include_lm_head_and_embeddings_keeps_tied_weights_tied(toy):
    ids = torch.randint(0, VOCAB, (1, 9))
    with torch.no_grad():
        ref = toy(ids)
        quantize_(toy, Int8WeightOnlyConfig(include_lm_head=True, include_embeddings=True))
        out = toy(ids)
    assert isinstance(toy.lm_head, Int8Linear) and isinstance(toy.embed_tokens, Int8Embedding)
    assert toy.lm_head.weight is toy.embed_tokens.weight
    assert toy.lm_head.weight_scale is toy.embed_tokens.weight_scale
    assert isinstance(toy.embed_positions, Int8Embedding)
    assert sqnr_db(out, ref) >= 25.0


def test_filter_fn_and_group_size(toy):
    quantize_(toy, Int8WeightOnlyConfig(group_size=32), filter_fn=lambda m, fqn: fqn.endswith("fc1"))
    kinds = linears(toy)
    assert [n for n, k in kinds.items() if k == "Int8Linear"] == ["layers.0.fc1", "layers.1.fc1"]
    assert toy.layers[0].fc1.weight_scale.shape == (FFN, WIDTH // 32)


def test_sequential_and_shared_module():
    shared = nn.Linear(16, 16)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), shared, shared, nn.Linear(16, 4))
    x = torch.randn(5, 8)
    ref = model(x).detach()
    quantize_(model)
    assert model[2] is model[3] and isinstance(model[2], Int8Linear)
    with torch.no_grad():
        assert sqnr_db(model(x), ref) >= 30.0


def test_multihead_attention_out_proj_is_left_alone():
    model = nn.ModuleDict({"mha": nn.MultiheadAttention(16, 2), "proj": nn.Linear(16, 16)})
    quantize_(model)
    assert type(model["mha"].out_proj) is not Int8Linear and isinstance(model["proj"], Int8Linear)


def test_quantizing_twice_is_an_error(toy):
    quantize_(toy)
    with pytest.raises(QuantizationError, match="already quantised.*'layers.0.self_attn.q_proj'"):
        quantize_(toy)


def test_config_validation():
    with pytest.raises(QuantizationError, match="backend must be 'native' or 'bnb'"):
        Int8WeightOnlyConfig(backend="gptq")
    with pytest.raises(QuantizationError, match="group_size"):
        Int8WeightOnlyConfig(group_size=0)
    with pytest.raises(QuantizationError, match="group_size must be None"):
        Int8WeightOnlyConfig(backend="bnb", group_size=64)
    model = nn.Sequential(nn.Linear(8, 10), nn.Linear(10, 4))
    with pytest.raises(QuantizationError, match="group_size 4 does not divide the 10 input features of '1'"):
        quantize_(model, Int8WeightOnlyConfig(group_size=4))
    assert type(model[0]) is nn.Linear  # validated before anything was replaced


def test_bnb_without_bitsandbytes_names_the_extra(toy, monkeypatch):
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # import bitsandbytes -> ImportError
    before = linears(toy)
    with pytest.raises(ImportError, match=r"blip2_fast\[int8\]"):
        quantize_(toy, Int8WeightOnlyConfig(backend="bnb"))
    assert linears(toy) == before  # nothing was replaced


# ------------------------------------------------------------------------------------ the modules

@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("group", [None, 32])
def test_int8_linear_sqnr_vs_16bit(dtype, group):
    torch.manual_seed(3)
    lin = nn.Linear(256, 192).to(dtype)
    x = torch.randn(7, 256, dtype=dtype)
    mod = Int8Linear.from_linear(lin, Int8WeightOnlyConfig(group_size=group))
    with torch.no_grad():
        db = sqnr_db(mod(x), lin(x))
    assert db >= 35.0, f"{db:.1f} dB"
    assert mod(x).dtype == dtype


def test_half_keeps_scales_in_float32():
    mod = Int8Linear.from_linear(nn.Linear(32, 8))
    scale = mod.weight_scale.clone()
    mod.half()
    assert mod.weight.dtype == torch.int8 and mod.weight_scale.dtype == torch.float32
    assert torch.equal(mod.weight_scale, scale) and mod.bias.dtype == torch.float16
    assert mod(torch.randn(2, 32, dtype=torch.float16)).dtype == torch.float16
    emb = Int8Embedding.from_embedding(nn.Embedding(10, 32))
    emb.to(torch.bfloat16)
    assert emb(torch.tensor([1, 2])).dtype == torch.bfloat16 and emb.weight_scale.dtype == torch.float32


def test_int8_embedding_matches_dequantised_table():
    emb = nn.Embedding(20, 48, padding_idx=0)
    for group in (None, 16):
        q = Int8Embedding.from_embedding(emb, Int8WeightOnlyConfig(group_size=group, include_embeddings=True))
        ids = torch.tensor([[3, 0, 19], [7, 7, 1]])
        table = im.dequantize_weight(q.weight, q.weight_scale)
        assert torch.equal(q(ids), table[ids])
        assert sqnr_db(q(ids), emb(ids)) >= 35.0


def test_meta_construction():
    mod = Int8Linear(64, 32, bias=True, group_size=16, device="meta", dtype=torch.bfloat16)
    assert mod.weight.device.type == "meta" and mod.weight.dtype == torch.int8
    assert mod.weight_scale.shape == (32, 4) and mod.bias.dtype == torch.bfloat16


# ------------------------------------------------------------------- checkpoint format and loading

def test_streaming_load_into_meta_model_equals_quantize_(toy):
    """The loader's path (meta skeleton, quantize_, per-tensor quantisation, assign=True) gives
    bit-identical tensors to quantising the loaded model."""
    sd = {k: v.clone() for k, v in toy.state_dict().items()}
    config = Int8WeightOnlyConfig(group_size=16)
    expected = quantize_(toy, config).state_dict()
    meta = quantize_(ToyDecoder(device="meta"), config)
    streamed = {}
    for name, tensor in sd.items():
        streamed.update(quantize_tensor_for_loading(name, tensor, config, meta))
    check_int8_state_dict(streamed, meta)
    meta.load_state_dict(streamed, assign=True, strict=True)
    got = meta.state_dict()
    assert set(got) == set(expected)
    for key in expected:
        assert torch.equal(got[key], expected[key]), key
    assert got["layers.1.fc1.weight"].dtype == torch.int8 and got["layers.1.fc1.weight_scale"].shape == (FFN, WIDTH // 16)
    assert meta.layers[1].fc1.weight.device.type == "cpu"


def test_quantize_tensor_for_loading_by_name_only():
    config = Int8WeightOnlyConfig()
    w = torch.randn(8, 16)
    out = quantize_tensor_for_loading("model.decoder.layers.0.fc1.weight", w, config)
    assert set(out) == {"model.decoder.layers.0.fc1.weight", "model.decoder.layers.0.fc1.weight_scale"}
    assert out["model.decoder.layers.0.fc1.weight"].dtype == torch.int8
    for untouched in ("lm_head.weight", "model.decoder.embed_tokens.weight", "model.decoder.layers.0.fc1.bias",
                      "model.decoder.final_layer_norm.weight"):
        t = torch.randn(8, 16) if untouched.endswith("weight") and "norm" not in untouched else torch.randn(16)
        assert quantize_tensor_for_loading(untouched, t, config) == {untouched: t}
    head = quantize_tensor_for_loading("lm_head.weight", w, Int8WeightOnlyConfig(include_lm_head=True))
    assert head["lm_head.weight"].dtype == torch.int8
    q = out["model.decoder.layers.0.fc1.weight"]
    assert quantize_tensor_for_loading("x.weight", q, config) == {"x.weight": q}  # already int8
    with pytest.raises(Int8StateDictError, match=r"'layers.0.fc1.weight': shape \(8, 16\) but the module expects"):
        quantize_tensor_for_loading("layers.0.fc1.weight", w, config, quantize_(ToyDecoder(device="meta"), config))


def _quantized_state(toy, group=None):
    quantize_(toy, Int8WeightOnlyConfig(group_size=group))
    return {k: v.clone() for k, v in toy.state_dict().items()}


def test_missing_scale_is_named(toy):
    sd = _quantized_state(toy)
    del sd["layers.1.self_attn.v_proj.weight_scale"]
    with pytest.raises(Int8StateDictError, match=r"'layers.1.self_attn.v_proj.weight_scale': missing scale"):
        check_int8_state_dict(sd, toy)
    with pytest.raises(Int8StateDictError, match=r"'layers.1.self_attn.v_proj.weight_scale': missing scale"):
        check_int8_state_dict(sd)
    with pytest.raises(Int8StateDictError, match="v_proj.weight_scale"):
        toy.load_state_dict(sd)


def test_wrong_shaped_scale_is_named(toy):
    sd = _quantized_state(toy, group=16)
    sd["layers.0.fc1.weight_scale"] = torch.ones(FFN)  # per-channel scale where groups of 16 are expected
    with pytest.raises(Int8StateDictError, match=r"'layers.0.fc1.weight_scale': shape \(160,\), expected \(160, 4\)"):
        check_int8_state_dict(sd, toy)
    with pytest.raises(Int8StateDictError, match="layers.0.fc1.weight_scale"):
        toy.load_state_dict(sd)
    sd["layers.0.fc1.weight_scale"] = torch.ones(FFN, 3)  # 3 groups cannot split 64 inputs
    with pytest.raises(Int8StateDictError, match=r"'layers.0.fc1.weight_scale': shape \(160, 3\) does not fit"):
        check_int8_state_dict(sd)


def test_unquantised_weight_and_orphan_scale_are_named(toy):
    sd = _quantized_state(toy)
    sd["layers.0.fc2.weight"] = torch.randn(WIDTH, FFN)
    with pytest.raises(Int8StateDictError, match=r"'layers.0.fc2.weight': dtype torch.float32, expected torch.int8"):
        check_int8_state_dict(sd, toy)
    with pytest.raises(Int8StateDictError, match="layers.0.fc2.weight"):
        toy.load_state_dict(sd)  # never copy fp32 values into an int8 buffer silently
    sd = _quantized_state(ToyDecoder())
    sd["layers.0.norm.weight_scale"] = torch.ones(WIDTH)
    with pytest.raises(Int8StateDictError, match="'layers.0.norm.weight_scale': scale without its int8 weight"):
        check_int8_state_dict(sd)
    del sd["layers.0.norm.weight_scale"]
    del sd["layers.1.fc1.weight"]
    with pytest.raises(Int8StateDictError, match="'layers.1.fc1.weight': missing int8 weight"):
        check_int8_state_dict(sd, quantize_(ToyDecoder()))


def test_state_dict_round_trip(toy, tmp_path):
    ids = torch.randint(0, VOCAB, (2, 5))
    quantize_(toy, Int8WeightOnlyConfig(group_size=32))
    path = tmp_path / "int8.pt"
    torch.save(toy.state_dict(), path)
    fresh = quantize_(ToyDecoder(device="meta"), Int8WeightOnlyConfig(group_size=32))
    sd = torch.load(path, mmap=True, weights_only=True)
    check_int8_state_dict(sd, fresh)
    fresh.load_state_dict(sd, assign=True)
    with torch.no_grad():
        assert torch.equal(fresh(ids), toy(ids))

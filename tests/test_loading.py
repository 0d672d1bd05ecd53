"""Loading and saving: both directions with transformers, formats, and clear errors."""
import copy
import json
import os
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from blip2_fast import Blip2Config, ConfigError
from blip2_fast.loading import CheckpointError
from blip2_fast.models.blip2 import Blip2ForConditionalGeneration
from blip2_fast.testing import make_tiny_folder, random_pixels


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny")
    hf = make_tiny_folder(str(folder), with_processor=False)
    return str(folder), hf


def _copy(src, tmp_path, name="copy"):
    dst = tmp_path / name
    shutil.copytree(src, dst)
    return str(dst)


def _logits(model, cfg, pixels):
    ids = torch.tensor([[cfg.image_token_index] * cfg.num_query_tokens + [2, 9, 10]])
    with torch.no_grad():
        out = model(pixel_values=pixels, input_ids=ids, attention_mask=torch.ones_like(ids))
    return out.logits if hasattr(out, "logits") else out[0]


def test_ours_saved_loads_in_transformers(tiny, tmp_path):
    from transformers import Blip2ForConditionalGeneration as HF
    folder, hf = tiny
    ours = Blip2ForConditionalGeneration.from_pretrained(folder)
    ours.save_pretrained(str(tmp_path / "ours"))
    back = HF.from_pretrained(str(tmp_path / "ours")).eval()
    pixels = random_pixels(2, seed=3)
    assert torch.equal(_logits(back, hf.config, pixels), _logits(hf, hf.config, pixels))
    for key, value in hf.state_dict().items():  # every tensor survives the round trip exactly
        assert torch.equal(back.state_dict()[key], value), key


def test_sharded_and_bin_formats(tiny, tmp_path):
    folder, hf = tiny
    ours = Blip2ForConditionalGeneration.from_pretrained(folder)
    ours.save_pretrained(str(tmp_path / "sharded"), max_shard_size="20KB")
    files = os.listdir(tmp_path / "sharded")
    assert "model.safetensors.index.json" in files and sum(f.endswith(".safetensors") for f in files) > 2
    sharded = Blip2ForConditionalGeneration.from_pretrained(str(tmp_path / "sharded"))
    binary = tmp_path / "bin"
    binary.mkdir()
    shutil.copy(os.path.join(folder, "config.json"), binary)
    torch.save(load_file(os.path.join(folder, "model.safetensors")), binary / "pytorch_model.bin")
    from_bin = Blip2ForConditionalGeneration.from_pretrained(str(binary))
    pixels = random_pixels(1, seed=4)
    ref = _logits(hf, hf.config, pixels)
    assert (_logits(sharded, hf.config, pixels) - ref).abs().max() <= 1e-5
    assert (_logits(from_bin, hf.config, pixels) - ref).abs().max() <= 1e-5


def test_legacy_q_v_bias_keys_are_folded(tiny, tmp_path):
    """Older checkpoints hold self_attn.q_bias / v_bias (no k bias): they land in qkv.bias as
    [q, 0, v], in that order, and the model computes what transformers computes from them."""
    folder, hf = tiny
    dst = _copy(folder, tmp_path)
    state = load_file(os.path.join(dst, "model.safetensors"))
    E = hf.config.vision_config.hidden_size
    want = {}
    for key in [k for k in state if k.endswith("self_attn.qkv.bias")]:
        bias = state.pop(key)
        state[key.replace("qkv.bias", "q_bias")] = bias[:E].clone()
        state[key.replace("qkv.bias", "v_bias")] = bias[2 * E:].clone()
        want[key] = torch.cat([bias[:E], torch.zeros(E), bias[2 * E:]])
    save_file(state, os.path.join(dst, "model.safetensors"))
    model = Blip2ForConditionalGeneration.from_pretrained(dst)
    got = model.state_dict()
    assert want and all(torch.equal(got[k], v) for k, v in want.items())
    hf = copy.deepcopy(hf)  # the module fixture stays untouched for the other tests
    with torch.no_grad():  # the reference, given the same biases (k's zeroed), agrees
        for key, value in want.items():
            hf.get_parameter(key).copy_(value)
    pixels = random_pixels(1, seed=5)
    assert (_logits(model, hf.config, pixels) - _logits(hf, hf.config, pixels)).abs().max() <= 1e-5


def test_dtype_and_fp32_qformer(tiny):
    folder, hf = tiny
    model = Blip2ForConditionalGeneration.from_pretrained(folder, dtype=torch.bfloat16)
    assert model.language_model.lm_head.weight.dtype == torch.bfloat16
    assert model.vision_model.post_layernorm.weight.dtype == torch.bfloat16
    assert model.qformer.layernorm.weight.dtype == torch.float32  # as transformers keeps it
    pixels = random_pixels(2, seed=6)
    ref = _logits(hf, hf.config, pixels[:1])
    got = _logits(model, hf.config, pixels[:1].to(torch.bfloat16))
    assert got.dtype == torch.bfloat16
    assert (got.float() - ref).norm() / ref.norm() < 0.03  # bf16 rounding, not a wrong computation
    out = model.generate(pixels.to(torch.bfloat16), max_new_tokens=3, min_new_tokens=3)
    assert out.shape == (2, hf.config.num_query_tokens + 1 + 3)


def _edit_state(folder, edit):
    path = os.path.join(folder, "model.safetensors")
    state = load_file(path)
    edit(state)
    save_file(state, path)


@pytest.mark.parametrize("edit,words", [
    (lambda s: s.pop("language_projection.weight"), ["missing", "language_projection.weight"]),
    (lambda s: s.__setitem__("surprise.weight", torch.zeros(2)), ["unexpected", "surprise.weight"]),
    (lambda s: s.__setitem__("language_projection.bias", torch.zeros(3)), ["language_projection.bias", "shape"]),
], ids=["missing", "unexpected", "wrong-shape"])
def test_bad_keys_are_named(tiny, tmp_path, edit, words):
    dst = _copy(tiny[0], tmp_path)
    _edit_state(dst, edit)
    with pytest.raises(CheckpointError) as err:
        Blip2ForConditionalGeneration.from_pretrained(dst)
    for word in words:
        assert word in str(err.value)


def test_truncated_file_is_named(tiny, tmp_path):
    dst = _copy(tiny[0], tmp_path)
    path = os.path.join(dst, "model.safetensors")
    size = os.path.getsize(path)
    with open(path, "r+b") as f:
        f.truncate(size // 2)
    with pytest.raises(CheckpointError, match="model.safetensors"):
        Blip2ForConditionalGeneration.from_pretrained(dst)


def test_missing_shard_and_missing_weights(tiny, tmp_path):
    dst = _copy(tiny[0], tmp_path)
    os.remove(os.path.join(dst, "model.safetensors"))
    with pytest.raises(CheckpointError, match="no model.safetensors"):
        Blip2ForConditionalGeneration.from_pretrained(dst)
    with open(os.path.join(dst, "model.safetensors.index.json"), "w") as f:
        json.dump({"weight_map": {"a": "model-00001-of-00002.safetensors"}}, f)
    with pytest.raises(CheckpointError, match="model-00001-of-00002"):
        Blip2ForConditionalGeneration.from_pretrained(dst)


def test_config_that_does_not_match(tiny, tmp_path):
    dst = _copy(tiny[0], tmp_path)
    path = os.path.join(dst, "config.json")
    cfg = json.load(open(path))
    cfg["qformer_config"]["hidden_size"] += 12
    json.dump(cfg, open(path, "w"))
    with pytest.raises(CheckpointError, match="shape"):
        Blip2ForConditionalGeneration.from_pretrained(dst)
    cfg["model_type"] = "llama"
    json.dump(cfg, open(path, "w"))
    with pytest.raises(ConfigError, match="model_type"):
        Blip2ForConditionalGeneration.from_pretrained(dst)
    open(path, "w").write("{not json")
    with pytest.raises(ConfigError, match="config.json"):
        Blip2ForConditionalGeneration.from_pretrained(dst)


def test_unknown_path_and_hub_id_offline(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(CheckpointError, match="could not be fetched"):
        Blip2ForConditionalGeneration.from_pretrained("nobody-here/blip2-none")
    with pytest.raises(CheckpointError, match="neither an existing folder"):
        Blip2ForConditionalGeneration.from_pretrained(str(tmp_path / "no" / "such" / "dir"))


def test_config_round_trip_with_transformers():
    from transformers import Blip2Config as HFConfig
    for name in ("blip2-opt-2.7b", "blip2-flan-t5-xl", "blip2-small"):
        ours = Blip2Config.from_name(name)
        hf = HFConfig.from_dict(ours.to_hf_dict())
        back = Blip2Config.from_hf_dict(hf.to_dict())
        assert back.vision == ours.vision and back.qformer == ours.qformer
        assert back.text.hidden_size == ours.text.hidden_size
        assert getattr(back.text, 'scale_decoder_outputs', None) == getattr(ours.text, 'scale_decoder_outputs', None)
        if name != 'blip2-flan-t5-xl':
            assert back.text == ours.text
        assert back.num_query_tokens == ours.num_query_tokens
    with pytest.raises(KeyError, match="unknown preset"):
        Blip2Config.from_name("blip3")


def test_save_is_atomic_on_failure(tiny, tmp_path, monkeypatch):
    """A save that fails midway leaves the previous checkpoint intact and no temp folder."""
    folder, _ = tiny
    model = Blip2ForConditionalGeneration.from_pretrained(folder)
    target = tmp_path / "target"
    model.save_pretrained(str(target))
    before = open(target / "model.safetensors", "rb").read()
    import safetensors.torch

    def boom(*a, **k):
        raise OSError("disk full")
    monkeypatch.setattr(safetensors.torch, "save_file", boom)
    with pytest.raises(OSError):
        model.save_pretrained(str(target))
    assert open(target / "model.safetensors", "rb").read() == before
    assert sorted(os.listdir(target)) == ["config.json", "model.safetensors"]


def test_stage1_heads_in_a_generation_folder_are_ignored_and_other_strays_are_not(tmp_path):
    """One folder may carry the stage-1 heads beside the LLM (transformers ignores them); we
    load it as the same model. Any other stray key is still an error naming it."""
    make_tiny_folder(str(tmp_path))
    plain = Blip2ForConditionalGeneration.from_pretrained(str(tmp_path))
    path = tmp_path / "model.safetensors"
    state = load_file(str(path))
    extra = {"itm_head.weight": torch.randn(2, 36), "temp": torch.tensor(0.07),
             "qformer_lm_head.dense.weight": torch.randn(36, 36), "vision_projection.weight": torch.randn(8, 36)}
    save_file({**state, **extra}, str(path), metadata={"format": "pt"})
    with_heads = Blip2ForConditionalGeneration.from_pretrained(str(tmp_path))
    a, b = plain.state_dict(), with_heads.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    save_file({**state, **extra, "qformer.stray.weight": torch.zeros(1)}, str(path), metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match="unexpected keys: qformer.stray.weight"):
        Blip2ForConditionalGeneration.from_pretrained(str(tmp_path))

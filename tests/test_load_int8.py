"""from_pretrained(load_in_8bit=True): int8 LLM linears quantised while streaming the checkpoint,
outputs close to the float model, and a saved int8 folder that reloads without re-quantising."""
import os

import pytest
import torch

from blip2_fast.loading import CheckpointError
from blip2_fast.models.blip2 import Blip2ForConditionalGeneration
from blip2_fast.quantization import Int8Linear, Int8WeightOnlyConfig, QuantizationError, quantize_
from blip2_fast.testing import make_tiny_folder, random_pixels


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny")
    make_tiny_folder(str(path), with_processor=False)
    return str(path)


def _logits(model, pixels):
    cfg = model.config
    ids = torch.tensor([[cfg.image_token_index] * cfg.num_query_tokens + [2, 9, 10, 11]] * pixels.shape[0])
    with torch.no_grad():
        return model(pixels, ids).logits


def test_load_in_8bit_quantises_llm_linears_only(folder):
    model = Blip2ForConditionalGeneration.from_pretrained(folder, load_in_8bit=True)
    lm = model.language_model
    layer = lm.model.decoder.layers[0]
    assert isinstance(layer.self_attn.q_proj, Int8Linear) and layer.fc1.weight.dtype == torch.int8
    assert layer.fc1.weight_scale.dtype == torch.float32
    assert not isinstance(lm.lm_head, Int8Linear)  # LM head and embeddings stay in 16/32 bits
    assert isinstance(model.language_projection, torch.nn.Linear)  # only the LLM is quantised
    assert not any(t.is_meta for t in model.state_dict().values())


def test_int8_logits_close_to_float(folder):
    ref = Blip2ForConditionalGeneration.from_pretrained(folder)
    q = Blip2ForConditionalGeneration.from_pretrained(folder, load_in_8bit=True)
    pixels = random_pixels(2, seed=3)
    a, b = _logits(ref, pixels), _logits(q, pixels)
    assert (a - b).norm() / a.norm() < 0.05
    assert (a - b).abs().max() > 0  # the int8 path really ran
    # streaming quantisation equals quantize_ applied to the loaded float model
    post = quantize_(Blip2ForConditionalGeneration.from_pretrained(folder).language_model, Int8WeightOnlyConfig())
    assert torch.equal(post.model.decoder.layers[1].fc2.weight, q.language_model.model.decoder.layers[1].fc2.weight)


def test_int8_save_and_reload_without_requantising(folder, tmp_path):
    q = Blip2ForConditionalGeneration.from_pretrained(folder, load_in_8bit=True)
    q.save_pretrained(str(tmp_path / "q"))
    back = Blip2ForConditionalGeneration.from_pretrained(str(tmp_path / "q"))  # config records int8
    assert isinstance(back.language_model.model.decoder.layers[0].fc1, Int8Linear)
    pixels = random_pixels(1, seed=4)
    assert torch.equal(_logits(q, pixels), _logits(back, pixels))
    assert os.path.getsize(tmp_path / "q" / "model.safetensors") < os.path.getsize(os.path.join(folder, "model.safetensors"))
    with pytest.raises(CheckpointError, match="already quantised"):
        Blip2ForConditionalGeneration.from_pretrained(str(tmp_path / "q"),
                                                      quantization_config=Int8WeightOnlyConfig(group_size=8))
    with pytest.raises(QuantizationError, match="already quantised"):
        quantize_(back.language_model, Int8WeightOnlyConfig())


def test_int8_tied_lm_head_on_request(folder):
    ref = Blip2ForConditionalGeneration.from_pretrained(folder)
    q = Blip2ForConditionalGeneration.from_pretrained(folder, quantization_config=Int8WeightOnlyConfig(include_lm_head=True))
    head = q.language_model.lm_head
    assert isinstance(head, Int8Linear) and head.weight.dtype == torch.int8
    assert q.language_model.get_input_embeddings().weight.dtype == torch.float32  # the embedding stays float
    pixels = random_pixels(2, seed=5)
    a, b = _logits(ref, pixels), _logits(q, pixels)
    assert (a - b).norm() / a.norm() < 0.05

"""Parity with transformers' Blip2ForConditionalGeneration on tiny random models (fp32).

transformers is the independent reference: same folder, loaded by both, compared on logits
(<= 1e-4 max abs at real positions), loss, Q-Former features, and greedy/beam token ids.
"""
import pytest
import torch

from blip2_fast.models.blip2 import Blip2ForConditionalGeneration
from blip2_fast.testing import make_tiny_folder, random_pixels

CONFIGS = {
    # odd head counts, several cross-attention layers (frequency 1), 3 layers
    "odd-heads-cross-every-layer": dict(vision_heads=3, qformer_heads=3, qformer_layers=3, cross_attention_frequency=1),
    "default-frequency": dict(vision_heads=4, qformer_heads=5, qformer_layers=4, cross_attention_frequency=2,
                              num_query_tokens=7),
    "post-ln-opt": dict(do_layer_norm_before=False, num_query_tokens=3),
}


@pytest.fixture(scope="module", params=sorted(CONFIGS))
def pair(request, tmp_path_factory):
    folder = tmp_path_factory.mktemp(request.param)
    hf = make_tiny_folder(str(folder), **CONFIGS[request.param])
    ours = Blip2ForConditionalGeneration.from_pretrained(str(folder))
    return hf, ours, hf.config


def _prompt_batch(cfg, lengths, pad_id=1, seed=0):
    """Left-padded prompts with the image placeholders first, as Blip2Processor lays them out."""
    gen = torch.Generator().manual_seed(seed)
    Q, width = cfg.num_query_tokens, max(lengths)
    ids = torch.full((len(lengths), Q + width), pad_id)
    mask = torch.zeros_like(ids)
    ids[:, :Q], mask[:, :Q] = cfg.image_token_index, 1
    for row, n in enumerate(lengths):
        ids[row, Q + width - n:] = torch.randint(4, 38, (n,), generator=gen)
        ids[row, Q + width - n] = 2  # BOS
        mask[row, Q + width - n:] = 1
    return ids, mask


def test_logits_and_loss_match(pair):
    hf, ours, cfg = pair
    pixels = random_pixels(3, seed=1)
    ids, mask = _prompt_batch(cfg, [6, 3, 1])
    labels = torch.where(mask.bool(), ids, -100)
    with torch.no_grad():
        ref = hf(pixel_values=pixels, input_ids=ids, attention_mask=mask, labels=labels)
        out = ours(pixels, ids, mask, labels=labels)
    real = mask.bool()
    assert (ref.logits - out.logits)[real].abs().max() <= 1e-4
    assert torch.allclose(ref.loss, out.loss, atol=1e-5)


def test_qformer_and_image_features_match(pair):
    hf, ours, _ = pair
    pixels = random_pixels(2, seed=2)
    with torch.no_grad():
        ref_q = hf.get_image_features(pixels, return_dict=True)
        ours_feat = ours.get_image_features(pixels)
        ours_q = ours.get_qformer_features(pixels)
    assert (ref_q.qformer_outputs.last_hidden_state - ours_q).abs().max() <= 1e-4
    assert (ref_q.pooler_output - ours_feat.pooler_output).abs().max() <= 1e-4
    assert (ref_q.last_hidden_state - ours_feat.last_hidden_state).abs().max() <= 1e-4


def test_prompt_without_placeholders_prepends_queries(pair):
    hf, ours, cfg = pair
    pixels = random_pixels(2, seed=3)
    ids, mask = _prompt_batch(cfg, [4, 4])
    text_only = ids[:, cfg.num_query_tokens:]
    with torch.no_grad():
        full = ours(pixels, ids, mask).logits
        plain = ours(pixels, text_only, torch.ones_like(text_only)).logits
    assert (full - plain).abs().max() <= 1e-5


@pytest.mark.parametrize("kw", [
    dict(num_beams=1),
    dict(num_beams=5, length_penalty=-1.0),
    dict(num_beams=5, length_penalty=2.0, early_stopping=True),
    dict(num_beams=3, min_new_tokens=4),
    dict(num_beams=2, repetition_penalty=1.5),
], ids=["greedy", "beam5-lp-1", "beam5-lp2-early", "beam3-min4", "beam2-repetition"])
@pytest.mark.parametrize("decode", [{}, dict(cache_implementation="static"),
                                    dict(cache_implementation="static", stop_check_every=4)],
                         ids=["dynamic", "static", "static-check4"])
def test_generate_matches_transformers(pair, kw, decode):
    """Both decode paths: the dynamic cache, and the static-shape one (whole-capacity attention
    with the unfilled slots masked, stop flag read every step or every 4 steps)."""
    hf, ours, cfg = pair
    pixels = random_pixels(3, seed=4)
    ids, mask = _prompt_batch(cfg, [5, 2, 1], seed=5)
    with torch.no_grad():
        ref = hf.generate(pixel_values=pixels, input_ids=ids, attention_mask=mask, max_new_tokens=8,
                          do_sample=False, **kw)
        out = ours.generate(pixels, ids, mask, max_new_tokens=8, **kw, **decode)
    assert out.tolist() == ref.tolist()


def test_max_length_counts_the_prompt_like_transformers(pair):
    hf, ours, cfg = pair
    pixels = random_pixels(2, seed=9)
    ids, mask = _prompt_batch(cfg, [3, 2], seed=10)
    with torch.no_grad():
        ref = hf.generate(pixel_values=pixels, input_ids=ids, attention_mask=mask, max_length=ids.shape[1] + 4)
        out = ours.generate(pixels, ids, mask, max_length=ids.shape[1] + 4)
    assert out.tolist() == ref.tolist()


def test_generate_without_prompt_matches_transformers(pair):
    hf, ours, _ = pair
    pixels = random_pixels(2, seed=6)
    with torch.no_grad():
        ref = hf.generate(pixel_values=pixels, max_new_tokens=6, do_sample=False)
        out = ours.generate(pixels, max_new_tokens=6)
    assert out.tolist() == ref.tolist()


@pytest.mark.parametrize("num_beams", [1, 4])
def test_batch_equals_one_by_one(pair, num_beams):
    _, ours, cfg = pair
    pixels = random_pixels(3, seed=7)
    lengths = [6, 2, 4]
    ids, mask = _prompt_batch(cfg, lengths, seed=8)
    with torch.no_grad():
        batched = ours.generate(pixels, ids, mask, max_new_tokens=7, num_beams=num_beams, length_penalty=0.5)
        for row, n in enumerate(lengths):
            keep = torch.cat([torch.arange(cfg.num_query_tokens), torch.arange(ids.shape[1] - n, ids.shape[1])])
            alone = ours.generate(pixels[row:row + 1], ids[row:row + 1, keep], mask[row:row + 1, keep],
                                  max_new_tokens=7, num_beams=num_beams, length_penalty=0.5)
            assert _new_tokens(batched[row], ids.shape[1]) == _new_tokens(alone[0], len(keep))


def _new_tokens(seq, prompt_len, pad=1):
    new = seq[prompt_len:].tolist()
    while new and new[-1] == pad:
        new.pop()
    return new

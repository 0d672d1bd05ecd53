"""BLIP-2 with a FlanT5-style LLM against transformers (fp32, tiny random models)."""
import pytest
import torch

from blip2_fast.models.blip2 import Blip2ForConditionalGeneration
from blip2_fast.testing import make_tiny_folder, random_pixels


@pytest.fixture(scope="module", params=["gated-gelu", "relu"])
def pair(request, tmp_path_factory):
    folder = tmp_path_factory.mktemp("t5-" + request.param)
    hf = make_tiny_folder(str(folder), text="t5", with_processor=False, feed_forward_proj=request.param,
                          qformer_heads=3, vision_heads=3)
    return hf, Blip2ForConditionalGeneration.from_pretrained(str(folder)), hf.config


def _inputs(cfg, lengths, seed=0):
    gen = torch.Generator().manual_seed(seed)
    Q, width = cfg.num_query_tokens, max(lengths)
    ids = torch.zeros(len(lengths), Q + width, dtype=torch.long)  # T5 pads with 0, on the right
    mask = torch.zeros_like(ids)
    ids[:, :Q], mask[:, :Q] = cfg.image_token_index, 1
    for row, n in enumerate(lengths):
        ids[row, Q:Q + n] = torch.randint(3, 38, (n,), generator=gen)
        ids[row, Q + n - 1] = 1  # EOS closes each T5 prompt
        mask[row, Q:Q + n] = 1
    return ids, mask


def test_logits_and_loss(pair):
    hf, ours, cfg = pair
    pixels = random_pixels(2, seed=1)
    ids, mask = _inputs(cfg, [5, 3])
    labels = torch.tensor([[5, 6, 7, 1], [8, 9, 1, -100]])
    with torch.no_grad():
        ref = hf(pixel_values=pixels, input_ids=ids, attention_mask=mask, labels=labels)
        out = ours(pixels, ids, mask, labels=labels)
    assert (ref.logits - out.logits).abs().max() <= 1e-4
    assert torch.allclose(ref.loss, out.loss, atol=1e-5)


@pytest.mark.parametrize("kw", [dict(num_beams=1), dict(num_beams=4, length_penalty=-1.0),
                                dict(num_beams=3, min_new_tokens=3, num_return_sequences=2)],
                         ids=["greedy", "beam4-lp-1", "beam3-min3-ret2"])
@pytest.mark.parametrize("decode", [{}, dict(cache_implementation="static"),
                                    dict(cache_implementation="static", stop_check_every=3)],
                         ids=["dynamic", "static", "static-check3"])
def test_generate_matches_transformers(pair, kw, decode):
    """Both decode paths (dynamic cache; static shapes with the stop flag read every 1 or 3 steps)."""
    hf, ours, cfg = pair
    pixels = random_pixels(3, seed=2)
    ids, mask = _inputs(cfg, [4, 2, 6], seed=3)
    with torch.no_grad():
        ref = hf.generate(pixel_values=pixels, input_ids=ids, attention_mask=mask, max_new_tokens=7,
                          do_sample=False, **kw)
        out = ours.generate(pixels, ids, mask, max_new_tokens=7, **kw, **decode)
    assert out.tolist() == ref.tolist()


def test_batch_equals_one_by_one(pair):
    _, ours, cfg = pair
    pixels = random_pixels(3, seed=4)
    lengths = [4, 2, 6]
    ids, mask = _inputs(cfg, lengths, seed=5)
    with torch.no_grad():
        batched = ours.generate(pixels, ids, mask, max_new_tokens=6, num_beams=3)
        for row, n in enumerate(lengths):
            width = cfg.num_query_tokens + n
            alone = ours.generate(pixels[row:row + 1], ids[row:row + 1, :width], mask[row:row + 1, :width],
                                  max_new_tokens=6, num_beams=3)
            got = [t for t in batched[row].tolist()]
            want = alone[0].tolist()
            assert got[:len(want)] == want and all(t == 0 for t in got[len(want):])

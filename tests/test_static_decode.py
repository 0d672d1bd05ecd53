"""The static-shape decode path (models/static_decode.py) against the dynamic one.

tests/test_blip2_parity.py checks both paths against transformers for greedy and beam search;
here sampling, several returned sequences, repetition penalty and the compiled step are
compared with the dynamic path. The static path attends over the whole fixed-capacity cache
with the unfilled slots masked: the same numbers up to the order of floating-point sums (about
1e-6 here), so on a model whose candidates are not near ties every mode gives the same tokens;
the LLM is re-initialised with a large weight scale to make its choices clear-cut.
"""
from __future__ import annotations

import pytest
import torch

from blip2_fast.models.blip2 import Blip2ForConditionalGeneration
from blip2_fast.testing import make_tiny_folder, random_pixels, randomize_

MODES = {
    "greedy": dict(),
    "beam4": dict(num_beams=4, length_penalty=1.0),
    "beam3-short-answers": dict(num_beams=3, length_penalty=-1.0, num_return_sequences=2),
    "beam5-early": dict(num_beams=5, early_stopping=True),
    "sampling": dict(do_sample=True, top_k=10, temperature=0.8, num_return_sequences=2),
    "repetition": dict(repetition_penalty=1.3, min_new_tokens=3),
}


@pytest.fixture(scope="module", params=["opt", "t5"])
def model(request, tmp_path_factory):
    folder = str(tmp_path_factory.mktemp(f"static-{request.param}"))
    make_tiny_folder(folder, text=request.param, num_query_tokens=5)
    net = Blip2ForConditionalGeneration.from_pretrained(folder)
    randomize_(net.language_model, seed=3, std=0.6)
    return net


def _inputs(net, lengths=(4, 1, 6)):
    gen = torch.Generator().manual_seed(7)
    Q, width = net.config.num_query_tokens, max(lengths)
    ids = torch.full((len(lengths), Q + width), net.config.text.pad_token_id)
    mask = torch.zeros_like(ids)
    ids[:, :Q], mask[:, :Q] = net.config.image_token_index, 1
    for row, n in enumerate(lengths):
        ids[row, Q + width - n:] = torch.randint(4, 38, (n,), generator=gen)
        mask[row, Q + width - n:] = 1
    return random_pixels(len(lengths), seed=8), ids, mask


def _generate(net, pixels, ids, mask, **kw):
    gen = torch.Generator().manual_seed(11) if kw.get("do_sample") else None
    return net.generate(pixels, ids, mask, max_new_tokens=9, eos_token_id=[2, 17], generator=gen, **kw)


@pytest.mark.parametrize("every", [1, 3])
@pytest.mark.parametrize("mode", sorted(MODES))
def test_static_gives_the_dynamic_tokens(model, mode, every):
    pixels, ids, mask = _inputs(model)
    dynamic = _generate(model, pixels, ids, mask, **MODES[mode])
    static = _generate(model, pixels, ids, mask, cache_implementation="static", stop_check_every=every, **MODES[mode])
    assert static.tolist() == dynamic.tolist()


def test_static_step_logits_match_the_dynamic_step(model):
    from blip2_fast.models.opt import OPTDecoderState
    from blip2_fast.models.static_decode import StaticOPTDecoderState, StaticT5DecoderState
    from blip2_fast.models.t5_generation import T5DecoderState

    dynamic, static = ((T5DecoderState, StaticT5DecoderState) if model.config.is_encoder_decoder
                       else (OPTDecoderState, StaticOPTDecoderState))
    pixels, ids, mask = _inputs(model)
    with torch.no_grad():
        embeds, m = model.merge_prompt(model.get_image_features(pixels).pooler_output, ids, mask)
        a = dynamic(model.language_model, embeds, m, 6)
        b = static(model.language_model, embeds, m, 6)
        start = int(b.input_pos)
        tokens = a.first_logits.argmax(-1)
        for _ in range(5):
            la, lb = a.step(tokens), b.step(tokens)
            assert (la - lb).abs().max() <= 1e-4 * la.abs().max()
            tokens = la.argmax(-1)
    assert int(b.input_pos) == start + 5  # one slot per step, counted on the device


def test_compiled_static_step_gives_the_same_tokens(model):
    """torch.compile (inductor, on the CPU too) of the static step: same greedy and beam tokens,
    and the compile time is recorded apart."""
    pixels, ids, mask = _inputs(model)
    for kw in (dict(), dict(num_beams=3)) if not model.config.is_encoder_decoder else (dict(),):
        eager = _generate(model, pixels, ids, mask, cache_implementation="static", **kw)
        compiled = _generate(model, pixels, ids, mask, cache_implementation="static", compile="default", **kw)
        assert compiled.tolist() == eager.tolist()

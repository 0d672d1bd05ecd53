"""Q-Former-only captioning against an explicit eager reference (dense causal mask, plain
matmuls) written here, on random weights: cached-step logits, greedy by hand, beam search."""
import math

import pytest
import torch

from blip2_fast.config import Blip2Config
from blip2_fast.generation import GenerationConfig, generate_tokens
from blip2_fast.loading import CheckpointError
from blip2_fast.models.retrieval_heads import Blip2ForImageTextRetrieval
from blip2_fast.models.qformer_caption import Blip2QFormerForCaptioning
from blip2_fast.testing import hf_config, random_pixels, randomize_

BOS, EOS, Q = 3, 7, 4


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    folder = tmp_path_factory.mktemp("cap")
    cfg = Blip2Config.from_hf_dict(hf_config(num_query_tokens=Q, qformer_heads=3, qformer_layers=3,
                                             cross_attention_frequency=2).to_dict())
    randomize_(Blip2QFormerForCaptioning(cfg), seed=1).eval().save_pretrained(str(folder))
    return Blip2QFormerForCaptioning.from_pretrained(str(folder))


# ---------------------------------------------------------------------------- eager reference
def _lin(x, mod):
    return x @ mod.weight.t() + mod.bias


def _ln(x, mod):
    mu, var = x.mean(-1, keepdim=True), x.var(-1, unbiased=False, keepdim=True)
    return (x - mu) / torch.sqrt(var + mod.eps) * mod.weight + mod.bias


def _attend(q_in, kv_in, proj, heads, allowed):
    B, Lq, E = q_in.shape
    d = E // heads
    split = lambda t: t.view(B, -1, heads, d).transpose(1, 2)  # noqa: E731
    q, k, v = split(_lin(q_in, proj.query)), split(_lin(kv_in, proj.key)), split(_lin(kv_in, proj.value))
    scores = (q @ k.transpose(-1, -2)) / math.sqrt(d)
    if allowed is not None:
        scores = scores.masked_fill(~allowed, float("-inf"))
    return (scores.softmax(-1) @ v).transpose(1, 2).reshape(B, Lq, E)


def eager_logits(m, image_embeds, ids):
    """Logits (B, T, V) at every text position of [queries ; ids] in the multimodal causal mode."""
    B, T = ids.shape
    qf, heads = m.qformer, m.config.qformer.num_attention_heads
    text = m.embeddings.word_embeddings.weight[ids] + m.embeddings.position_embeddings.weight[:T]
    x = _ln(torch.cat([m.query_tokens.expand(B, -1, -1), text], 1), qf.layernorm)
    L = Q + T
    row, col = torch.arange(L)[:, None], torch.arange(L)[None, :]
    allowed = torch.where(row < Q, col < Q, col <= row)  # queries: queries; text: queries + causal text
    for layer in qf.encoder.layer:
        a = layer.attention
        x = _ln(_lin(_attend(x, x, a.attention, heads, allowed), a.output.dense) + x, a.output.LayerNorm)
        qpart, tpart = x[:, :Q], x[:, Q:]
        if layer.has_cross_attention:
            c = layer.crossattention
            qpart = _ln(_lin(_attend(qpart, image_embeds, c.attention, heads, None), c.output.dense) + qpart,
                        c.output.LayerNorm)
        ffn = lambda h, inter, out: _ln(_lin(torch.nn.functional.gelu(_lin(h, inter.dense)), out.dense) + h,  # noqa: E731
                                        out.LayerNorm)
        x = torch.cat([ffn(qpart, layer.intermediate_query, layer.output_query),
                       ffn(tpart, layer.intermediate, layer.output)], 1)
    head = m.qformer_lm_head
    h = _ln(torch.nn.functional.gelu(_lin(x[:, Q:], head.dense)), head.LayerNorm)
    return h @ m.embeddings.word_embeddings.weight.t() + head.bias


class EagerState:
    """DecoderState that recomputes the whole sequence each step with the eager reference."""

    def __init__(self, m, image_embeds, ids):
        self.m, self.img, self.ids = m, image_embeds, ids

    def step(self, tokens):
        self.ids = torch.cat([self.ids, tokens[:, None]], 1)
        return eager_logits(self.m, self.img, self.ids)[:, -1]

    def reorder(self, index):
        self.img, self.ids = self.img.index_select(0, index), self.ids.index_select(0, index)


# ---------------------------------------------------------------------------- tests
def test_cached_steps_equal_eager_and_full_causal_forward(model):
    from blip2_fast.models.qformer_caption import CaptionState
    pixels = random_pixels(2, seed=3)
    ids = torch.cat([torch.full((2, 1), BOS), torch.randint(4, 90, (2, 6), generator=torch.Generator().manual_seed(0))], 1)
    with torch.no_grad():
        img = model.vision(pixels)
        ref = eager_logits(model, img, ids)  # (B, T, V)
        state = CaptionState(model, img, ids.shape[1])
        cached = torch.stack([state.step(ids[:, t]) for t in range(ids.shape[1])], 1)
        hidden = torch.cat([model.query_tokens.expand(2, -1, -1), model.embeddings(ids)], 1)
        full = model.lm_logits(model.qformer(hidden, Q, "causal", image_embeds=img)[:, Q:])
    assert ref.std() > 0.1
    assert (cached - ref).abs().max() <= 1e-4
    assert (full - ref).abs().max() <= 1e-4


def test_greedy_equals_argmax_by_hand(model):
    pixels = random_pixels(3, seed=4)
    out = model.generate(pixels, max_new_tokens=6, bos_token_id=BOS, eos_token_id=EOS)
    with torch.no_grad():
        img = model.vision(pixels)
        ids = torch.full((3, 1), BOS)
        done = torch.zeros(3, dtype=torch.bool)
        for _ in range(6):
            nxt = eager_logits(model, img, ids)[:, -1].argmax(-1)
            nxt = torch.where(done, torch.zeros_like(nxt), nxt)  # pad (0) after eos
            done |= nxt == EOS
            ids = torch.cat([ids, nxt[:, None]], 1)
            if done.all():
                break
    assert torch.equal(out, ids)


@pytest.mark.parametrize("kw", [dict(num_beams=3, max_new_tokens=5),
                                dict(num_beams=2, max_new_tokens=4, num_return_sequences=2, length_penalty=0.5)])
def test_beam_search_equals_recomputing_reference(model, kw):
    pixels = random_pixels(2, seed=5)
    prompt = torch.tensor([[BOS, 10, 11], [BOS, 12, 13]])  # a prompt ("[DEC] a photo of")
    out = model.generate(pixels, input_ids=prompt, bos_token_id=BOS, eos_token_id=EOS, **kw)
    with torch.no_grad():
        state = EagerState(model, model.vision(pixels), prompt)
        first = eager_logits(model, state.img, prompt)[:, -1]
        ref = generate_tokens(state, first, GenerationConfig(eos_token_id=EOS, pad_token_id=0, **kw))
    n = kw.get("num_return_sequences", 1)
    assert torch.equal(out, torch.cat([prompt.repeat_interleave(n, 0), ref], 1))


def test_loading_and_token_errors(model, tmp_path):
    assert {k for k in model.state_dict() if k.startswith("qformer_lm_head")} == {
        "qformer_lm_head.dense.weight", "qformer_lm_head.dense.bias", "qformer_lm_head.LayerNorm.weight",
        "qformer_lm_head.LayerNorm.bias", "qformer_lm_head.bias"}
    from safetensors.torch import save_file
    model.save_pretrained(str(tmp_path))  # then the same folder without the head, as a retrieval model's
    save_file({k: v.contiguous() for k, v in model.state_dict().items() if not k.startswith("qformer_lm_head")},
              str(tmp_path / "model.safetensors"))
    assert Blip2ForImageTextRetrieval.from_pretrained(str(tmp_path)) is not None
    with pytest.raises(CheckpointError, match="qformer_lm_head"):
        Blip2QFormerForCaptioning.from_pretrained(str(tmp_path))
    with pytest.raises(ValueError, match="bos_token_id"):
        model.generate(random_pixels(1), max_new_tokens=2)
    with pytest.raises(ValueError, match="positions"):
        model.generate(random_pixels(1), max_new_tokens=600, bos_token_id=BOS, eos_token_id=EOS)

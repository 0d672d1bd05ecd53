"""blip2_fast.generation against transformers' `generate` (the independent reference) on a
tiny random OPT, plus scripted-logit states for the exact eos/pad and support semantics."""
from __future__ import annotations

import collections
import inspect
import os

import pytest
import torch

from blip2_fast.generation import GenerationConfig, GenerationConfigError, generate_tokens

transformers = pytest.importorskip("transformers")

PAD = 1
VOCAB = 64
# transformers renamed the cache argument of its models' forward from past_key_values to cache
# (5.2x); the old name is ignored silently by releases that take **kwargs, so pick by signature
CACHE_KW = "cache" if "cache" in inspect.signature(transformers.OPTForCausalLM.forward).parameters \
    else "past_key_values"


class HFState:
    """DecoderState over a transformers causal LM with its own DynamicCache and a
    left-padded attention mask (positions follow from the mask, as in HF's OPT)."""

    def __init__(self, model, input_ids, attention_mask):
        self.model, self.mask = model, attention_mask
        self.cache = transformers.DynamicCache(config=model.config)
        self.steps = 0
        with torch.no_grad():
            out = model(input_ids=input_ids, attention_mask=attention_mask, use_cache=True, **{CACHE_KW: self.cache})
        self.first_logits = out.logits[:, -1]

    def step(self, tokens):
        self.steps += 1
        self.mask = torch.cat([self.mask, self.mask.new_ones(self.mask.shape[0], 1)], dim=1)
        with torch.no_grad():
            out = self.model(input_ids=tokens[:, None], attention_mask=self.mask, use_cache=True,
                             **{CACHE_KW: self.cache})
        return out.logits[:, -1]

    def reorder(self, index):
        self.cache.reorder_cache(index)
        self.mask = self.mask.index_select(0, index)


class FakeState:
    """Scripted logits: row r at new-token index t gets `script(r, t)` (a (V,) tensor).
    Rows follow `reorder`, so each row keeps the identity of the prompt it came from."""

    def __init__(self, batch, script):
        self.rows = torch.arange(batch)
        self.t, self.script, self.calls = 0, script, []

    def logits(self):
        return torch.stack([self.script(int(r), self.t) for r in self.rows])

    def step(self, tokens):
        assert tokens.shape == self.rows.shape
        self.calls.append(("step", tokens.clone()))
        self.t += 1
        return self.logits()

    def reorder(self, index):
        self.calls.append(("reorder", index.clone()))
        self.rows = self.rows[index]


def one_hot_logits(token, vocab=8, high=5.0):
    x = torch.zeros(vocab)
    x[token] = high
    return x


@pytest.fixture(scope="module")
def tiny():
    return build_tiny()


def build_tiny():
    """A peaky tiny OPT, left-padded prompts of different lengths, and an eos id that greedy
    decoding emits early for some prompts but not all (so eos and padding paths run)."""
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    torch.manual_seed(0)
    cfg = transformers.OPTConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, ffn_dim=64,
                                 num_attention_heads=4, max_position_embeddings=64, word_embed_proj_dim=32,
                                 pad_token_id=PAD, bos_token_id=2, eos_token_id=2, init_std=0.3,
                                 dropout=0.0, attention_dropout=0.0)
    model = transformers.OPTForCausalLM(cfg).eval()
    g = torch.Generator().manual_seed(1)
    lens = [3, 7, 5, 9, 4, 6]
    width = max(lens)
    ids = torch.full((len(lens), width), PAD)
    mask = torch.zeros(len(lens), width, dtype=torch.long)
    for i, n in enumerate(lens):
        ids[i, width - n:] = torch.randint(3, VOCAB, (n,), generator=g)
        mask[i, width - n:] = 1
    plain = model.generate(ids, attention_mask=mask, max_new_tokens=10, do_sample=False,
                           eos_token_id=None, pad_token_id=PAD)[:, width:]
    # The token first appearing early in the most (but not all) rows.
    rows_with = collections.Counter(int(v) for row in plain[:, :6] for v in set(row.tolist()))
    eos = max((c, tok) for tok, c in rows_with.items() if c < len(lens))[1]
    return model, ids, mask, eos


def run_ours(model, ids, mask, cfg, generator=None, prompt_tokens=None):
    state = HFState(model, ids, mask)
    return generate_tokens(state, state.first_logits, cfg, generator, prompt_tokens=prompt_tokens)


def check_hf(model, ids, mask, cfg, hf_kw, prompt_tokens=None):
    """Ours and HF's generate give the same new tokens after the same number of forward
    passes (so we stop exactly when HF stops, not merely pad identically)."""
    calls = []
    hook = model.register_forward_hook(lambda *_: calls.append(1))
    try:
        state = HFState(model, ids, mask)
        ours = generate_tokens(state, state.first_logits, cfg, prompt_tokens=prompt_tokens)
        ours_calls, calls[:] = len(calls), []
        ref = model.generate(ids, attention_mask=mask, **hf_kw)[:, ids.shape[1]:]
    finally:
        hook.remove()
    assert_same(ours, ref)
    assert ours_calls == len(calls), f"forward passes: ours {ours_calls}, HF {len(calls)}"
    return ours


def assert_same(ours, ref):
    assert ours.shape == ref.shape, (ours.shape, ref.shape, ours, ref)
    assert torch.equal(ours, ref), (ours, ref)


@pytest.mark.parametrize("min_new", [0, 3])
def test_greedy_matches_hf(tiny, min_new):
    model, ids, mask, eos = tiny
    kw = dict(max_new_tokens=12, min_new_tokens=min_new, eos_token_id=eos, pad_token_id=PAD)
    ours = check_hf(model, ids, mask, GenerationConfig(**kw), dict(do_sample=False, **kw))
    if min_new == 0:
        assert (ours == eos).any() and (ours == PAD).any(), "fixture should exercise eos and padding"


def test_greedy_stops_when_all_finished(tiny):
    model, ids, mask, eos = tiny
    first = GenerationConfig(max_new_tokens=12, eos_token_id=eos)
    rows = [i for i in range(ids.shape[0]) if (run_ours(model, ids[i:i + 1], mask[i:i + 1], first) == eos).any()]
    sub_ids, sub_mask = ids[rows], mask[rows]
    cfg = GenerationConfig(max_new_tokens=30, eos_token_id=eos, pad_token_id=PAD)
    ours = check_hf(model, sub_ids, sub_mask, cfg, dict(max_new_tokens=30, eos_token_id=eos, pad_token_id=PAD))
    assert ours.shape[1] < 30


def test_max_length_alias_matches_hf(tiny):
    model, ids, mask, eos = tiny
    cfg = GenerationConfig.from_kwargs(prompt_length=ids.shape[1], max_length=ids.shape[1] + 7,
                                       min_length=ids.shape[1] + 2, eos_token_id=eos, pad_token_id=PAD)
    assert (cfg.max_new_tokens, cfg.min_new_tokens) == (7, 2)
    check_hf(model, ids, mask, cfg, dict(max_length=ids.shape[1] + 7, min_length=ids.shape[1] + 2,
                                         eos_token_id=eos, pad_token_id=PAD))


@pytest.mark.parametrize("early", [False, True, "never"])
@pytest.mark.parametrize("lp", [1.0, -1.0, 2.0])
@pytest.mark.parametrize("nrs,min_new", [(1, 0), (3, 0), (3, 4)])
def test_beam_matches_hf(tiny, early, lp, nrs, min_new):
    model, ids, mask, eos = tiny
    kw = dict(max_new_tokens=10, min_new_tokens=min_new, num_beams=5, length_penalty=lp, early_stopping=early,
              num_return_sequences=nrs, eos_token_id=eos, pad_token_id=PAD)
    check_hf(model, ids, mask, GenerationConfig(**kw), dict(do_sample=False, **kw))


@pytest.mark.parametrize("beams,extra_eos", [(2, []), (3, [2, 18, 12])])
@pytest.mark.parametrize("lp", [1.0, 2.0])
def test_beam_stopping_rules_match_hf(tiny, beams, extra_eos, lp):
    """Few beams and frequent eos fill the finished pools early: True stops once every pool
    is full, False when its heuristic says no running beam can improve, and "never"
    (lp > 0: bound at max_new_tokens) runs on. check_hf also compares the step counts."""
    model, ids, mask, eos = tiny
    outs = {}
    for early in (False, "never", True):
        kw = dict(max_new_tokens=14, num_beams=beams, length_penalty=lp, early_stopping=early,
                  num_return_sequences=beams, eos_token_id=[eos] + extra_eos, pad_token_id=PAD)
        outs[early] = check_hf(model, ids, mask, GenerationConfig(**kw), kw)
    a, b = outs[False], outs["never"]
    assert a.shape != b.shape or not torch.equal(a, b), "case should tell False from 'never'"


@pytest.mark.parametrize("pad", [0, None])
def test_beam_fill_value_and_eos_list_match_hf(tiny, pad):
    """Two eos ids (K = 3N candidates), and HF's fill value: eos[0] when pad is 0 or unset."""
    model, ids, mask, eos = tiny
    other = int(run_ours(model, ids, mask, GenerationConfig(max_new_tokens=3))[0, 1])
    kw = dict(max_new_tokens=9, num_beams=4, num_return_sequences=2, eos_token_id=[eos, other], pad_token_id=pad)
    check_hf(model, ids, mask, GenerationConfig(**kw), kw)


def test_beam_without_eos_matches_hf(tiny):
    model, ids, mask, _ = tiny
    kw = dict(max_new_tokens=6, num_beams=3, num_return_sequences=2)
    check_hf(model, ids, mask, GenerationConfig(pad_token_id=PAD, **kw),
             dict(eos_token_id=None, pad_token_id=PAD, **kw))


@pytest.mark.parametrize("beams", [1, 3])
def test_repetition_penalty_matches_hf(tiny, beams):
    model, ids, mask, eos = tiny
    kw = dict(max_new_tokens=10, num_beams=beams, repetition_penalty=1.7, eos_token_id=eos, pad_token_id=PAD)
    prompt = ids.masked_fill(mask == 0, -1)  # left padding is not part of the prompt
    check_hf(model, ids, mask, GenerationConfig(**kw), kw, prompt_tokens=prompt)


def test_sampling_seeded_and_top_k_1_is_greedy(tiny):
    model, ids, mask, eos = tiny
    cfg = GenerationConfig(max_new_tokens=12, do_sample=True, top_k=0, temperature=1.5, num_return_sequences=2,
                           eos_token_id=eos, pad_token_id=PAD)
    a = run_ours(model, ids, mask, cfg, torch.Generator().manual_seed(7))
    b = run_ours(model, ids, mask, cfg, torch.Generator().manual_seed(7))
    c = run_ours(model, ids, mask, cfg, torch.Generator().manual_seed(8))
    assert a.shape[0] == 2 * ids.shape[0]
    assert torch.equal(a, b) and not torch.equal(a[:, :5], c[:, :5])
    greedy = run_ours(model, ids, mask, GenerationConfig(max_new_tokens=12, eos_token_id=eos, pad_token_id=PAD))
    top1_cfg = GenerationConfig(max_new_tokens=12, do_sample=True, top_k=1, eos_token_id=eos, pad_token_id=PAD)
    top1 = run_ours(model, ids, mask, top1_cfg, torch.Generator().manual_seed(3))
    assert_same(top1, greedy)


def test_beam_sampling_is_seeded(tiny):
    model, ids, mask, eos = tiny
    cfg = GenerationConfig(max_new_tokens=8, num_beams=3, do_sample=True, top_p=0.9,
                           eos_token_id=eos, pad_token_id=PAD)
    a = run_ours(model, ids, mask, cfg, torch.Generator().manual_seed(5))
    b = run_ours(model, ids, mask, cfg, torch.Generator().manual_seed(5))
    assert torch.equal(a, b) and a.shape[0] == ids.shape[0]


@pytest.mark.parametrize("top_k,top_p,temp", [(3, 1.0, 1.0), (0, 0.6, 1.0), (5, 0.8, 0.7), (0, 0.3, 2.0)])
def test_sampling_stays_in_support(top_k, top_p, temp):
    """Fixed logits per row: every draw lies in the top-k / top-p set computed here from scratch."""
    vocab, batch, steps = 16, 4, 50
    base = torch.randn(batch, vocab, generator=torch.Generator().manual_seed(0)) * 2
    state = FakeState(batch, lambda r, t: base[r])
    cfg = GenerationConfig(max_new_tokens=steps, do_sample=True, top_k=top_k, top_p=top_p, temperature=temp)
    out = generate_tokens(state, state.logits(), cfg, torch.Generator().manual_seed(1))
    for r in range(batch):
        probs = (base[r] / temp).softmax(-1)
        order = probs.argsort(descending=True)
        allowed = order[:top_k] if top_k else order
        p = probs[allowed] / probs[allowed].sum()
        # smallest prefix reaching mass top_p (the HF rule removes tails with mass <= 1 - top_p)
        n = int((p.cumsum(0) < top_p - 1e-6).sum()) + 1 if top_p < 1 else len(allowed)
        support = set(allowed[:n].tolist())
        drawn = set(out[r].tolist())
        assert drawn <= support, (r, drawn, support)
        if len(support) > 1:
            assert len(drawn) > 1  # it really samples


def test_eos_pad_semantics_scripted():
    """Row 0 emits eos (7) at t=2 and then pads; row 1 emits eos at t=4; the loop stops there
    and never steps for a token it will not use."""
    eos_at = {0: 2, 1: 4}
    state = FakeState(2, lambda r, t: one_hot_logits(7 if t == eos_at[r] else 3 + t % 3))
    cfg = GenerationConfig(max_new_tokens=10, eos_token_id=7, pad_token_id=0)
    out = generate_tokens(state, state.logits(), cfg)
    assert out.tolist() == [[3, 4, 7, 0, 0], [3, 4, 5, 3, 7]]
    assert [c[0] for c in state.calls] == ["step"] * 4


def test_min_new_tokens_masks_eos_scripted():
    state = FakeState(1, lambda r, t: one_hot_logits(7, high=9.0) + one_hot_logits(5, high=4.0))
    cfg = GenerationConfig(max_new_tokens=10, min_new_tokens=3, eos_token_id=[7, 6], pad_token_id=0)
    assert generate_tokens(state, state.logits(), cfg).tolist() == [[5, 5, 5, 7]]


def test_no_eos_runs_to_max_scripted():
    state = FakeState(2, lambda r, t: one_hot_logits(r + 2))
    out = generate_tokens(state, state.logits(), GenerationConfig(max_new_tokens=4))
    assert out.tolist() == [[2] * 4, [3] * 4] and len(state.calls) == 3


def test_beam_expands_rows_in_place_scripted():
    state = FakeState(2, lambda r, t: one_hot_logits(r + 2, high=1.0))
    generate_tokens(state, state.logits(), GenerationConfig(max_new_tokens=3, num_beams=3))
    kind, index = state.calls[0]
    assert kind == "reorder" and index.tolist() == [0, 0, 0, 1, 1, 1]
    assert state.rows.tolist() == [0, 0, 0, 1, 1, 1]  # beams never leave their sample


@pytest.mark.parametrize("kw,needle", [
    (dict(num_beam=2), "unknown generation argument(s): num_beam"),
    (dict(num_beams=0), "num_beams=0"),
    (dict(do_sample=True, temperature=0.0), "temperature=0.0"),
    (dict(top_p=0.0), "top_p=0.0"),
    (dict(top_p=1.5), "top_p=1.5"),
    (dict(top_k=-1), "top_k=-1"),
    (dict(max_new_tokens=0), "max_new_tokens=0"),
    (dict(num_beams=2, num_return_sequences=3), "must be <= num_beams (2)"),
    (dict(num_return_sequences=2), "greedy decoding returns one sequence"),
    (dict(early_stopping="sometimes"), "early_stopping='sometimes'"),
    (dict(eos_token_id=[]), "eos_token_id=[]"),
    (dict(max_length=20), "max_length=20 counts the prompt"),
    (dict(max_length=5, prompt_length=5), "leaves no room"),
    (dict(repetition_penalty=0.0), "repetition_penalty=0.0"),
    (dict(top_p="0.5"), "top_p='0.5': must be a number"),
])
def test_config_errors_name_the_argument(kw, needle):
    with pytest.raises(GenerationConfigError) as err:
        GenerationConfig.from_kwargs(**kw)
    assert needle in str(err.value)


def test_from_kwargs_none_means_unset():
    cfg = GenerationConfig.from_kwargs(max_new_tokens=None, top_k=None, eos_token_id=None, num_beams=3)
    assert (cfg.max_new_tokens, cfg.top_k, cfg.num_beams, cfg.eos_token_id) == (20, 50, 3, None)
    assert GenerationConfig.from_kwargs(max_length=30, max_new_tokens=5).max_new_tokens == 5  # as HF


@pytest.mark.parametrize("every", [2, 3, 8])
@pytest.mark.parametrize("kw", [
    dict(max_new_tokens=30),
    dict(max_new_tokens=14, num_beams=3, length_penalty=1.0, early_stopping=True, num_return_sequences=3),
    dict(max_new_tokens=14, num_beams=2, length_penalty=1.0, early_stopping=False),
    dict(max_new_tokens=14, num_beams=3, length_penalty=-1.0, early_stopping="never", num_return_sequences=2),
], ids=["greedy", "beam3-early", "beam2-heuristic", "beam3-never"])
def test_checking_the_stop_flag_every_few_steps_changes_no_token(tiny, every, kw):
    """Steps run after every row (or every beam search) stopped must not change the output:
    the result of checking every `every` steps is transformers' result (checked every step)."""
    model, ids, mask, eos = tiny
    kw = dict(kw, eos_token_id=[eos, 2, 18], pad_token_id=PAD)  # frequent eos: searches end early
    ref = model.generate(ids, attention_mask=mask, do_sample=False, **kw)[:, ids.shape[1]:]
    assert ref.shape[1] < kw["max_new_tokens"], "fixture should stop before max_new_tokens"
    ours = run_ours(model, ids, mask, GenerationConfig(**kw, stop_check_every=every))
    assert_same(ours, ref)


def test_decode_options_are_validated():
    with pytest.raises(GenerationConfigError, match="compile"):
        GenerationConfig(compile="default")  # a compiled step needs the static cache
    with pytest.raises(GenerationConfigError, match="cache_implementation"):
        GenerationConfig(cache_implementation="paged")
    with pytest.raises(GenerationConfigError, match="stop_check_every"):
        GenerationConfig(stop_check_every=0)

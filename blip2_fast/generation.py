"""Model-agnostic token generation: greedy, sampling and beam search, token for token as
transformers v5 `generate` (`GenerationMixin._sample` / `_beam_search`) decides them.

Contract. The caller runs the prompt itself and hands over the logits of the last prompt
position `first_logits (B, V)` and a `DecoderState` that owns the KV cache, attention mask
and positions: `state.step(tokens (B',)) -> logits (B', V)` appends one token per row, and
`state.reorder(index (B',))` gathers batch rows. The engine calls `reorder` once to expand
B -> B*num_beams (beam search) or B*num_return_sequences (sampling), rows repeated in place
(`repeat_interleave`, as HF), then once per beam-search step. It never calls `step` for a
token it will not use: after the last token, or when every row has stopped.
`generate_tokens` returns only the new tokens, (B*num_return_sequences, new_len).

Logits processing (fp32, in HF's order): repetition penalty (over `prompt_tokens`, if
given, and the generated tokens), min_new_tokens (eos -> -inf while fewer than
min_new_tokens were generated), then, only when sampling, temperature, top-k (ties with
the k-th value kept) and top-p (drop the low tail whose cumulative probability is
<= 1 - top_p). Beam search applies them to log_softmax(logits), greedy/sampling to the
raw logits, as HF does.

Greedy / sampling. argmax, or a categorical draw as argmax(p / E) with E ~ Exp(1) from the
caller's torch.Generator (the exponential race; reproducible per seed, not HF's RNG
stream). A row that emitted eos is finished: its later tokens are pad_token_id (eos[0]
when no pad is given). Generation stops at max_new_tokens or when every row finished.

Beam search (HF v5's vectorised algorithm, reproduced with the same tensor ops so ties
and the -1e9 sentinels resolve identically). Per sample: N running beams and N finished
hypotheses. Each step takes the top K = max(2, 1 + #eos) * N of (beam score + log-prob)
over all beams x vocab (K > N keeps N live beams when eos wins many slots). Candidates
ending in eos, or reaching max_new_tokens, "hit" stopping; the best N non-hitting
candidates run on; hitting candidates among the first N of K enter the finished pool with
score sum_logprob / generated_len ** length_penalty, generated_len counting the new
tokens including eos (not the prompt). Nothing enters a pool that is full while
early_stopping is True, nor once improvement was judged impossible: a sample stops
improving when the best running score / L ** length_penalty cannot beat its worst
finished score, L = tokens generated so far, or max_new_tokens when
early_stopping == "never" and length_penalty > 0. The loop ends when no sample can
improve, or (early_stopping True) every pool is full, or every candidate hit stopping.
The first num_return_sequences hypotheses of each pool are returned, cut to the longest.
HF quirk kept on purpose: beam outputs are padded with `pad or eos[0]` (so eos[0] when
pad_token_id == 0, e.g. T5), and -1 when there is no eos.

Hot path: one host synchronisation per step (the stop flag), or per `stop_check_every` steps;
everything else, including sampling and beam bookkeeping, stays on the device and is
vectorised over batch and beams.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Protocol

import torch
import torch.nn.functional as F

_NEG = -1.0e9  # HF's "impossible" sentinel; kept identical so float32 ties break the same way


class DecoderState(Protocol):
    """What a model exposes to the engine after running the prompt."""

    def step(self, tokens: torch.Tensor) -> torch.Tensor:
        """Append tokens (B,) (one per row); return next-token logits (B, V)."""
        ...

    def reorder(self, index: torch.Tensor) -> None:
        """Gather batch rows: new row i is old row index[i]; index may change B."""
        ...


class GenerationConfigError(ValueError):
    """An unknown or invalid generation argument; the message names it."""


@dataclass
class GenerationConfig:
    max_new_tokens: int = 20
    min_new_tokens: int = 0
    num_beams: int = 1
    do_sample: bool = False
    temperature: float = 1.0
    top_k: int = 50  # 0 disables
    top_p: float = 1.0
    length_penalty: float = 1.0
    early_stopping: bool | str = False  # True, False or "never"
    num_return_sequences: int = 1
    eos_token_id: int | list[int] | None = None
    pad_token_id: int | None = None
    repetition_penalty: float = 1.0
    # How the model decodes (not how tokens are chosen): "dynamic" grows the KV cache view step
    # by step; "static" keeps every step's shapes fixed (models/static_decode.py), optionally
    # compiled with torch.compile mode `compile`. stop_check_every: read the "all rows stopped"
    # flag on the host every that many steps (1: every step, as transformers); extra steps after
    # everything stopped change no output, they only cost time.
    cache_implementation: str = "dynamic"
    compile: str | None = None
    stop_check_every: int = 1

    def __post_init__(self):
        def bad(name, why):
            raise GenerationConfigError(f"{name}={getattr(self, name)!r}: {why}")

        def is_int(v):
            return isinstance(v, int) and not isinstance(v, bool)

        for name in ("temperature", "top_p", "length_penalty", "repetition_penalty"):
            if not isinstance(getattr(self, name), (int, float)) or isinstance(getattr(self, name), bool):
                bad(name, "must be a number")

        if not is_int(self.max_new_tokens) or self.max_new_tokens < 1:
            bad("max_new_tokens", "must be an integer >= 1")
        if not is_int(self.min_new_tokens) or self.min_new_tokens < 0:
            bad("min_new_tokens", "must be an integer >= 0")
        if not is_int(self.num_beams) or self.num_beams < 1:
            bad("num_beams", "must be an integer >= 1")
        if not is_int(self.num_return_sequences) or self.num_return_sequences < 1:
            bad("num_return_sequences", "must be an integer >= 1")
        if not isinstance(self.do_sample, bool):
            bad("do_sample", "must be a bool")
        if self.early_stopping not in (True, False, "never") or not isinstance(self.early_stopping, (bool, str)):
            bad("early_stopping", "must be True, False or 'never'")
        if not is_int(self.top_k) or self.top_k < 0:
            bad("top_k", "must be an integer >= 0 (0 disables top-k)")
        if not 0.0 < self.top_p <= 1.0:
            bad("top_p", "must lie in (0, 1]")
        if self.do_sample and not self.temperature > 0.0:
            bad("temperature", "must be > 0 when sampling (use do_sample=False for greedy)")
        if not self.repetition_penalty > 0.0:
            bad("repetition_penalty", "must be > 0 (1.0 disables it)")
        if self.num_beams == 1 and not self.do_sample and self.num_return_sequences != 1:
            bad("num_return_sequences", "greedy decoding returns one sequence per prompt; "
                "use num_beams > 1 or do_sample=True")
        if self.num_beams > 1 and self.num_return_sequences > self.num_beams:
            bad("num_return_sequences", f"must be <= num_beams ({self.num_beams})")
        eos = self.eos_token_id
        eos = [eos] if is_int(eos) else eos
        if eos is not None and (not isinstance(eos, (list, tuple)) or not eos
                                or not all(is_int(e) and e >= 0 for e in eos)):
            bad("eos_token_id", "must be a non-negative int or a non-empty list of them")
        if self.pad_token_id is not None and (not is_int(self.pad_token_id) or self.pad_token_id < 0):
            bad("pad_token_id", "must be a non-negative int")
        if self.cache_implementation not in ("dynamic", "static"):
            bad("cache_implementation", "must be 'dynamic' or 'static'")
        if self.compile not in (None, "default", "reduce-overhead", "max-autotune"):
            bad("compile", "must be None, 'default', 'reduce-overhead' or 'max-autotune'")
        if self.compile is not None and self.cache_implementation != "static":
            bad("compile", "needs cache_implementation='static' (a compiled step needs fixed shapes)")
        if not is_int(self.stop_check_every) or self.stop_check_every < 1:
            bad("stop_check_every", "must be an integer >= 1")

    @property
    def eos_ids(self) -> list[int]:
        e = self.eos_token_id
        return [] if e is None else [e] if isinstance(e, int) else list(e)

    @classmethod
    def from_kwargs(cls, prompt_length: int | None = None, **kw) -> "GenerationConfig":
        """Build from HF-style keyword arguments; None means "unset" (as in HF).

        `max_length` / `min_length` count the prompt in HF, so they need `prompt_length`
        (the padded prompt length, HF's input_ids.shape[1]); max_new_tokens wins over
        max_length as in HF, and min_length combines with min_new_tokens (both mask eos).
        """
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(kw) - names - {"max_length", "min_length"})
        if unknown:
            raise GenerationConfigError(f"unknown generation argument(s): {', '.join(unknown)}; "
                                        f"known: {', '.join(sorted(names | {'max_length', 'min_length'}))}")
        kw = {k: v for k, v in kw.items() if v is not None}
        max_length, min_length = kw.pop("max_length", None), kw.pop("min_length", None)
        if "max_new_tokens" in kw:
            max_length = None  # HF: max_new_tokens takes precedence
        for name, value in (("max_length", max_length), ("min_length", min_length)):
            if value is not None and prompt_length is None:
                raise GenerationConfigError(f"{name}={value} counts the prompt: pass prompt_length= "
                                            f"(or use {name.replace('length', 'new_tokens')})")
        if max_length is not None:
            if max_length - prompt_length < 1:
                raise GenerationConfigError(f"max_length={max_length} leaves no room after a prompt of "
                                            f"{prompt_length} tokens")
            kw["max_new_tokens"] = max_length - prompt_length
        if min_length is not None:
            kw["min_new_tokens"] = max(kw.get("min_new_tokens", 0), min_length - prompt_length, 0)
        return cls(**kw)


def _process(scores: torch.Tensor, t: int, cfg: GenerationConfig, eos: torch.Tensor | None,
             seen: torch.Tensor | None, min_keep: int) -> torch.Tensor:
    """HF's logits-processor chain on fp32 scores (N, V) at new-token index t."""
    if seen is not None:
        p = cfg.repetition_penalty
        scores = torch.where(seen, torch.where(scores < 0, scores * p, scores / p), scores)
    if eos is not None and t < cfg.min_new_tokens:
        scores = scores.index_fill(1, eos, float("-inf"))
    if not cfg.do_sample:
        return scores
    if cfg.temperature != 1.0:
        scores = scores / float(cfg.temperature)
    if cfg.top_k != 0:
        k = min(max(cfg.top_k, min_keep), scores.shape[-1])
        kth = torch.topk(scores, k).values[..., -1:]
        scores = scores.masked_fill(scores < kth, float("-inf"))
    if cfg.top_p < 1.0:
        sorted_scores, order = torch.sort(scores, descending=False)
        drop = sorted_scores.softmax(-1).cumsum(-1) <= 1.0 - cfg.top_p
        drop[..., -min_keep:] = False  # the most likely tokens always survive
        scores = scores.masked_fill(drop.scatter(1, order, drop), float("-inf"))
    return scores


def _exp_noise(like: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    # Exp(1) noise; clamped away from 0 so p / E never forms 0/0 = nan for filtered tokens.
    return torch.empty_like(like).exponential_(generator=generator).clamp_min_(torch.finfo(like.dtype).tiny)


def _mark_seen(seen: torch.Tensor | None, tokens: torch.Tensor) -> None:
    if seen is not None:
        seen.scatter_(1, tokens[:, None], True)


def _initial_seen(prompt_tokens, rows: int, vocab: int, expand: int, device) -> torch.Tensor:
    # One extra column absorbs ignored (negative) prompt entries, then is dropped.
    seen = torch.zeros(rows, vocab + 1, dtype=torch.bool, device=device)
    if prompt_tokens is not None:
        ids = prompt_tokens.to(device).repeat_interleave(expand, 0)
        seen.scatter_(1, torch.where(ids < 0, vocab, ids), True)
    return seen[:, :vocab]


@torch.no_grad()
def generate_tokens(state: DecoderState, first_logits: torch.Tensor, config: GenerationConfig,
                    generator: torch.Generator | None = None,
                    prompt_tokens: torch.Tensor | None = None) -> torch.Tensor:
    """Generate new tokens after a prefilled prompt; returns (B * num_return_sequences, new_len).

    `generator` drives sampling (it must live on the logits' device). `prompt_tokens (B, L)`
    is only read by repetition_penalty, which HF applies to prompt tokens too; negative
    entries (e.g. left padding) are ignored. Without it only generated tokens are penalised.
    """
    if first_logits.dim() != 2:
        raise ValueError(f"first_logits must be (B, V), got {tuple(first_logits.shape)}")
    if config.num_beams > 1:
        return _beam_search(state, first_logits, config, generator, prompt_tokens)
    return _greedy_or_sample(state, first_logits, config, generator, prompt_tokens)


def _greedy_or_sample(state, logits, cfg, generator, prompt_tokens):
    batch, vocab = logits.shape
    device = logits.device
    n = cfg.num_return_sequences
    if n > 1:
        state.reorder(torch.arange(batch, device=device).repeat_interleave(n))
        logits = logits.repeat_interleave(n, 0)
    rows = batch * n
    eos = torch.tensor(cfg.eos_ids, device=device) if cfg.eos_ids else None
    pad = cfg.pad_token_id if cfg.pad_token_id is not None else (cfg.eos_ids[0] if eos is not None else 0)
    seen = _initial_seen(prompt_tokens, rows, vocab, n, device) if cfg.repetition_penalty != 1.0 else None
    unfinished = torch.ones(rows, dtype=torch.bool, device=device)
    out = torch.empty(rows, cfg.max_new_tokens, dtype=torch.long, device=device)
    # the step at which every row had stopped (max_new_tokens while some row runs): what the
    # output is cut to, so checking the flag only every few steps changes no output
    stopped_at = torch.full((), cfg.max_new_tokens, dtype=torch.long, device=device)
    for t in range(cfg.max_new_tokens):
        if t > 0:
            logits = state.step(tokens)
        scores = _process(logits.float(), t, cfg, eos, seen, 1)
        if cfg.do_sample:
            tokens = torch.argmax(scores.softmax(-1) / _exp_noise(scores, generator), dim=-1)
        else:
            tokens = torch.argmax(scores, dim=-1)
        if eos is not None:
            tokens = torch.where(unfinished, tokens, pad)  # finished rows emit padding
            unfinished &= ~torch.isin(tokens, eos)
        out[:, t] = tokens
        _mark_seen(seen, tokens)
        if eos is not None:
            stopped_at = torch.where(unfinished.any() | (stopped_at < t + 1), stopped_at, t + 1)
        if t + 1 == cfg.max_new_tokens:
            break
        if eos is not None and (t + 1) % cfg.stop_check_every == 0 and not bool(unfinished.any()):
            break  # the one host sync, every step by default
    if cfg.stop_check_every == 1:
        return out[:, :t + 1].contiguous()
    return out[:, :int(stopped_at)].contiguous()  # once, after the loop


def _beam_search(state, logits, cfg, generator, prompt_tokens):
    batch, vocab = logits.shape
    device = logits.device
    nb, steps, lp = cfg.num_beams, cfg.max_new_tokens, cfg.length_penalty
    early = cfg.early_stopping
    eos_ids = cfg.eos_ids
    eos = torch.tensor(eos_ids, device=device) if eos_ids else None
    n_keep = max(2, 1 + len(eos_ids)) * nb  # candidates per sample and step
    top_mask = torch.arange(n_keep, device=device) < nb  # only the first N may finish
    fill = (cfg.pad_token_id or eos_ids[0]) if eos_ids else -1  # HF's fill value, quirks included
    min_keep = len(eos_ids) + 1 if eos_ids else 2  # beam sampling keeps one non-eos token

    state.reorder(torch.arange(batch, device=device).repeat_interleave(nb))
    logits = logits.repeat_interleave(nb, 0)
    seen = _initial_seen(prompt_tokens, batch * nb, vocab, nb, device) if cfg.repetition_penalty != 1.0 else None
    offsets = torch.arange(batch, device=device)[:, None] * nb  # (B, 1) flat row of beam 0

    run_tok = torch.full((batch, nb, steps), fill, dtype=torch.long, device=device)  # (B, N, T)
    run_score = torch.zeros(batch, nb, dtype=torch.float32, device=device)
    run_score[:, 1:] = _NEG  # all beams start identical: only beam 0 may expand at first
    fin_tok = run_tok.clone()
    fin_score = torch.full((batch, nb), _NEG, dtype=torch.float32, device=device)
    fin_len = torch.zeros(batch, nb, dtype=torch.long, device=device)
    is_fin = torch.zeros(batch, nb, dtype=torch.bool, device=device)
    improvable = torch.ones(batch, 1, dtype=torch.bool, device=device)
    # with a deferred stop check, whether the search still runs lives on the device
    active = torch.ones((), dtype=torch.bool, device=device) if cfg.stop_check_every > 1 else None

    for t in range(steps):
        if t > 0:
            logits = state.step(run_tok[:, :, t - 1].reshape(-1))
        logp = _process(F.log_softmax(logits.float(), dim=-1), t, cfg, eos, seen, min_keep)
        acc = (logp.view(batch, nb, vocab) + run_score[:, :, None]).view(batch, nb * vocab)
        if cfg.do_sample:
            # K draws without replacement from softmax(acc): Gumbel-top-k, then HF's descending sort.
            idx = torch.topk(acc - _exp_noise(acc, generator).log(), n_keep).indices
            cand_score, order = acc.gather(1, idx).sort(dim=-1, descending=True)
            idx = idx.gather(1, order)
        else:
            cand_score, idx = torch.topk(acc, n_keep)  # (B, K), sorted
        src = idx // vocab  # (B, K) source beam
        tok = idx % vocab
        cand_tok = run_tok.gather(1, src[:, :, None].expand(-1, -1, steps)).clone()  # (B, K, T)
        cand_tok[:, :, t] = tok
        hits = torch.isin(tok, eos) if eos is not None else torch.zeros_like(tok, dtype=torch.bool)
        if t + 1 == steps:
            hits = torch.ones_like(hits)  # max length: every candidate stops

        # Running beams: the best N candidates that did not stop.
        live_score = cand_score + hits.to(torch.float32) * _NEG
        pick = torch.topk(live_score, nb).indices  # (B, N)
        run_tok = cand_tok.gather(1, pick[:, :, None].expand(-1, -1, steps))
        run_score = live_score.gather(1, pick)
        parent = (src.gather(1, pick) + offsets).view(-1)  # flat rows feeding the new beams

        # Finished pool: merge newly stopped top-N candidates, keep the best N.
        new_fin = hits & top_mask[None, :]
        score = cand_score / ((t + 1) ** lp)
        score = score + (is_fin.all(-1, keepdim=True) & (early is True)).to(torch.float32) * _NEG
        score = score + (~improvable).to(torch.float32) * _NEG
        score = score + (~new_fin) * _NEG
        keep = torch.topk(torch.cat((fin_score, score), 1), nb).indices
        cand_len = torch.full_like(tok, t + 1)
        pools = (torch.cat((fin_tok, cand_tok), 1).gather(1, keep[:, :, None].expand(-1, -1, steps)),
                 torch.cat((fin_score, score), 1).gather(1, keep),
                 torch.cat((fin_len, cand_len), 1).gather(1, keep),
                 torch.cat((is_fin, new_fin), 1).gather(1, keep))
        if active is None:
            fin_tok, fin_score, fin_len, is_fin = pools
        else:  # steps run after the search ended (deferred stop check) leave the pools as they were
            fin_tok, fin_score, fin_len, is_fin = (torch.where(active, new, old) for new, old in
                                                   zip(pools, (fin_tok, fin_score, fin_len, is_fin)))

        # Can the best running beam still beat the worst finished hypothesis?
        best_len = steps if (early == "never" and lp > 0.0) else t + 1
        best_run = run_score[:, :1] / (best_len ** lp)
        worst_fin = torch.where(is_fin, fin_score.min(dim=1, keepdim=True)[0], _NEG)
        improvable = improvable & (best_run > worst_fin).any(-1, keepdim=True)
        # HF's third stop condition, "every candidate hit a stopping criterion", can only
        # hold at max length (N beams x #eos eos-candidates < K): the loop bound covers it.
        go_on = improvable.any() & ~(is_fin.all() & (early is True))
        if active is not None:
            active = active & go_on
        if t + 1 == steps or ((t + 1) % cfg.stop_check_every == 0 and not bool(go_on)):
            break  # the one host sync, every step by default
        state.reorder(parent)
        if seen is not None:
            seen = seen.index_select(0, parent)
            _mark_seen(seen, run_tok[:, :, t].reshape(-1))

    nrs = cfg.num_return_sequences
    out_len = int(fin_len[:, :nrs].max())  # once, after the loop
    return fin_tok[:, :nrs, :out_len].reshape(batch * nrs, out_len)

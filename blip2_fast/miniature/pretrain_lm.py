"""Pretrain the miniature's language model (the OPT BLIP-2 keeps frozen) on the world's text.

Our `OPTLM(cfg.text)`, trained as a causal LM on `blip2_fast.bpe.world_corpus`: for each
scene its caption, then one "Question: {q} Answer: {a}" line per question (the prompt format
BLIP-2 uses with OPT). Each line is `</s> tokens </s>`: the tokenizer prepends BOS (= </s>, as
OPT) and we append EOS, so the LM learns where a caption or an answer ends — what lets stage 2
and VQA stop generating. Lines are right-padded with <pad>; padding is neither attended nor
predicted. The text stream is drawn on the fly (no scene is repeated); validation lines come
from another split and seed.

The saved state_dict has our keys, which are transformers' `language_model.*` keys minus the
prefix (`model.decoder.layers.0.self_attn.q_proj.weight`, ...); `lm_head.weight` is tied to
`model.decoder.embed_tokens.weight` and, as transformers does, not written.

A floor on the loss: the captions' and answers' attributes are random, so no LM can predict
them from text alone; what it must learn is the grammar, the vocabulary of each slot and
where a line ends. `entropy_floor` measures that floor independently of any model: the
world's text has a few thousand distinct lines, so their frequencies over 100k scenes give the
entropy of a line, and the floor per predicted token is that entropy over the mean number of
predicted tokens per line (the best any LM can reach on the token-weighted validation loss).

Measured (2-core CPU, defaults, seed 0): 800 steps in 83 s; validation loss 0.430 per token
against an entropy floor of 0.413 (perplexity 1.54), next-token accuracy 0.78 (the rest are the
random attribute words). Given the scene's caption in front, a line's loss is 0.388 (0.430
alone). Split up (200 documents each): question lines 0.33 in context against 0.38 alone, but
caption lines -- which the context gives word for word -- 0.72 in context against 0.69 alone,
after 800 steps and after 3000 alike: no copying circuit forms, and the recipe's stage 2 on this
LM reaches VQA 0.48 only. See `pretrain_lm` for what was tried.
"""
from __future__ import annotations

import itertools
from collections import Counter
import json
import logging
import math
import os
import time
from typing import Iterator

import torch
import torch.nn.functional as F
from tokenizers import Tokenizer
from tqdm import tqdm

from ..bpe import EOS, world_corpus
from ..world import caption, questions, sample_scene, scene_rng
from ..models.opt import OPTLM
from .preset import (NUM_QUERY_TOKENS, PAD_ID, init_weights_, load_weights, make_optimizer, miniature_opt_config, save_weights,
                     set_threads, warmup_cosine)

log = logging.getLogger("blip2_fast.miniature")

WEIGHTS_FILE = "language_model.safetensors"
TIED = "lm_head.weight"


def load_tokenizer(tokenizer_dir: str) -> Tokenizer:
    path = os.path.join(tokenizer_dir, "tokenizer.json")
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path}: no tokenizer (train it with blip2_fast.bpe.train_bpe_tokenizer)")
    return Tokenizer.from_file(path)


def encode_lines(tok: Tokenizer, lines: list[str], max_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """`</s> line </s>` per line, right-padded: input_ids and attention_mask (B, L)."""
    eos = tok.token_to_id(EOS)
    rows = [e.ids + [eos] for e in tok.encode_batch(lines)]
    too_long = [(l, len(r)) for l, r in zip(lines, rows) if len(r) > max_len]
    if too_long:
        raise ValueError(f"line {too_long[0][0]!r} is {too_long[0][1]} tokens, over the LM's {max_len} positions")
    L = max(len(r) for r in rows)
    ids = torch.full((len(rows), L), PAD_ID, dtype=torch.long)
    mask = torch.zeros(len(rows), L, dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, : len(r)] = torch.tensor(r)
        mask[i, : len(r)] = 1
    return ids, mask


def scene_documents(n: int, seed: int, split: str) -> Iterator[tuple[str, str]]:
    """(caption, line) for every line `world_corpus` yields, the scene's caption as context:
    the caption itself, then each "Question: q Answer: a" line of that scene."""
    for i in range(n):
        rng = scene_rng(seed, i, split)
        scene = sample_scene(rng)
        text = caption(scene)
        yield text, text
        for q, a in questions(scene, rng):
            yield text, f"Question: {q} Answer: {a}"


def encode_documents(tok: Tokenizer, docs: list[tuple[str, str]], max_len: int):
    """`</s> context </s> line </s>` per document, right-padded: input_ids, attention_mask and
    line_mask (1 on the line's tokens and its closing </s>, the ones a soft prompt will precede)."""
    eos = tok.token_to_id(EOS)
    ctx = tok.encode_batch([c for c, _ in docs])
    lines = tok.encode_batch([l for _, l in docs])
    # the tokenizer puts </s> in front of each text: the context's closing </s> is the line's opening one
    rows = [(c.ids + [eos], l.ids[1:] + [eos]) for c, l in zip(ctx, lines)]
    L = max(len(a) + len(b) for a, b in rows)
    if L > max_len:
        raise ValueError(f"a context document is {L} tokens, over the LM's {max_len} positions")
    ids = torch.full((len(rows), L), PAD_ID, dtype=torch.long)
    mask, line_mask = torch.zeros_like(ids), torch.zeros_like(ids)
    for i, (a, b) in enumerate(rows):
        ids[i, : len(a) + len(b)] = torch.tensor(a + b)
        mask[i, : len(a) + len(b)] = 1
        line_mask[i, len(a): len(a) + len(b)] = 1
    return ids, mask, line_mask


def lm_loss(model: OPTLM, ids: torch.Tensor, mask: torch.Tensor, prefix: int = 0,
            generator: torch.Generator | None = None,
            loss_mask: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, int]:
    """(mean next-token loss, number of correct argmax predictions, number of predicted tokens).

    prefix: that many random vectors in front of every line (attended to, never predicted),
    Gaussian at the embedding table's scale: what BLIP-2 puts there is the Q-Former's soft
    prompt, unknown to a text-only LM. loss_mask: only tokens where it is 1 are predicted."""
    embeds = model.get_input_embeddings()(ids)
    if prefix:
        table = model.get_input_embeddings().weight.detach()
        noise = torch.randn(ids.shape[0], prefix, embeds.shape[-1], generator=generator) * table.std()
        embeds = torch.cat([noise.to(embeds.dtype), embeds], 1)
        mask = torch.cat([mask.new_ones(ids.shape[0], prefix), mask], 1)
    logits = model(embeds, mask)[:, prefix:]  # (B, L, V)
    mask = mask[:, prefix:]
    keep = mask if loss_mask is None else mask * loss_mask
    target = ids[:, 1:].masked_fill(keep[:, 1:] == 0, -100)
    flat = logits[:, :-1].float().reshape(-1, logits.shape[-1])
    loss = F.cross_entropy(flat, target.reshape(-1), ignore_index=-100)
    valid = target != -100
    correct = ((logits[:, :-1].argmax(-1) == target) & valid).sum()
    return loss, correct, int(valid.sum())


@torch.no_grad()
def evaluate(model: OPTLM, tok: Tokenizer, seed: int, n_scenes: int, batch_size: int = 256, prefix: int = 0) -> dict:
    """Token-weighted validation loss, perplexity and next-token accuracy on fresh scenes' text
    (behind `prefix` random vectors, see `lm_loss`)."""
    model.eval()
    gen = torch.Generator().manual_seed(seed)
    lines = list(world_corpus(n_scenes, seed, split="lm_val"))
    total, correct, count = 0.0, 0, 0
    for start in range(0, len(lines), batch_size):
        ids, mask = encode_lines(tok, lines[start:start + batch_size], model.config.max_position_embeddings)
        loss, ok, n = lm_loss(model, ids, mask, prefix, gen)
        total += float(loss) * n
        correct += int(ok)
        count += n
    return {"val_loss": total / count, "val_perplexity": math.exp(total / count),
            "val_token_accuracy": correct / count, "val_lines": len(lines), "val_tokens": count}


@torch.no_grad()
def in_context_loss(model: OPTLM, tok: Tokenizer, seed: int, n_scenes: int, batch_size: int = 256) -> float:
    """Token-weighted loss of each line given its scene's caption in front (`scene_documents`):
    near 0 when the LM reads the attributes from the context."""
    model.eval()
    docs = list(scene_documents(n_scenes, seed, split="lm_val"))
    total, count = 0.0, 0
    for start in range(0, len(docs), batch_size):
        ids, mask, line = encode_documents(tok, docs[start:start + batch_size], model.config.max_position_embeddings)
        loss, _, n = lm_loss(model, ids, mask, loss_mask=line)
        total, count = total + float(loss) * n, count + n
    return total / count


def entropy_floor(tok: Tokenizer, n_scenes: int = 100_000, seed: int = 7) -> float:
    """Nats per predicted token that no LM can beat (module docstring), by counting lines."""
    counts = Counter(world_corpus(n_scenes, seed, split="lm_floor"))
    n = sum(counts.values())
    entropy = -sum(c / n * math.log(c / n) for c in counts.values())  # nats per line
    # predicted tokens per line: everything after BOS, plus the appended EOS = len(encode(line))
    tokens = sum(c * len(tok.encode(line).ids) for line, c in counts.items()) / n
    return entropy / tokens


def pretrain_lm(out_dir: str, tokenizer_dir: str, steps: int = 800, batch_size: int = 64, seed: int = 0,
                lr: float = 1e-3, warmup: int = 50, weight_decay: float = 0.05, n_val_scenes: int = 400,
                fixed_batch: bool = False, floor_scenes: int = 100_000, in_context: bool = True,
                progress: bool = True) -> dict:
    """Train OPTLM on the world's text; write out_dir/language_model.safetensors and
    out_dir/metrics.json; return the metrics (with the text's entropy floor from floor_scenes
    scenes; 0 skips it). fixed_batch: the first batch every step (tests).

    in_context: every other step trains on `scene_documents` -- a scene's caption, then one of
    its lines -- instead of single lines. Why (measured): an LM trained only on single lines
    starting at position 0 ties its grammar to absolute positions, and it never needs to read
    earlier tokens for attributes. Behind BLIP-2's 8 query embeddings its caption loss doubled
    (0.42 -> 0.82 nats after stage 2); trained behind random vectors it read text fine there but
    stage 2 could not make it use the queries (0.417 -> 0.408 in 600 steps). A large LLM brings
    in-context reading from its pretraining; documents whose second part is answered by the
    first teach this one the same, and the line no longer always starts at position 0.
    """
    if steps < 1 or batch_size < 1:
        raise ValueError(f"steps ({steps}) and batch_size ({batch_size}) must be >= 1")
    set_threads()
    torch.manual_seed(seed)
    tok = load_tokenizer(tokenizer_dir)
    cfg = miniature_opt_config(tok.get_vocab_size())
    model = init_weights_(OPTLM(cfg))
    model.tie_weights()
    opt = make_optimizer(model, lr, weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: warmup_cosine(s, steps, min(warmup, steps)))
    stream = world_corpus(10 ** 9, seed, split="lm_train")  # lazily drawn: never materialised
    first = list(itertools.islice(stream, batch_size))
    losses, t0 = [], time.perf_counter()
    docs = scene_documents(10 ** 9, seed, split="lm_documents")
    model.train()
    for step in tqdm(range(steps), desc="language model", unit="step", disable=not progress):
        lines = first if (fixed_batch or step == 0) else list(itertools.islice(stream, batch_size))
        if in_context and step % 2 and not fixed_batch:
            ids, mask, _ = encode_documents(tok, list(itertools.islice(docs, batch_size)), cfg.max_position_embeddings)
        else:
            ids, mask = encode_lines(tok, lines, cfg.max_position_embeddings)
        loss, _, _ = lm_loss(model, ids, mask)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        losses.append(float(loss.detach()))
        if not math.isfinite(losses[-1]):
            raise FloatingPointError(f"LM pretraining: loss is {losses[-1]} at step {step}")
    train_s = time.perf_counter() - t0
    t1 = time.perf_counter()
    val = evaluate(model, tok, seed + 1000, n_val_scenes)
    val["val_loss_behind_prefix"] = evaluate(model, tok, seed + 1000, n_val_scenes, prefix=NUM_QUERY_TOKENS)["val_loss"]
    val["val_line_loss_in_context"] = in_context_loss(model, tok, seed + 1000, n_val_scenes)
    if floor_scenes:
        val["entropy_floor"] = entropy_floor(tok, floor_scenes)
    metrics = {"steps": steps, "batch_size": batch_size, "lr": lr, "vocab_size": cfg.vocab_size,
               "train_seconds": train_s, "eval_seconds": time.perf_counter() - t1,
               "loss_first": losses[0], "loss_last": sum(losses[-10:]) / len(losses[-10:]), "losses": losses, **val}
    state = {k: v for k, v in model.state_dict().items() if k != TIED}  # tied to the input embedding
    save_weights(state, os.path.join(out_dir, WEIGHTS_FILE))
    with open(os.path.join(out_dir, "metrics.json"), "w", encoding="utf-8") as f:
        json.dump(metrics, f, indent=1)
    log.info("LM: %d steps in %.0f s, val loss %.4f (perplexity %.3f)", steps, train_s, val["val_loss"],
             val["val_perplexity"])
    return metrics


def load_language_model(folder: str, vocab_size: int) -> OPTLM:
    """The pretrained LM from `folder`: every OPTLM key but the tied head, nothing else."""
    model = OPTLM(miniature_opt_config(vocab_size))
    missing, unexpected = model.load_state_dict(load_weights(os.path.join(folder, WEIGHTS_FILE)), strict=False)
    if unexpected or set(missing) != {TIED}:
        raise KeyError(f"{folder}/{WEIGHTS_FILE}: missing {sorted(set(missing) - {TIED})}, unexpected {sorted(unexpected)}")
    model.tie_weights()
    return model.eval()

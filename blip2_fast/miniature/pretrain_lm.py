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

Measured (2-core CPU, defaults, seed 0, the shipped run): 1600 steps in 188 s; validation loss
0.464 per token on single lines against an entropy floor of 0.413 (perplexity 1.59), next-token
accuracy 0.72. Given the scene's caption in front (`in_context_loss`, 400 scenes): caption lines,
which the context gives word for word, 0.063 (0.655 alone: the LM copies); question lines 0.287
(0.433 alone: it reads the answer from the caption, imperfectly -- an LM trained the same way
answered 0.71 of the questions with the true caption in front, 0.30 of "what shape is on the
left?"). See `pretrain_lm` for the document mix and what else was tried.
"""
from __future__ import annotations

import itertools
from collections import Counter
import json
import logging
import math
import os
import random
import time
from typing import Iterator

import torch
import torch.nn.functional as F
from tokenizers import Tokenizer

from ..bpe import EOS, world_corpus
from ..world import caption, questions, sample_scene, scene_rng
from ..models.opt import OPTLM
from .preset import (NUM_QUERY_TOKENS, PAD_ID, init_weights_, load_weights, miniature_opt_config, save_weights,
                     set_threads)
from .pretrain_loop import pretrain_loop

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


def scene_documents(n: int, seed: int, split: str, copy_fraction: float | None = None) -> Iterator[tuple[str, str]]:
    """(caption, line) documents: the scene's caption as context, then a line of that scene.

    copy_fraction None: every line `world_corpus` yields (the caption itself, then each
    "Question: q Answer: a" line) -- what the in-context metrics read. Otherwise one document per
    scene: the caption repeated with probability copy_fraction, else one of its question lines
    drawn at random (what training reads, see `pretrain_lm`)."""
    pick = random.Random(f"{seed}/{split}/documents")
    for i in range(n):
        rng = scene_rng(seed, i, split)
        scene = sample_scene(rng)
        text = caption(scene)
        qa = [f"Question: {q} Answer: {a}" for q, a in questions(scene, rng)]
        if copy_fraction is None:
            yield from [(text, text)] + [(text, line) for line in qa]
        elif pick.random() < copy_fraction or not qa:
            yield text, text
        else:
            yield text, pick.choice(qa)


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
def in_context_loss(model: OPTLM, tok: Tokenizer, seed: int, n_scenes: int, batch_size: int = 256) -> dict:
    """Token-weighted loss of each line given its scene's caption in front (`scene_documents`),
    over caption lines (the context word for word: near 0 once the LM copies) and question lines
    (only the answer is given by the context), and the same lines alone, without the caption."""
    model.eval()
    docs = list(scene_documents(n_scenes, seed, split="lm_val"))
    out = {}
    for kind, subset in (("caption", [d for d in docs if d[0] == d[1]]), ("question", [d for d in docs if d[0] != d[1]])):
        sums = {"in_context": [0.0, 0], "alone": [0.0, 0]}
        for start in range(0, len(subset), batch_size):
            chunk = subset[start:start + batch_size]
            ids, mask, line = encode_documents(tok, chunk, model.config.max_position_embeddings)
            alone_ids, alone_mask = encode_lines(tok, [l for _, l in chunk], model.config.max_position_embeddings)
            for key, (loss, _, n) in (("in_context", lm_loss(model, ids, mask, loss_mask=line)),
                                      ("alone", lm_loss(model, alone_ids, alone_mask))):
                sums[key][0] += float(loss) * n
                sums[key][1] += n
        for key, (total, count) in sums.items():
            out[f"val_{kind}_loss_{key}"] = total / count
    return out


def entropy_floor(tok: Tokenizer, n_scenes: int = 100_000, seed: int = 7) -> float:
    """Nats per predicted token that no LM can beat (module docstring), by counting lines."""
    counts = Counter(world_corpus(n_scenes, seed, split="lm_floor"))
    n = sum(counts.values())
    entropy = -sum(c / n * math.log(c / n) for c in counts.values())  # nats per line
    # predicted tokens per line: everything after BOS, plus the appended EOS = len(encode(line))
    tokens = sum(c * len(tok.encode(line).ids) for line, c in counts.items()) / n
    return entropy / tokens


def pretrain_lm(out_dir: str, tokenizer_dir: str, steps: int = 1600, batch_size: int = 64, seed: int = 0,
                lr: float = 1e-3, warmup: int = 50, weight_decay: float = 0.05, n_val_scenes: int = 400,
                fixed_batch: bool = False, floor_scenes: int = 100_000, document_probability: float = 0.75,
                copy_fraction: float = 0.5, progress: bool = True) -> dict:
    """Train OPTLM on the world's text; write out_dir/language_model.safetensors and
    out_dir/metrics.json; return the metrics (with the text's entropy floor from floor_scenes
    scenes; 0 skips it). fixed_batch: the first batch every step (tests).

    document_probability: the chance that a step trains on `scene_documents` (a scene's caption,
    then its caption again with probability copy_fraction, else one of its question lines)
    instead of single lines. Why (measured, 2-core CPU): BLIP-2's frozen LLM must read what the
    Q-Former puts in front of the text, and a large LLM brings that in-context reading from its
    pretraining; this one has to be taught it.
    - Single lines only: grammar tied to absolute positions, nothing read from the context;
      behind 8 query embeddings (8 then) the caption loss doubled (0.42 -> 0.82 after stage 2).
    - Random vectors in front of half the lines: reads text fine there, but stage 2 could not
      make it use the queries (0.417 -> 0.408 in 600 steps).
    - Every other step a document, 1 in 6 of them a caption copy: no copying circuit forms at
      800 or 3000 steps (caption lines 0.72 in context, 0.69 alone); stage 2 reached VQA 0.48.
    - Documents only, all of them copies: copying is learnt in 600 steps (0.002 in context).
    - Documents on 3 steps in 4, half of them copies, 1600 steps (the defaults): caption lines
      0.06 in context, question lines 0.29 (0.43 alone), single lines 0.46 (floor 0.41).
      Stage 2 on this LM reads the image (VQA 0.75 straight after stage 2, with 8 queries then).
    - 4000 steps, documents on 17 steps in 20, 3 in 10 of them copies: it answers better from a
      text caption (0.83 against 0.71) but copies worse (0.21), and stage 2 on it reached VQA
      0.54 only: copying, not question answering, is what the soft prompt gets used through.
    """
    if steps < 1 or batch_size < 1:
        raise ValueError(f"steps ({steps}) and batch_size ({batch_size}) must be >= 1")
    set_threads()
    torch.manual_seed(seed)
    tok = load_tokenizer(tokenizer_dir)
    cfg = miniature_opt_config(tok.get_vocab_size())
    model = init_weights_(OPTLM(cfg))
    model.tie_weights()
    stream = world_corpus(10 ** 9, seed, split="lm_train")  # lazily drawn: never materialised
    first = list(itertools.islice(stream, batch_size))
    docs = scene_documents(10 ** 9, seed, split="lm_documents", copy_fraction=copy_fraction)
    pick = random.Random(seed)  # which steps read documents

    def batches():  # drawn lazily, one per step: (input_ids, attention_mask)
        for step in range(steps):
            if fixed_batch or step == 0:
                yield encode_lines(tok, first, cfg.max_position_embeddings)
            elif pick.random() < document_probability:
                yield encode_documents(tok, list(itertools.islice(docs, batch_size)), cfg.max_position_embeddings)[:2]
            else:
                yield encode_lines(tok, list(itertools.islice(stream, batch_size)), cfg.max_position_embeddings)

    t0 = time.perf_counter()
    model.train()
    losses = pretrain_loop(model.named_parameters(), lambda batch: lm_loss(model, *batch)[0], batches(), steps, lr,
                           warmup, weight_decay, progress, desc="language model")
    train_s = time.perf_counter() - t0
    t1 = time.perf_counter()
    val = evaluate(model, tok, seed + 1000, n_val_scenes)
    val["val_loss_behind_prefix"] = evaluate(model, tok, seed + 1000, n_val_scenes, prefix=NUM_QUERY_TOKENS)["val_loss"]
    val.update(in_context_loss(model, tok, seed + 1000, n_val_scenes))
    if floor_scenes:
        val["entropy_floor"] = entropy_floor(tok, floor_scenes)
    metrics = {"steps": steps, "batch_size": batch_size, "lr": lr, "vocab_size": cfg.vocab_size,
               "document_probability": document_probability, "copy_fraction": copy_fraction,
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

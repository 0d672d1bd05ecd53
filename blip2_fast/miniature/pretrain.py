"""Recipe step 1 from scratch: the two tokenizers, the three unimodal pretrainings and the
assembled initial BLIP-2 folder (`python -m blip2_fast.miniature pretrain` prints its table)."""
from __future__ import annotations

import json
import os
import time

from tqdm import tqdm

from ..bpe import train_bpe_tokenizer, world_corpus
from .assemble import assemble_initial_model, folder_size_bytes
from .pretrain_lm import pretrain_lm
from .pretrain_text_encoder import pretrain_text_encoder
from .pretrain_vision import pretrain_vision
from .qformer_tokenizer import qformer_corpus, train_qformer_tokenizer

# steps, batch size per part; full sizes are the functions' defaults (measured, see their docstrings)
QUICK = {"corpus_scenes": 300, "vision": dict(steps=3, batch_size=8, n_val=16),
         "lm": dict(steps=3, batch_size=8, n_val_scenes=10), "text": dict(steps=3, batch_size=8, n_val_scenes=10)}
FULL = {"corpus_scenes": 3000, "vision": {}, "lm": {}, "text": {}}


def pretrain(out: str, quick: bool = False, seed: int = 0, progress: bool = True) -> dict:
    """Run every part into `out`; return {part: metrics} (also written to out/summary.json)."""
    sizes = QUICK if quick else FULL
    d = {k: os.path.join(out, k) for k in ("tokenizer", "qformer_tokenizer", "vision", "lm", "text_encoder", "initial")}
    summary: dict = {}
    parts = ["tokenizers", "vision", "lm", "text", "assemble"]
    bar = tqdm(parts, desc="miniature pretraining", unit="part", disable=not progress, position=0)
    for part in bar:
        bar.set_postfix_str(part)
        t0 = time.perf_counter()
        if part == "tokenizers":
            n = sizes["corpus_scenes"]
            opt_tok = train_bpe_tokenizer(world_corpus(n, seed, split="tokenizer"), 512, d["tokenizer"])
            q_tok = train_qformer_tokenizer(qformer_corpus(n, seed, split="tokenizer"), d["qformer_tokenizer"])
            m = {"opt_vocab_size": opt_tok.get_vocab_size(), "qformer_vocab_size": q_tok.get_vocab_size()}
        elif part == "vision":
            m = pretrain_vision(d["vision"], seed=seed, progress=progress, **sizes["vision"])
        elif part == "lm":
            m = pretrain_lm(d["lm"], d["tokenizer"], seed=seed, progress=progress, **sizes["lm"])
        elif part == "text":
            m = pretrain_text_encoder(d["text_encoder"], d["qformer_tokenizer"], seed=seed, progress=progress,
                                      **sizes["text"])
        else:
            assemble_initial_model(d["initial"], d["vision"], d["lm"], d["text_encoder"], d["tokenizer"],
                                   d["qformer_tokenizer"], seed=seed)
            m = {"folder": d["initial"], "megabytes": folder_size_bytes(d["initial"]) / 2 ** 20}
        m = {k: v for k, v in m.items() if k != "losses"}
        m["seconds"] = time.perf_counter() - t0
        summary[part] = m
    with open(os.path.join(out, "summary.json"), "w", encoding="utf-8") as f:
        json.dump(summary, f, indent=1)
    return summary


__all__ = ["pretrain", "QUICK", "FULL"]

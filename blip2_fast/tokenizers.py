"""Tokenizers of a BLIP-2 model folder, and the text tensors built with them.

- `load_tokenizer(folder)`: the LLM's tokenizer (left padding: generation continues from the
  last position), as transformers' `AutoTokenizer` loads it.
- `load_qformer_tokenizer(folder, path=None)`: the Q-Former's BERT-style tokenizer, saved as
  `qformer_tokenizer/` in the folder (InstructBLIP's processor layout; our training exports
  carry it), or from an explicit folder.
- `tokenize_texts`: padded ids and mask with the tokenizer's own truncation.
- `qformer_question_inputs`: the Q-Former side of a question, for inference and training alike.

Every problem a user can fix (no tokenizer files, an unusable tokenizer) is a `TokenizerError`
naming the folder.
"""
from __future__ import annotations

import os

import torch

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "spiece.model", "tokenizer.model")


class TokenizerError(ValueError):
    """A model folder's tokenizer is missing or unusable; the message names the folder."""


def _auto_tokenizer(path: str, what: str):
    from transformers import AutoTokenizer
    try:
        return AutoTokenizer.from_pretrained(path)
    except Exception as err:  # transformers raises many types here; all mean "unusable tokenizer"
        raise TokenizerError(f"{path}: cannot load the {what} ({type(err).__name__}: {err})") from None


def load_tokenizer(folder: str):
    """The LLM tokenizer of a model folder, padding on the left, with a pad token."""
    if not any(os.path.exists(os.path.join(folder, n)) for n in TOKENIZER_FILES):
        raise TokenizerError(f"{folder} has no tokenizer (none of {', '.join(TOKENIZER_FILES)}); save one beside "
                             f"the weights, e.g. Blip2Processor.save_pretrained(folder)")
    tokenizer = _auto_tokenizer(folder, "tokenizer")
    tokenizer.padding_side = "left"  # decoder-only generation continues from the last position
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_qformer_tokenizer(folder: str, path: str | None = None, why: str = "its Q-Former reads text"):
    """The Q-Former's tokenizer: `path` when given, else `folder/qformer_tokenizer`.

    `why` says in the error what needs it (a question-reading model, stage-1 training)."""
    if path and not os.path.isdir(path):
        raise TokenizerError(f"no Q-Former tokenizer: {path} is not a folder (name a BERT-style tokenizer folder)")
    path = path or os.path.join(folder, "qformer_tokenizer")
    if not os.path.isdir(path):
        raise TokenizerError(f"{folder}: {why} but the folder has no qformer_tokenizer/ to tokenise it with; copy in "
                             f"the BERT-style tokenizer it was trained with")
    return _auto_tokenizer(path, "Q-Former tokenizer")


def tokenize_texts(tokenizer, texts: list[str], max_length: int, add_eos: bool = False,
                   padding_side: str = "right") -> tuple[torch.Tensor, torch.Tensor, int]:
    """-> (input_ids (B, T), attention_mask (B, T), n_truncated), T = the longest row (<= max_length).

    The tokenizer's special tokens are added (BOS for OPT, [CLS]/[SEP] for BERT); add_eos
    appends eos_token_id. A text longer than max_length is truncated by the tokenizer itself
    (so its specials, e.g. BERT's [SEP], survive) and gets no EOS, since it did not end there.
    """
    if not texts or max_length < 1 or padding_side not in ("left", "right"):
        raise ValueError(f"tokenize_texts: need texts, max_length >= 1 and padding_side left/right; got "
                         f"{len(texts)} texts, max_length={max_length}, padding_side={padding_side!r}")
    pad, eos = tokenizer.pad_token_id, tokenizer.eos_token_id
    if pad is None or (add_eos and eos is None):
        raise ValueError(f"tokenize_texts: tokenizer lacks a {'pad' if pad is None else 'eos'} token id")
    rows = [list(r) + ([eos] if add_eos else []) for r in tokenizer(list(texts), add_special_tokens=True)["input_ids"]]
    long = [i for i, r in enumerate(rows) if len(r) > max_length]
    if long:
        cut = tokenizer([texts[i] for i in long], add_special_tokens=True, truncation=True,
                        max_length=max_length)["input_ids"]
        for i, r in zip(long, cut):
            rows[i] = list(r)
    T = max(len(r) for r in rows)
    ids = torch.full((len(rows), T), pad, dtype=torch.long)
    mask = torch.zeros((len(rows), T), dtype=torch.long)
    for i, r in enumerate(rows):
        s = slice(0, len(r)) if padding_side == "right" else slice(T - len(r), T)
        ids[i, s] = torch.tensor(r, dtype=torch.long)
        mask[i, s] = 1
    return ids, mask, len(long)


def qformer_question_inputs(tokenizer, questions: list[str | None], max_length: int) -> tuple[dict, int]:
    """The Q-Former side of VQA rows: ({qformer_input_ids, qformer_attention_mask}, n_truncated).

    [CLS] question [SEP], right padding, truncated by the tokenizer (its [SEP] survives). A row
    without a question (None or blank: a caption row of a vqa+caption finetune, or a caption
    asked of a question-reading model) gets a mask of zeros: its queries attend to no text and
    compute exactly what a call without qformer_input_ids computes, which is how captions are
    generated (and all transformers' Blip2ForConditionalGeneration can do)."""
    blank = [q is None or not q.strip() for q in questions]
    ids, mask, n = tokenize_texts(tokenizer, ["" if b else q for q, b in zip(questions, blank)], max_length)
    mask[torch.tensor(blank, dtype=torch.bool)] = 0
    return {"qformer_input_ids": ids, "qformer_attention_mask": mask}, n


__all__ = ["TOKENIZER_FILES", "TokenizerError", "load_tokenizer", "load_qformer_tokenizer", "tokenize_texts",
           "qformer_question_inputs"]

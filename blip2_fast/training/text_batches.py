"""The LLM (and Q-Former) side of a stage-2 batch, built from strings as BLIP-2 / LAVIS does.

Layout (what `Blip2Stage2.forward` relies on to merge the soft prompt without host reads):
every row starts with the Q image placeholders (`config.image_token_index`, transformers'
layout) when the config has one; without one there are none and the model prepends the prompt.

Decoder-only (OPT), right padding, labels = -100 on placeholders, BOS, prompt and padding:
    [img]*Q  BOS  prompt  text  EOS  pad...
Encoder-decoder (FlanT5), both sides right padding:
    encoder  [img]*Q  prompt-or-prefix  EOS  pad...     decoder labels  text-or-suffix  EOS  -100...
  "pretrain" is prefix-LM: each caption's tokens are split at a point drawn uniformly from
  1..n-1 (both parts non-empty; n = 1 gives an empty prefix) by the caller's generator.

Prompts: pretrain none; caption "a photo of"; vqa "Question: {} Answer:" (FlanT5 "Question: {}
Short answer:"). Text after a prompt is tokenised as " " + text, which gives the tokens of the
joined string for whitespace-split BPE (GPT-2/OPT) and word-level tokenizers, and keeps the
prompt/label boundary exact without re-tokenising.

Terminator: LAVIS appends "\\n" to OPT targets and generates with eos_token_id = "\\n". We append
the model's `eos_token_id` (config.text.eos_token_id, what `generate` stops on by default); pass
`eos_token_id=<id of "\\n">` to reproduce LAVIS, and generate with the same id.

Truncation (`max_length` counts LLM text tokens, not the Q placeholders): the tail of the text is
cut. For OPT the terminator goes with it (LAVIS's "\\n" is text); for FlanT5 the EOS is kept (the
T5 tokenizer truncates the content and then appends EOS). A row whose prompt leaves no target
token is an error. `n_truncated` counts truncated sequences (LLM input, decoder target and
Q-Former question each count). The LLM side is tokenised here (`_encode`: ids without special
tokens, so BOS/EOS and the prompt boundary are placed exactly); the Q-Former question goes
through `blip2_fast.tokenizers.tokenize_texts` ([CLS] ... [SEP], as the stage-1 texts).
"""
from __future__ import annotations

import torch

from ..config import Blip2Config
from ..tokenizers import qformer_question_inputs

STAGES = ("pretrain", "caption", "vqa")
DEFAULT_PROMPTS = {("opt", "caption"): "a photo of", ("opt", "vqa"): "Question: {} Answer:",
                   ("t5", "caption"): "a photo of", ("t5", "vqa"): "Question: {} Short answer:"}
IGNORE = -100


def _encode(tokenizer, texts: list[str]) -> list[list[int]]:
    """Token ids without special tokens (empty strings give [])."""
    if not texts:
        return []
    return [list(ids) for ids in tokenizer(list(texts), add_special_tokens=False)["input_ids"]]


def _pad(rows: list[list[int]], value: int, left: bool = False) -> torch.Tensor:
    width = max(len(r) for r in rows)
    out = torch.full((len(rows), width), value, dtype=torch.long)
    for i, r in enumerate(rows):
        if r:
            if left:
                out[i, width - len(r):] = torch.tensor(r)
            else:
                out[i, :len(r)] = torch.tensor(r)
    return out


def _mask(rows: list[list[int]], left: bool = False) -> torch.Tensor:
    return _pad([[1] * len(r) for r in rows], 0, left)


class LMBatchBuilder:
    """Strings -> the tensors `Blip2Stage2.forward` takes. Picklable (DataLoader workers).

    tokenizer: the LLM's; config: the model's Blip2Config; stage: pretrain | caption | vqa;
    prompt: overrides the stage default (vqa prompts need one "{}" for the question);
    max_length: LLM tokens of the (encoder) input; max_target_length: FlanT5 decoder tokens
    (default max_length); qformer_tokenizer: BERT-style tokenizer of the Q-Former: with it, vqa
    batches carry the question as qformer_input_ids / qformer_attention_mask.
    """

    def __init__(self, tokenizer, config: Blip2Config, stage: str = "caption", prompt: str | None = None,
                 max_length: int = 32, max_target_length: int | None = None, qformer_tokenizer=None,
                 qformer_max_length: int = 32, eos_token_id: int | None = None):
        if stage not in STAGES:
            raise ValueError(f"stage must be one of {STAGES}, got {stage!r}")
        if config.text is None:
            raise ValueError("this config has no LLM (text_config): stage 2 needs one")
        self.family = "t5" if config.is_encoder_decoder else "opt"
        if prompt is None:
            prompt = DEFAULT_PROMPTS.get((self.family, stage), "")
        if stage == "pretrain" and prompt:
            raise ValueError(f"stage 'pretrain' trains without a prompt, got prompt={prompt!r}")
        if (stage == "vqa") != (prompt.count("{}") == 1):
            raise ValueError(f"prompt {prompt!r}: a vqa prompt needs exactly one '{{}}' for the question, "
                             f"and only a vqa prompt may have one (stage {stage!r})")
        if qformer_tokenizer is not None and stage != "vqa":
            raise ValueError(f"qformer_tokenizer feeds the VQA question to the Q-Former; stage {stage!r} has none")
        min_len = 2 if self.family == "opt" else 1  # room for one target token after BOS / before EOS
        if max_length < min_len or (max_target_length is not None and max_target_length < 1) or qformer_max_length < 2:
            raise ValueError(f"max lengths too small: max_length={max_length}, max_target_length="
                             f"{max_target_length}, qformer_max_length={qformer_max_length}")
        text = config.text
        self.tokenizer, self.qformer_tokenizer = tokenizer, qformer_tokenizer
        self.stage, self.prompt = stage, prompt.rstrip()
        self.max_length = max_length
        self.max_target_length = max_target_length or max_length
        self.qformer_max_length = qformer_max_length
        self.num_query = config.num_query_tokens
        self.image_token_index = config.image_token_index
        self.pad_id = text.pad_token_id
        self.eos_id = text.eos_token_id if eos_token_id is None else eos_token_id
        self.bos_id = getattr(text, "bos_token_id", None)  # T5 has none
        self.vocab_size, self.qformer_vocab_size = text.vocab_size, config.qformer.vocab_size

    # ------------------------------------------------------------------ helpers
    def _placeholders(self) -> list[int]:
        return [self.image_token_index] * self.num_query if self.image_token_index is not None else []

    def _prompt_strings(self, n: int, questions) -> list[str]:
        if self.stage != "vqa":
            if questions is not None:
                raise ValueError(f"questions given for stage {self.stage!r}, which has none")
            return [self.prompt] * n
        if questions is None or len(questions) != n:
            got = "none" if questions is None else len(questions)
            raise ValueError(f"stage 'vqa' needs one question per text: {n} texts, questions: {got}")
        # None: a caption in a vqa+caption finetune, trained behind the empty prompt captioning uses
        return ["" if q is None else self.prompt.format(q.strip()) for q in questions]

    def _after_prompt(self, texts: list[str], prompts: list[str]) -> list[str]:
        return [(" " + t.lstrip()) if p else t for t, p in zip(texts, prompts)]

    def _qformer(self, questions: list[str | None]) -> tuple[dict, int]:
        return qformer_question_inputs(self.qformer_tokenizer, questions, self.qformer_max_length)

    def _check_vocab(self, out: dict) -> None:
        # here, in the data workers: on the GPU an out-of-range id is an opaque device-side assert
        for key, size, what in (("input_ids", self.vocab_size, "LLM"), ("labels", self.vocab_size, "LLM"),
                                ("qformer_input_ids", self.qformer_vocab_size, "Q-Former")):
            if key in out and out[key].numel() and int(out[key].max()) >= size:
                raise ValueError(f"{key}: token id {int(out[key].max())} is outside the {what}'s vocabulary of "
                                 f"{size}: the tokenizer does not belong to this model")

    # ------------------------------------------------------------------ training batches
    def __call__(self, texts: list[str], questions: list[str] | None = None,
                 generator: torch.Generator | None = None) -> dict:
        """texts: captions (pretrain/caption) or answers (vqa); questions: vqa only, None where
        the row is a caption (trained behind the empty prompt).
        Returns input_ids, attention_mask, labels (+ decoder_attention_mask for FlanT5,
        + qformer_input_ids/qformer_attention_mask for vqa with a Q-Former tokenizer) and
        n_truncated (int)."""
        texts = list(texts)
        if not texts:
            raise ValueError("empty batch: no texts")
        bad = [i for i, t in enumerate(texts) if not isinstance(t, str)]
        if bad:
            raise TypeError(f"texts[{bad[0]}] is {type(texts[bad[0]]).__name__}, expected str")
        prompts = self._prompt_strings(len(texts), questions)
        out = self._t5(texts, prompts, generator) if self.family == "t5" else self._opt(texts, prompts)
        if self.qformer_tokenizer is not None:
            q, n = self._qformer(questions)
            out.update(q)
            out["n_truncated"] += n
        self._check_vocab(out)
        return out

    def _opt(self, texts, prompts) -> dict:
        heads = [[self.bos_id] + p for p in _encode(self.tokenizer, prompts)]
        tails = [t + [self.eos_id] for t in _encode(self.tokenizer, self._after_prompt(texts, prompts))]
        ph, ids, labels, n_trunc = self._placeholders(), [], [], 0
        for i, (head, tail) in enumerate(zip(heads, tails)):
            row = (head + tail)[:self.max_length]
            n_trunc += len(head) + len(tail) > self.max_length
            if len(row) <= len(head):
                raise ValueError(f"row {i}: BOS + prompt take {len(head)} tokens, max_length={self.max_length} "
                                 f"leaves no target token: raise max_length or shorten the prompt/question")
            ids.append(ph + row)
            labels.append([IGNORE] * (len(ph) + len(head)) + row[len(head):])
        return {"input_ids": _pad(ids, self.pad_id), "attention_mask": _mask(ids),
                "labels": _pad(labels, IGNORE), "n_truncated": n_trunc}

    def _t5(self, texts, prompts, generator) -> dict:
        if self.stage == "pretrain":
            captions = _encode(self.tokenizer, texts)
            u = torch.rand(len(captions), generator=generator).tolist()  # host: runs in the data workers
            cuts = [1 + int(x * (len(c) - 1)) if len(c) > 1 else 0 for x, c in zip(u, captions)]
            enc = [c[:k] for c, k in zip(captions, cuts)]
            dec = [c[k:] for c, k in zip(captions, cuts)]
        else:
            enc = _encode(self.tokenizer, prompts)
            dec = _encode(self.tokenizer, texts)
        empty = [i for i, d in enumerate(dec) if not d]
        if empty:
            raise ValueError(f"row {empty[0]}: text {texts[empty[0]]!r} has no tokens to train on")
        n_trunc = sum(len(e) > self.max_length - 1 for e in enc) + sum(len(d) > self.max_target_length - 1 for d in dec)
        ph = self._placeholders()
        enc = [ph + e[:self.max_length - 1] + [self.eos_id] for e in enc]
        dec = [d[:self.max_target_length - 1] + [self.eos_id] for d in dec]
        return {"input_ids": _pad(enc, self.pad_id), "attention_mask": _mask(enc), "labels": _pad(dec, IGNORE),
                "decoder_attention_mask": _mask(dec), "n_truncated": n_trunc}

    # ------------------------------------------------------------------ generation prompts
    def generation_inputs(self, questions: list[str] | None = None, batch_size: int | None = None) -> dict:
        """Prompts for `generate` in this stage's format: OPT [img]*Q, left padding, BOS, prompt
        (Blip2Processor's layout); FlanT5 [img]*Q, prompt, EOS, right padding. Not truncated
        (cutting a prompt would drop its "Answer:"): `generate` refuses what exceeds the context."""
        if questions is not None:
            batch_size = len(questions)
        if not batch_size:
            raise ValueError("generation_inputs needs questions (vqa) or a batch_size")
        prompts = self._prompt_strings(batch_size, questions)
        ph, ids = self._placeholders(), _encode(self.tokenizer, prompts)
        if self.family == "t5":
            rows = [ph + p + [self.eos_id] for p in ids]
            out = {"input_ids": _pad(rows, self.pad_id), "attention_mask": _mask(rows)}
        else:
            rows = [[self.bos_id] + p for p in ids]
            head = torch.tensor([ph] * batch_size, dtype=torch.long).view(batch_size, len(ph))  # (B, Q)
            out = {"input_ids": torch.cat([head, _pad(rows, self.pad_id, left=True)], 1),
                   "attention_mask": torch.cat([torch.ones_like(head), _mask(rows, left=True)], 1)}
        if self.qformer_tokenizer is not None:
            q, n = self._qformer(questions)
            if n:
                raise ValueError(f"{n} question(s) exceed qformer_max_length={self.qformer_max_length} tokens")
            out.update(q)
        self._check_vocab(out)
        return out


__all__ = ["LMBatchBuilder", "STAGES", "DEFAULT_PROMPTS", "IGNORE"]

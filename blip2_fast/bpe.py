"""A small byte-level BPE tokenizer for the world of shapes, shaped like OPT's.

OPT (the decoder-only LLM BLIP-2 pairs with) uses byte-level BPE with "</s>" as both BOS and
EOS, prepends BOS to every sequence, and pads on the left for batched generation. We keep
those conventions so the miniature model's data path is the same as the real one's:
ids 0-3 are <pad>, </s>, <unk>, <image> ("<image>" is the placeholder that recent
transformers BLIP-2 processors expand into the query-token slots).

The output directory loads with `transformers.AutoTokenizer.from_pretrained(out_dir)` or
`PreTrainedTokenizerFast.from_pretrained(out_dir)`; we write the three JSON files directly
(instead of calling transformers) so training a tokenizer needs only `tokenizers`.
"""
from __future__ import annotations

import json
import os
from collections.abc import Iterable, Iterator

import numpy as np
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

from .world import caption, questions, sample_scene, scene_rng

PAD, EOS, UNK, IMAGE = "<pad>", "</s>", "<unk>", "<image>"
SPECIAL_TOKENS = [PAD, EOS, UNK, IMAGE]  # ids 0, 1, 2, 3 in this order


def train_bpe_tokenizer(texts: Iterable[str], vocab_size: int, out_dir: str) -> Tokenizer:
    """Train a byte-level BPE on `texts` and save it to out_dir in Hugging Face form.

    The 256 byte symbols are always in the vocabulary, so any text encodes without <unk>;
    `vocab_size` is an upper bound (training stops early on a tiny corpus).
    """
    tok = Tokenizer(models.BPE(unk_token=UNK))
    # add_prefix_space=False matches OPT/GPT-2: "a" at the start and " a" inside differ.
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train_from_iterator(texts, trainer=trainer)
    eos_id = tok.token_to_id(EOS)
    # OPT prepends BOS (= </s>) and appends nothing; the pair form mirrors that.
    tok.post_processor = processors.TemplateProcessing(
        single=f"{EOS} $A", pair=f"{EOS} $A {EOS} $B", special_tokens=[(EOS, eos_id)])
    os.makedirs(out_dir, exist_ok=True)
    tok.save(os.path.join(out_dir, "tokenizer.json"))
    special = {"bos_token": EOS, "eos_token": EOS, "unk_token": UNK, "pad_token": PAD,
               "additional_special_tokens": [IMAGE]}
    config = dict(special, tokenizer_class="PreTrainedTokenizerFast", padding_side="left",
                  add_bos_token=True, add_eos_token=False, clean_up_tokenization_spaces=False,
                  model_max_length=512)
    for name, obj in (("tokenizer_config.json", config), ("special_tokens_map.json", special)):
        with open(os.path.join(out_dir, name), "w", encoding="utf-8") as f:
            json.dump(obj, f, indent=2)
    return tok


def world_corpus(n: int, seed: int, split: str = "lm") -> Iterator[str]:
    """For n sampled scenes (no rendering), yield the caption, then one
    "Question: {q} Answer: {a}" string per question (the OPT VQA prompt format)."""
    for i in range(n):
        rng: np.random.Generator = scene_rng(seed, i, split)
        scene = sample_scene(rng)
        yield caption(scene)
        for q, a in questions(scene, rng):
            yield f"Question: {q} Answer: {a}"

"""The Q-Former's BERT-style tokenizer for the miniature, trained with the `tokenizers` library.

BLIP-2 reads text in the Q-Former with BERT's uncased WordPiece vocabulary plus a `[DEC]`
token (LAVIS adds it as the tokenizer's bos_token; ITG puts it in place of `[CLS]`). Ours is
the same kind of tokenizer, only trained on the world's text: BERT normaliser (lower-case,
accents stripped), BERT pre-tokenizer (words and punctuation), WordPiece, and
`[CLS] text [SEP]` for one sequence. Fixed ids: [PAD]=0 (the Q-Former's pad_token_id), [UNK]=1,
[CLS]=2, [SEP]=3, [MASK]=4, [DEC]=5.

The folder holds tokenizer.json, tokenizer_config.json and special_tokens_map.json and loads
with `transformers.AutoTokenizer.from_pretrained(dir)` (a PreTrainedTokenizerFast with every
special token named); writing the JSON files ourselves keeps training free of transformers.
"""
from __future__ import annotations

import json
import os
from collections.abc import Iterable, Iterator

from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers

from ..world import caption, questions, sample_scene, scene_rng

PAD, UNK, CLS, SEP, MASK, DEC = "[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "[DEC]"
SPECIAL_TOKENS = [PAD, UNK, CLS, SEP, MASK, DEC]  # ids 0..5 in this order


def train_qformer_tokenizer(texts: Iterable[str], out_dir: str, vocab_size: int = 256,
                            model_max_length: int = 64) -> Tokenizer:
    """Train a lower-case WordPiece tokenizer on `texts` and save it to out_dir (see module
    docstring); return the `tokenizers.Tokenizer`. `vocab_size` is an upper bound: on the
    world's ~35 words training stops once every word is one token."""
    tok = Tokenizer(models.WordPiece(unk_token=UNK, continuing_subword_prefix="##"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True, strip_accents=True, clean_text=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.decoder = decoders.WordPiece(prefix="##")
    trainer = trainers.WordPieceTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS,
                                        continuing_subword_prefix="##", show_progress=False)
    tok.train_from_iterator(texts, trainer=trainer)
    for i, name in enumerate(SPECIAL_TOKENS):
        if tok.token_to_id(name) != i:  # the trainer places specials first; the ids are a contract
            raise RuntimeError(f"{name} got id {tok.token_to_id(name)}, expected {i}")
    cls_id, sep_id = tok.token_to_id(CLS), tok.token_to_id(SEP)
    tok.post_processor = processors.TemplateProcessing(
        single=f"{CLS} $A {SEP}", pair=f"{CLS} $A {SEP} $B:1 {SEP}:1", special_tokens=[(CLS, cls_id), (SEP, sep_id)])
    os.makedirs(out_dir, exist_ok=True)
    tok.save(os.path.join(out_dir, "tokenizer.json"))
    # bos_token = [DEC] as LAVIS sets it; the others are BERT's roles
    special = {"unk_token": UNK, "sep_token": SEP, "pad_token": PAD, "cls_token": CLS, "mask_token": MASK,
               "bos_token": DEC}
    config = dict(special, tokenizer_class="PreTrainedTokenizerFast", do_lower_case=True, padding_side="right",
                  truncation_side="right", model_max_length=model_max_length,
                  clean_up_tokenization_spaces=True, model_input_names=["input_ids", "attention_mask"])
    for name, obj in (("tokenizer_config.json", config), ("special_tokens_map.json", special)):
        with open(os.path.join(out_dir, name), "w", encoding="utf-8") as f:
            json.dump(obj, f, indent=2)
    return tok


def qformer_corpus(n: int, seed: int, split: str = "qformer_text") -> Iterator[str]:
    """For n sampled scenes (no rendering): the caption, then each question and its answer as
    separate strings (the texts the Q-Former reads: captions for stage 1, questions for the
    question-conditioned VQA Q-Former; answers so every answer word is in the vocabulary)."""
    for i in range(n):
        rng = scene_rng(seed, i, split)
        scene = sample_scene(rng)
        yield caption(scene)
        for q, a in questions(scene, rng):
            yield q
            yield a


__all__ = ["SPECIAL_TOKENS", "DEC", "MASK", "CLS", "SEP", "PAD", "UNK", "train_qformer_tokenizer", "qformer_corpus"]

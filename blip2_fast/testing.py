"""Tiny random BLIP-2 checkpoints built with transformers, for tests and CPU benchmarks.

Nothing can be downloaded where our tests run, so the tokenizer is a word-level one built on
the spot with the `tokenizers` library, wrapped as a transformers fast tokenizer, and saved with
a `Blip2Processor` beside a random transformers model: the folder is exactly what a user gets
from the hub, only small. The reference model is transformers' own class, so tests compare our
code against an independent implementation.
"""
from __future__ import annotations

import os

import torch

WORDS = ("a photo of the cat dog red green blue small large circle square triangle star on left right and "
         "question answer what color is there how many shapes one two yes no shape ? : .").split()


def make_tokenizer(vocab_extra: int = 0):
    """A word-level fast tokenizer: <pad>=0? No: OPT's ids — <s>/</s>=2, <pad>=1, <unk>=3."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "<pad>": 1, "</s>": 2, "<s>": 3}
    for w in WORDS + [f"w{i}" for i in range(vocab_extra)]:
        vocab.setdefault(w, len(vocab))
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    from tokenizers import processors
    tok.post_processor = processors.TemplateProcessing(single="</s> $A", special_tokens=[("</s>", 2)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="</s>", eos_token="</s>", pad_token="<pad>",
                                   unk_token="<unk>", padding_side="left")


QFORMER_SPECIALS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "[DEC]")


def make_qformer_tokenizer(folder: str | None = None):
    """A BERT-style word-level tokenizer for the Q-Former: "[CLS] text [SEP]", [PAD]=0, [DEC]=5,
    lower-cased, covering every word of the world of shapes. Saved to `folder` when given."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    from .world import COLORS, SHAPES

    words = list(WORDS) + list(COLORS) + list(SHAPES) + ["are", "tiny", "big"]
    vocab = {t: i for i, t in enumerate(QFORMER_SPECIALS)}
    for w in words:
        vocab.setdefault(w, len(vocab))
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.BertProcessing(("[SEP]", vocab["[SEP]"]), ("[CLS]", vocab["[CLS]"]))
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="[PAD]", unk_token="[UNK]", cls_token="[CLS]",
                                   sep_token="[SEP]", mask_token="[MASK]", additional_special_tokens=["[DEC]"],
                                   padding_side="right")
    if folder is not None:
        fast.save_pretrained(folder)
    return fast


def hf_config(text: str = "opt", num_query_tokens: int = 5, vision_heads: int = 4, qformer_heads: int = 3,
              qformer_layers: int = 3, cross_attention_frequency: int = 2, image_size: int = 28,
              use_qformer_text_input: bool = True, vocab_size: int = 120, image_token_index: int | None = None,
              qformer_vocab: int = 99, **text_overrides):
    """A transformers Blip2Config with odd sizes (non power-of-two heads and widths)."""
    from transformers import Blip2Config, OPTConfig, T5Config

    vision = dict(hidden_size=8 * vision_heads, intermediate_size=64, num_hidden_layers=2,
                  num_attention_heads=vision_heads, image_size=image_size, patch_size=14)
    qformer = dict(hidden_size=12 * qformer_heads, num_hidden_layers=qformer_layers,
                   num_attention_heads=qformer_heads, intermediate_size=64, vocab_size=qformer_vocab,
                   cross_attention_frequency=cross_attention_frequency,
                   use_qformer_text_input=use_qformer_text_input)
    if text == "opt":
        t = dict(hidden_size=40, num_hidden_layers=2, num_attention_heads=5, ffn_dim=64, vocab_size=vocab_size,
                 max_position_embeddings=64, bos_token_id=2, eos_token_id=2, pad_token_id=1)
        t.update(text_overrides)
        text_cfg = OPTConfig(**t).to_dict()
    elif text == "t5":
        t = dict(d_model=40, d_kv=8, d_ff=64, num_layers=2, num_heads=5, vocab_size=vocab_size,
                 feed_forward_proj="gated-gelu", tie_word_embeddings=False, decoder_start_token_id=0,
                 pad_token_id=0, eos_token_id=1)
        t.update(text_overrides)
        text_cfg = T5Config(**t).to_dict()
    else:
        raise ValueError(text)
    return Blip2Config(vision_config=vision, qformer_config=qformer, text_config=text_cfg,
                       num_query_tokens=num_query_tokens, image_token_index=image_token_index)


def randomize_(model: torch.nn.Module, seed: int = 0, std: float = 0.2) -> torch.nn.Module:
    """transformers initialises some weights to zero (query tokens, biases): give every
    parameter random values so parity tests exercise every path."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("LayerNorm.weight") or "layer_norm" in name and name.endswith("weight") \
                    or name.endswith("layernorm.weight"):
                p.copy_(1 + 0.1 * torch.randn(p.shape, generator=gen))
            else:
                p.copy_(std * torch.randn(p.shape, generator=gen))
    return model


def make_tiny_folder(folder: str, text: str = "opt", seed: int = 0, with_processor: bool = True, **cfg_kw):
    """Write a random transformers BLIP-2 (config, safetensors, tokenizer, processor) into
    `folder`; returns the transformers model (the reference)."""
    from transformers import Blip2ForConditionalGeneration, Blip2Processor, BlipImageProcessor

    tokenizer = make_tokenizer()
    image_token_index = len(tokenizer)  # the processor adds "<image>" right after the vocabulary
    cfg = hf_config(text=text, image_token_index=image_token_index, **cfg_kw)
    if text == "t5":
        tokenizer.bos_token = None
    torch.manual_seed(seed)
    model = randomize_(Blip2ForConditionalGeneration(cfg), seed).eval()
    model.save_pretrained(folder)
    if with_processor:
        size = cfg.vision_config.image_size
        image_processor = BlipImageProcessor(size={"height": size, "width": size})
        processor = Blip2Processor(image_processor=image_processor, tokenizer=tokenizer,
                                   num_query_tokens=cfg.num_query_tokens)
        processor.save_pretrained(folder)
        assert processor.tokenizer.convert_tokens_to_ids("<image>") == image_token_index
    return model


def add_question_reading_(folder: str, seed: int = 0) -> str:
    """Make a tiny folder's Q-Former read VQA questions, as `blip2-fast train --stage vqa` leaves
    one: random Q-Former text embeddings (`embeddings.*`), config `vqa_qformer_question`, and a
    `qformer_tokenizer/` covering the model's words."""
    import json

    from safetensors.torch import load_file, save_file

    with open(os.path.join(folder, "config.json"), encoding="utf-8") as f:
        config = json.load(f)
    q = config["qformer_config"]
    gen = torch.Generator().manual_seed(seed)
    path = os.path.join(folder, "model.safetensors")
    state = load_file(path)
    state["embeddings.word_embeddings.weight"] = 0.2 * torch.randn(q["vocab_size"], q["hidden_size"], generator=gen)
    state["embeddings.position_embeddings.weight"] = 0.2 * torch.randn(q["max_position_embeddings"],
                                                                       q["hidden_size"], generator=gen)
    save_file(state, path, metadata={"format": "pt"})
    config["vqa_qformer_question"] = True
    with open(os.path.join(folder, "config.json"), "w", encoding="utf-8") as f:
        json.dump(config, f, indent=2)
    make_qformer_tokenizer(os.path.join(folder, "qformer_tokenizer"))
    return folder


def instructblip_reference(folder: str):
    """transformers' InstructBlipForConditionalGeneration holding a question-reading BLIP-2
    folder's weights: the independent reference for VQA with the question in the Q-Former.

    InstructBLIP's Q-Former is BLIP-2's with the question beside the queries; only names differ:
    its `qformer.embeddings` holds the word and position embeddings (our `embeddings.*`, from
    Blip2ForImageTextRetrieval) and the LayerNorm of the concatenation (our `qformer.layernorm`,
    which BLIP-2 applies to the queries alone). Stage-1 heads are left out."""
    import json

    from safetensors.torch import load_file
    from transformers import InstructBlipConfig, InstructBlipForConditionalGeneration

    with open(os.path.join(folder, "config.json"), encoding="utf-8") as f:
        d = json.load(f)
    config = InstructBlipConfig(vision_config=d["vision_config"], qformer_config=d["qformer_config"],
                                text_config=d["text_config"], num_query_tokens=d["num_query_tokens"],
                                image_token_index=d["image_token_index"])
    model = InstructBlipForConditionalGeneration(config)
    state = {}
    for key, tensor in load_file(os.path.join(folder, "model.safetensors")).items():
        if key.startswith("qformer.layernorm."):
            key = "qformer.embeddings." + key[len("qformer."):]
        elif key.startswith("embeddings."):
            key = "qformer." + key
        state[key] = tensor
    if "language_model.lm_head.weight" not in state:  # tied, and not written
        state["language_model.lm_head.weight"] = state["language_model.model.decoder.embed_tokens.weight"]
    result = model.load_state_dict(state, strict=False)
    heads = ("itm_head.", "vision_projection.", "text_projection.", "qformer_lm_head.", "temp")
    if result.missing_keys or any(not k.startswith(heads) for k in result.unexpected_keys):
        raise ValueError(f"{folder}: not an InstructBLIP-shaped checkpoint (missing {result.missing_keys}, "
                         f"unexpected {result.unexpected_keys})")
    return model.eval()


def random_pixels(batch: int, size: int = 28, seed: int = 0) -> torch.Tensor:
    return torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(seed))


__all__ = ["make_tokenizer", "make_qformer_tokenizer", "hf_config", "randomize_", "make_tiny_folder",
           "add_question_reading_", "instructblip_reference", "random_pixels"]
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

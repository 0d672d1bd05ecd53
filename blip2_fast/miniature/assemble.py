"""Assemble the pretrained unimodal parts into ONE transformers-format BLIP-2 folder: the
starting point of stage 1 (and, for the ablation, of stage 2 without stage 1).

The folder (config.json, model.safetensors, the OPT tokenizer and the processor config as
`transformers.Blip2Processor.save_pretrained` writes them, and the Q-Former's tokenizer in
`qformer_tokenizer/`) holds the union of the keys of every model the recipe builds from it:
- from the pretrainings: `vision_model.*` (ViT), `language_model.*` (OPT, lm_head tied and not
  written), `embeddings.*` + `qformer.*` + `qformer_lm_head.*` (the masked-LM text encoder,
  query feed-forward = copy of the text one, cross-attention N(0, 0.02));
- new, seeded: `query_tokens` ~ N(0, 0.02) (LAVIS), `vision_projection`, `text_projection`,
  `itm_head`, `language_projection` (weights N(0, 0.02), biases 0), `temp` = 0.07.
So `blip2_fast.Blip2ForConditionalGeneration` (skip_unused=True: the stage-1 heads and text
embeddings are not its keys), `blip2_fast.Blip2ForImageTextRetrieval` (skip_unused=True),
`blip2_fast.training.Blip2Stage1` (skip_unused=True: the LM and language_projection are not
its keys) and transformers' `Blip2ForConditionalGeneration` / `Blip2ForImageTextRetrieval`
(which ignore extra keys with a warning) all load it. Before writing, the keys and shapes are
checked against those classes built from the folder's config.
"""
from __future__ import annotations

import json
import os
import shutil

import torch

from .preset import IMAGE_TOKEN_INDEX, NUM_QUERY_TOKENS, image_spec, load_weights, miniature_config, save_weights
from .pretrain_lm import TIED
from .pretrain_lm import WEIGHTS_FILE as LM_FILE
from .pretrain_text_encoder import WEIGHTS_FILE as TEXT_FILE
from .pretrain_vision import WEIGHTS_FILE as VISION_FILE
from .qformer_tokenizer import DEC

QFORMER_TOKENIZER_DIR = "qformer_tokenizer"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")


def _random_linear(prefix: str, n_in: int, n_out: int, gen: torch.Generator) -> dict:
    return {f"{prefix}.weight": 0.02 * torch.randn(n_out, n_in, generator=gen), f"{prefix}.bias": torch.zeros(n_out)}


def _expected_keys(cfg) -> dict[str, tuple]:
    """key -> shape for the union of the classes that load this folder (built on meta)."""
    from ..models.blip2 import Blip2ForConditionalGeneration
    from ..training.stage1 import Blip2Stage1
    out = {}
    with torch.device("meta"):
        for cls in (Blip2ForConditionalGeneration, Blip2Stage1):
            out.update({k: tuple(v.shape) for k, v in cls(cfg).state_dict().items()})
    out.pop(f"language_model.{TIED}")  # tied to the input embedding, as transformers writes OPT
    return out


def save_processor(out_dir: str, tokenizer_dir: str) -> None:
    """The OPT tokenizer and a 64 px image processor, saved as Blip2Processor does."""
    from transformers import AutoTokenizer, Blip2Processor, BlipImageProcessor
    spec = image_spec()
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    image_processor = BlipImageProcessor(size={"height": spec.height, "width": spec.width},
                                         image_mean=list(spec.image_mean), image_std=list(spec.image_std),
                                         resample=int(spec.resample), do_convert_rgb=True)
    processor = Blip2Processor(image_processor=image_processor, tokenizer=tokenizer, num_query_tokens=NUM_QUERY_TOKENS)
    got = processor.tokenizer.convert_tokens_to_ids("<image>")
    if got != IMAGE_TOKEN_INDEX:  # the processor adds "<image>" when missing: ours must be id 3
        raise ValueError(f"{tokenizer_dir}: '<image>' is id {got}, the miniature config expects {IMAGE_TOKEN_INDEX}")
    processor.save_pretrained(out_dir)


def assemble_initial_model(out_dir: str, vision_dir: str, lm_dir: str, text_encoder_dir: str,
                           opt_tokenizer_dir: str, qformer_tokenizer_dir: str, seed: int = 0) -> str:
    """Write the initial BLIP-2 folder to out_dir (see module docstring); return out_dir."""
    from tokenizers import Tokenizer
    opt_tok = Tokenizer.from_file(os.path.join(opt_tokenizer_dir, "tokenizer.json"))
    q_tok = Tokenizer.from_file(os.path.join(qformer_tokenizer_dir, "tokenizer.json"))
    cfg = miniature_config(opt_tok.get_vocab_size(), q_tok.get_vocab_size(), q_tok.token_to_id(DEC))
    cfg.extra["architectures"] = ["Blip2ForConditionalGeneration"]

    state = {}
    for prefix, folder, name in (("vision_model.", vision_dir, VISION_FILE), ("language_model.", lm_dir, LM_FILE),
                                 ("", text_encoder_dir, TEXT_FILE)):
        state.update({prefix + k: v for k, v in load_weights(os.path.join(folder, name)).items()})
    gen = torch.Generator().manual_seed(seed)
    q, d = cfg.qformer.hidden_size, cfg.image_text_hidden_size
    state["query_tokens"] = 0.02 * torch.randn(1, cfg.num_query_tokens, q, generator=gen)
    state.update(_random_linear("vision_projection", q, d, gen))
    state.update(_random_linear("text_projection", q, d, gen))
    state.update(_random_linear("itm_head", q, 2, gen))
    state.update(_random_linear("language_projection", q, cfg.text.hidden_size, gen))
    state["temp"] = torch.tensor(0.07)

    expected = _expected_keys(cfg)
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    wrong = sorted(k for k in set(state) & set(expected) if tuple(state[k].shape) != expected[k])
    if missing or unexpected or wrong:
        raise KeyError(f"assembling {out_dir}: missing {missing[:8]}, unexpected {unexpected[:8]}, "
                       f"wrong shape {[(k, tuple(state[k].shape), expected[k]) for k in wrong[:8]]}")

    os.makedirs(out_dir, exist_ok=True)
    save_weights(state, os.path.join(out_dir, "model.safetensors"))
    with open(os.path.join(out_dir, "config.json"), "w", encoding="utf-8") as f:
        json.dump(cfg.to_hf_dict(), f, indent=2, sort_keys=True)
    save_processor(out_dir, opt_tokenizer_dir)
    sub = os.path.join(out_dir, QFORMER_TOKENIZER_DIR)
    os.makedirs(sub, exist_ok=True)
    for name in TOKENIZER_FILES:
        shutil.copyfile(os.path.join(qformer_tokenizer_dir, name), os.path.join(sub, name))
    return out_dir


def folder_size_bytes(folder: str) -> int:
    return sum(os.path.getsize(os.path.join(root, f)) for root, _, files in os.walk(folder) for f in files)

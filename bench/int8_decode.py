"""Batch-1 decode tokens/s of the LLM: float weights against int8 weights (with and without the
LM head quantised), same random weights, same process, rounds interleaved.

    python bench/int8_decode.py --preset blip2-small --tokens 32 --rounds 3
"""
from __future__ import annotations

import argparse
import tempfile
import time

import torch

from blip2_fast.config import Blip2Config
from blip2_fast.generation import GenerationConfig, generate_tokens
from blip2_fast.models.blip2 import Blip2ForConditionalGeneration
from blip2_fast.models.opt import OPTDecoderState
from blip2_fast.quantization import Int8WeightOnlyConfig


def _decode_rate(model, embeds: torch.Tensor, tokens: int) -> float:
    gen = GenerationConfig.from_kwargs(max_new_tokens=tokens, min_new_tokens=tokens, eos_token_id=2, pad_token_id=1)
    mask = torch.ones(embeds.shape[:2], dtype=torch.long)
    state = OPTDecoderState(model.language_model, embeds, mask, tokens)  # prefill is outside the clock
    start = time.perf_counter()
    generate_tokens(state, state.first_logits, gen)
    return tokens / (time.perf_counter() - start)


def main(preset: str = "blip2-small", tokens: int = 32, rounds: int = 3, prompt: int = 40) -> dict:
    torch.manual_seed(0)
    model = Blip2ForConditionalGeneration(Blip2Config.from_name(preset)).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():  # random weights of a trained model's scale
            p.normal_(0, 0.02) if p.dim() > 1 else p.fill_(1.0 if "norm" in name else 0.0)
    folder = tempfile.mkdtemp()
    model.save_pretrained(folder)
    variants = {"float32": Blip2ForConditionalGeneration.from_pretrained(folder),
                "int8": Blip2ForConditionalGeneration.from_pretrained(folder, load_in_8bit=True),
                "int8+lm_head": Blip2ForConditionalGeneration.from_pretrained(
                    folder, quantization_config=Int8WeightOnlyConfig(include_lm_head=True))}
    embeds = 0.02 * torch.randn(1, prompt, model.config.text.hidden_size)
    rates = {name: [] for name in variants}
    with torch.no_grad():
        for m in variants.values():
            _decode_rate(m, embeds, 4)  # warm-up: kernel choice per shape is timed on first use
        for _ in range(rounds):
            for name, m in variants.items():
                rates[name].append(_decode_rate(m, embeds, tokens))
    best = {name: sorted(r)[len(r) // 2] for name, r in rates.items()}
    for name, rate in best.items():
        print(f"{name:>13}: {rate:7.1f} tokens/s  ({rate / best['float32']:.2f}x float32)")
    return best


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="blip2-small")
    parser.add_argument("--tokens", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=3)
    main(**vars(parser.parse_args()))

"""Static-shape decoding: every decode step has the same shapes, and nothing in it is a host integer.

The fast engines' decode loop (gpt-fast's `KVCache` indexed by `input_pos`): the KV cache has
a fixed capacity (prompt + max_new_tokens), the slot a step writes is a (1,) device tensor,
the positions are a (B,) device tensor, and the key mask is a (B, capacity) device tensor a
step marks in place. Attention always spans the whole capacity, its unfilled slots masked. So
one step is one fixed graph: `torch.compile` traces it once (inductor on the CPU too), and on
CUDA it can be captured as a graph (mode "reduce-overhead").

What it costs: attention over `capacity` keys instead of the filled ones, a few dozen extra
keys for captions and short answers. What it saves: per-step host work and, compiled, the
launch and dispatch overhead of a few hundred small ops per token.

`StaticOPTDecoderState` and `StaticT5DecoderState` are `generation.DecoderState`s: the engine
drives them exactly like the dynamic states and gets the same tokens (the prompt, or T5's
start token, runs through the dynamic path, which fills the first slots of the same cache).
"""
from __future__ import annotations

import time
from typing import Callable

import torch

from .opt import OPTLM
from .t5 import T5LM, key_padding_mask

COMPILE_MODES = ("default", "reduce-overhead", "max-autotune")


def compiled_step(lm: OPTLM | T5LM, mode: str = "default") -> Callable:
    """`lm.static_step` compiled once per model and mode (kept on the model, so it lives and
    dies with it); a new batch size or capacity adds a graph, the same shapes reuse one."""
    if mode not in COMPILE_MODES:
        raise ValueError(f"compile mode {mode!r}: expected one of {', '.join(COMPILE_MODES)}")
    steps = lm.__dict__.setdefault("_compiled_static_steps", {})
    if mode not in steps:
        steps[mode] = torch.compile(lm.static_step, mode=None if mode == "default" else mode, dynamic=False)
    return steps[mode]


class _StaticSteps:
    """What both static states share: the compiled or eager step, its first-call timing, the
    device slot counter, and zeroed buffers."""

    def _setup(self, lm, cache, input_pos: int, compile: str | None) -> None:
        self.lm, self.cache = lm, cache
        for buffer in cache.k + cache.v:
            # every step reads every slot: unwritten memory could hold NaN or inf, and a masked
            # NaN score, or a zero weight times an inf value, is still NaN
            buffer.zero_()
        self.input_pos = torch.full((1,), input_pos, dtype=torch.long, device=cache.k[0].device)
        self._step = compiled_step(lm, compile) if compile else lm.static_step
        self.compile_seconds: float | None = None if compile else 0.0

    def _run(self, *args) -> torch.Tensor:
        start = time.perf_counter() if self.compile_seconds is None else None
        logits = self._step(*args)
        if start is not None:
            if logits.is_cuda:
                torch.cuda.synchronize(logits.device)
            self.compile_seconds = time.perf_counter() - start
        self.input_pos += 1
        return logits


class StaticOPTDecoderState(_StaticSteps):
    """OPT: prefill with the dynamic path, then one static-shape step per token.

    compile: None (eager static steps), or a torch.compile mode ("default", "reduce-overhead",
    "max-autotune"). `compile_seconds` records the time of the first compiled step, which
    includes tracing and code generation (reported apart from steady-state timings)."""

    def __init__(self, lm: OPTLM, inputs_embeds: torch.Tensor, attention_mask: torch.Tensor, max_new_tokens: int,
                 compile: str | None = None):
        B, L, _ = inputs_embeds.shape
        device = inputs_embeds.device
        capacity = L + max_new_tokens
        self._setup(lm, lm.new_cache(B, capacity, inputs_embeds.dtype, device), L, compile)
        self.key_valid = torch.zeros(B, capacity, dtype=torch.bool, device=device)
        self.key_valid[:, :L] = attention_mask.bool()
        self.next_position = attention_mask.long().sum(1)  # (B,) OPT position of the next token
        self.first_logits = lm(inputs_embeds, attention_mask, self.cache, logits_to_keep=1)[:, -1]

    def step(self, tokens: torch.Tensor) -> torch.Tensor:
        logits = self._run(tokens, self.cache, self.input_pos, self.next_position, self.key_valid)
        self.next_position += 1
        return logits

    def reorder(self, index: torch.Tensor) -> None:
        if index.shape[0] == self.key_valid.shape[0]:  # beam step: gather in place
            self.cache.reorder(index, in_place=True)
            self.key_valid.copy_(self.key_valid.index_select(0, index))
            self.next_position.copy_(self.next_position.index_select(0, index))
        else:  # expansion to beams or return sequences: new buffers of the new batch size
            self.cache.reorder(index)
            self.key_valid = self.key_valid.index_select(0, index)
            self.next_position = self.next_position.index_select(0, index)


class StaticT5DecoderState(_StaticSteps):
    """T5 / FlanT5: the encoder once, the start token through the dynamic decoder (which also
    projects the encoder output to cross-attention K/V, kept in the cache), then static steps."""

    def __init__(self, lm: T5LM, inputs_embeds: torch.Tensor, attention_mask: torch.Tensor, max_new_tokens: int,
                 compile: str | None = None):
        B = inputs_embeds.shape[0]
        device = inputs_embeds.device
        self.encoder_mask = attention_mask
        self.encoder_hidden = lm.encode(inputs_embeds, attention_mask)  # (B, S, E)
        self.cross_mask = key_padding_mask(attention_mask, self.encoder_hidden.dtype)  # (B, 1, 1, S)
        self._setup(lm, lm.new_cache(B, max_new_tokens + 1, self.encoder_hidden.dtype, device), 1, compile)
        start = torch.full((B, 1), lm.config.decoder_start_token_id, dtype=torch.long, device=device)
        self.first_logits = lm.decode(start, self.encoder_hidden, attention_mask, cache=self.cache)[:, -1]

    def step(self, tokens: torch.Tensor) -> torch.Tensor:
        return self._run(tokens, self.cache, self.input_pos, self.encoder_hidden, self.cross_mask)

    def reorder(self, index: torch.Tensor) -> None:
        if index.shape[0] != self.encoder_hidden.shape[0]:  # expansion: the encoder side follows
            self.encoder_hidden = self.encoder_hidden.index_select(0, index)
            self.encoder_mask = self.encoder_mask.index_select(0, index)
            self.cross_mask = self.cross_mask.index_select(0, index)
            self.cache.reorder(index)
        else:  # beams of one sample share the encoder output: only the self-attention cache moves
            self.cache.reorder(index, in_place=True)


__all__ = ["StaticOPTDecoderState", "StaticT5DecoderState", "compiled_step", "COMPILE_MODES"]

"""Generation-engine adapter for encoder-decoder LLMs (T5 / FlanT5).

The encoder runs once on [soft visual prompt ; prompt]; the decoder starts from
`decoder_start_token_id` and appends one token per step with its self-attention KV cache.
Cross-attention K/V are computed from the encoder output on the first decoder call and kept
in `cache.cross`; beams of one sample share the encoder output, so a beam reorder leaves the
encoder tensors alone and only an expansion (B -> B*beams) gathers them.
"""
from __future__ import annotations

import torch


class T5DecoderState:
    def __init__(self, lm, inputs_embeds: torch.Tensor, attention_mask: torch.Tensor, max_new_tokens: int):
        B = inputs_embeds.shape[0]
        self.lm = lm
        self.encoder_mask = attention_mask
        self.encoder_hidden = lm.encode(inputs_embeds, attention_mask)  # (B, S, E)
        self.cache = lm.new_cache(B, max_new_tokens + 1, self.encoder_hidden.dtype, inputs_embeds.device)
        start = torch.full((B, 1), lm.config.decoder_start_token_id, dtype=torch.long, device=inputs_embeds.device)
        self.first_logits = self._decode(start)

    def _decode(self, ids: torch.Tensor) -> torch.Tensor:
        return self.lm.decode(ids, self.encoder_hidden, self.encoder_mask, cache=self.cache)[:, -1]

    def step(self, tokens: torch.Tensor) -> torch.Tensor:
        return self._decode(tokens[:, None])

    def reorder(self, index: torch.Tensor) -> None:
        if index.shape[0] != self.encoder_hidden.shape[0]:
            self.encoder_hidden = self.encoder_hidden.index_select(0, index)
            self.encoder_mask = self.encoder_mask.index_select(0, index)
        self.cache.reorder(index)

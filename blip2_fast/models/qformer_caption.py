"""Q-Former-only captioning for stage-1 models (no LLM): BLIP-2's ITG head used for decoding.

Model. `Blip2QFormerForCaptioning` = `Blip2ForImageTextRetrieval` + `qformer_lm_head`, the BERT
LM head (dense + GELU + LayerNorm, decoder tied to `embeddings.word_embeddings`, own bias).
Checkpoint keys of the head (our naming; transformers has no such head):
    qformer_lm_head.dense.{weight,bias}, qformer_lm_head.LayerNorm.{weight,bias}, qformer_lm_head.bias
LAVIS names them Qformer.cls.predictions.transform.dense.*, ...transform.LayerNorm.*,
...predictions.bias (its decoder.weight is the tied word embedding and is not stored). A folder
without these keys (e.g. Salesforce/blip2-itm-vit-g) fails to load with `CheckpointError`
naming them.

Decoding (the Q-Former's multimodal causal mask mode). Queries attend only to queries, so
their hidden states, and hence their self-attention K/V in every layer, do not depend on the
text: they are computed once per image (prefill) and written at the head of a per-layer KV
cache. Each step then runs only the new token: its K/V are appended and it attends to all
cached keys (the queries and the text up to itself, exactly the causal rows of the mask), so
the attention is an unmasked `cross_attention` call; text rows never cross-attend to the
image. Text positions start at 0 at the first text token ([DEC]), as in BLIP-2. Equality with a
dense-mask recomputation of the whole sequence is tested.

Tokens. BLIP-2 starts from `[DEC]` (bos) and stops at `[SEP]` (eos). For BERT's vocabulary plus
[DEC] (vocab 30523, Salesforce's tokenizer) the defaults are bos 30522 and eos 102; other
vocabularies must pass `bos_token_id` and `eos_token_id` (or set them in qformer_config).
"""
from __future__ import annotations

import torch

from ..config import Blip2Config
from ..generation import GenerationConfig, generate_tokens
from ..kernels.cross_attention import cross_attention
from .cache import KVCache
from .qformer import Attention, QFormerLMHead
from .retrieval_heads import Blip2ForImageTextRetrieval

BERT_DEC_VOCAB, BERT_DEC, BERT_SEP = 30523, 30522, 102


class Blip2QFormerForCaptioning(Blip2ForImageTextRetrieval):
    def __init__(self, config: Blip2Config):
        super().__init__(config)
        self.qformer_lm_head = QFormerLMHead(config.qformer)

    def lm_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Q-Former text outputs (..., E) -> next-token logits (..., V)."""
        head = self.qformer_lm_head
        return head(hidden.to(head.dense.weight.dtype), self.embeddings.word_embeddings.weight)

    def special_tokens(self, bos: int | None, eos: int | list[int] | None, pad: int | None):
        q = self.config.qformer
        bos = bos if bos is not None else q.extra.get("bos_token_id")
        eos = eos if eos is not None else q.extra.get("eos_token_id", q.extra.get("sep_token_id"))
        if q.vocab_size == BERT_DEC_VOCAB:
            bos = BERT_DEC if bos is None else bos
            eos = BERT_SEP if eos is None else eos
        if bos is None or eos is None:
            raise ValueError(f"the Q-Former vocabulary ({q.vocab_size} tokens) is not BERT + [DEC]: pass "
                             f"bos_token_id (the [DEC] token) and eos_token_id (the [SEP] token)")
        return bos, eos, q.pad_token_id if pad is None else pad

    @torch.no_grad()
    def generate(self, pixel_values, input_ids=None, interpolate_pos_encoding: bool = False,
                 generator: torch.Generator | None = None, bos_token_id: int | None = None,
                 **generate_kwargs) -> torch.LongTensor:
        """Captions as token ids (B * num_return_sequences, P + new): the prompt (default
        `[DEC]`; a given `input_ids` (B, P) must start with it, unpadded) then the new tokens.
        `generate_kwargs`: see `blip2_fast.generation.GenerationConfig` (greedy, beams, sampling)."""

        bos, eos, pad = self.special_tokens(bos_token_id, generate_kwargs.pop("eos_token_id", None),
                                            generate_kwargs.pop("pad_token_id", None))
        gen = GenerationConfig.from_kwargs(eos_token_id=eos, pad_token_id=pad, **generate_kwargs)
        image_embeds = self.vision(pixel_values, interpolate_pos_encoding)
        B = image_embeds.shape[0]
        if input_ids is None:
            input_ids = torch.full((B, 1), bos, dtype=torch.long, device=self.device)
        if input_ids.dim() != 2 or input_ids.shape[0] != B or input_ids.shape[1] == 0:
            raise ValueError(f"input_ids must be (batch={B}, length >= 1), got {tuple(input_ids.shape)}")
        input_ids = input_ids.to(self.device)
        state = CaptionState(self, image_embeds, input_ids.shape[1] + gen.max_new_tokens)
        first = state.prefill(input_ids)
        new = generate_tokens(state, first, gen, generator=generator)
        return torch.cat([input_ids.repeat_interleave(new.shape[0] // B, 0), new], 1)


class CaptionState:
    """`DecoderState` for the generation engine: the queries' K/V once, then one token per step."""

    def __init__(self, model: Blip2QFormerForCaptioning, image_embeds: torch.Tensor, max_text: int):
        qf, Q = model.qformer, model.num_query
        if max_text > model.embeddings.position_embeddings.num_embeddings:
            raise ValueError(f"{max_text} text tokens exceed the Q-Former's "
                             f"{model.embeddings.position_embeddings.num_embeddings} positions")
        self.model, self.layers, self.text_len = model, qf.encoder.layer, 0
        B, cfg = image_embeds.shape[0], qf.config
        dtype = qf.layernorm.weight.dtype
        self.cache = KVCache(len(self.layers), B, cfg.num_attention_heads, Q + max_text,
                             cfg.hidden_size // cfg.num_attention_heads, dtype, image_embeds.device)
        x = qf.layernorm(model.query_tokens.expand(B, -1, -1).to(dtype))  # (B, Q, E)
        image_kv = qf.image_kv(image_embeds)
        for i, layer in enumerate(self.layers):
            self.cache.update(i, *layer.attention.attention.kv(x))  # the queries' K/V, once
            x = layer(x, Q, "causal", None, image_kv[i], None)
        self.cache.advance(Q)

    def prefill(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Run the prompt (B, P) token by token; logits after its last token (B, V)."""
        for j in range(input_ids.shape[1]):
            logits = self.step(input_ids[:, j])
        return logits

    def step(self, tokens: torch.Tensor) -> torch.Tensor:
        m = self.model
        x = m.qformer.layernorm(m.embeddings(tokens[:, None], past_length=self.text_len).to(self.cache.k[0].dtype))
        for i, layer in enumerate(self.layers):
            proj = layer.attention.attention
            q, (k, v) = proj.heads(proj.query(x)), proj.kv(x)  # (B, H, 1, D)
            k_all, v_all = self.cache.update(i, k, v)  # queries + text so far: all visible
            x = layer.attention.output(Attention.merge(cross_attention(q, k_all, v_all)), x)
            x = layer.output(layer.intermediate(x), x)  # text rows: BERT feed-forward, no image
        self.cache.advance(1)
        self.text_len += 1
        return m.lm_logits(x[:, 0])

    def reorder(self, index: torch.Tensor) -> None:
        self.cache.reorder(index)


__all__ = ["Blip2QFormerForCaptioning", "CaptionState"]

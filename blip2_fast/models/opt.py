"""OPT decoder (the frozen LLM of blip2-opt-*) with a preallocated KV cache.

Attribute names follow transformers' `OPTForCausalLM` (`model.decoder.layers.{i}.self_attn.q_proj`,
`lm_head`, ...). Positions follow OPT: learned, offset by 2, counted over the attention mask
(`cumsum(mask) * mask - 1`), so left padding leaves every real token at the position it would
have alone — the reason a padded batch decodes like each prompt on its own.

`OPTDecoderState` adapts the model to the generation engine (`blip2_fast.generation`): the mask
and the next position live in preallocated device tensors, so a decode step never reads the
device from the host.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..config import OPTConfig
from .cache import KVCache
from .vision import activation


def additive_mask(key_mask: torch.Tensor, q_len: int, past: int, dtype: torch.dtype) -> torch.Tensor:
    """(B, S) key validity -> (B, 1, q_len, S) additive mask, causal for the last q_len keys.

    Uses the dtype's minimum rather than -inf so rows with no valid key (left padding) stay
    finite; their outputs are never read as real tokens."""
    S = key_mask.shape[1]
    rows = torch.arange(past, past + q_len, device=key_mask.device)[:, None]
    cols = torch.arange(S, device=key_mask.device)[None, :]
    allowed = (cols <= rows)[None] & key_mask[:, None, :].bool()  # (B, q_len, S)
    mask = torch.zeros(allowed.shape, dtype=dtype, device=key_mask.device)
    return mask.masked_fill_(~allowed, torch.finfo(dtype).min)[:, None]


class OPTAttention(nn.Module):
    def __init__(self, cfg: OPTConfig):
        super().__init__()
        E, bias = cfg.hidden_size, cfg.enable_bias
        self.num_heads = cfg.num_attention_heads
        self.q_proj, self.k_proj = nn.Linear(E, E, bias=bias), nn.Linear(E, E, bias=bias)
        self.v_proj, self.out_proj = nn.Linear(E, E, bias=bias), nn.Linear(E, E, bias=bias)

    def forward(self, x, mask, cache: KVCache | None, layer_idx: int, input_pos: torch.Tensor | None = None):
        B, L, E = x.shape
        H = self.num_heads

        def heads(t):  # (B, L, E) -> (B, H, L, D)
            return t.view(B, L, H, E // H).transpose(1, 2)

        q, k, v = heads(self.q_proj(x)), heads(self.k_proj(x)), heads(self.v_proj(x))
        if cache is not None and input_pos is not None:
            k, v = cache.write(layer_idx, k, v, input_pos)  # (B, H, capacity, D), static shapes
        elif cache is not None:
            k, v = cache.update(layer_idx, k, v)  # (B, H, past + L, D)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return self.out_proj(out.transpose(1, 2).reshape(B, L, E))


class OPTLayer(nn.Module):
    def __init__(self, cfg: OPTConfig):
        super().__init__()
        E, affine = cfg.hidden_size, cfg.layer_norm_elementwise_affine
        self.pre_ln = cfg.do_layer_norm_before
        self.self_attn = OPTAttention(cfg)
        self.self_attn_layer_norm = nn.LayerNorm(E, elementwise_affine=affine)
        self.fc1 = nn.Linear(E, cfg.ffn_dim, bias=cfg.enable_bias)
        self.fc2 = nn.Linear(cfg.ffn_dim, E, bias=cfg.enable_bias)
        self.final_layer_norm = nn.LayerNorm(E, elementwise_affine=affine)
        self.act = activation(cfg.activation_function)

    def forward(self, x, mask, cache, idx, input_pos=None):
        h = self.self_attn_layer_norm(x) if self.pre_ln else x
        x = x + self.self_attn(h, mask, cache, idx, input_pos)
        if not self.pre_ln:
            x = self.self_attn_layer_norm(x)
        h = self.final_layer_norm(x) if self.pre_ln else x
        x = x + self.fc2(self.act(self.fc1(h)))
        return x if self.pre_ln else self.final_layer_norm(x)


class OPTDecoder(nn.Module):
    def __init__(self, cfg: OPTConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.word_embed_proj_dim, padding_idx=cfg.pad_token_id)
        self.embed_positions = nn.Embedding(cfg.max_position_embeddings + 2, cfg.hidden_size)
        if cfg.word_embed_proj_dim != cfg.hidden_size:
            self.project_in = nn.Linear(cfg.word_embed_proj_dim, cfg.hidden_size, bias=False)
            self.project_out = nn.Linear(cfg.hidden_size, cfg.word_embed_proj_dim, bias=False)
        if cfg.do_layer_norm_before and not cfg.extra.get("_remove_final_layer_norm", False):
            self.final_layer_norm = nn.LayerNorm(cfg.hidden_size, elementwise_affine=cfg.layer_norm_elementwise_affine)
        self.layers = nn.ModuleList(OPTLayer(cfg) for _ in range(cfg.num_hidden_layers))


class OPTBody(nn.Module):
    def __init__(self, cfg: OPTConfig):
        super().__init__()
        self.decoder = OPTDecoder(cfg)


class OPTLM(nn.Module):
    """inputs_embeds (B, L, E_word) + attention_mask (B, past + L) -> logits (B, L, V)."""

    def __init__(self, cfg: OPTConfig):
        super().__init__()
        self.config = cfg
        self.model = OPTBody(cfg)
        self.lm_head = nn.Linear(cfg.word_embed_proj_dim, cfg.vocab_size, bias=False)
        self.gradient_checkpointing = False

    def get_input_embeddings(self) -> nn.Embedding:
        return self.model.decoder.embed_tokens

    def tie_weights(self) -> None:
        if self.config.tie_word_embeddings:
            self.lm_head.weight = self.model.decoder.embed_tokens.weight

    def new_cache(self, batch: int, max_len: int, dtype: torch.dtype, device) -> KVCache:
        c = self.config
        return KVCache(c.num_hidden_layers, batch, c.num_attention_heads, max_len,
                       c.hidden_size // c.num_attention_heads, dtype, device)

    def hidden_states(self, inputs_embeds: torch.Tensor, attention_mask: torch.Tensor,
                      cache: KVCache | None = None, position_ids: torch.Tensor | None = None) -> torch.Tensor:
        """The decoder's last hidden states (final LayerNorm and project_out applied): (B, L, E_word)."""
        dec = self.model.decoder
        B, L, _ = inputs_embeds.shape
        past = cache.length if cache is not None else 0
        if attention_mask.shape != (B, past + L):
            raise ValueError(f"attention_mask has shape {tuple(attention_mask.shape)}, expected {(B, past + L)}")
        if past + L > self.config.max_position_embeddings:
            raise ValueError(f"sequence of {past + L} tokens exceeds the LLM's context of "
                             f"{self.config.max_position_embeddings} positions")
        if position_ids is None:
            position_ids = (attention_mask.long().cumsum(1) * attention_mask.long() - 1)[:, past:]
        x = inputs_embeds
        if hasattr(dec, "project_in"):
            x = dec.project_in(x)
        x = x + dec.embed_positions(position_ids + 2).to(x.dtype)  # (B, L, E)
        mask = additive_mask(attention_mask, L, past, x.dtype)
        for i, layer in enumerate(dec.layers):
            if self.gradient_checkpointing and self.training and torch.is_grad_enabled():
                x = torch.utils.checkpoint.checkpoint(layer, x, mask, cache, i, use_reentrant=False)
            else:
                x = layer(x, mask, cache, i)
        if cache is not None:
            cache.advance(L)
        if hasattr(dec, "final_layer_norm"):
            x = dec.final_layer_norm(x)
        if hasattr(dec, "project_out"):
            x = dec.project_out(x)
        return x

    def forward(self, inputs_embeds: torch.Tensor, attention_mask: torch.Tensor,
                cache: KVCache | None = None, position_ids: torch.Tensor | None = None,
                logits_to_keep: int = 0) -> torch.Tensor:
        """Logits (B, L, V); `logits_to_keep` > 0 projects only the last that many positions."""
        x = self.hidden_states(inputs_embeds, attention_mask, cache, position_ids)
        x = x[:, -logits_to_keep:] if logits_to_keep else x
        # as a 2-D matrix: on a strided 3-D slice (the prefill's last position) torch's matmul may
        # take a batched path that first copies the (V, E) head once per row (measured: 0.2-0.6 s
        # per call in bf16 at vocabulary 50272, batch 8, on the CPU)
        B, L, E = x.shape
        return self.lm_head(x.reshape(B * L, E)).view(B, L, -1)

    def static_step(self, tokens: torch.Tensor, cache: KVCache, input_pos: torch.Tensor,
                    position_ids: torch.Tensor, key_valid: torch.Tensor) -> torch.Tensor:
        """One decode step on static shapes: tokens (B,) at cache slot `input_pos` (1,), OPT
        positions `position_ids` (B,); `key_valid` (B, capacity) marks the filled slots and gets
        this one marked. Attends over the whole cache, masking the rest. -> logits (B, V)."""
        dec = self.model.decoder
        x = dec.embed_tokens(tokens[:, None])  # (B, 1, E_word)
        if hasattr(dec, "project_in"):
            x = dec.project_in(x)
        x = x + dec.embed_positions(position_ids[:, None] + 2).to(x.dtype)  # (B, 1, E)
        key_valid.index_fill_(1, input_pos, True)
        slots = torch.arange(key_valid.shape[1], device=key_valid.device)
        allowed = key_valid & (slots <= input_pos)[None, :]  # (B, capacity)
        mask = torch.zeros(allowed.shape, dtype=x.dtype, device=x.device)
        mask = mask.masked_fill_(~allowed, torch.finfo(x.dtype).min)[:, None, None, :]  # (B, 1, 1, capacity)
        for i, layer in enumerate(dec.layers):
            x = layer(x, mask, cache, i, input_pos)
        if hasattr(dec, "final_layer_norm"):
            x = dec.final_layer_norm(x)
        if hasattr(dec, "project_out"):
            x = dec.project_out(x)
        return self.lm_head(x[:, 0])


class OPTDecoderState:
    """Generation-engine adapter: prefill once, then one token per row per step."""

    def __init__(self, lm: OPTLM, inputs_embeds: torch.Tensor, attention_mask: torch.Tensor, max_new_tokens: int):
        B, L, _ = inputs_embeds.shape
        self.lm = lm
        self.cache = lm.new_cache(B, L + max_new_tokens, inputs_embeds.dtype, inputs_embeds.device)
        self.mask = torch.zeros(B, L + max_new_tokens, dtype=torch.long, device=inputs_embeds.device)
        self.mask[:, :L] = attention_mask
        self.next_position = attention_mask.long().sum(1)  # (B,) position of the next token
        self.first_logits = lm(inputs_embeds, self.mask[:, :L], self.cache, logits_to_keep=1)[:, -1]

    def step(self, tokens: torch.Tensor) -> torch.Tensor:
        cur = self.cache.length
        self.mask[:, cur] = 1
        embeds = self.lm.get_input_embeddings()(tokens[:, None])
        logits = self.lm(embeds, self.mask[:, : cur + 1], self.cache, position_ids=self.next_position[:, None])
        self.next_position = self.next_position + 1
        return logits[:, -1]

    def reorder(self, index: torch.Tensor) -> None:
        self.cache.reorder(index)
        self.mask = self.mask.index_select(0, index)
        self.next_position = self.next_position.index_select(0, index)

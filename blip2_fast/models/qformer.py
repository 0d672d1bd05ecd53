"""The Querying Transformer (Q-Former): BERT-shaped, post-LN, queries beside optional text.

Sequence layout: `[num_query learned queries ; T text tokens]` (either part may be empty).
- Self-attention is shared by queries and text; the mask mode (`unimodal`, `causal`,
  `bidirectional`) and the text padding go to the fused kernel
  `blip2_fast.kernels.qformer_attention`, which never materialises an L×L mask on the GPU.
- Cross-attention to the image tokens in layers with `idx % cross_attention_frequency == 0`,
  for query rows only. The image tokens' K/V for all cross layers can be computed once per image
  (`image_kv`) and reused across beams, ITM pairs and retrieval queries (`image_index` maps each
  row of the batch to its image).
- Query rows use their own feed-forward (`intermediate_query`/`output_query`), text rows BERT's.

Attribute names follow transformers' `Blip2QFormerModel` so checkpoint keys map one to one.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from blip2_fast.kernels.cross_attention import cross_attention
from blip2_fast.kernels.qformer_attention import qformer_attention

from ..config import QFormerConfig
from .vision import activation


class MultiHeadProjections(nn.Module):
    """query/key/value projections (checkpoint names); the attention itself is a kernel call."""

    def __init__(self, cfg: QFormerConfig, kv_width: int):
        super().__init__()
        self.num_heads = cfg.num_attention_heads
        self.query = nn.Linear(cfg.hidden_size, cfg.hidden_size)
        self.key = nn.Linear(kv_width, cfg.hidden_size)
        self.value = nn.Linear(kv_width, cfg.hidden_size)

    def heads(self, x: torch.Tensor) -> torch.Tensor:  # (B, L, E) -> (B, H, L, D)
        B, L, E = x.shape
        return x.view(B, L, self.num_heads, E // self.num_heads).transpose(1, 2)

    def kv(self, states: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.heads(self.key(states)), self.heads(self.value(states))


class AddNorm(nn.Module):
    """dense -> dropout -> LayerNorm(x + residual): BERT's `*Output` blocks."""

    def __init__(self, width_in: int, cfg: QFormerConfig):
        super().__init__()
        self.dense = nn.Linear(width_in, cfg.hidden_size)
        self.LayerNorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.dropout = nn.Dropout(cfg.hidden_dropout_prob)

    def forward(self, x, residual):
        return self.LayerNorm(self.dropout(self.dense(x)) + residual)


class Attention(nn.Module):
    def __init__(self, cfg: QFormerConfig, kv_width: int):
        super().__init__()
        self.attention = MultiHeadProjections(cfg, kv_width)
        self.output = AddNorm(cfg.hidden_size, cfg)
        self.dropout_p = cfg.attention_probs_dropout_prob

    @staticmethod
    def merge(out: torch.Tensor) -> torch.Tensor:  # (B, H, L, D) -> (B, L, E)
        B, H, L, D = out.shape
        return out.transpose(1, 2).reshape(B, L, H * D)


class FeedForward(nn.Module):
    def __init__(self, cfg: QFormerConfig):
        super().__init__()
        self.dense = nn.Linear(cfg.hidden_size, cfg.intermediate_size)
        self.act = activation(cfg.hidden_act)

    def forward(self, x):
        return self.act(self.dense(x))


class QFormerLayer(nn.Module):
    def __init__(self, cfg: QFormerConfig, idx: int):
        super().__init__()
        self.attention = Attention(cfg, cfg.hidden_size)
        self.has_cross_attention = idx % cfg.cross_attention_frequency == 0
        if self.has_cross_attention:
            self.crossattention = Attention(cfg, cfg.encoder_hidden_size)
        if cfg.use_qformer_text_input:
            self.intermediate = FeedForward(cfg)
            self.output = AddNorm(cfg.intermediate_size, cfg)
        self.intermediate_query = FeedForward(cfg)
        self.output_query = AddNorm(cfg.intermediate_size, cfg)

    def forward(self, x, num_query, mode, key_padding_mask, image_kv, image_index):
        proj = self.attention.attention
        q, (k, v) = proj.heads(proj.query(x)), proj.kv(x)  # (B, H, L, D)
        attn = qformer_attention(q, k, v, mode, num_query, key_padding_mask)
        x = self.attention.output(Attention.merge(attn), x)  # (B, L, E)

        query, text = x[:, :num_query], x[:, num_query:]
        parts = []
        if num_query > 0:
            if self.has_cross_attention:
                if image_kv is None:
                    raise ValueError("this Q-Former layer cross-attends to the image: image embeddings are required")
                ik, iv = image_kv
                if image_index is not None:
                    ik, iv = ik.index_select(0, image_index), iv.index_select(0, image_index)
                cp = self.crossattention.attention
                cq = cp.heads(cp.query(query))
                query = self.crossattention.output(Attention.merge(cross_attention(cq, ik, iv)), query)
            parts.append(self.output_query(self.intermediate_query(query), query))
        if text.shape[1] > 0:
            if not hasattr(self, "intermediate"):
                raise ValueError("this Q-Former has no text feed-forward (use_qformer_text_input is False): "
                                 "it cannot take text input")
            parts.append(self.output(self.intermediate(text), text))
        return parts[0] if len(parts) == 1 else torch.cat(parts, dim=1)


class QFormerEncoder(nn.Module):
    def __init__(self, cfg: QFormerConfig):
        super().__init__()
        self.layer = nn.ModuleList(QFormerLayer(cfg, i) for i in range(cfg.num_hidden_layers))


class QFormerModel(nn.Module):
    """hidden (B, L, E) = [queries ; text embeddings] -> (B, L, E)."""

    def __init__(self, cfg: QFormerConfig):
        super().__init__()
        self.config = cfg
        self.layernorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.dropout = nn.Dropout(cfg.hidden_dropout_prob)
        self.encoder = QFormerEncoder(cfg)
        self.gradient_checkpointing = False

    def image_kv(self, image_embeds: torch.Tensor) -> list:
        """Per-layer cross-attention K/V of the image tokens, (B, H, S, D) each; None where a
        layer has no cross-attention. Computed once per image and reusable."""
        image_embeds = image_embeds.to(self.layernorm.weight.dtype)
        return [layer.crossattention.attention.kv(image_embeds) if layer.has_cross_attention else None
                for layer in self.encoder.layer]

    def forward(self, hidden: torch.Tensor, num_query: int, mode: str = "bidirectional",
                key_padding_mask: torch.Tensor | None = None, image_embeds: torch.Tensor | None = None,
                image_kv: list | None = None, image_index: torch.Tensor | None = None) -> torch.Tensor:
        if image_kv is None and image_embeds is not None:
            image_kv = self.image_kv(image_embeds)
        x = self.dropout(self.layernorm(hidden.to(self.layernorm.weight.dtype)))
        for i, layer in enumerate(self.encoder.layer):
            kv = image_kv[i] if image_kv is not None else None
            if self.gradient_checkpointing and self.training and torch.is_grad_enabled():
                x = torch.utils.checkpoint.checkpoint(layer, x, num_query, mode, key_padding_mask, kv,
                                                      image_index, use_reentrant=False)
            else:
                x = layer(x, num_query, mode, key_padding_mask, kv, image_index)
        return x


class QFormerTextEmbeddings(nn.Module):
    """BERT word + absolute position embeddings (the LayerNorm is the Q-Former's `layernorm`)."""

    def __init__(self, cfg: QFormerConfig):
        super().__init__()
        self.word_embeddings = nn.Embedding(cfg.vocab_size, cfg.hidden_size, padding_idx=cfg.pad_token_id)
        self.position_embeddings = nn.Embedding(cfg.max_position_embeddings, cfg.hidden_size)

    def forward(self, input_ids: torch.Tensor, past_length: int = 0) -> torch.Tensor:
        L = input_ids.shape[1]
        if past_length + L > self.position_embeddings.num_embeddings:
            raise ValueError(f"text of {past_length + L} tokens exceeds the Q-Former's "
                             f"{self.position_embeddings.num_embeddings} positions")
        pos = torch.arange(past_length, past_length + L, device=input_ids.device)
        return self.word_embeddings(input_ids) + self.position_embeddings(pos)[None]


class QFormerLMHead(nn.Module):
    """BERT LM head for ITG: dense + GELU + LayerNorm + decoder tied to the word embeddings."""

    def __init__(self, cfg: QFormerConfig):
        super().__init__()
        self.dense = nn.Linear(cfg.hidden_size, cfg.hidden_size)
        self.LayerNorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.bias = nn.Parameter(torch.zeros(cfg.vocab_size))
        self.act = activation(cfg.hidden_act)

    def forward(self, x: torch.Tensor, word_embeddings: torch.Tensor) -> torch.Tensor:
        return F.linear(self.LayerNorm(self.act(self.dense(x))), word_embeddings, self.bias)

"""Compact T5 / FlanT5 encoder-decoder: the language model of blip2-flan-t5-*.

State-dict keys are exactly those of transformers' `T5ForConditionalGeneration`
(shared.weight, {encoder,decoder}.embed_tokens.weight, {encoder,decoder}.block.{i}.layer.{j}...,
{encoder,decoder}.final_layer_norm.weight, lm_head.weight), so a BLIP-2 checkpoint's
`language_model.<key>` loads with `load_state_dict(strict=True)`.

What makes it T5 (behaviour read from the reference, code our own):
- pre-norm residual blocks; the norm is scale-only RMS with fp32 statistics (bf16/fp16 safe);
- no 1/sqrt(d) scaling of the scores (T5 folds it into the initialisation);
- a learned relative position bias, looked up once per forward from block 0's table and added
  to the scores of every layer: bidirectional buckets in the encoder, causal in the decoder;
  cross-attention has no position bias;
- feed-forward `relu` (wi, wo) or gated (`gated-gelu`: wi_0, wi_1, wo with tanh GELU);
- T5 v1.0 ties lm_head to the embedding and scales the decoder output by d_model**-0.5;
  FlanT5 / T5 v1.1 have their own lm_head and no scaling. `config.scale_decoder_outputs`
  (transformers 5's name; older configs say it with tie_word_embeddings) decides both at
  construction; `tie_weights()` ties unconditionally, for checkpoints that carry no lm_head
  (transformers 5 saves T5 that way), and the scaling stays what the config says.

Attention runs through torch SDPA with one float mask per forward, shared by the layers:
the position bias where a key is visible, a large negative number where it is not.
Decoding with a `KVCache` appends L tokens at positions cache.length..., computes each
layer's cross-attention K/V once into `cache.cross`, and calls `cache.advance(L)`.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from blip2_fast.config import T5Config
from blip2_fast.models.cache import KVCache

# Score of a hidden key: fp16's lowest finite value. It stays finite when the mask is cast to
# any float dtype we run (fp32's finfo.min rounds to -inf in bf16, and a fully masked row of
# -inf is NaN), and exp() of it underflows to 0 just as -inf would.
_MASKED = -65504.0

_ACTS = {"relu": F.relu, "gelu": F.gelu, "silu": F.silu,
         "gelu_new": lambda x: F.gelu(x, approximate="tanh")}


def relative_position_bucket(rel: torch.Tensor, bidirectional: bool, num_buckets: int,
                             max_distance: int) -> torch.Tensor:
    """Bucket of each relative position rel = key - query (int tensor, any shape).

    Per direction, half of the buckets are exact small distances and the other half grow
    logarithmically up to max_distance; farther keys share the last bucket. Causal buckets
    only distinguish keys before the query (later ones are masked anyway)."""
    offset = 0
    if bidirectional:
        num_buckets //= 2
        offset = (rel > 0).long() * num_buckets  # keys after the query use the upper half
        dist = rel.abs()
    else:
        dist = (-rel).clamp(min=0)
    exact = num_buckets // 2
    # clamp(min=1) avoids log(0); those small distances take the exact branch anyway
    scaled = torch.log(dist.clamp(min=1).float() / exact) / math.log(max_distance / exact) * (num_buckets - exact)
    large = (exact + scaled.long()).clamp(max=num_buckets - 1)
    return offset + torch.where(dist < exact, dist, large)


def _clamp_fp16(h: torch.Tensor) -> torch.Tensor:
    # T5 v1.1 / FlanT5 activations overflow fp16 in the residual stream; clamp just inside the
    # range as the reference does (without its data-dependent isinf check, which costs a
    # reduction per sublayer). bf16 has fp32's range and needs no clamp.
    if h.dtype == torch.float16:
        m = torch.finfo(torch.float16).max - 1000
        return h.clamp(-m, m)
    return h


def key_padding_mask(mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """(B, S) 1 = attend, 0 = padding -> additive (B, 1, 1, S)."""
    add = torch.zeros(mask.shape, dtype=dtype, device=mask.device)
    return add.masked_fill_(~mask.bool(), _MASKED)[:, None, None, :]


class T5LayerNorm(nn.Module):
    """Scale-only RMS norm; the mean square is taken in fp32 whatever the input dtype."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.float()
        y = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * y.to(self.weight.dtype)  # fp32 weight keeps fp32, half weight casts


class T5Attention(nn.Module):
    def __init__(self, cfg: T5Config, relative_bias: bool, dropout: float):
        super().__init__()
        self.h, self.d = cfg.num_heads, cfg.d_kv
        inner = self.h * self.d
        self.q = nn.Linear(cfg.d_model, inner, bias=False)
        self.k = nn.Linear(cfg.d_model, inner, bias=False)
        self.v = nn.Linear(cfg.d_model, inner, bias=False)
        self.o = nn.Linear(inner, cfg.d_model, bias=False)
        if relative_bias:
            self.relative_attention_bias = nn.Embedding(cfg.relative_attention_num_buckets, self.h)
        self.num_buckets, self.max_distance = cfg.relative_attention_num_buckets, cfg.relative_attention_max_distance
        self.p = dropout

    def split(self, x: torch.Tensor, proj: nn.Linear) -> torch.Tensor:
        B, S, _ = x.shape
        return proj(x).view(B, S, self.h, self.d).transpose(1, 2)  # (B, H, S, D)

    def position_bias(self, q_start: int, q_len: int, k_len: int, bidirectional: bool,
                      device) -> torch.Tensor:
        q = torch.arange(q_start, q_start + q_len, device=device)
        rel = torch.arange(k_len, device=device)[None, :] - q[:, None]  # (Lq, Lk) key - query
        b = relative_position_bucket(rel, bidirectional, self.num_buckets, self.max_distance)
        return self.relative_attention_bias(b).permute(2, 0, 1).unsqueeze(0)  # (1, H, Lq, Lk)

    def forward(self, x: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None):
        """x (B, L, E) attends to k, v (B, H, T, D) under an additive mask (B|1, H|1, L, T)."""
        B, L, _ = x.shape
        q = self.split(x, self.q)  # (B, H, L, D)
        if mask is not None and mask.dtype != q.dtype:
            mask = mask.to(q.dtype)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=1.0,
                                             dropout_p=self.p if self.training else 0.0)
        return self.o(out.transpose(1, 2).reshape(B, L, self.h * self.d))  # (B, L, E)


class T5DenseFF(nn.Module):
    def __init__(self, cfg: T5Config, dropout: float):
        super().__init__()
        proj = cfg.feed_forward_proj
        parts = proj.split("-")
        self.gated = parts[0] == "gated" and len(parts) == 2
        act = "gelu_new" if proj == "gated-gelu" else parts[-1]  # "gated-gelu" means tanh GELU
        if act not in _ACTS or (len(parts) == 2 and not self.gated) or len(parts) > 2:
            raise ValueError(f"T5Config.feed_forward_proj {proj!r} is not supported "
                             f"(use 'relu', 'gated-gelu' or [gated-]{{{', '.join(_ACTS)}}})")
        self.act = _ACTS[act]
        if self.gated:
            self.wi_0 = nn.Linear(cfg.d_model, cfg.d_ff, bias=False)
            self.wi_1 = nn.Linear(cfg.d_model, cfg.d_ff, bias=False)
        else:
            self.wi = nn.Linear(cfg.d_model, cfg.d_ff, bias=False)
        self.wo = nn.Linear(cfg.d_ff, cfg.d_model, bias=False)
        self.drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.act(self.wi_0(x)) * self.wi_1(x) if self.gated else self.act(self.wi(x))  # (B, L, F)
        h = self.drop(h)
        # wo may be kept in fp32 in a half model (FlanT5-XXL overflows fp16 there; transformers'
        # _keep_in_fp32_modules), so feed it its own dtype; the residual then promotes to fp32
        if h.dtype != self.wo.weight.dtype and self.wo.weight.is_floating_point():
            h = h.to(self.wo.weight.dtype)
        return self.wo(h)


class _Sub(nn.Module):
    """One pre-norm residual branch; `name` keeps transformers' key (SelfAttention, ...)."""

    def __init__(self, name: str, inner: nn.Module, cfg: T5Config):
        super().__init__()
        setattr(self, name, inner)
        self.layer_norm = T5LayerNorm(cfg.d_model, cfg.layer_norm_epsilon)


class T5Block(nn.Module):
    def __init__(self, cfg: T5Config, relative_bias: bool, is_decoder: bool, dropout: float):
        super().__init__()
        subs = [_Sub("SelfAttention", T5Attention(cfg, relative_bias, dropout), cfg)]
        if is_decoder:
            subs.append(_Sub("EncDecAttention", T5Attention(cfg, False, dropout), cfg))
        subs.append(_Sub("DenseReluDense", T5DenseFF(cfg, dropout), cfg))
        self.layer = nn.ModuleList(subs)
        self.is_decoder = is_decoder
        self.drop = nn.Dropout(dropout)

    def forward(self, h, self_mask, i: int, cache: KVCache | None, enc, cross_mask, input_pos=None):
        sa = self.layer[0]
        att, x = sa.SelfAttention, sa.layer_norm(h)
        k, v = att.split(x, att.k), att.split(x, att.v)  # (B, H, L, D)
        if cache is not None and input_pos is not None:
            k, v = cache.write(i, k, v, input_pos)  # (B, H, capacity, D), static shapes
        elif cache is not None:
            k, v = cache.update(i, k, v)  # (B, H, length + L, D)
        h = _clamp_fp16(h + self.drop(att(x, k, v, self_mask)))
        if self.is_decoder:
            ca = self.layer[1]
            att = ca.EncDecAttention
            kv = cache.cross.get(i) if cache is not None else None
            if kv is None:  # the encoder output is fixed during decoding: project it once
                kv = (att.split(enc, att.k), att.split(enc, att.v))  # (B, H, S, D)
                if cache is not None:
                    cache.cross[i] = kv
            h = _clamp_fp16(h + self.drop(att(ca.layer_norm(h), *kv, cross_mask)))
        ff = self.layer[-1]
        return _clamp_fp16(h + self.drop(ff.DenseReluDense(ff.layer_norm(h))))


class T5Stack(nn.Module):
    def __init__(self, cfg: T5Config, shared: nn.Embedding, n_layers: int, is_decoder: bool, dropout: float):
        super().__init__()
        self.embed_tokens = shared  # the same module: its key appears in the state dict, as in transformers
        self.block = nn.ModuleList(T5Block(cfg, i == 0, is_decoder, dropout) for i in range(n_layers))
        self.final_layer_norm = T5LayerNorm(cfg.d_model, cfg.layer_norm_epsilon)
        self.drop = nn.Dropout(dropout)
        self.bidirectional = not is_decoder

    def position_bias(self, q_start: int, q_len: int, k_len: int, device) -> torch.Tensor:
        att = self.block[0].layer[0].SelfAttention  # only block 0 owns the table; all layers use it
        return att.position_bias(q_start, q_len, k_len, self.bidirectional, device)  # (1, H, Lq, Lk)

    def forward(self, h, self_mask, cache=None, enc=None, cross_mask=None, input_pos=None):
        h = self.drop(h)
        for i, blk in enumerate(self.block):
            h = blk(h, self_mask, i, cache, enc, cross_mask, input_pos)
        return self.drop(self.final_layer_norm(h))


class T5LM(nn.Module):
    def __init__(self, cfg: T5Config):
        super().__init__()
        self.config = cfg
        dropout = float(cfg.extra.get("dropout_rate", 0.1))  # transformers' default
        self.shared = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.encoder = T5Stack(cfg, self.shared, cfg.num_layers, False, dropout)
        self.decoder = T5Stack(cfg, self.shared, cfg.num_decoder_layers, True, dropout)
        self.lm_head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        self.scale_logits = bool(cfg.scale_decoder_outputs)
        if self.scale_logits:  # T5 v1.0: genuinely tied
            self.tie_weights()

    def tie_weights(self) -> None:
        """Make lm_head share the input embedding (after load_state_dict(assign=True) on a
        tied model, or for a checkpoint without lm_head). Logit scaling is not affected."""
        self.lm_head.weight = self.shared.weight

    def get_input_embeddings(self) -> nn.Embedding:
        return self.shared

    def new_cache(self, batch: int, max_len: int, dtype: torch.dtype | None = None, device=None) -> KVCache:
        w = self.shared.weight
        return KVCache(self.config.num_decoder_layers, batch, self.config.num_heads, max_len, self.config.d_kv,
                       dtype or w.dtype, device or w.device)

    def encode(self, inputs_embeds: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """inputs_embeds (B, S, E), attention_mask (B, S) 1 = token -> hidden (B, S, E)."""
        S = inputs_embeds.shape[1]
        mask = self.encoder.position_bias(0, S, S, inputs_embeds.device)  # (1, H, S, S)
        if attention_mask is not None:
            mask = torch.where(attention_mask.bool()[:, None, None, :], mask, _MASKED)  # (B, H, S, S)
        return self.encoder(inputs_embeds, mask)

    def decode(self, decoder_input_ids: torch.Tensor, encoder_hidden: torch.Tensor,
               encoder_mask: torch.Tensor | None = None, cache: KVCache | None = None,
               decoder_attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """decoder_input_ids (B, L) -> logits (B, L, V).

        With a cache the L tokens sit at positions cache.length ... cache.length + L - 1 and
        decoder_attention_mask, if given, covers every key: (B, >= cache.length + L).
        Without a cache: full causal decode (teacher forcing), decoder_attention_mask (B, L)."""
        L = decoder_input_ids.shape[1]
        past = cache.length if cache is not None else 0
        T, dev = past + L, decoder_input_ids.device
        mask = self.decoder.position_bias(past, L, T, dev)  # (1, H, L, T)
        keep = None
        if L > 1:  # a single new token sees every cached key: no causal mask needed
            keep = torch.arange(T, device=dev)[None, :] <= torch.arange(past, T, device=dev)[:, None]  # (L, T)
        if decoder_attention_mask is not None:
            pad = decoder_attention_mask[:, None, None, :T].bool()  # (B, 1, 1, T)
            keep = pad if keep is None else keep & pad
        if keep is not None:
            mask = torch.where(keep, mask, _MASKED)  # (B|1, H, L, T)
        cross = key_padding_mask(encoder_mask, mask.dtype) if encoder_mask is not None else None  # (B, 1, 1, S)
        h = self.decoder(self.shared(decoder_input_ids), mask, cache, encoder_hidden, cross)  # (B, L, E)
        if cache is not None:
            cache.advance(L)
        if self.scale_logits:
            h = h * self.config.d_model ** -0.5
        return self.lm_head(h)

    def static_step(self, tokens: torch.Tensor, cache: KVCache, input_pos: torch.Tensor, encoder_hidden: torch.Tensor,
                    cross_mask: torch.Tensor | None) -> torch.Tensor:
        """One decoder step on static shapes: tokens (B,) at cache slot `input_pos` (1,), attending
        over every slot with the ones after it masked; `cache.cross` must already hold the
        encoder K/V (the first, dynamic decode call computes them). -> logits (B, V)."""
        att = self.decoder.block[0].layer[0].SelfAttention
        slots = torch.arange(cache.max_len, device=tokens.device)
        rel = slots[None, :] - input_pos[:, None]  # (1, capacity) key - query
        bias = att.relative_attention_bias(relative_position_bucket(rel, False, att.num_buckets, att.max_distance))
        bias = bias.permute(2, 0, 1).unsqueeze(0)  # (1, H, 1, capacity)
        mask = torch.where((slots <= input_pos)[None, None, None, :], bias, _MASKED)
        h = self.decoder(self.shared(tokens[:, None]), mask, cache, encoder_hidden, cross_mask, input_pos)
        if self.scale_logits:
            h = h * self.config.d_model ** -0.5
        return self.lm_head(h[:, 0])

    def shift_right(self, labels: torch.Tensor) -> torch.Tensor:
        """Teacher-forcing inputs: decoder_start_token_id, then labels[:-1]; -100 becomes pad."""
        ids = torch.cat([labels.new_full((labels.shape[0], 1), self.config.decoder_start_token_id),
                         labels[:, :-1]], dim=1)
        return ids.masked_fill(ids == -100, self.config.pad_token_id)

    def forward(self, inputs_embeds: torch.Tensor, attention_mask: torch.Tensor | None = None,
                decoder_input_ids: torch.Tensor | None = None, labels: torch.Tensor | None = None,
                decoder_attention_mask: torch.Tensor | None = None):
        """-> (loss or None, logits (B, L, V)); loss = mean cross-entropy over labels != -100."""
        if decoder_input_ids is None:
            if labels is None:
                raise ValueError("T5LM.forward needs decoder_input_ids or labels")
            decoder_input_ids = self.shift_right(labels)
        enc = self.encode(inputs_embeds, attention_mask)
        logits = self.decode(decoder_input_ids, enc, attention_mask, decoder_attention_mask=decoder_attention_mask)
        loss = None
        if labels is not None:
            # in fp32: a bf16 log-softmax over 32k classes keeps ~3 significant digits
            loss = F.cross_entropy(logits.flatten(0, 1).float(), labels.flatten().to(logits.device),
                                   ignore_index=-100)
        return loss, logits

"""The eager training references of bench/test_bench_train.py: what users run today.

Stage 1 (`Stage1Reference`): LAVIS' `Blip2Qformer.forward` (lavis/models/blip2_models/
blip2_qformer.py) written on transformers' modules — `Blip2ForImageTextRetrieval`'s
`vision_model`, `query_tokens`, `embeddings`, `qformer` (Blip2QFormerModel), `vision_projection`,
`text_projection`, `itm_head`, plus transformers' BERT LM head (`BertLMPredictionHead`, decoder
tied to the word embeddings) for ITG, because transformers has no stage-1 model:
- the ViT runs under no_grad (frozen, eval mode);
- ITC: a queries-only pass (image K/V projected from the ViT tokens) and a text-only pass
  ([CLS] feature); similarity = max over the queries / temp; cross-entropy both ways, label
  smoothing 0.1 (LAVIS);
- ITM: softmax weights with the diagonal filled with -10000, then LAVIS' per-sample Python
  loops of `torch.multinomial(w[b], 1).item()` (one host synchronisation per draw, 2B per
  step); the image features are re-expanded per pair (`torch.stack` of the drawn images) and
  3B pairs go through the bidirectional Q-Former, each pair re-projecting its image's K/V;
- ITG: [DEC] replaces [CLS]; queries + text in one pass with LAVIS' dense multimodal causal
  mask, built as a (B, L, L) 0/1 tensor and turned into the additive (B, 1, L, L) mask that
  BERT's `get_extended_attention_mask` used to make. transformers 5.x's Blip2QFormerModel no
  longer calls get_extended_attention_mask: its `create_bidirectional_mask` takes a 2-D padding
  mask or a prepared 4-D mask; a (B, L, L) mask raises a RuntimeError in masking_utils as soon as
  one entry is masked (an all-ones one is silently dropped as "no padding"). So the 4-D additive
  mask is passed. transformers' Q-Former has no key/value cache, so unlike LAVIS (which feeds
  the ITC pass's `past_key_values` to ITG) the query rows are recomputed inside the ITG pass: one
  extra queries pass per step, part of what the reference costs.

Stage 2 (`stage2_reference`): transformers' `Blip2ForConditionalGeneration(..., labels=...)`
with the ViT and the LLM frozen (requires_grad False, eval mode) and exactly the parameters our
`Blip2Stage2` trains left trainable.

Both copy their weights from our models (`Stage1Reference.load_from(Blip2Stage1)`, strict key
match; `stage2_reference(ours)` from the same state dict), so the two sides compute the same
losses on the same batch. Nothing here calls blip2_fast's forward code.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

# ours -> reference names for the pieces that are not transformers' retrieval model
LM_HEAD_KEYS = {"qformer_lm_head.dense.weight": "lm_head.transform.dense.weight",
                "qformer_lm_head.dense.bias": "lm_head.transform.dense.bias",
                "qformer_lm_head.LayerNorm.weight": "lm_head.transform.LayerNorm.weight",
                "qformer_lm_head.LayerNorm.bias": "lm_head.transform.LayerNorm.bias",
                "qformer_lm_head.bias": "lm_head.decoder.bias"}


def hf_blip2_config(config):
    """transformers' Blip2Config for one of our Blip2Config objects."""
    import transformers
    return transformers.Blip2Config.from_dict(config.to_hf_dict())


def multimodal_causal_mask(attention_mask: torch.Tensor, num_query: int) -> torch.Tensor:
    """LAVIS' `get_extended_attention_mask(is_decoder=True, has_query=True)`, written out:
    attention_mask (B, Q + T) 0/1 -> (B, L, L) 0/1: queries see queries, text sees all queries
    and the text up to itself; times the key padding."""
    B, L = attention_mask.shape
    T = L - num_query
    seq = torch.arange(T, device=attention_mask.device)
    causal = (seq[None, None, :].repeat(B, T, 1) <= seq[None, :, None]).to(attention_mask.dtype)  # (B, T, T)
    causal = torch.cat([torch.zeros(B, num_query, T, dtype=causal.dtype, device=causal.device), causal], 1)
    causal = torch.cat([torch.ones(B, L, num_query, dtype=causal.dtype, device=causal.device), causal], 2)
    return causal * attention_mask[:, None, :]  # (B, L, L)


def additive_mask(mask3d: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """(B, L, L) 0/1 -> (B, 1, L, L): 0 where allowed, the dtype's minimum elsewhere (what
    `get_extended_attention_mask` returned)."""
    return (1.0 - mask3d[:, None].to(dtype)) * torch.finfo(dtype).min


class Stage1Reference(nn.Module):
    """LAVIS' stage-1 forward on transformers' modules (see the module docstring).

    config: our Blip2Config (Q-Former with text input); dec_token_id: the [DEC] id. Label
    smoothing 0.1 for ITC and ITG, as LAVIS. `forward(..., negatives=(neg_text, neg_image))`
    uses given negatives instead of drawing them (for comparing ITM with ours)."""

    def __init__(self, config, dec_token_id: int, temp: float = 0.07, itc_label_smoothing: float = 0.1,
                 itg_label_smoothing: float = 0.1, attn_implementation: str = "sdpa"):
        import transformers
        from transformers.models.bert.modeling_bert import BertConfig, BertLMPredictionHead

        super().__init__()
        hf_cfg = hf_blip2_config(config)
        for sub in (hf_cfg, hf_cfg.vision_config, hf_cfg.qformer_config):
            sub._attn_implementation = attn_implementation
        hf = transformers.Blip2ForImageTextRetrieval(hf_cfg)
        self.vision_model = hf.vision_model.requires_grad_(False).eval()
        self.query_tokens = hf.query_tokens
        self.embeddings = hf.embeddings
        self.qformer = hf.qformer
        self.vision_projection = hf.vision_projection
        self.text_projection = hf.text_projection
        self.itm_head = hf.itm_head
        q = config.qformer
        self.lm_head = BertLMPredictionHead(BertConfig(hidden_size=q.hidden_size, vocab_size=q.vocab_size,
                                                       hidden_act=q.hidden_act, layer_norm_eps=q.layer_norm_eps))
        self.lm_head.decoder.weight = self.embeddings.word_embeddings.weight  # tied, as BERT's
        del self.lm_head.bias  # transformers 5 reads decoder.bias; the separate copy is unused
        self.temp = nn.Parameter(torch.tensor(float(temp)))
        self.num_query = config.num_query_tokens
        self.dec_token_id = int(dec_token_id)
        self.itc_label_smoothing, self.itg_label_smoothing = itc_label_smoothing, itg_label_smoothing

    def train(self, mode: bool = True):
        super().train(mode)
        self.vision_model.eval()
        return self

    @torch.no_grad()
    def load_from(self, ours: nn.Module) -> "Stage1Reference":
        """Copy a Blip2Stage1's weights in: every tensor, strict both ways."""
        state = {LM_HEAD_KEYS.get(k, k): v for k, v in ours.state_dict().items()}
        state["lm_head.decoder.weight"] = state["embeddings.word_embeddings.weight"]
        own = self.state_dict()
        missing, unexpected = sorted(set(own) - set(state)), sorted(set(state) - set(own))
        if missing or unexpected:
            raise KeyError(f"weights do not map: missing {missing[:6]}, unexpected {unexpected[:6]}")
        for k, v in state.items():
            own[k].copy_(v)
        return self

    def forward(self, pixel_values, input_ids, attention_mask, negatives=None) -> dict:
        B, Q = input_ids.shape[0], self.num_query
        device = self.query_tokens.device
        with torch.no_grad():
            self.temp.clamp_(0.001, 0.5)
            image_embeds = self.vision_model(pixel_values=pixel_values.to(device, self.vision_model.dtype)
                                             ).last_hidden_state  # (B, S, Ev)
        query_tokens = self.query_tokens.expand(B, -1, -1)

        # ITC ----------------------------------------------------------------------------------
        query_out = self.qformer(query_embeds=query_tokens, encoder_hidden_states=image_embeds).last_hidden_state
        image_feats = F.normalize(self.vision_projection(query_out), dim=-1)  # (B, Q, D)
        text_out = self.qformer(query_embeds=self.embeddings(input_ids=input_ids), query_length=0,
                                attention_mask=attention_mask).last_hidden_state
        text_feat = F.normalize(self.text_projection(text_out[:, 0, :]), dim=-1)  # (B, D)
        sim_q2t = torch.matmul(image_feats.unsqueeze(1), text_feat.unsqueeze(-1)).squeeze(-1)  # (B, B, Q)
        sim_i2t = sim_q2t.max(-1).values / self.temp
        sim_t2q = torch.matmul(text_feat.unsqueeze(1).unsqueeze(1), image_feats.permute(0, 2, 1)).squeeze(-2)
        sim_t2i = sim_t2q.max(-1).values / self.temp  # (B, B)
        targets = torch.arange(B, device=device)
        loss_itc = (F.cross_entropy(sim_i2t, targets, label_smoothing=self.itc_label_smoothing)
                    + F.cross_entropy(sim_t2i, targets, label_smoothing=self.itc_label_smoothing)) / 2

        # ITM ----------------------------------------------------------------------------------
        if negatives is None:
            with torch.no_grad():
                w_t2i = F.softmax(sim_t2i.detach().float().clone().fill_diagonal_(-10000), dim=1)
                w_i2t = F.softmax(sim_i2t.detach().float().clone().fill_diagonal_(-10000), dim=1)
            neg_image = [torch.multinomial(w_t2i[b], 1).item() for b in range(B)]  # LAVIS: host loop
            neg_text = [torch.multinomial(w_i2t[b], 1).item() for b in range(B)]
        else:
            neg_text, neg_image = (n.tolist() for n in negatives)
        image_embeds_neg = torch.stack([image_embeds[i] for i in neg_image])
        text_ids_neg = torch.stack([input_ids[i] for i in neg_text])
        text_atts_neg = torch.stack([attention_mask[i] for i in neg_text])
        text_ids_all = torch.cat([input_ids, input_ids, text_ids_neg])  # pos, pos, neg
        text_atts_all = torch.cat([attention_mask, attention_mask, text_atts_neg])
        image_embeds_all = torch.cat([image_embeds, image_embeds_neg, image_embeds])  # pos, neg, pos
        query_itm = self.query_tokens.expand(3 * B, -1, -1)
        att_all = torch.cat([torch.ones(3 * B, Q, dtype=text_atts_all.dtype, device=device), text_atts_all], 1)
        out_itm = self.qformer(query_embeds=self.embeddings(input_ids=text_ids_all, query_embeds=query_itm),
                               query_length=Q, attention_mask=att_all,
                               encoder_hidden_states=image_embeds_all).last_hidden_state
        logits = self.itm_head(out_itm[:, :Q, :]).mean(dim=1)  # (3B, 2)
        itm_labels = torch.cat([torch.ones(B, dtype=torch.long), torch.zeros(2 * B, dtype=torch.long)]).to(device)
        loss_itm = F.cross_entropy(logits.float(), itm_labels)

        # ITG ----------------------------------------------------------------------------------
        dec_ids = input_ids.clone()
        dec_ids[:, 0] = self.dec_token_id
        labels = dec_ids.masked_fill(attention_mask == 0, -100)
        att = torch.cat([torch.ones(B, Q, dtype=attention_mask.dtype, device=device), attention_mask], 1)
        # in the dtype the attention scores will have (under autocast the 16-bit one): SDPA takes a
        # float mask only in the query's dtype
        kind = device.type
        mask_dtype = (torch.get_autocast_dtype(kind) if torch.is_autocast_enabled(kind)
                      else self.qformer.layernorm.weight.dtype)
        mask4d = additive_mask(multimodal_causal_mask(att, Q), mask_dtype)
        h = self.qformer(query_embeds=self.embeddings(input_ids=dec_ids, query_embeds=query_tokens),
                         query_length=Q, attention_mask=mask4d, encoder_hidden_states=image_embeds).last_hidden_state
        scores = self.lm_head(h[:, Q:, :])  # (B, T, V)
        shifted = scores[:, :-1, :].contiguous()
        loss_itg = F.cross_entropy(shifted.float().view(-1, shifted.shape[-1]), labels[:, 1:].reshape(-1),
                                   label_smoothing=self.itg_label_smoothing)
        return {"loss": loss_itc + loss_itm + loss_itg, "loss_itc": loss_itc, "loss_itm": loss_itm,
                "loss_itg": loss_itg,
                "neg_text_index": torch.tensor(neg_text), "neg_image_index": torch.tensor(neg_image)}


def stage2_reference(ours, attn_implementation: str = "sdpa"):
    """transformers' Blip2ForConditionalGeneration with our Blip2Stage2's weights, built on
    the same device and in the same dtypes tensor by tensor; trainable = exactly ours'."""
    import transformers

    model = ours.model
    hf_cfg = hf_blip2_config(model.config)
    for sub in (hf_cfg, hf_cfg.vision_config, hf_cfg.qformer_config, hf_cfg.text_config):
        sub._attn_implementation = attn_implementation
    with torch.device(model.device):  # built where it runs (non-persistent buffers included)
        hf = transformers.Blip2ForConditionalGeneration(hf_cfg)
    state = model.state_dict()
    own = hf.state_dict()
    tied = {k for k in own if k.endswith("lm_head.weight")}
    missing = sorted(set(own) - set(state) - tied)
    unexpected = sorted(set(state) - set(own))
    if missing or unexpected:
        raise KeyError(f"weights do not map: missing {missing[:6]}, unexpected {unexpected[:6]}")
    # assign: each tensor keeps our dtype (frozen parts in 16 bits, trained ones in fp32)
    hf.load_state_dict({k: v.detach().clone() for k, v in state.items()}, strict=False, assign=True)
    hf.tie_weights()
    trainable = {n for n, _ in ours.trainable_parameters()}
    for n, p in hf.named_parameters():
        p.requires_grad_(n in trainable)
    hf.train()
    hf.vision_model.eval()
    hf.language_model.eval()
    return hf


__all__ = ["Stage1Reference", "stage2_reference", "multimodal_causal_mask", "additive_mask", "hf_blip2_config"]

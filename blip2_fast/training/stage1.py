"""BLIP-2 stage 1: representation learning with a frozen image encoder.

Loss = ITC + ITM + ITG, computed on one batch of B (image, text) pairs:
- the image tokens' cross-attention K/V (`qformer.image_kv`) are computed once per image and
  shared by the query pass, the 3B ITM pairs (through `image_index`) and ITG;
- ITG runs [queries ; [DEC] text] in the multimodal causal mode. There the query rows attend
  only to queries, so their outputs are exactly those of a queries-only pass: when ITG is on
  they also serve ITC and the negative sampling, and the queries are run once (LAVIS reaches the
  same thing by caching the queries' keys/values from the ITC pass);
- ITM hard negatives are drawn on the device for the whole batch (`losses.sample_negatives`),
  and across data-parallel ranks from the whole global batch (texts and frozen ViT outputs
  gathered), as LAVIS draws them.

Attribute names are those of transformers' `Blip2ForImageTextRetrieval` (`vision_model`,
`query_tokens`, `embeddings`, `qformer`, `vision_projection`, `text_projection`, `itm_head`),
so its checkpoints' tensors map one to one; `qformer_lm_head` and `temp` are stage-1 extras.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..config import Blip2Config
from ..models.qformer import QFormerLMHead, QFormerModel, QFormerTextEmbeddings
from ..models.vision import VisionModel
from .losses import gather_no_grad, gather_with_grad, itc_loss, itc_similarities, itg_loss, sample_negatives, world


class Blip2Stage1(nn.Module):
    """Frozen ViT + trainable Q-Former with the ITC/ITM/ITG heads.

    config: a Blip2Config whose Q-Former takes text (`use_qformer_text_input`); `config.text`
    is ignored. dec_token_id: the `[DEC]` id that replaces the first text token for ITG
    (default: `config.qformer.extra["dec_token_id"]`). Label smoothing: 0.1 for ITG (paper);
    LAVIS also smooths ITC by 0.1, which is the default here.
    """

    TEMP_MIN, TEMP_MAX = 0.001, 0.5

    def __init__(self, config: Blip2Config, dec_token_id: int | None = None, temp: float = 0.07,
                 itc_label_smoothing: float = 0.1, itg_label_smoothing: float = 0.1):
        super().__init__()
        q = config.qformer
        if not q.use_qformer_text_input:
            raise ValueError("stage 1 needs a Q-Former that takes text: set qformer use_qformer_text_input=True")
        if dec_token_id is None:
            dec_token_id = q.extra.get("dec_token_id")
        if dec_token_id is None or not 0 <= int(dec_token_id) < q.vocab_size:
            raise ValueError(f"dec_token_id must be a token id in [0, {q.vocab_size}) (the [DEC] token), "
                             f"got {dec_token_id!r}")
        self.config = config
        self.dec_token_id = int(dec_token_id)
        self.itc_label_smoothing = itc_label_smoothing
        self.itg_label_smoothing = itg_label_smoothing

        self.vision_model = VisionModel(config.vision).requires_grad_(False).eval()
        self.query_tokens = nn.Parameter(0.02 * torch.randn(1, config.num_query_tokens, q.hidden_size))
        self.embeddings = QFormerTextEmbeddings(q)
        self.qformer = QFormerModel(q)
        self.vision_projection = nn.Linear(q.hidden_size, config.image_text_hidden_size)
        self.text_projection = nn.Linear(q.hidden_size, config.image_text_hidden_size)
        self.itm_head = nn.Linear(q.hidden_size, 2)
        # decoder weight = embeddings.word_embeddings.weight, passed at call time: tied by construction
        self.qformer_lm_head = QFormerLMHead(q)
        self.temp = nn.Parameter(torch.tensor(float(temp)))

    @property
    def num_query(self) -> int:
        return self.config.num_query_tokens

    def train(self, mode: bool = True):
        """The image encoder is frozen: it stays in eval mode (no dropout/statistics updates)."""
        super().train(mode)
        self.vision_model.eval()
        return self

    def _queries(self, n: int) -> torch.Tensor:  # (n, Q, E)
        return self.query_tokens.expand(n, -1, -1)

    def _with_query_mask(self, attention_mask: torch.Tensor) -> torch.Tensor:
        """(N, T) text padding -> (N, Q + T): query positions are never padding."""
        ones = attention_mask.new_ones(attention_mask.shape[0], self.num_query)
        return torch.cat([ones, attention_mask], 1)

    def forward(self, pixel_values: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                use_itc: bool = True, use_itm: bool = True, use_itg: bool = True,
                generator: torch.Generator | None = None) -> dict:
        """pixel_values (B, 3, H, W); input_ids, attention_mask (B, T), [CLS] first, right-padded.

        Returns {"loss": sum of the enabled losses, "loss_itc", "loss_itm", "loss_itg" (those
        enabled), and with ITM "neg_text_index" (B,) (the negative text of each image) and
        "neg_image_index" (B,) (the negative image of each text)}, indices into the global batch
        (rank-major; the local batch when not distributed). `generator` drives the
        negative sampling (it must live on the batch's device).
        """
        if not (use_itc or use_itm or use_itg):
            raise ValueError("all of ITC, ITM and ITG are switched off: nothing to train")
        if input_ids.dim() != 2 or input_ids.shape[1] < 2:
            raise ValueError(f"input_ids must be (batch, length >= 2), got {tuple(input_ids.shape)}")
        with torch.no_grad():  # LAVIS clamps the parameter in place before every step
            self.temp.clamp_(self.TEMP_MIN, self.TEMP_MAX)
        device = self.query_tokens.device
        input_ids = input_ids.to(device)
        attention_mask = torch.ones_like(input_ids) if attention_mask is None else attention_mask.to(device)
        B, Q = input_ids.shape[0], self.num_query
        if pixel_values.shape[0] != B:
            raise ValueError(f"{pixel_values.shape[0]} images but {B} texts: stage 1 takes aligned pairs")

        with torch.no_grad():
            image_embeds = self.vision_model(pixel_values.to(device))  # (B, S, E_vision)
        image_kv = self.qformer.image_kv(image_embeds)  # per layer (B, H, S, D) or None: shared below
        out: dict = {}

        query_out = None  # (B, Q, E)
        if use_itg:
            dec_ids = input_ids.clone()
            dec_ids[:, 0] = self.dec_token_id
            hidden = torch.cat([self._queries(B), self.embeddings(dec_ids).to(self.query_tokens.dtype)], 1)
            h = self.qformer(hidden, Q, "causal", key_padding_mask=self._with_query_mask(attention_mask),
                             image_kv=image_kv)  # (B, Q + T, E)
            query_out = h[:, :Q]  # = the queries-only pass (causal: queries see only queries)
            logits = self.qformer_lm_head(h[:, Q:-1], self.embeddings.word_embeddings.weight)  # (B, T-1, V)
            out["loss_itg"] = itg_loss(logits, input_ids, attention_mask, self.itg_label_smoothing)

        if use_itc or use_itm:
            # Without ITC the features only steer the sampling: no graph is kept for them.
            with torch.set_grad_enabled(use_itc and torch.is_grad_enabled()):
                if query_out is None:
                    query_out = self.qformer(self._queries(B), Q, "unimodal", image_kv=image_kv)
                image_feats = F.normalize(self.vision_projection(query_out), dim=-1)  # (B, Q, D)
                text_h = self.qformer(self.embeddings(input_ids), 0, "unimodal", key_padding_mask=attention_mask)
                text_feat = F.normalize(self.text_projection(text_h[:, 0]), dim=-1)  # (B, D), [CLS]
                rank = world()[0]
                image_all = gather_with_grad(image_feats)  # (W*B, Q, D); no graph when only ITM samples
                text_all = gather_with_grad(text_feat)  # (W*B, D)
                sim_i2t, sim_t2i = itc_similarities(image_feats, text_feat, image_all, text_all, self.temp)
            if use_itc:
                out["loss_itc"] = itc_loss(sim_i2t, sim_t2i, rank, self.itc_label_smoothing)
            if use_itm:
                out.update(self._itm(input_ids, attention_mask, image_embeds, image_kv, sim_i2t, sim_t2i, generator))

        out["loss"] = sum(out[k] for k in ("loss_itc", "loss_itm", "loss_itg") if k in out)
        return out

    def _itm(self, input_ids, attention_mask, image_embeds, image_kv, sim_i2t, sim_t2i, generator) -> dict:
        """3B pairs in LAVIS' order: (image b, text b) positives, (negative image of text b,
        text b), (image b, negative text of image b). sims: (B, W*B) against every rank's batch.
        Across ranks the negatives are drawn from the whole global batch, as LAVIS does: the
        texts and the frozen ViT's outputs are gathered (no gradient needed: the ViT is frozen),
        and the cross-attention K/V of the gathered images are computed here, so their gradient
        reaches the K/V projections on this rank. Ranks must pad texts to one length (the loop
        pads to max_text_length in distributed runs)."""
        B, Q = input_ids.shape[0], self.num_query
        rank, size = world()
        neg_text, neg_image = sample_negatives(sim_i2t.detach(), sim_t2i.detach(), generator, offset=rank * B)
        if size > 1:
            ids_all, mask_all = gather_no_grad(input_ids), gather_no_grad(attention_mask)  # (W*B, T)
            kv = self.qformer.image_kv(gather_no_grad(image_embeds))  # per layer (W*B, H, S, D)
            own = rank * B + torch.arange(B, device=input_ids.device)
        else:
            ids_all, mask_all, kv, own = input_ids, attention_mask, image_kv, torch.arange(B, device=input_ids.device)
        image_index = torch.cat([own, neg_image, own])  # (3B,) rows -> images of kv
        ids = torch.cat([input_ids, input_ids, ids_all[neg_text]])  # (3B, T)
        mask = torch.cat([attention_mask, attention_mask, mask_all[neg_text]])
        hidden = torch.cat([self._queries(3 * B), self.embeddings(ids).to(self.query_tokens.dtype)], 1)
        h = self.qformer(hidden, Q, "bidirectional", key_padding_mask=self._with_query_mask(mask),
                         image_kv=kv, image_index=image_index)  # (3B, Q + T, E)
        logits = self.itm_head(h[:, :Q]).mean(dim=1)  # (3B, 2)
        labels = torch.cat([torch.ones(B, dtype=torch.long, device=logits.device),
                            torch.zeros(2 * B, dtype=torch.long, device=logits.device)])
        return {"loss_itm": F.cross_entropy(logits.float(), labels),
                "neg_text_index": neg_text, "neg_image_index": neg_image}


__all__ = ["Blip2Stage1"]

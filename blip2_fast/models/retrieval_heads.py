"""`Blip2ForImageTextRetrieval`: the stage-1 model (frozen ViT + Q-Former with text input, no LLM).

A drop-in for transformers' class of the same name: same attribute names, hence the same
checkpoint keys (`vision_model.*`, `query_tokens`, `embeddings.*`, `qformer.*`,
`vision_projection.*`, `text_projection.*`, `itm_head.*`), same `forward` outputs:
- ITC (`use_image_text_matching_head=False`): image features = normalised `vision_projection`
  of the Q query outputs (B_i, Q, D); text feature = normalised `text_projection` of the first
  ([CLS]) text output (B_t, D); `logits_per_image` (B_i, B_t) = max over queries of the cosine
  similarity, no temperature; `logits_per_text` its transpose.
- ITM (`True`): pairs (image b, text b) through the Q-Former in bidirectional mode; the
  `itm_head` logits of the query outputs averaged over queries: `logits_per_image` (B, 2).
Placeholders: when `config.image_token_index` is set, transformers drops the first Q columns
of `input_ids` (the image placeholders `Blip2Processor` puts there). We do the same when they
are placeholders; text with no placeholder at all is taken as plain text; anything else (a
partial block) is an error rather than silently dropping real tokens.

Engine building blocks: `encode_image` (vision tokens kept for ITM + normalised query features),
`encode_text` (normalised text features) and `itm_logits`, which scores many (image, text) pairs
against per-image cross-attention K/V computed once (`qformer.image_kv`) and shared through
`image_index`.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..config import Blip2Config
from .qformer import QFormerModel, QFormerTextEmbeddings
from .vision import VisionModel


@dataclass
class ImageTextMatchingOutput:
    """transformers' `Blip2ImageTextMatchingModelOutput`, less the sub-model outputs.
    ITC: logits (B_i, B_t) / (B_t, B_i), text_embeds (B_t, D), image_embeds (B_i, Q, D).
    ITM: logits (B, 2) / (2, B), text_embeds = Q-Former output (B, Q+T, E),
    image_embeds = vision tokens (B, S, E_vision)."""
    logits_per_image: torch.Tensor
    logits_per_text: torch.Tensor
    text_embeds: torch.Tensor
    image_embeds: torch.Tensor
    loss: torch.Tensor | None = None

    def __getitem__(self, i):  # tuple-style access like transformers' ModelOutput
        return (self.logits_per_image, self.logits_per_text, self.text_embeds, self.image_embeds)[i]


class Blip2ForImageTextRetrieval(nn.Module):
    def __init__(self, config: Blip2Config):
        super().__init__()
        self.config = config
        q = config.qformer
        self.vision_model = VisionModel(config.vision)
        self.query_tokens = nn.Parameter(torch.zeros(1, config.num_query_tokens, q.hidden_size))
        self.embeddings = QFormerTextEmbeddings(q)
        self.qformer = QFormerModel(q)
        self.vision_projection = nn.Linear(q.hidden_size, config.image_text_hidden_size)
        self.text_projection = nn.Linear(q.hidden_size, config.image_text_hidden_size)
        self.itm_head = nn.Linear(q.hidden_size, 2)

    @property
    def device(self) -> torch.device:
        return self.query_tokens.device

    @property
    def num_query(self) -> int:
        return self.config.num_query_tokens

    def get_input_embeddings(self) -> nn.Embedding:
        return self.embeddings.word_embeddings

    # ------------------------------------------------------------------ image side
    def vision(self, pixel_values, interpolate_pos_encoding: bool = False) -> torch.Tensor:
        """pixel_values (B, 3, H, W) -> vision tokens (B, S, E_vision), ln_vision applied."""
        self.vision_model.check_pixels(pixel_values, interpolate_pos_encoding)
        return self.vision_model(pixel_values.to(self.device), interpolate_pos_encoding)

    def query_output(self, image_embeds=None, image_kv=None) -> torch.Tensor:
        """The Q-Former's query outputs for images alone, (B, Q, E); from the vision tokens or
        from their per-layer K/V (`qformer.image_kv`)."""
        if image_kv is None:
            image_kv = self.qformer.image_kv(image_embeds)
        batch = next(kv[0].shape[0] for kv in image_kv if kv is not None)
        q = self.query_tokens.expand(batch, -1, -1)
        return self.qformer(q, self.num_query, "unimodal", image_kv=image_kv)

    def project_image(self, query_out: torch.Tensor) -> torch.Tensor:
        """(B, Q, E) -> normalised ITC image features (B, Q, D)."""
        w = self.vision_projection.weight
        return F.normalize(self.vision_projection(query_out.to(w.dtype)), dim=-1)

    @torch.no_grad()
    def encode_image(self, pixel_values, interpolate_pos_encoding: bool = False):
        """-> (vision tokens (B, S, E_vision) for ITM, normalised query features (B, Q, D))."""
        image_embeds = self.vision(pixel_values, interpolate_pos_encoding)
        return image_embeds, self.project_image(self.query_output(image_embeds))

    # ------------------------------------------------------------------ text side
    def _check_text(self, input_ids, attention_mask):
        if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2:
            raise ValueError(f"input_ids must be a (batch, length) tensor, got "
                             f"{tuple(input_ids.shape) if isinstance(input_ids, torch.Tensor) else type(input_ids)}")
        if input_ids.shape[1] == 0:
            raise ValueError("input_ids has no tokens (length 0)")
        input_ids = input_ids.to(self.device)
        if attention_mask is None:
            return input_ids, torch.ones_like(input_ids)
        if attention_mask.shape != input_ids.shape:
            raise ValueError(f"attention_mask {tuple(attention_mask.shape)} does not match input_ids "
                             f"{tuple(input_ids.shape)}")
        return input_ids, attention_mask.to(self.device)

    def text_output(self, input_ids, attention_mask=None) -> torch.Tensor:
        """The Q-Former on text alone (ITC's unimodal text branch): (B, T, E)."""
        input_ids, attention_mask = self._check_text(input_ids, attention_mask)
        embeds = self.embeddings(input_ids)
        return self.qformer(embeds, 0, "unimodal", key_padding_mask=attention_mask)

    def text_features(self, input_ids, attention_mask=None) -> torch.Tensor:
        """Plain text ids (no image placeholders), [CLS] first -> normalised features (B, D)."""
        cls = self.text_output(input_ids, attention_mask)[:, 0]
        w = self.text_projection.weight
        return F.normalize(self.text_projection(cls.to(w.dtype)), dim=-1)

    @torch.no_grad()
    def encode_text(self, input_ids, attention_mask=None) -> torch.Tensor:
        """`text_features` without autograd: normalised ITC text features (B, D)."""
        return self.text_features(input_ids, attention_mask)

    # ------------------------------------------------------------------ ITM
    def multimodal_output(self, input_ids, attention_mask=None, image_embeds=None, image_kv=None,
                          image_index=None, query_mask=None) -> torch.Tensor:
        """[queries ; text] through the Q-Former in bidirectional mode, queries cross-attending
        to their image: (N, Q + T, E). `image_index` (N,) maps pair rows to the images of
        `image_kv`/`image_embeds` (default: row i <-> image i). `query_mask` (N, Q) replaces the
        all-ones padding of the query positions (transformers takes it from the mask of the
        placeholder columns)."""
        input_ids, attention_mask = self._check_text(input_ids, attention_mask)
        N, Q = input_ids.shape[0], self.num_query
        queries = self.query_tokens.expand(N, -1, -1)
        text = self.embeddings(input_ids).to(queries.dtype)
        if query_mask is None:
            query_mask = torch.ones(N, Q, dtype=attention_mask.dtype, device=attention_mask.device)
        mask = torch.cat([query_mask.to(attention_mask), attention_mask], 1)  # (N, Q + T)
        if image_kv is None:
            image_kv = self.qformer.image_kv(image_embeds)
        return self.qformer(torch.cat([queries, text], 1), Q, "bidirectional", key_padding_mask=mask,
                            image_kv=image_kv, image_index=image_index)

    def itm_from_output(self, out: torch.Tensor) -> torch.Tensor:
        """Q-Former output (N, Q + T, E) -> ITM logits (N, 2) averaged over the queries."""
        w = self.itm_head.weight
        return self.itm_head(out[:, :self.num_query].to(w.dtype)).mean(dim=1)

    @torch.no_grad()
    def itm_logits(self, image_kv, image_index, input_ids, attention_mask=None) -> torch.Tensor:
        """ITM logits (N, 2) for N pairs: text row n with image `image_index[n]` of `image_kv`
        (the per-layer K/V of `qformer.image_kv(vision tokens)`, computed once per image)."""
        out = self.multimodal_output(input_ids, attention_mask, image_kv=image_kv, image_index=image_index)
        return self.itm_from_output(out)

    # ------------------------------------------------------------------ forward
    def strip_placeholders(self, input_ids, attention_mask):
        """input_ids, attention_mask (B, L) -> (text ids, text mask, query-position mask or None)
        with the image placeholders removed (module docstring)."""
        tok, Q = self.config.image_token_index, self.num_query
        if tok is None:
            return input_ids, attention_mask, None
        is_img = input_ids == tok
        n_img = is_img.sum(1)
        if bool((n_img == 0).all()):
            return input_ids, attention_mask, None
        if input_ids.shape[1] <= Q or not bool(is_img[:, :Q].all()) or bool(is_img[:, Q:].any()):
            raise ValueError(f"input_ids must start with exactly {Q} image tokens (id {tok}) in every row, as "
                             f"Blip2Processor lays them out, or contain none; got counts {n_img.tolist()}")
        return input_ids[:, Q:], attention_mask[:, Q:], attention_mask[:, :Q]

    def forward(self, pixel_values, input_ids, attention_mask=None, use_image_text_matching_head: bool = False,
                interpolate_pos_encoding: bool = False) -> ImageTextMatchingOutput:
        image_embeds = self.vision(pixel_values, interpolate_pos_encoding)
        input_ids, attention_mask = self._check_text(input_ids, attention_mask)
        text_ids, text_mask, query_mask = self.strip_placeholders(input_ids, attention_mask)
        if use_image_text_matching_head:
            if image_embeds.shape[0] != text_ids.shape[0]:
                raise ValueError(f"ITM scores pairs: {image_embeds.shape[0]} images but {text_ids.shape[0]} texts")
            out = self.multimodal_output(text_ids, text_mask, image_embeds=image_embeds, query_mask=query_mask)
            logits = self.itm_from_output(out)
            return ImageTextMatchingOutput(logits, logits.t(), out.to(self.itm_head.weight.dtype), image_embeds)
        image_feats = self.project_image(self.query_output(image_embeds))  # (B_i, Q, D)
        text_feats = self.text_features(text_ids, text_mask)  # (B_t, D)
        sim = torch.matmul(image_feats, text_feats.t()).max(dim=1).values  # (B_i, B_t)
        return ImageTextMatchingOutput(sim, sim.t(), text_feats, image_feats)

    # ------------------------------------------------------------------ loading
    @classmethod
    def from_pretrained(cls, path_or_hub_id: str, **kwargs):
        """Load a transformers `Blip2ForImageTextRetrieval` folder or hub id (e.g.
        Salesforce/blip2-itm-vit-g). See `blip2_fast.loading.load_pretrained`."""
        from ..loading import load_pretrained
        return load_pretrained(cls, path_or_hub_id, **kwargs)

    def save_pretrained(self, folder: str, **kwargs) -> None:
        from ..loading import save_pretrained
        save_pretrained(self, folder, **kwargs)

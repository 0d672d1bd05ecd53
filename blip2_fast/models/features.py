"""Feature extraction, as transformers' `Blip2Model`, `Blip2VisionModelWithProjection` and
`Blip2TextModelWithProjection` compute it (same folders, same keys, same outputs).

- `Blip2Model` (an LLM folder): `get_image_features` = the vision encoder's output
  (`last_hidden_state` (B, S, E_vision) with ln_vision, and `pooler_output` (B, E_vision) = ln_vision
  applied once more to the class token — transformers' quirk, kept for parity);
  `get_qformer_features` = the Q-Former's query outputs (B, Q, E); `get_text_features` = the
  LLM's last hidden states (OPT decoder / T5 encoder).
- `Blip2VisionModelWithProjection`: `image_embeds` = normalised `vision_projection` of every
  query output (B, Q, D) — not pooled, as in transformers; `last_hidden_state` = vision tokens.
- `Blip2TextModelWithProjection`: `text_embeds` = normalised `text_projection` of every text
  position (B, T, D) (ITC uses position 0, [CLS]); `last_hidden_state` = the Q-Former text outputs.
- `multimodal_features(model, ...)`: LAVIS' multimodal embeddings, the query outputs (B, Q, E)
  of [queries ; text] in bidirectional mode with cross-attention to the image (ITM's input).
  transformers has no method for it; it is `text_model_output.last_hidden_state[:, :Q]` of
  `Blip2ForImageTextRetrieval(..., use_image_text_matching_head=True)`.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..config import Blip2Config
from .blip2 import Blip2ForConditionalGeneration
from .qformer import QFormerModel, QFormerTextEmbeddings
from .vision import VisionModel


@dataclass
class VisionOutput:
    last_hidden_state: torch.Tensor  # (B, S, E_vision)
    pooler_output: torch.Tensor  # (B, E_vision)


@dataclass
class VisionProjectionOutput:
    image_embeds: torch.Tensor  # (B, Q, D), unit norm
    last_hidden_state: torch.Tensor  # vision tokens (B, S, E_vision)


@dataclass
class TextProjectionOutput:
    text_embeds: torch.Tensor  # (B, T, D), unit norm
    last_hidden_state: torch.Tensor  # Q-Former text outputs (B, T, E)


def vision_features(model: nn.Module, pixel_values, interpolate_pos_encoding: bool = False) -> VisionOutput:
    """`Blip2Model.get_image_features` for any of our models with a `vision_model`."""
    vm = model.vision_model
    vm.check_pixels(pixel_values, interpolate_pos_encoding)
    tokens = vm(pixel_values.to(vm.post_layernorm.weight.device), interpolate_pos_encoding)
    return VisionOutput(tokens, vm.post_layernorm(tokens[:, 0]))


def query_features(model: nn.Module, image_embeds: torch.Tensor) -> torch.Tensor:
    """Query outputs (B, Q, E) of the Q-Former for vision tokens (B, S, E_vision)."""
    q = model.query_tokens.expand(image_embeds.shape[0], -1, -1)
    return model.qformer(q, q.shape[1], "unimodal", image_embeds=image_embeds)


def multimodal_features(model: nn.Module, pixel_values, input_ids, attention_mask=None,
                        interpolate_pos_encoding: bool = False) -> torch.Tensor:
    """LAVIS' multimodal embeddings (B, Q, E) for (image b, text b) pairs; `model` is a
    `Blip2ForImageTextRetrieval` (plain text ids; placeholders are stripped as in its forward)."""
    image_embeds = model.vision(pixel_values, interpolate_pos_encoding)
    input_ids, attention_mask = model._check_text(input_ids, attention_mask)
    ids, mask, query_mask = model.strip_placeholders(input_ids, attention_mask)
    if ids.shape[0] != image_embeds.shape[0]:
        raise ValueError(f"multimodal features need pairs: {image_embeds.shape[0]} images but {ids.shape[0]} texts")
    out = model.multimodal_output(ids, mask, image_embeds=image_embeds, query_mask=query_mask)
    return out[:, :model.num_query]


class _Pretrained(nn.Module):
    """from_pretrained / save_pretrained for the projection models. transformers loads them from
    their own folders and also from a `Blip2ForImageTextRetrieval` folder (e.g.
    Salesforce/blip2-itm-vit-g), ignoring the other tower's weights; so do we: tensors we have no
    place for are skipped unread, and a missing one is still `CheckpointError`."""

    @classmethod
    def from_pretrained(cls, path_or_hub_id: str, **kwargs):
        from ..loading import load_pretrained
        return load_pretrained(cls, path_or_hub_id, skip_unused=True, **kwargs)

    def save_pretrained(self, folder: str, **kwargs) -> None:
        from ..loading import save_pretrained
        save_pretrained(self, folder, **kwargs)


class Blip2Model(Blip2ForConditionalGeneration):
    """transformers' `Blip2Model`: the same weights as `Blip2ForConditionalGeneration`, with the
    feature methods returning what `Blip2Model`'s do (see the module docstring)."""

    def get_image_features(self, pixel_values, interpolate_pos_encoding: bool = False) -> VisionOutput:
        return vision_features(self, pixel_values, interpolate_pos_encoding)


class Blip2VisionModelWithProjection(_Pretrained):
    def __init__(self, config: Blip2Config):
        super().__init__()
        self.config = config
        self.vision_model = VisionModel(config.vision)
        self.query_tokens = nn.Parameter(torch.zeros(1, config.num_query_tokens, config.qformer.hidden_size))
        self.qformer = QFormerModel(config.qformer)
        self.vision_projection = nn.Linear(config.qformer.hidden_size, config.image_text_hidden_size)

    def forward(self, pixel_values, interpolate_pos_encoding: bool = False) -> VisionProjectionOutput:
        tokens = vision_features(self, pixel_values, interpolate_pos_encoding).last_hidden_state
        out = query_features(self, tokens)
        w = self.vision_projection.weight
        return VisionProjectionOutput(F.normalize(self.vision_projection(out.to(w.dtype)), dim=-1), tokens)


class Blip2TextModelWithProjection(_Pretrained):
    def __init__(self, config: Blip2Config):
        super().__init__()
        self.config = config
        self.query_tokens = nn.Parameter(torch.zeros(1, config.num_query_tokens, config.qformer.hidden_size))
        self.embeddings = QFormerTextEmbeddings(config.qformer)
        self.qformer = QFormerModel(config.qformer)
        self.text_projection = nn.Linear(config.qformer.hidden_size, config.image_text_hidden_size)

    def forward(self, input_ids, attention_mask=None) -> TextProjectionOutput:
        if input_ids.dim() != 2 or input_ids.shape[1] == 0:
            raise ValueError(f"input_ids must be (batch, length >= 1), got {tuple(input_ids.shape)}")
        input_ids = input_ids.to(self.query_tokens.device)
        if attention_mask is not None:
            if attention_mask.shape != input_ids.shape:
                raise ValueError(f"attention_mask {tuple(attention_mask.shape)} does not match input_ids "
                                 f"{tuple(input_ids.shape)}")
            attention_mask = attention_mask.to(input_ids.device)
        out = self.qformer(self.embeddings(input_ids), 0, "unimodal", key_padding_mask=attention_mask)
        w = self.text_projection.weight
        return TextProjectionOutput(F.normalize(self.text_projection(out.to(w.dtype)), dim=-1), out)


__all__ = ["Blip2Model", "Blip2VisionModelWithProjection", "Blip2TextModelWithProjection", "vision_features",
           "query_features", "multimodal_features", "VisionOutput", "VisionProjectionOutput", "TextProjectionOutput"]

"""BLIP-2 stage 2: generative learning with a frozen image encoder and a frozen LLM.

`Blip2Stage2` wraps a `Blip2ForConditionalGeneration` (`.model`) for the training loop:
- trained: query_tokens, the Q-Former, language_projection; with `qformer_text_input` (VQA with
  a question-conditioned Q-Former) also `embeddings` and the Q-Former's text feed-forward;
  with `unfreeze_vision` (caption finetuning) also the ViT, with gradient checkpointing;
- frozen: the LLM always, the ViT unless unfrozen. Frozen parts have requires_grad False and
  stay in eval mode when the wrapper is put in train mode; the frozen ViT runs under no_grad,
  the frozen LLM still carries the gradient back to the soft prompt (an int8 LLM too: Int8Linear
  has a backward for its input);
- parameters that cannot receive a gradient are not trained (so DDP needs no
  find_unused_parameters): without question input the Q-Former's text feed-forward, and with it
  the last layer's text feed-forward, whose output nothing reads;
- trained parameters are kept in `master_dtype` (float32) whatever the checkpoint dtype.

The training path reads nothing from the device on the host: the batch layout of
`text_batches.LMBatchBuilder` (the Q placeholders first in every row) lets the soft prompt be
concatenated in place of the placeholders instead of `merge_prompt`'s counted masked_scatter;
the layout is checked with an asynchronous device assertion.
"""
from __future__ import annotations

import re

import torch
import torch.nn.functional as F
from torch import nn

from ..models.blip2 import Blip2ForConditionalGeneration

IGNORE = -100
_TEXT_FFN = re.compile(r"^qformer\.encoder\.layer\.(\d+)\.(intermediate|output)\.")


class Blip2Stage2(nn.Module):
    def __init__(self, model: Blip2ForConditionalGeneration, unfreeze_vision: bool = False,
                 qformer_text_input: bool = False, master_dtype: torch.dtype | None = torch.float32):
        super().__init__()
        if not isinstance(model, Blip2ForConditionalGeneration):
            raise TypeError(f"Blip2Stage2 wraps a blip2_fast Blip2ForConditionalGeneration, got {type(model).__name__}")
        if qformer_text_input and model.embeddings is None:
            raise ValueError("qformer_text_input=True needs Q-Former text embeddings (embeddings.*), which this "
                             "model lacks: its Q-Former takes no text, or its checkpoint carried none")
        self.model = model
        self.unfreeze_vision = unfreeze_vision
        self.qformer_text_input = qformer_text_input
        last = model.config.qformer.num_hidden_layers - 1
        names = []
        for name, p in model.named_parameters():
            train = self._trains(name, last)
            p.requires_grad_(train)
            if train:
                names.append(name)
                if master_dtype is not None and p.is_floating_point() and p.dtype != master_dtype:
                    p.data = p.data.to(master_dtype)
        self._trainable = names
        model.vision_model.gradient_checkpointing = unfreeze_vision
        self.train(self.training)

    def _trains(self, name: str, last_layer: int) -> bool:
        if name.startswith("language_model."):
            return False
        if name.startswith("vision_model."):
            return self.unfreeze_vision
        if name.startswith("embeddings."):
            return self.qformer_text_input
        ffn = _TEXT_FFN.match(name)
        if ffn:  # text rows' feed-forward: used only by question tokens, and not in the last layer
            return self.qformer_text_input and int(ffn.group(1)) < last_layer
        return name.startswith(("query_tokens", "qformer.", "language_projection."))

    @classmethod
    def from_pretrained(cls, folder: str, unfreeze_vision: bool = False, qformer_text_input: bool = False,
                        master_dtype: torch.dtype | None = torch.float32, **load_kw) -> "Blip2Stage2":
        """load_kw go to `Blip2ForConditionalGeneration.from_pretrained` (dtype, device, load_in_8bit, ...)."""
        model = Blip2ForConditionalGeneration.from_pretrained(folder, **load_kw)
        return cls(model, unfreeze_vision, qformer_text_input, master_dtype)

    def train(self, mode: bool = True):
        super().train(mode)
        self.model.language_model.eval()  # frozen: no dropout
        if not self.unfreeze_vision:
            self.model.vision_model.eval()
        return self

    # ------------------------------------------------------------------ trainable state
    def trainable_parameters(self) -> list[tuple[str, nn.Parameter]]:
        """(name, parameter) of everything trained; names are the model's checkpoint keys."""
        params = dict(self.model.named_parameters())
        return [(n, params[n]) for n in self._trainable]

    def trainable_state_dict(self) -> dict[str, torch.Tensor]:
        return {n: p.detach() for n, p in self.trainable_parameters()}

    def load_trainable_state_dict(self, state_dict: dict, strict: bool = True) -> None:
        """Copy trained tensors in (cast to each parameter's dtype/device). strict: the keys
        must be exactly the trainable ones; otherwise unknown keys are still an error and
        missing ones are left as they are."""
        params = dict(self.trainable_parameters())
        unexpected = sorted(set(state_dict) - set(params))
        missing = sorted(set(params) - set(state_dict)) if strict else []
        if unexpected or missing:
            raise KeyError(f"trainable state dict does not match: unexpected {unexpected[:8]} ({len(unexpected)}), "
                           f"missing {missing[:8]} ({len(missing)})")
        for name, tensor in state_dict.items():
            if tuple(tensor.shape) != tuple(params[name].shape):
                raise ValueError(f"key {name}: shape {tuple(tensor.shape)}, the model's is {tuple(params[name].shape)}")
        with torch.no_grad():
            for name, tensor in state_dict.items():
                params[name].copy_(tensor)

    # ------------------------------------------------------------------ forward
    def _image_embeds(self, pixel_values, image_embeds) -> torch.Tensor:
        m = self.model
        if image_embeds is not None:
            if self.unfreeze_vision:
                raise ValueError("image_embeds (cached ViT outputs) cannot train the ViT: unfreeze_vision is set")
            if image_embeds.dim() != 3 or image_embeds.shape[-1] != m.config.vision.hidden_size:
                raise ValueError(f"image_embeds must be (batch, tokens, {m.config.vision.hidden_size}), "
                                 f"got {tuple(image_embeds.shape)}")
            return image_embeds.to(m.device)
        if pixel_values is None:
            raise ValueError("pass pixel_values or image_embeds")
        if pixel_values.dim() != 4 or pixel_values.shape[1] != 3:  # shape only: no isfinite() host read
            raise ValueError(f"pixel_values must be (batch, 3, height, width), got {tuple(pixel_values.shape)}")
        pixel_values = pixel_values.to(m.device)
        # caption finetuning at a higher resolution (364 px in the paper): interpolated positions
        interpolate = tuple(pixel_values.shape[-2:]) != (m.config.vision.image_size,) * 2
        if self.unfreeze_vision:
            return m.vision_model(pixel_values, interpolate)
        with torch.no_grad():
            return m.vision_model(pixel_values, interpolate)

    def _llm_inputs(self, prompt: torch.Tensor, input_ids: torch.Tensor, attention_mask):
        """Soft prompt (B, Q, E) into the text embeddings for the builder's layout."""
        B, Q, _ = prompt.shape
        if input_ids.dim() != 2 or input_ids.shape[0] != B:
            raise ValueError(f"input_ids must be (batch={B}, length), got {tuple(input_ids.shape)}")
        input_ids = input_ids.to(prompt.device)
        mask = torch.ones_like(input_ids) if attention_mask is None else attention_mask.to(prompt.device)
        if mask.shape != input_ids.shape:
            raise ValueError(f"attention_mask {tuple(mask.shape)} does not match input_ids {tuple(input_ids.shape)}")
        embed = self.model.get_input_embeddings()
        tok = self.model.config.image_token_index
        if tok is None:  # no placeholders: the prompt goes in front and the mask grows
            text = embed(input_ids)
            return torch.cat([prompt.to(text.dtype), text], 1), torch.cat([mask.new_ones(B, Q), mask], 1)
        if input_ids.shape[1] < Q:
            raise ValueError(f"input_ids have {input_ids.shape[1]} columns, fewer than the {Q} image placeholders")
        # the builder puts the Q placeholders first in every row; checked on the device, no sync
        torch._assert_async((input_ids[:, :Q] == tok).all())
        text = embed(input_ids[:, Q:])
        return torch.cat([prompt.to(text.dtype), text], 1), mask

    def forward(self, pixel_values=None, input_ids=None, attention_mask=None, labels=None,
                decoder_input_ids=None, decoder_attention_mask=None, qformer_input_ids=None,
                qformer_attention_mask=None, image_embeds=None, n_truncated=None) -> dict:
        """-> {"loss": mean cross-entropy over labels != -100 (fp32), "logits"}. Tensors as
        `LMBatchBuilder` makes them; n_truncated (its count) is accepted and ignored."""
        if input_ids is None or labels is None:
            raise ValueError("stage 2 needs input_ids and labels (see text_batches.LMBatchBuilder)")
        if qformer_input_ids is not None and not self.qformer_text_input:
            raise ValueError("qformer_input_ids given, but this Blip2Stage2 was built with qformer_text_input=False")
        m = self.model
        vision = self._image_embeds(pixel_values, image_embeds)  # (B, S, Ev)
        queries = m._queries(vision, qformer_input_ids, qformer_attention_mask)  # (B, Q, Eq)
        prompt = m.language_projection(queries.to(m.language_projection.weight.dtype))  # (B, Q, E_text)
        embeds, mask = self._llm_inputs(prompt, input_ids, attention_mask)
        labels = labels.to(prompt.device)
        if m.config.is_encoder_decoder:
            if decoder_attention_mask is not None:
                decoder_attention_mask = decoder_attention_mask.to(prompt.device)
            if decoder_input_ids is not None:
                decoder_input_ids = decoder_input_ids.to(prompt.device)
            loss, logits = m.language_model(embeds, mask, decoder_input_ids=decoder_input_ids, labels=labels,
                                            decoder_attention_mask=decoder_attention_mask)
            return {"loss": loss, "logits": logits}
        if labels.shape[1] > embeds.shape[1]:
            raise ValueError(f"labels have {labels.shape[1]} columns, the LLM input only {embeds.shape[1]}")
        logits = m.language_model(embeds, mask)  # (B, L, V)
        shifted = logits[:, -labels.shape[1]:][:, :-1]  # position t predicts label t + 1
        loss = F.cross_entropy(shifted.float().reshape(-1, shifted.shape[-1]), labels[:, 1:].reshape(-1),
                               ignore_index=IGNORE)
        return {"loss": loss, "logits": logits}


__all__ = ["Blip2Stage2"]

"""`Blip2ForConditionalGeneration`: frozen ViT -> Q-Former -> language_projection -> frozen LLM.

A drop-in for transformers' class of the same name: same checkpoint keys, same inputs (what
`Blip2Processor` produces, with `num_query_tokens` image placeholder tokens in `input_ids`),
same outputs. A prompt without placeholders is also accepted: the soft visual prompt is then
prepended (BLIP-2's original layout), and the attention mask is extended to cover it.

Question-conditioned Q-Former (VQA): when `config.qformer.use_qformer_text_input`
the model holds `embeddings` (BERT word + position embeddings, the keys `embeddings.*` of
transformers' Blip2ForImageTextRetrieval and of our Blip2Stage1), and `get_image_features`,
`forward` and `generate` take `qformer_input_ids` / `qformer_attention_mask` (InstructBLIP's
names): queries and question tokens run together in the bidirectional mode and only the query
outputs feed `language_projection`. transformers' Blip2ForConditionalGeneration has no such
input and ignores `embeddings.*` in a folder; a folder it wrote has none, and then our model is
built without them (no question conditioning; passing qformer_input_ids is an error).
A model finetuned that way (`blip2-fast train --stage vqa`, as BLIP-2's VQA finetune and
InstructBLIP do) says so in its config, `"vqa_qformer_question": true`
(`reads_question`): the CLI and the evaluation then feed each question to its Q-Former, and
captions (no question) run the queries alone, as transformers' class always does.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..config import Blip2Config
from .opt import OPTLM, OPTDecoderState
from .qformer import QFormerModel, QFormerTextEmbeddings
from .static_decode import StaticOPTDecoderState, StaticT5DecoderState
from .t5_generation import T5DecoderState
from .vision import VisionModel


@dataclass
class Blip2Output:
    loss: torch.Tensor | None
    logits: torch.Tensor
    language_model_inputs: torch.Tensor | None = None  # (B, Q, E_text)

    def __getitem__(self, i):  # tuple-style access like transformers' ModelOutput
        return tuple(v for v in (self.loss, self.logits) if v is not None)[i]


@dataclass
class ImageFeatures:
    last_hidden_state: torch.Tensor  # vision tokens (B, S, E_vision)
    qformer_last_hidden_state: torch.Tensor  # (B, Q, E_qformer)
    pooler_output: torch.Tensor  # projected queries = soft visual prompt (B, Q, E_text)


def build_language_model(config: Blip2Config) -> nn.Module:
    if config.text is None:
        raise ValueError("this config has no text_config: it describes a model without an LLM "
                         "(use Blip2ForImageTextRetrieval)")
    if config.text.model_type == "opt":
        return OPTLM(config.text)
    from .t5 import T5LM  # encoder-decoder LLMs: imported only when used
    return T5LM(config.text)


# a folder may also hold the stage-1 heads (one folder for captioning and retrieval, as the
# miniature model ships its start folder): transformers' class ignores them, and so do we
RETRIEVAL_ONLY_KEYS = ("vision_projection.", "text_projection.", "itm_head.", "qformer_lm_head.", "temp")
TEXT_EMBEDDING_KEYS = ("embeddings.word_embeddings.weight", "embeddings.position_embeddings.weight")
# config.json key: the Q-Former was finetuned to read the VQA question (module docstring)
QUESTION_CONFIG_KEY = "vqa_qformer_question"


class Blip2ForConditionalGeneration(nn.Module):
    def __init__(self, config: Blip2Config, qformer_text_embeddings: bool | None = None):
        """qformer_text_embeddings: build `embeddings` for question tokens (default: when the
        Q-Former takes text, `config.qformer.use_qformer_text_input`)."""
        super().__init__()
        self.config = config
        self.language_model = build_language_model(config)  # first: it refuses configs without an LLM
        self.vision_model = VisionModel(config.vision)
        self.query_tokens = nn.Parameter(torch.zeros(1, config.num_query_tokens, config.qformer.hidden_size))
        self.qformer = QFormerModel(config.qformer)
        self.language_projection = nn.Linear(config.qformer.hidden_size, config.text.hidden_size)
        if qformer_text_embeddings is None:
            qformer_text_embeddings = config.qformer.use_qformer_text_input
        if qformer_text_embeddings and not config.qformer.use_qformer_text_input:
            raise ValueError("qformer_text_embeddings=True needs a Q-Former that takes text "
                             "(qformer_config.use_qformer_text_input is False)")
        self.embeddings = QFormerTextEmbeddings(config.qformer) if qformer_text_embeddings else None

    # ------------------------------------------------------------------ features
    @property
    def device(self) -> torch.device:
        return self.query_tokens.device

    @property
    def reads_question(self) -> bool:
        """Whether questions should go to the Q-Former: it was finetuned so (config key
        `vqa_qformer_question`) and this model has the text embeddings to read them."""
        return self.embeddings is not None and bool(self.config.extra.get(QUESTION_CONFIG_KEY, False))

    def get_input_embeddings(self) -> nn.Embedding:
        return self.language_model.get_input_embeddings()

    def _vision(self, pixel_values, interpolate_pos_encoding=False):
        self.vision_model.check_pixels(pixel_values, interpolate_pos_encoding)
        return self.vision_model(pixel_values.to(self.device), interpolate_pos_encoding)

    def _queries(self, image_embeds: torch.Tensor, qformer_input_ids: torch.Tensor | None = None,
                 qformer_attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Query outputs (B, Q, Eq); with question tokens (B, T) both run in the bidirectional
        mode under the question's padding mask. Shape checks only: no host synchronisation."""
        B = image_embeds.shape[0]
        q = self.query_tokens.expand(B, -1, -1)
        Q = q.shape[1]
        if qformer_input_ids is None:
            if qformer_attention_mask is not None:
                raise ValueError("qformer_attention_mask was given without qformer_input_ids")
            return self.qformer(q, Q, "bidirectional", image_embeds=image_embeds)
        if self.embeddings is None:
            why = ("its Q-Former takes no text (qformer_config.use_qformer_text_input is False)"
                   if not self.config.qformer.use_qformer_text_input else
                   "it was loaded from a checkpoint without Q-Former text embeddings (embeddings.word_embeddings / "
                   "embeddings.position_embeddings; transformers' Blip2ForConditionalGeneration writes none): "
                   "copy them in from a stage-1 or retrieval checkpoint of the same Q-Former")
            raise ValueError(f"qformer_input_ids given, but this model cannot condition the Q-Former on text: {why}")
        if qformer_input_ids.dim() != 2 or qformer_input_ids.shape[0] != B:
            raise ValueError(f"qformer_input_ids must be (batch={B}, length), got {tuple(qformer_input_ids.shape)}")
        ids = qformer_input_ids.to(q.device)
        text_mask = torch.ones_like(ids) if qformer_attention_mask is None else qformer_attention_mask.to(q.device)
        if text_mask.shape != ids.shape:
            raise ValueError(f"qformer_attention_mask {tuple(text_mask.shape)} does not match qformer_input_ids "
                             f"{tuple(ids.shape)}")
        hidden = torch.cat([q, self.embeddings(ids).to(q.dtype)], 1)  # (B, Q + T, Eq)
        mask = torch.cat([text_mask.new_ones(B, Q), text_mask], 1)  # queries are never padding
        return self.qformer(hidden, Q, "bidirectional", key_padding_mask=mask, image_embeds=image_embeds)[:, :Q]

    def get_qformer_features(self, pixel_values, interpolate_pos_encoding: bool = False,
                             qformer_input_ids=None, qformer_attention_mask=None) -> torch.Tensor:
        """The Q-Former's last hidden states for the queries, (B, Q, E_qformer)."""
        return self._queries(self._vision(pixel_values, interpolate_pos_encoding), qformer_input_ids,
                             qformer_attention_mask)

    def get_image_features(self, pixel_values, interpolate_pos_encoding: bool = False, qformer_input_ids=None,
                           qformer_attention_mask=None) -> ImageFeatures:
        image_embeds = self._vision(pixel_values, interpolate_pos_encoding)
        query_out = self._queries(image_embeds, qformer_input_ids, qformer_attention_mask)
        prompt = self.language_projection(query_out.to(self.language_projection.weight.dtype))
        return ImageFeatures(image_embeds, query_out, prompt)

    def get_text_features(self, input_ids, attention_mask=None) -> torch.Tensor:
        """The LLM's last hidden states for text alone (decoder for OPT, encoder for T5)."""
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        embeds = self.get_input_embeddings()(input_ids)
        if self.config.is_encoder_decoder:
            return self.language_model.encode(embeds, attention_mask)
        return self.language_model.hidden_states(embeds, attention_mask)

    # ------------------------------------------------------------------ prompts
    def merge_prompt(self, prompt: torch.Tensor, input_ids: torch.Tensor | None, attention_mask):
        """Put the soft visual prompt (B, Q, E) into the text embeddings.

        With image placeholders in `input_ids` they are replaced (transformers' layout); without,
        the prompt is prepended and the mask extended. Returns (inputs_embeds, attention_mask)."""
        B, Q, _ = prompt.shape
        if input_ids is None:
            input_ids = torch.empty(B, 0, dtype=torch.long, device=prompt.device)
        if input_ids.dim() != 2 or input_ids.shape[0] != B:
            raise ValueError(f"input_ids must be (batch={B}, length), got {tuple(input_ids.shape)}")
        input_ids = input_ids.to(prompt.device)
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        attention_mask = attention_mask.to(prompt.device)
        if attention_mask.shape != input_ids.shape:
            raise ValueError(f"attention_mask {tuple(attention_mask.shape)} does not match input_ids {tuple(input_ids.shape)}")
        embeds = self.get_input_embeddings()(input_ids)
        prompt = prompt.to(embeds.dtype)
        tok = self.config.image_token_index
        counts = (input_ids == tok).sum(1) if tok is not None else torch.zeros(B, dtype=torch.long)
        counts = counts.tolist()  # one host read per call, not per token
        if all(c == 0 for c in counts):
            ones = torch.ones(B, Q, dtype=attention_mask.dtype, device=attention_mask.device)
            return torch.cat([prompt, embeds], 1), torch.cat([ones, attention_mask], 1)
        bad = [(i, c) for i, c in enumerate(counts) if c != Q]
        if bad:
            i, c = bad[0]
            raise ValueError(f"input_ids row {i} has {c} image tokens (id {tok}); expected {Q} "
                             f"(num_query_tokens) in every row, or none at all")
        mask = (input_ids == tok)[..., None]
        return embeds.masked_scatter(mask, prompt), attention_mask

    # ------------------------------------------------------------------ forward
    def forward(self, pixel_values, input_ids, attention_mask=None, labels=None, decoder_input_ids=None,
                decoder_attention_mask=None, interpolate_pos_encoding: bool = False, qformer_input_ids=None,
                qformer_attention_mask=None) -> Blip2Output:
        prompt = self.get_image_features(pixel_values, interpolate_pos_encoding, qformer_input_ids,
                                         qformer_attention_mask).pooler_output
        embeds, mask = self.merge_prompt(prompt, input_ids, attention_mask)
        lm = self.language_model
        if self.config.is_encoder_decoder:
            loss, logits = lm(embeds, mask, decoder_input_ids=decoder_input_ids, labels=labels,
                              decoder_attention_mask=decoder_attention_mask)
            return Blip2Output(loss, logits, prompt)
        logits = lm(embeds, mask)
        loss = None
        if labels is not None:
            labels = labels.to(logits.device)
            shifted = logits[:, -labels.shape[1]:][:, :-1]  # position t predicts label t + 1
            loss = F.cross_entropy(shifted.float().reshape(-1, shifted.shape[-1]),
                                   labels[:, 1:].reshape(-1), ignore_index=-100)
        return Blip2Output(loss, logits, prompt)

    # ------------------------------------------------------------------ generate
    @torch.no_grad()
    def generate(self, pixel_values, input_ids=None, attention_mask=None, interpolate_pos_encoding: bool = False,
                 generator: torch.Generator | None = None, qformer_input_ids=None, qformer_attention_mask=None,
                 **generate_kwargs) -> torch.LongTensor:
        """Token ids as transformers returns them: for decoder-only LLMs the prompt ids followed by
        the new tokens, for encoder-decoder LLMs the decoder start token then the new tokens."""
        from ..generation import GenerationConfig, generate_tokens

        text_cfg = self.config.text
        generate_kwargs.setdefault("eos_token_id", text_cfg.eos_token_id)
        generate_kwargs.setdefault("pad_token_id", text_cfg.pad_token_id)
        prompt = self.get_image_features(pixel_values, interpolate_pos_encoding, qformer_input_ids,
                                         qformer_attention_mask).pooler_output
        B, Q, _ = prompt.shape
        if input_ids is None and not self.config.is_encoder_decoder:
            start = [text_cfg.bos_token_id]
            if self.config.image_token_index is not None:
                start = [self.config.image_token_index] * Q + start
            input_ids = torch.tensor([start] * B, dtype=torch.long, device=prompt.device)
        embeds, mask = self.merge_prompt(prompt, input_ids, attention_mask)
        if self.config.is_encoder_decoder:
            # like transformers: lengths and penalties count decoder tokens, from the start token
            start = torch.full((B, 1), text_cfg.decoder_start_token_id, dtype=torch.long, device=prompt.device)
            gen = GenerationConfig.from_kwargs(prompt_length=1, **generate_kwargs)
            if gen.cache_implementation == "static":
                state = StaticT5DecoderState(self.language_model, embeds, mask, gen.max_new_tokens, compile=gen.compile)
            else:
                state = T5DecoderState(self.language_model, embeds, mask, gen.max_new_tokens)
            new = generate_tokens(state, state.first_logits, gen, generator=generator, prompt_tokens=start)
            return torch.cat([start.repeat_interleave(new.shape[0] // B, 0), new], 1)
        input_ids = input_ids.to(prompt.device)
        gen = GenerationConfig.from_kwargs(prompt_length=input_ids.shape[1], **generate_kwargs)
        if embeds.shape[1] + gen.max_new_tokens > text_cfg.max_position_embeddings:
            raise ValueError(f"prompt of {embeds.shape[1]} positions (including {Q} image queries) plus "
                             f"{gen.max_new_tokens} new tokens exceeds the LLM's context of "
                             f"{text_cfg.max_position_embeddings} positions")
        if gen.cache_implementation == "static":
            state = StaticOPTDecoderState(self.language_model, embeds, mask, gen.max_new_tokens, compile=gen.compile)
        else:
            state = OPTDecoderState(self.language_model, embeds, mask, gen.max_new_tokens)
        new = generate_tokens(state, state.first_logits, gen, generator=generator, prompt_tokens=input_ids)
        return torch.cat([input_ids.repeat_interleave(new.shape[0] // B, 0), new], 1)

    # ------------------------------------------------------------------ loading
    @classmethod
    def from_pretrained(cls, path_or_hub_id: str, revision: str | None = None, token: str | None = None,
                        **kwargs) -> "Blip2ForConditionalGeneration":
        """Load a transformers BLIP-2 folder or hub id. See `blip2_fast.loading.load_pretrained`.

        A Q-Former that takes text gets `embeddings` only if the checkpoint holds them: a folder
        written by transformers' Blip2ForConditionalGeneration has none and still loads."""
        from ..loading import load_pretrained, resolve_folder
        folder = resolve_folder(path_or_hub_id, revision, token)
        text_embeddings = None
        if _reads_qformer_text(folder):
            keys = _checkpoint_keys(folder)
            text_embeddings = all(k in keys for k in TEXT_EMBEDDING_KEYS)
        kwargs.setdefault("ignore", RETRIEVAL_ONLY_KEYS)
        return load_pretrained(lambda config: cls(config, qformer_text_embeddings=text_embeddings), folder, **kwargs)

    def save_pretrained(self, folder: str, **kwargs) -> None:
        from ..loading import save_pretrained
        save_pretrained(self, folder, **kwargs)

    def tie_weights(self) -> None:
        tie = getattr(self.language_model, "tie_weights", None)
        if tie is not None:
            tie()


def _reads_qformer_text(folder: str) -> bool:
    import json
    import os
    try:
        with open(os.path.join(folder, "config.json"), encoding="utf-8") as f:
            d = json.load(f)
    except (OSError, ValueError):
        return False  # load_pretrained names the missing or broken config.json
    return isinstance(d, dict) and bool((d.get("qformer_config") or {}).get("use_qformer_text_input", False))


def _checkpoint_keys(folder: str) -> set[str]:
    """Tensor names of a folder's checkpoint, from the safetensors headers (no tensor is read;
    a torch pickle is opened with mmap)."""
    from ..loading import weight_files, iter_checkpoint
    keys: set[str] = set()

    def note(key: str) -> bool:
        keys.add(key)
        return False  # never read the tensor

    for _ in iter_checkpoint(weight_files(folder), want=note):
        pass
    return keys

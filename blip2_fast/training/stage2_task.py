"""Stages "2", "caption" and "vqa" for the loop: a `Blip2Stage2` and an `LMBatchBuilder`.

- "2": LM loss on the caption (OPT) or prefix-LM (FlanT5: a random split of the caption, the
  prefix into the encoder after the soft prompt, the rest as the decoder's target).
- "caption": the caption after the prompt (default "a photo of"); `unfreeze_vision` also trains
  the ViT, with gradient checkpointing, at whatever `image_size` the data is read at.
- "vqa": "Question: {} Answer:" + the answer; with `vqa_qformer_question` the question also goes
  to the Q-Former (bidirectional mode with the queries).
The frozen LLM and ViT are loaded in 16 bits when the run is in bf16/fp16 (the trained parts are
kept in fp32 by `Blip2Stage2`); `load_in_8bit` gives the LLM int8 weights. With `cache_features`
the frozen ViT's outputs are computed once into <out>/vision_cache and read back by index.
"""
from __future__ import annotations

import logging
import os

import torch
import torch.distributed as dist

from ..config import Blip2Config
from ..loading import resolve_folder
from ..tokenizers import load_qformer_tokenizer, load_tokenizer
from .stage2 import Blip2Stage2
from .text_batches import LMBatchBuilder
from .train_config import TrainConfig

log = logging.getLogger("blip2_fast.train")
BUILDER_STAGE = {"2": "pretrain", "caption": "caption", "vqa": "vqa"}


class Stage2Task:
    def __init__(self, cfg: TrainConfig, device: torch.device):
        self.cfg, self.device = cfg, device
        self.folder = resolve_folder(cfg.model)
        config = Blip2Config.from_json_file(os.path.join(self.folder, "config.json"))
        frozen_dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[cfg.precision]
        if config.is_encoder_decoder and cfg.precision == "fp16":
            log.warning("FlanT5 overflows in fp16 (BLIP-2 runs it in bf16); its frozen weights stay in fp16 as asked")
        from ..models.blip2 import Blip2ForConditionalGeneration

        net = Blip2ForConditionalGeneration.from_pretrained(self.folder, dtype=frozen_dtype, device=device,
                                                            load_in_8bit=cfg.load_in_8bit)
        qtext = cfg.stage == "vqa" and cfg.vqa_qformer_question and getattr(net, "embeddings", None) is not None
        if cfg.stage == "vqa" and cfg.vqa_qformer_question and not qtext:
            log.warning("vqa: %s has no Q-Former text embeddings (embeddings.*); the question goes to the LLM "
                        "only", self.folder)
        self.model = Blip2Stage2(net, unfreeze_vision=cfg.unfreeze_vision, qformer_text_input=qtext)
        self.model.model.qformer.gradient_checkpointing = cfg.grad_checkpointing
        self.config = config
        qtok = load_qformer_tokenizer(self.folder, cfg.qformer_tokenizer,
                                      why="the Q-Former reads the questions") if qtext else None
        self.builder = LMBatchBuilder(load_tokenizer(self.folder), config, stage=BUILDER_STAGE[cfg.stage],
                                      prompt=cfg.prompt, max_length=cfg.max_text_length, qformer_tokenizer=qtok)
        # the prefix-LM split point is random: its generator is saved with the checkpoint
        self.generators = {"text": torch.Generator().manual_seed(cfg.seed)}
        self.cache = None

    @property
    def image_size(self) -> int:
        return self.config.vision.image_size

    def prepare(self, dataset, run) -> None:
        """Build (rank 0) or open the frozen-ViT feature cache when asked."""
        if not self.cfg.cache_features:
            return
        from .feature_cache import VisionFeatureCache, build_vision_cache, data_fingerprint

        path = os.path.join(self.cfg.out, "vision_cache")
        vision = self.model.model.vision_model
        data_key = data_fingerprint(dataset.records, dataset.transform)
        if run.main:
            try:
                VisionFeatureCache(path, vision, data_key)
            except ValueError as err:  # absent, incomplete, from other weights or other data: (re)build it
                log.info("building the vision feature cache in %s (%s)", path, err)
                build_vision_cache(vision, dataset, path, batch_size=self.cfg.batch_size, data_key=data_key)
        if run.distributed:
            dist.barrier()
        self.cache = VisionFeatureCache(path, vision, data_key)

    def trainable_parameters(self):
        return self.model.trainable_parameters()

    def trainable_state_dict(self) -> dict[str, torch.Tensor]:
        return self.model.trainable_state_dict()

    def load_trainable_state_dict(self, state: dict) -> None:
        self.model.load_trainable_state_dict(state)

    def inputs(self, batch: dict, generator=None) -> tuple[dict, int]:
        text = self.builder(batch["texts"], batch["questions"], generator=self.generators["text"])
        truncated = int(text.pop("n_truncated"))
        if self.cache is not None:
            text["image_embeds"] = self.cache.batch(batch["indices"].tolist()).to(self.device)
        else:
            text["pixel_values"] = batch["pixel_values"]
        return text, truncated

    def export_config(self) -> dict | None:
        """A vqa finetune records whether its Q-Former learnt to read the question (what the CLI and
        the evaluation then feed it); other stages leave the start folder's config as it is."""
        if self.cfg.stage != "vqa":
            return None
        from ..config import hf_config_dict_from_file
        from ..models.blip2 import QUESTION_CONFIG_KEY

        d = hf_config_dict_from_file(self.folder)
        if self.model.qformer_text_input:
            d[QUESTION_CONFIG_KEY] = True
        else:
            d.pop(QUESTION_CONFIG_KEY, None)  # retrained without it: a start folder's claim no longer holds
        return d


__all__ = ["Stage2Task"]

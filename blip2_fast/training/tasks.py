"""What differs between the stages, behind one small interface the loop drives.

A task owns the trainable module (`task.model`), turns a data batch into its forward's keyword
arguments (`task.inputs`), names what is trained (`task.trainable_parameters`,
`task.trainable_state_dict`) and knows the folder it started from (for the export).

- stage "1": `Blip2Stage1` (frozen ViT + Q-Former, ITC/ITM/ITG), texts tokenised with the
  Q-Former's BERT-style tokenizer ([CLS] first, right-padded).
- stages "2", "caption", "vqa": `Blip2Stage2` (frozen ViT and LLM), texts turned into LLM inputs
  and labels by `LMBatchBuilder`; vqa also feeds the question to the Q-Former.
"""
from __future__ import annotations

import logging
import os

import torch

from ..config import Blip2Config
from ..loading import CheckpointError, resolve_folder
from ..tokenizers import load_qformer_tokenizer
from ..tokenizers import tokenize_texts
from .export import load_matching
from .losses import world
from .stage1 import Blip2Stage1
from .train_config import TrainConfig

log = logging.getLogger("blip2_fast.train")

# tensors transformers' retrieval checkpoints do not have: they may start from initialisation
STAGE1_OPTIONAL = ("qformer_lm_head.", "temp")


class Stage1Task:
    def __init__(self, cfg: TrainConfig, device: torch.device):
        self.cfg = cfg
        self.folder = resolve_folder(cfg.model)
        config = Blip2Config.from_json_file(os.path.join(self.folder, "config.json"))
        self.tokenizer = load_qformer_tokenizer(self.folder, cfg.qformer_tokenizer, why="stage 1 tokenises its texts with it")
        dec = config.qformer.extra.get("dec_token_id")
        if dec is None:
            dec = self.tokenizer.convert_tokens_to_ids("[DEC]")
        if dec is None or dec == self.tokenizer.unk_token_id:
            raise CheckpointError(f"{self.folder}: no [DEC] token id (qformer_config.dec_token_id, or a [DEC] "
                                  f"token in the Q-Former tokenizer)")
        self.model = Blip2Stage1(config, dec_token_id=dec)
        missing = load_matching(self.model, self.folder)
        required = [k for k in missing if not k.startswith(STAGE1_OPTIONAL)]
        if required:
            raise CheckpointError(f"{self.folder}: stage 1 needs tensors the folder lacks: "
                                  f"{', '.join(required[:8])}{' ...' if len(required) > 8 else ''}")
        if missing:
            log.warning("stage 1 starts %s from initialisation (not in %s)", ", ".join(missing), self.folder)
        self.config = config
        self.model.qformer.gradient_checkpointing = cfg.grad_checkpointing
        self.model.to(device)
        if cfg.precision != "fp32":  # frozen: no master weights needed, run it in 16 bits
            self.model.vision_model.to(torch.bfloat16 if cfg.precision == "bf16" else torch.float16)

    @property
    def image_size(self) -> int:
        return self.config.vision.image_size

    def trainable_parameters(self) -> list[tuple[str, torch.nn.Parameter]]:
        return [(n, p) for n, p in self.model.named_parameters() if not n.startswith("vision_model.")]

    def trainable_state_dict(self) -> dict[str, torch.Tensor]:
        names = {n for n, _ in self.trainable_parameters()}
        return {k: v for k, v in self.model.state_dict().items() if k in names}

    def load_trainable_state_dict(self, state: dict) -> None:
        own = self.model.state_dict()
        with torch.no_grad():
            for k, v in state.items():
                own[k].copy_(v)

    def inputs(self, batch: dict, generator: torch.Generator | None) -> tuple[dict, int]:
        """Model kwargs and the number of texts truncated to max_text_length."""

        ids, mask, truncated = tokenize_texts(self.tokenizer, batch["texts"], self.cfg.max_text_length)
        if world()[1] > 1 and ids.shape[1] < self.cfg.max_text_length:
            # ITM gathers every rank's texts: one length on all ranks, known without a collective
            extra = self.cfg.max_text_length - ids.shape[1]
            ids = torch.nn.functional.pad(ids, (0, extra), value=self.tokenizer.pad_token_id)
            mask = torch.nn.functional.pad(mask, (0, extra), value=0)
        return dict(pixel_values=batch["pixel_values"], input_ids=ids, attention_mask=mask,
                    use_itc=self.cfg.use_itc, use_itm=self.cfg.use_itm, use_itg=self.cfg.use_itg,
                    generator=generator), truncated

    def export_config(self) -> dict | None:
        return None  # the start folder's config describes the exported model unchanged


def build_task(cfg: TrainConfig, device: torch.device):
    if cfg.stage == "1":
        return Stage1Task(cfg, device)
    from .stage2_task import Stage2Task
    return Stage2Task(cfg, device)


__all__ = ["Stage1Task", "build_task"]

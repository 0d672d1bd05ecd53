"""`TrainConfig`: every setting of a training run in one flat dataclass.

Read from YAML (`TrainConfig.from_yaml`) and/or command-line flags (flags win); an unknown field
or a value of the wrong type is a `ConfigError` naming it, so a typo never silently falls back to
a default. Defaults per stage follow the paper's recipe; `for_stage` fills them.
"""
from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field

from ..config import ConfigError

STAGES = ("1", "2", "caption", "vqa")
PRECISIONS = ("fp32", "bf16", "fp16")


@dataclass
class TrainConfig:
    stage: str = "1"
    model: str = ""                     # BLIP-2 folder (or hub id) the run starts from
    data: list = field(default_factory=list)   # JSONL / CSV / image folder / tar shards
    out: str = "runs/blip2"             # checkpoints, metrics.jsonl, the exported model
    qformer_tokenizer: str | None = None  # stage 1 / vqa: default <model>/qformer_tokenizer
    resume: str | None = None           # checkpoint file or run folder; "auto" = <out>/checkpoints/last.pt
    # optimisation
    steps: int = 1000                   # optimiser steps
    batch_size: int = 32                # per process, per micro-batch
    grad_accum: int = 1
    lr: float = 1e-4
    min_lr: float = 0.0
    warmup_steps: int = 0
    warmup_lr: float = 1e-6
    weight_decay: float = 0.05
    betas: tuple = (0.9, 0.98)
    precision: str = "fp32"             # fp32 | bf16 (autocast) | fp16 (autocast + loss scaling)
    grad_checkpointing: bool = False    # Q-Former layers (and the ViT when it is trained)
    max_grad_norm: float | None = None
    # model / task
    use_itc: bool = True
    use_itm: bool = True
    use_itg: bool = True
    prompt: str | None = None           # caption: "a photo of"; vqa: "Question: {} Answer:"
    unfreeze_vision: bool = False       # caption finetuning
    image_size: int | None = None       # default: the model's
    vqa_qformer_question: bool = True   # vqa: feed the question to the Q-Former (bidirectional mode)
    vqa_captions: bool = False          # vqa: also train each record's caption behind an empty prompt
    load_in_8bit: bool = False          # stage 2+: frozen LLM with int8 weights
    max_text_length: int = 32
    # data
    augment: bool = False               # RandomResizedCrop(0.5-1) + flip (off for the world of shapes)
    hflip: bool = True
    num_workers: int = 0
    cache_features: bool = False        # stage 2+: frozen-ViT outputs cached on disk (needs augment off)
    # run
    seed: int = 0
    device: str | None = None           # default cuda when available
    distributed: str = "auto"           # auto (DDP when launched by torchrun) | ddp | fsdp | none
    deterministic: bool = False
    log_every: int = 10
    save_every: int = 500
    tensorboard: bool = False
    export: bool = True                 # write <out>/model (transformers format) at the end
    progress: bool = True

    @classmethod
    def names(cls) -> set[str]:
        return {f.name for f in dataclasses.fields(cls)}

    @classmethod
    def from_dict(cls, d: dict, where: str = "config") -> "TrainConfig":
        unknown = sorted(set(d) - cls.names())
        if unknown:
            raise ConfigError(f"{where}: unknown field(s) {', '.join(unknown)}; known fields: "
                              f"{', '.join(sorted(cls.names()))}")
        cfg = cls(**d)
        cfg.validate(where)
        return cfg

    @classmethod
    def from_yaml(cls, path: str, overrides: dict | None = None) -> "TrainConfig":
        import yaml

        if not os.path.exists(path):
            raise ConfigError(f"{path}: no such config file")
        try:
            with open(path, encoding="utf-8") as f:
                d = yaml.safe_load(f) or {}
        except yaml.YAMLError as err:
            raise ConfigError(f"{path}: not valid YAML ({err})") from None
        if not isinstance(d, dict):
            raise ConfigError(f"{path}: expected a mapping of field: value, got {type(d).__name__}")
        d.update(overrides or {})
        return cls.from_dict(d, path)

    def validate(self, where: str = "config") -> None:
        self.stage = str(self.stage)
        if isinstance(self.data, str):
            self.data = [self.data]
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if isinstance(f.default, bool) and not isinstance(value, bool):
                raise ConfigError(f"{where}: {f.name} must be true or false, got {value!r}")
            if type(f.default) in (int, float) and not isinstance(f.default, bool):
                if isinstance(value, bool) or not isinstance(value, (int, float)):
                    raise ConfigError(f"{where}: {f.name} must be a number, got {value!r}")
        checks = [
            (self.stage in STAGES, f"stage must be one of {', '.join(STAGES)}, got {self.stage!r}"),
            (self.precision in PRECISIONS, f"precision must be one of {', '.join(PRECISIONS)}, got {self.precision!r}"),
            (self.distributed in ("auto", "ddp", "fsdp", "none"), f"distributed {self.distributed!r} unknown"),
            (bool(self.model), "model is required (a BLIP-2 folder or hub id to start from)"),
            (bool(self.data), "data is required (JSONL, CSV, image folder or tar shards)"),
            (self.steps >= 1 and self.batch_size >= 1 and self.grad_accum >= 1,
             "steps, batch_size and grad_accum must be >= 1"),
            (self.lr > 0 and 0 <= self.min_lr <= self.lr, "need lr > 0 and 0 <= min_lr <= lr"),
            (self.log_every >= 1 and self.save_every >= 1, "log_every and save_every must be >= 1"),
            (not (self.cache_features and self.augment), "cache_features needs augment off (cached features "
                                                         "would freeze one augmentation)"),
            (not (self.cache_features and self.stage == "1"), "cache_features is for stage 2+ (stage 1 "
                                                              "re-reads the ViT features each step anyway)"),
            (self.stage == "vqa" or not self.vqa_captions, "vqa_captions is for stage vqa (a finetune that "
                                                            "trains answers and captions)"),
            (self.stage != "1" or self.use_itc or self.use_itm or self.use_itg, "use_itc, use_itm and use_itg "
                                                                                 "are all off"),
        ]
        for ok, message in checks:
            if not ok:
                raise ConfigError(f"{where}: {message}")
        self._check_device(where)
        self.betas = tuple(self.betas)

    def _check_device(self, where: str) -> None:
        """A device torch cannot parse, or CUDA where there is none, fails here, not inside the run."""
        if self.device is None:
            return
        import torch

        try:
            device = torch.device(self.device)
        except (RuntimeError, ValueError, TypeError):
            raise ConfigError(f"{where}: device {self.device!r} is not a device; use cpu, cuda or cuda:N") from None
        if device.type not in ("cpu", "cuda"):
            raise ConfigError(f"{where}: device {self.device!r}: training runs on cpu or cuda")
        if device.type == "cuda" and not torch.cuda.is_available():
            raise ConfigError(f"{where}: device {self.device!r}: CUDA is not available on this machine")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


__all__ = ["TrainConfig", "STAGES", "PRECISIONS"]

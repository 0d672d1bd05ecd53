"""`blip2-fast train`: every TrainConfig field as a flag, a YAML file for the rest.

    blip2-fast train --stage 1 --model FOLDER --data train.jsonl --out runs/s1 --steps 2000
    blip2-fast train --config stage2.yaml --lr 5e-5          (flags override the file)
    torchrun --nproc-per-node 8 -m blip2_fast train --config stage1.yaml   (DDP)

Prints a summary of the run on stderr before the first step, and the last metrics on stdout at
the end. Stopped by SIGINT / SIGTERM, it saves a checkpoint after the current step and exits
with 130 / 143; `--resume auto` continues from there.
"""
from __future__ import annotations

import argparse
import dataclasses
import sys

from ..training.loop import train
from ..training.train_config import STAGES, TrainConfig

# one sentence per TrainConfig field; the default is appended from the dataclass
_HELP = {
    "stage": "what to train: 1 (ITC + ITM + ITG), 2 (LM / prefix-LM), caption or vqa finetuning",
    "model": "BLIP-2 folder or hub id to start from",
    "data": "JSONL / CSV files, image folders or tar shards (patterns like shards/{000..009}.tar)",
    "out": "output folder: checkpoints/, metrics.jsonl, vision_cache/ and the exported model/",
    "qformer_tokenizer": "BERT-style Q-Former tokenizer folder (default: <model>/qformer_tokenizer)",
    "resume": "checkpoint file or run folder to continue from; 'auto' resumes <out>/checkpoints/last.pt when "
              "present (previous.pt when last.pt is damaged) (default: none, a fresh start)",
    "steps": "optimiser steps of the whole run",
    "batch_size": "samples per process per micro-batch",
    "grad_accum": "micro-batches accumulated per optimiser step",
    "lr": "peak learning rate, reached after the warm-up",
    "min_lr": "learning rate at the end of the cosine decay",
    "warmup_steps": "steps of linear warm-up from --warmup-lr",
    "warmup_lr": "learning rate at the first warm-up step",
    "weight_decay": "AdamW weight decay (norms and biases get none)",
    "betas": "AdamW beta1 and beta2",
    "precision": "fp32, bf16 (autocast) or fp16 (autocast + loss scaling)",
    "grad_checkpointing": "recompute Q-Former activations (and the ViT's when trained) in the backward pass to "
                          "save memory",
    "max_grad_norm": "clip the gradient norm to this (default: no clipping)",
    "use_itc": "stage 1: train the image-text contrastive loss",
    "use_itm": "stage 1: train image-text matching with hard negatives",
    "use_itg": "stage 1: train image-grounded text generation",
    "prompt": "text before the target (default: 'a photo of' for caption, 'Question: {} Answer:' for vqa)",
    "unfreeze_vision": "caption finetuning: also train the vision encoder",
    "image_size": "image side the data is read at (default: the model's)",
    "vqa_qformer_question": "vqa: feed the question to the Q-Former beside the queries",
    "vqa_captions": "vqa: also train each record's caption behind an empty prompt",
    "load_in_8bit": "stage 2+: keep the frozen LLM's weights in int8",
    "max_text_length": "tokens per text; longer texts are truncated and counted",
    "augment": "random resized crops and flips (off for the world of shapes)",
    "hflip": "with --augment: flip images horizontally half of the time",
    "num_workers": "DataLoader worker processes (0: load in the training process)",
    "cache_features": "stage 2+: compute the frozen ViT's outputs once into <out>/vision_cache (needs augment off)",
    "seed": "seed of data order, augmentation, dropout and ITM negatives",
    "device": "cpu, cuda or cuda:N (default: cuda when available)",
    "distributed": "auto (DDP under torchrun), ddp, fsdp or none",
    "deterministic": "deterministic kernels where torch has them (slower)",
    "log_every": "steps between metrics.jsonl rows",
    "save_every": "steps between checkpoints (one is also saved at the end and when stopped by a signal)",
    "tensorboard": "also write TensorBoard event files (when tensorboard is installed)",
    "export": "write <out>/model, a transformers-format folder, at the end",
    "progress": "show a progress bar",
}


def _help(field: dataclasses.Field) -> str:
    text = _HELP[field.name]
    if field.default in ("", dataclasses.MISSING):  # model, data: the run needs them
        return f"{text} (required: no default)"
    if field.default is None or "default:" in text:
        return text
    default = field.default
    shown = ("on" if default else "off") if isinstance(default, bool) else \
        " ".join(map(str, default)) if isinstance(default, tuple) else default
    return f"{text} (default: {shown})"


def add_train_parser(sub) -> argparse.ArgumentParser:
    p = sub.add_parser("train", help="train: stage 1, stage 2, caption or VQA finetuning",
                       description="Train BLIP-2. Flags override the YAML config's fields.")
    p.add_argument("--config", help="YAML file of TrainConfig fields (default: none, flags only)")
    p.add_argument("--threads", type=int, help="CPU threads torch may use (default: torch's choice)")
    for f in dataclasses.fields(TrainConfig):
        flag = "--" + f.name.replace("_", "-")
        kw = {"dest": f.name, "default": argparse.SUPPRESS, "help": _help(f)}
        if isinstance(f.default, bool):
            p.add_argument(flag, action=argparse.BooleanOptionalAction, **kw)
        elif f.name == "data":
            p.add_argument(flag, nargs="+", **kw)
        elif f.name == "betas":
            p.add_argument(flag, nargs=2, type=float, **kw)
        elif f.name == "stage":
            p.add_argument(flag, choices=STAGES, **kw)
        elif f.name in ("max_grad_norm",):
            p.add_argument(flag, type=float, **kw)
        elif f.name == "image_size":
            p.add_argument(flag, type=int, **kw)
        else:
            kind = type(f.default) if f.default is not None and not callable(f.default_factory) else str
            p.add_argument(flag, type=kind if kind in (int, float) else str, **kw)
    return p


def print_summary(run: dict) -> None:
    """The run at a glance, on stderr, before its first step."""
    skipped = f"; {run['skipped_records']} skipped" if run["skipped_records"] else ""
    start = f"step {run['start']} from {run['resume']}" if run["resume"] else "none: a fresh start"
    batch = (f"{run['batch_size']} per process x {run['grad_accum']} accumulated x {run['world']} process(es) = "
             f"{run['global_batch']} samples per step")
    rows = [("stage", run["stage"]), ("model", run["model"]),
            ("data", f"{', '.join(run['data'])} ({run['records']} records{skipped})"),
            ("steps", f"{run['steps']} (checkpoint every {run['save_every']})"), ("batch", batch),
            ("precision", f"{run['precision']} on {run['device']}, lr {run['lr']:g}"
                          f"{', cached ViT features' if run['cache_features'] else ''}"),
            ("output", run["out"]), ("resume", start)]
    print("blip2-fast train\n" + "\n".join(f"  {name:<10} {value}" for name, value in rows), file=sys.stderr,
          flush=True)


def train_main(args: dict) -> int:
    path = args.pop("config", None)
    cfg = TrainConfig.from_yaml(path, args) if path else TrainConfig.from_dict(args, "flags")
    result = train(cfg, on_start=print_summary)
    last = result["last"]
    if last:
        parts = [f"{k} {v:.4f}" for k, v in last.items() if k.startswith("loss")]
        print(f"step {last['step']}: " + ", ".join(parts) + f"; {last['samples_per_s']:.1f} samples/s; "
              f"skipped {last['skipped_steps']} steps, {last['skipped_records']} records; "
              f"truncated {last['truncated_texts']} texts")
    if result["exported"]:
        print(f"model: {result['exported']}")
    if result["stopped"]:
        print(f"blip2-fast: stopped by {result['stopped']} after step {result['step']}; checkpoint "
              f"{result['checkpoint']}; continue with --resume auto", file=sys.stderr)
        return result["exit_code"]
    return 0


__all__ = ["add_train_parser", "train_main", "print_summary"]

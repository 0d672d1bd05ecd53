"""`blip2-fast train`: every TrainConfig field as a flag, a YAML file for the rest.

    blip2-fast train --stage 1 --model FOLDER --data train.jsonl --out runs/s1 --steps 2000
    blip2-fast train --config stage2.yaml --lr 5e-5          (flags override the file)
    torchrun --nproc-per-node 8 -m blip2_fast train --config stage1.yaml   (DDP)
"""
from __future__ import annotations

import argparse
import dataclasses
import logging
import sys

from ..training.loop import train
from ..training.train_config import STAGES, TrainConfig

_HELP = {
    "stage": "1 (ITC+ITM+ITG), 2 (LM / prefix-LM), caption or vqa finetuning",
    "model": "BLIP-2 folder or hub id to start from",
    "data": "JSONL / CSV files, image folders or tar shards (patterns like shards/{000..009}.tar)",
    "resume": "checkpoint file or run folder; 'auto' resumes <out>/checkpoints/last.pt when present",
    "precision": "fp32, bf16 (autocast) or fp16 (autocast + loss scaling)",
}


def add_train_parser(sub) -> argparse.ArgumentParser:
    p = sub.add_parser("train", help="train: stage 1, stage 2, caption or VQA finetuning",
                       description="Train BLIP-2. Flags override the YAML config's fields.")
    p.add_argument("--config", help="YAML file of TrainConfig fields")
    for f in dataclasses.fields(TrainConfig):
        flag = "--" + f.name.replace("_", "-")
        kw = {"dest": f.name, "default": argparse.SUPPRESS, "help": _HELP.get(f.name)}
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


def train_main(args: dict) -> int:
    path = args.pop("config", None)
    cfg = TrainConfig.from_yaml(path, args) if path else TrainConfig.from_dict(args, "flags")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", stream=sys.stderr)
    result = train(cfg)
    last = result["last"]
    if last:
        parts = [f"{k} {v:.4f}" for k, v in last.items() if k.startswith("loss")]
        print(f"step {last['step']}: " + ", ".join(parts) + f"; {last['samples_per_s']:.1f} samples/s; "
              f"skipped {last['skipped_steps']} steps, {last['skipped_records']} records; "
              f"truncated {last['truncated_texts']} texts")
    if result["exported"]:
        print(f"model: {result['exported']}")
    return 0


__all__ = ["add_train_parser", "train_main"]

"""The GPU suite's stage-1 training case: `bench/test_bench_train.py: run_case` on its GPU
stage-1 case (ViT-g + BERT-base Q-Former, batch 64, bf16 autocast) against the LAVIS-procedure
reference (bench/train_reference.py), samples/s and peak memory; its targets (>= 2x the
reference at <= 60% of its peak memory, on an H100) are the summary's, with the paper's implied
stage-1 rate per GPU beside them.
"""
from __future__ import annotations

import torch

from suite_support import Budget, Suite, bench_module


def run_train_stage1(suite: Suite, budget: Budget) -> None:
    tbt = bench_module("test_bench_train")
    case = tbt.GPU_CASES[0]
    assert case.stage == 1, case

    def run():
        row = tbt.run_case(case, rounds=3)
        tbt.record(row, suite.out_dir)
        print(tbt.summary(row), flush=True)
        return row
    row = budget.step(case.id, 60.0, run)
    if row is None:
        return
    t = tbt.TARGETS
    suite.add(f"stage-1 training step {case.id}: samples/s ours vs reference",
              f">= {t['min_ratio']}x the reference ({t['device']})",
              f"{row['ours']['samples_per_s']:.1f} vs {row['reference']['samples_per_s']:.1f} samples/s: "
              f"x{row['ratio']:.2f}", row["ratio"] >= t["min_ratio"])
    suite.add(f"stage-1 training step {case.id}: peak memory ours / reference",
              f"<= {t['max_memory_ratio']} of the reference's",
              f"{row['ours']['peak_memory_bytes'] / 2**30:.1f} vs {row['reference']['peak_memory_bytes'] / 2**30:.1f} GiB: "
              f"{row['memory_ratio']:.2f}", row["memory_ratio"] <= t["max_memory_ratio"])
    suite.add("stage-1 images/s per GPU vs the paper's implied rate", ">= 810 / 16 A100s = 50.6",
              f"{row['ours']['samples_per_s']:.1f}", row["ours"]["samples_per_s"] >= tbt.PAPER_IMAGES_PER_S / tbt.PAPER_GPUS)


# ----------------------------------------------------------------------------- dry run
def check_train_stage1() -> list[str]:
    tbt = bench_module("test_bench_train")
    from blip2_fast.training import Blip2Stage1
    case = tbt.GPU_CASES[0]
    cfg = tbt.bench_config(case)
    with torch.device("meta"):
        ours = Blip2Stage1(cfg, dec_token_id=cfg.qformer.vocab_size - 1)
        ref = tbt.Stage1Reference(cfg, cfg.qformer.vocab_size - 1)
    trainable = sum(p.numel() for p in ours.parameters() if p.requires_grad)
    return [f"{case.id}: ours {trainable / 1e6:.0f}M trainable parameters, reference built "
            f"({sum(p.numel() for p in ref.parameters()) / 1e9:.2f}B parameters); targets {tbt.TARGETS}"]

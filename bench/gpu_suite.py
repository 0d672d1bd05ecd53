"""Every GPU figure of blip2_fast in one call, within 8 minutes on one H100/H200.

    python -m bench.gpu_suite                 # on the GPU machine, from the repository root
    python -m bench.gpu_suite --dry-run       # anywhere: the plan, its budgets, and checks of every case
    python -m bench.gpu_suite --only qformer_attention,cross_attention

Cases, fastest and most important first, each with a time budget it respects (bench/
suite_support.py: a step whose estimate no longer fits is skipped with the rest of its case,
and the skip is recorded): the Q-Former's fused masked attention and the cross-attention
against SDPA / FlexAttention / flash-attn / xformers; int8 weight-only layers against bf16
(and bitsandbytes); the stage-1 training step against the eager LAVIS procedure; captioning at
the blip2-opt-2.7b and blip2-flan-t5-xl architectures against transformers (random weights,
bf16, greedy and beam 5); int8 decode against bf16; the peak memory of blip2-opt-6.7b with its
LLM in int8. bench/suite_kernels.py, suite_train.py, suite_caption.py and suite_memory.py say what each measures; they
run the pytest-benchmark suites' own code (bench/test_bench_*.py) wherever it measures the
figure already. Ours and the reference always run in the same process; every ratio is ours
against the reference (> 1: ours better).

Installs nothing. Written for the GPU image's torch 2.11, triton 3.6, transformers 5.17;
flash-attn, xformers and bitsandbytes are optional and skipped with the reason when missing.

Output: one JSON row per measurement (and per skipped or failed step) in
<out-dir>/<device>.jsonl through bench/harness.py (device, commit, versions in every row), and
the summary table (figure, target, value, met) on stdout and in <out-dir>/gpu_summary_<device>.md,
rewritten after every case. --out-dir defaults to $OUT when set (the device runner returns the
files written there), else bench/results.

Budgets and estimates are reasoned, not yet measured (no GPU run of the suite exists yet): the
estimates are what each case should take on an H100/H200, the budgets what it may take; their
sum, plus ~30 s of start-up, stays within 8 minutes. `--total-s` moves the global deadline,
`--scale` multiplies the budgets (for a run of fewer cases with `--only`).

On the device runner (a one-call session; the tree is copied without .git):
    BLIP2_FAST_COMMIT=<commit> PYTHONUNBUFFERED=1 python -m bench.gpu_suite     (timeout_s 540)
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from dataclasses import dataclass
from typing import Callable

START = time.monotonic()
BENCH_DIR = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, BENCH_DIR)  # harness and the suites' modules import as top-level modules

import suite_kernels as kernels  # noqa: E402
import suite_caption as caption  # noqa: E402
import suite_memory as memory  # noqa: E402
import suite_train as train  # noqa: E402
from suite_support import Budget, Suite, missing  # noqa: E402

TOTAL_S = 480.0  # 8 minutes
STARTUP_S = 30.0  # interpreter, torch / transformers imports, CUDA context, summary writing
OPTIONAL = ("flash_attn", "xformers", "bitsandbytes", "torch.nn.attention.flex_attention", "pynvml",
            "pytest", "pytest_benchmark")


@dataclass(frozen=True)
class Case:
    name: str
    figure: str
    estimate_s: float  # expected on an H100/H200 (reasoned: model writes, loads and compiles dominate)
    budget_s: float  # the most it may take
    check: Callable[[], list[str]]  # --dry-run: validate imports, configs and shapes without a GPU
    run: Callable[[Suite, Budget], None]


CASES = [
    Case("qformer_attention", "(a) Q-Former masked attention, 3 modes, fwd and fwd+bwd, B 256/32: ours vs SDPA+mask "
         "vs FlexAttention", 60, 85, kernels.check_qformer_attention, kernels.run_qformer_attention),
    Case("cross_attention", "(b) cross-attention 32 x 257/677 tokens, B 256/64: ours vs SDPA / flash-attn / xformers",
         15, 25, kernels.check_cross_attention, kernels.run_cross_attention),
    Case("int8_layers", "(d) int8 weight-only OPT-2.7B layers, M 1/16/128: ours vs bf16 F.linear / bitsandbytes",
         12, 20, kernels.check_int8_layers, kernels.run_int8_layers),
    Case("train_stage1", "(e) stage-1 training step, ViT-g + Q-Former, B 64, bf16: samples/s and peak memory vs "
         "the LAVIS procedure", 50, 65, train.check_train_stage1, train.run_train_stage1),
    Case("caption_opt", "(c) captioning blip2-opt-2.7b, bf16, greedy / beam 5, B 8/1/32: ours vs transformers",
         95, 110, lambda: caption.check_captioning("blip2-opt-2.7b"), caption.run_caption_opt),
    Case("int8_decode", "(d) decode tokens/s of OPT-2.7B, B 1/8: int8 weights vs bf16 (vs bitsandbytes)",
         30, 35, caption.check_int8_decode, caption.run_int8_decode),
    Case("memory_opt67b", "(f) peak memory of blip2-opt-6.7b with its LLM in int8 vs bf16 (load + caption)",
         25, 35, memory.check_memory_opt67b, memory.run_memory_opt67b),
    Case("caption_t5", "(c) captioning blip2-flan-t5-xl, bf16, greedy / beam 5, B 8/1/32: ours vs transformers",
         70, 75, lambda: caption.check_captioning("blip2-flan-t5-xl"), caption.run_caption_t5),
]


def select(only: str | None) -> list[Case]:
    if not only:
        return CASES
    names = [n.strip() for n in only.split(",") if n.strip()]
    unknown = [n for n in names if n not in {c.name for c in CASES}]
    if unknown:
        raise SystemExit(f"unknown case(s) {unknown}; known: {[c.name for c in CASES]}")
    return [c for c in CASES if c.name in names]


def dry_run(cases: list[Case], total_s: float) -> int:
    """Print the plan and run every case's check; 0 when all pass and the budgets fit."""
    print(f"{'#':>2}  {'case':<18} {'estimate_s':>10} {'budget_s':>8}  figure")
    for i, c in enumerate(cases, 1):
        print(f"{i:>2}  {c.name:<18} {c.estimate_s:>10.0f} {c.budget_s:>8.0f}  {c.figure}")
    budget = sum(c.budget_s for c in cases)
    estimate = sum(c.estimate_s for c in cases)
    fits = budget + STARTUP_S <= total_s
    print(f"total: estimate {estimate:.0f} s, budgets {budget:.0f} s + start-up {STARTUP_S:.0f} s "
          f"{'<=' if fits else '>'} {total_s:.0f} s")
    failed = 0 if fits else 1
    print("\nchecks (no GPU: configs built, models on the meta device, launch parameters validated):")
    for c in cases:
        start = time.monotonic()
        try:
            lines = c.check()
        except Exception as err:  # noqa: BLE001 - report every case's problem, then fail the run
            failed += 1
            print(f"  {c.name}: FAILED {type(err).__name__}: {err}")
            continue
        print(f"  {c.name}: ok ({time.monotonic() - start:.1f} s)")
        for line in lines:
            print(f"      {line}")
    print("\noptional libraries (missing ones are skipped with this reason on the GPU):")
    for name in OPTIONAL:
        print(f"  {name}: {missing(name) or 'importable'}")
    return 1 if failed else 0


def use_commit_from_env() -> str | None:
    """The commit every row records. The device runner copies the working tree without .git, so
    harness.git_commit() finds none there: BLIP2_FAST_COMMIT (e.g. `git rev-parse HEAD` plus
    "+dirty" when the tree has changes) then stands in, for the suites' rows too."""
    import harness

    found = harness.git_commit()
    given = os.environ.get("BLIP2_FAST_COMMIT", "").strip()
    if found is None and given:
        harness.git_commit = lambda: given  # append_result calls it for every row
        return given
    return found


def run(cases: list[Case], out_dir: str, total_s: float, scale: float) -> int:
    import torch

    import harness

    if not torch.cuda.is_available():
        print("no CUDA device: nothing to measure (python -m bench.gpu_suite --dry-run checks the plan)")
        return 2
    suite = Suite(out_dir, harness.device_info("cuda"), deadline=START + total_s - 5)
    commit = use_commit_from_env()
    print(f"device {suite.device}, versions {harness.versions()}, commit {commit}; rows -> {out_dir}")
    for name in OPTIONAL:
        print(f"  {name}: {missing(name) or 'importable'}")
    for c in cases:
        left = suite.deadline - time.monotonic()
        print(f"\n== {c.name} (budget {c.budget_s * scale:.0f} s, {left:.0f} s left in all): {c.figure}", flush=True)
        if left <= 0:
            suite.record_status(c.name, "all", "skipped", "the suite's deadline has passed")
            continue
        start = time.monotonic()
        try:
            c.run(suite, Budget(suite, c.name, c.budget_s * scale))
        except Exception as err:  # noqa: BLE001 - a case that breaks outside its steps: record, go on
            suite.record_status(c.name, "case", "failed", f"{type(err).__name__}: {err} "
                                f"(after {time.monotonic() - start:.1f} s)")
        else:
            suite.record_status(c.name, "case", "ok", f"took {time.monotonic() - start:.1f} s")
        print(f"summary -> {suite.write_summary()}", flush=True)
    print("\n" + suite.markdown())
    print(f"total {time.monotonic() - START:.0f} s")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dry-run", action="store_true", help="list the cases and check them; no GPU needed")
    parser.add_argument("--out-dir", default=os.environ.get("OUT") or os.path.join(BENCH_DIR, "results"),
                        help="folder for <device>.jsonl and gpu_summary_<device>.md (default: $OUT, else bench/results)")
    parser.add_argument("--only", default=None, help="comma-separated case names")
    parser.add_argument("--total-s", type=float, default=TOTAL_S, help="the whole suite's deadline (default 480)")
    parser.add_argument("--scale", type=float, default=1.0,
                        help="multiply every case's budget (e.g. --only qformer_attention --scale 4 gives FlexAttention's "
                             "compiles room); the deadline still holds")
    args = parser.parse_args(argv)
    cases = select(args.only)
    if args.dry_run:
        return dry_run(cases, args.total_s)
    if args.scale <= 0:
        parser.error("--scale must be positive")
    return run(cases, args.out_dir, args.total_s, args.scale)


if __name__ == "__main__":
    sys.exit(main())

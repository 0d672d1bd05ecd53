"""Training-step throughput and peak memory: our stage 1 and stage 2 against the eager reference.

One training step = forward, backward, AdamW step, zero_grad, on one batch of `batch` image-text
pairs; unit: samples/s (= images/s: one image per sample) and peak memory. Both sides in one
process, same weights, same batch, same optimiser (blip2_fast.training.optim.build_optimizer:
AdamW (0.9, 0.98), weight decay 0.05 on matrices, lr 1e-4) over the same trainable parameters.

- stage 1: ours `Blip2Stage1` (one forward gives ITC + ITM + ITG, image K/V shared, on-device
  hard negatives, fused masked attention) against `train_reference.Stage1Reference` (LAVIS'
  procedure on transformers' modules: separate ITC / ITM / ITG passes, a dense multimodal causal
  mask, per-pair image re-encoding, per-sample host multinomial); weights copied from ours.
- stage 2: ours `Blip2Stage2` against transformers' `Blip2ForConditionalGeneration(...,
  labels=...)` with the ViT and the LLM frozen; batch from `LMBatchBuilder` ("pretrain": LM
  loss on the caption), weights copied from ours.

What is compared (the first, untimed call, both sides in eval mode so that dropout is off):
stage 1 ITC and ITG losses, and ITM with the reference given *our* sampled negatives, each
within 1e-4 in fp32 (5e-2 relative in bf16), plus the relative difference of all trainable
gradients (asserted <= 1e-4 in fp32, recorded in bf16); stage 2 the LM loss, same bounds. That
step then takes an AdamW step on both sides (creating the optimiser state). In the timed steps
each side draws its own ITM negatives (ours on the device, the reference with LAVIS' host loop),
so their ITM losses differ by design. Attention-probability dropout is set to 0 on both sides:
our fused Q-Former attention applies none (blip2_fast/models/qformer.py stores
`attention_probs_dropout_prob` and never uses it) while transformers' would, so leaving it at
0.1 would time different work; hidden dropout stays at the config's 0.1 on both.

Timing (bench/harness.py conventions): the check call is untimed (`first_call_s`; on CUDA it also
runs our kernels' one-off autotuning); the next step of each side is the warm-up, run under
`harness.PeakMemory` and reported apart (`warmup_s`); then `rounds` rounds alternate reference
then ours (pytest-benchmark's `setup` hook runs the reference), each phase (forward, backward,
optimizer) clocked with the device synchronised before the clock is read. Medians of the step
times (sum of a round's phases) and of each phase are reported.

Memory: peak_memory_bytes = this side's resident bytes (weights + buffers + AdamW state) + the
step's peak above what was allocated when it began (activations, gradients, workspaces:
`peak_extra_bytes`), measured in the warm-up step, when the optimiser state already exists. On
CUDA torch.cuda.max_memory_allocated; on the CPU glibc's in-use bytes sampled every 0.5 ms
(`memory_kind`; may miss a spike shorter than that).

Cases: CPU "blip2-small" preset, fp32, batch 8 (stage 1: 32 Q-Former text tokens at most; stage 2:
32 LLM text tokens at most). CUDA (skip without a GPU): stage 1 with the blip2-itm-vit-g
architecture (ViT-g/14 + BERT-base Q-Former), batch 64, ViT frozen in bf16 and the Q-Former fp32
under bf16 autocast (how blip2_fast.training.tasks runs bf16); stage 2 with the blip2-opt-2.7b
architecture, random weights, ViT and OPT frozen in bf16, trained parts fp32 under autocast,
batch 64. Targets on an H100: stage 1 >= 2x the reference at <= 60% of its peak
memory; the paper's implied stage-1 rate is >= 810 images/s over 16 A100s, ~50.6 per GPU, printed
next to our images/s per GPU.

Row (bench/results/<device>.jsonl): bench "train", case, config, device, telemetry, memory_kind,
ours / reference {step_s, times_s, phases_s, samples_per_s, first_call_s, warmup_s,
trainable_params, weights_bytes, optimizer_state_bytes, peak_extra_bytes, peak_memory_bytes,
losses (the last timed step's)}, ratio (ours samples/s / reference's), memory_ratio (ours peak /
reference peak), parity, paper_images_per_s_per_gpu and targets (CUDA stage 1), load_avg (CPU:
1-minute load average, a shared machine's noise), rounds, quick.

    pytest bench/test_bench_train.py --benchmark-only -k stage1   (CPU: ~1 min per case on an idle 2-core
                                                                 machine at 3 rounds; minutes when loaded)
    python bench/test_bench_train.py --rounds 3 [--stage 1|2] [--no-record]
"""
from __future__ import annotations

import argparse
import contextlib
import gc
import os
import random
import sys
import time
from dataclasses import asdict, dataclass

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # script mode: harness, train_reference
import harness  # noqa: E402
from train_reference import LM_HEAD_KEYS, Stage1Reference, stage2_reference  # noqa: E402

if __name__ != "__main__":
    import pytest

    pytest.importorskip("pytest_benchmark")

PAPER_IMAGES_PER_S = 810.0  # >= 810 images/s over 16 A100s in stage 1 (the paper's figure)
PAPER_GPUS = 16
TARGETS = {"min_ratio": 2.0, "max_memory_ratio": 0.6, "device": "H100", "stage": 1}
LOSS_KEYS = ("loss", "loss_itc", "loss_itm", "loss_itg")
LR = 1e-4


@dataclass(frozen=True)
class Case:
    stage: int  # 1 or 2
    preset: str
    device: str
    dtype: str  # float32: all fp32; bfloat16: frozen parts in bf16, trained parts fp32 under bf16 autocast
    batch: int
    text_len: int  # most text tokens: stage 1 Q-Former tokens, stage 2 LLM tokens (max_length)
    std: float = 0.02  # random weights' scale

    @property
    def id(self) -> str:
        return f"stage{self.stage}-{self.preset}-{self.device}-{self.dtype}-b{self.batch}-t{self.text_len}"


CPU_CASES = [Case(1, "blip2-small", "cpu", "float32", 8, 32), Case(2, "blip2-small", "cpu", "float32", 8, 32)]
GPU_CASES = [Case(1, "blip2-itm-vit-g", "cuda", "bfloat16", 64, 32), Case(2, "blip2-opt-2.7b", "cuda", "bfloat16", 64, 32)]
GPU_SKIP = "needs a CUDA GPU (ViT-g / OPT-2.7B training steps in bf16)"


# ---------------------------------------------------------------------------- models and batches
def bench_config(case: Case):
    from blip2_fast.config import Blip2Config
    cfg = Blip2Config.from_name(case.preset)
    cfg.qformer.attention_probs_dropout_prob = 0.0  # ours applies none: see the module docstring
    if case.stage == 2:  # transformers' Blip2ForConditionalGeneration feeds no text to the Q-Former
        cfg.qformer.use_qformer_text_input = False
    return cfg


@torch.no_grad()
def randomize(model: torch.nn.Module, seed: int, std: float) -> torch.nn.Module:
    """blip2_fast.testing.randomize_'s rule (LayerNorm weights 1 + 0.1 N(0, 1), everything else
    std N(0, 1)), drawn on the parameters' device so a 3.8B model is not filled from the host."""
    gens = {}
    for name, p in model.named_parameters():
        gen = gens.setdefault(p.device, torch.Generator(p.device).manual_seed(seed))
        noise = torch.randn(p.shape, generator=gen, device=p.device, dtype=torch.float32)
        if name.endswith(("LayerNorm.weight", "layernorm.weight")) or ("layer_norm" in name and name.endswith("weight")):
            p.copy_(1 + 0.1 * noise)
        else:
            p.copy_(std * noise)
    return model


def stage1_pair(case: Case):
    from blip2_fast.training import Blip2Stage1
    cfg = bench_config(case)
    # blip2-itm-vit-g: [DEC] is the id appended to BERT's 30522 (30522); blip2-small's vocabulary
    # has no extra id, its last one stands in
    dec = cfg.qformer.vocab_size - 1
    with torch.device(case.device):
        ours = Blip2Stage1(cfg, dec_token_id=dec)
        ref = Stage1Reference(cfg, dec)
    randomize(ours, seed=0, std=case.std)
    with torch.no_grad():
        ours.temp.fill_(0.07)
    ref.load_from(ours)
    if case.dtype != "float32":  # frozen: no master weights, run in 16 bits (Stage1Task's rule)
        for m in (ours, ref):
            m.vision_model.to(getattr(torch, case.dtype))
    return ours, ref, cfg


def stage1_batch(case: Case, cfg) -> dict:
    g = torch.Generator().manual_seed(0)
    B, T, size = case.batch, case.text_len, cfg.vision.image_size
    pixels = torch.randn(B, 3, size, size, generator=g)
    lengths = torch.randint(max(2, T // 3), T + 1, (B,), generator=g)
    lengths[0] = T
    ids = torch.randint(1000, cfg.qformer.vocab_size - 2, (B, T), generator=g)
    ids[:, 0] = 101  # [CLS]
    mask = (torch.arange(T)[None] < lengths[:, None]).long()
    vision_dtype = torch.float32 if case.dtype == "float32" else getattr(torch, case.dtype)
    return {"pixel_values": pixels.to(case.device, vision_dtype), "input_ids": (ids * mask).to(case.device),
            "attention_mask": mask.to(case.device)}


def stage2_pair(case: Case):
    from blip2_fast.models.blip2 import Blip2ForConditionalGeneration
    from blip2_fast.training.stage2 import Blip2Stage2
    cfg = bench_config(case)
    with torch.device(case.device):
        net = Blip2ForConditionalGeneration(cfg)
    randomize(net, seed=0, std=case.std)
    net.tie_weights()
    if case.dtype != "float32":  # what Stage2Task loads: frozen ViT and LLM in 16 bits
        net.vision_model.to(getattr(torch, case.dtype))
        net.language_model.to(getattr(torch, case.dtype))
    ours = Blip2Stage2(net)  # trained parameters in fp32
    ref = stage2_reference(ours)
    return ours, ref, cfg


def stage2_batch(case: Case, cfg) -> dict:
    from blip2_fast.testing import WORDS, make_tokenizer
    from blip2_fast.training.text_batches import LMBatchBuilder
    rng = random.Random(0)
    texts = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(case.text_len // 3, case.text_len)))
             for _ in range(case.batch)]
    batch = LMBatchBuilder(make_tokenizer(), cfg, "pretrain", max_length=case.text_len)(texts)
    batch.pop("n_truncated")
    g = torch.Generator().manual_seed(0)
    size = cfg.vision.image_size
    pixels = torch.randn(case.batch, 3, size, size, generator=g)
    vision_dtype = torch.float32 if case.dtype == "float32" else getattr(torch, case.dtype)
    return {"pixel_values": pixels.to(case.device, vision_dtype), **{k: v.to(case.device) for k, v in batch.items()}}


# ---------------------------------------------------------------------------- one training step
class Side:
    """A module, its forward on the fixed batch and its optimiser; `step()` runs one training
    step with each phase on its own synchronised stopwatch."""

    def __init__(self, module, forward, named_params, case: Case):
        self.module, self.forward, self.case = module, forward, case
        self.named = [(n, p) for n, p in named_params if p.requires_grad]
        from blip2_fast.training.optim import build_optimizer
        self.optimizer = build_optimizer(self.named, LR)
        self.autocast_dtype = None if case.dtype == "float32" else getattr(torch, case.dtype)
        self.watches = {"forward": harness.Stopwatch(self._forward, case.device),
                        "backward": harness.Stopwatch(self._backward, case.device),
                        "optimizer": harness.Stopwatch(self._optimizer, case.device)}
        self._out, self.losses = None, {}

    def run_forward(self, **kw) -> dict:
        ctx = (contextlib.nullcontext() if self.autocast_dtype is None
               else torch.autocast(torch.device(self.case.device).type, dtype=self.autocast_dtype))
        with ctx:
            return self.forward(**kw)

    def _forward(self):
        self._out = self.run_forward()

    def _backward(self):
        out, self._out = self._out, None  # nothing of the forward outlives the backward (logits)
        self.losses = {k: out[k].detach() for k in LOSS_KEYS if k in out}
        loss = out["loss"]
        del out
        loss.backward()

    def _optimizer(self):
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)

    def step(self):
        for w in self.watches.values():
            w()

    def step_times(self, rounds: int) -> list[float]:
        phases = [w.measured(rounds) for w in self.watches.values()]
        return [sum(t) for t in zip(*phases)]

    def resident_bytes(self) -> tuple[int, int]:
        state = sum(t.numel() * t.element_size() for s in self.optimizer.state.values()
                    for t in s.values() if torch.is_tensor(t))
        return harness.weights_bytes(self.module), state


def sides(case: Case):
    """(ours, reference, cfg, batch) for a case."""
    if case.stage == 1:
        ours_m, ref_m, cfg = stage1_pair(case)
        batch = stage1_batch(case, cfg)
        gen = torch.Generator(case.device).manual_seed(0)
        ours = Side(ours_m, lambda **kw: ours_m(**batch, generator=gen, **kw), ours_m.named_parameters(), case)
        ref = Side(ref_m, lambda **kw: ref_m(**batch, **kw), ref_m.named_parameters(), case)
    else:
        ours_m, ref_m, cfg = stage2_pair(case)
        batch = stage2_batch(case, cfg)
        ours = Side(ours_m, lambda: ours_m(**batch), ours_m.trainable_parameters(), case)
        ref = Side(ref_m, lambda: {"loss": ref_m(**batch).loss}, ref_m.named_parameters(), case)
    return ours, ref, cfg, batch


# ---------------------------------------------------------------------------- the check call
def _grad_rel_diff(ours: Side, ref: Side, names: dict) -> float:
    """||g_ours - g_ref|| / ||g_ref|| over every trainable parameter (matched by name)."""
    ref_params = dict(ref.named)
    num = den = 0.0
    for n, p in ours.named:
        r = ref_params[names.get(n, n)]
        g, h = p.grad.float(), r.grad.float()
        num += float((g - h).pow(2).sum())
        den += float(h.pow(2).sum())
    return (num / max(den, 1e-30)) ** 0.5


def check_call(case: Case, ours: Side, ref: Side) -> dict:
    """Untimed first call of each side: same losses (and gradients), then one AdamW step each."""
    fp32 = case.dtype == "float32"
    for s in (ours, ref):
        s.module.eval()  # dropout off: both compute the same function
    t0 = time.perf_counter()
    o = ours.run_forward()
    o["loss"].backward()
    harness.synchronize(case.device)
    t1 = time.perf_counter()
    if case.stage == 1:  # ITM on our negatives: the reference is given them
        r = ref.run_forward(negatives=(o["neg_text_index"], o["neg_image_index"]))
    else:
        r = ref.run_forward()
    r["loss"].backward()
    harness.synchronize(case.device)
    t2 = time.perf_counter()

    keys = [k for k in LOSS_KEYS if k in o]
    parity = {"losses": {k: {"ours": float(o[k].detach()), "reference": float(r[k].detach()),
                             "abs_diff": abs(float(o[k].detach()) - float(r[k].detach()))}
                         for k in keys},
              "grad_rel_diff": _grad_rel_diff(ours, ref, LM_HEAD_KEYS if case.stage == 1 else {}),
              "loss_tolerance": "abs 1e-4 x max(1, |loss|)" if fp32 else "relative 5e-2",
              "grad_tolerance": "1e-4 relative (asserted)" if fp32 else "recorded, not asserted (bf16)",
              "itm": "compared with the reference given our sampled negatives; timed steps draw their own"
                     if case.stage == 1 else None}
    for k, v in parity["losses"].items():
        bound = 1e-4 * max(1.0, abs(v["reference"])) if fp32 else 5e-2 * max(1.0, abs(v["reference"]))
        assert v["abs_diff"] <= bound, f"{case.id}: {k} ours {v['ours']} vs reference {v['reference']}"
    if fp32:
        assert parity["grad_rel_diff"] <= 1e-4, f"{case.id}: gradients differ by {parity['grad_rel_diff']:.2e}"
    del o, r
    for s in (ours, ref):
        s._optimizer()  # first AdamW step: allocates its state before memory is measured
        s.module.train()
    harness.synchronize(case.device)
    ours.first_call_s, ref.first_call_s = t1 - t0, t2 - t1
    return parity


# ---------------------------------------------------------------------------- a case
def side_row(s: Side, case: Case, rounds: int, mem: harness.PeakMemory, warmup_s: float) -> dict:
    times = s.step_times(rounds)
    step = harness.median(times)
    weights, state = s.resident_bytes()
    return {"step_s": step, "times_s": times,
            "phases_s": {k: harness.median(w.measured(rounds)) for k, w in s.watches.items()},
            "samples_per_s": case.batch / step, "first_call_s": s.first_call_s, "warmup_s": warmup_s,
            "trainable_params": sum(p.numel() for _, p in s.named), "weights_bytes": weights,
            "optimizer_state_bytes": state, "peak_extra_bytes": mem.peak_extra_bytes,
            "peak_memory_bytes": weights + state + mem.peak_extra_bytes,
            "losses": {k: float(v) for k, v in s.losses.items()}}


def run_case(case: Case, rounds: int, benchmark=None, quick: bool = False) -> dict:
    """Build both sides, check, warm up under PeakMemory, time `rounds` alternating rounds;
    returns the result row. With `benchmark` (pytest-benchmark) it drives the timed rounds."""
    torch.manual_seed(0)
    ours, ref, cfg, _ = sides(case)
    parity = check_call(case, ours, ref)

    mems, warm = {}, {}
    for name, s in (("reference", ref), ("ours", ours)):  # warm-up step, untimed, memory
        with harness.PeakMemory(case.device) as mems[name]:
            t = time.perf_counter()
            s.step()
            harness.synchronize(case.device)
            warm[name] = time.perf_counter() - t

    if benchmark is not None:
        benchmark.pedantic(ours.step, setup=ref.step, rounds=rounds, warmup_rounds=0)
    else:
        for _ in range(rounds):
            ref.step()
            ours.step()
    cuda = torch.device(case.device).type == "cuda"
    telemetry = harness.gpu_telemetry(torch.device(case.device).index or 0) if cuda else None

    r_ours = side_row(ours, case, rounds, mems["ours"], warm["ours"])
    r_ref = side_row(ref, case, rounds, mems["reference"], warm["reference"])
    row = {"bench": "train", "case": case.id, "config": asdict(case), "device": harness.device_info(case.device),
           "telemetry": telemetry, "memory_kind": mems["ours"].kind, "ours": r_ours, "reference": r_ref,
           "reference_impl": "LAVIS stage 1 on transformers modules (bench/train_reference.py)" if case.stage == 1
           else "transformers Blip2ForConditionalGeneration(labels=...), ViT and LLM frozen",
           "ratio": r_ours["samples_per_s"] / r_ref["samples_per_s"],
           "memory_ratio": r_ours["peak_memory_bytes"] / r_ref["peak_memory_bytes"],
           "parity": parity, "rounds": rounds, "quick": quick,
           "load_avg": None if cuda else os.getloadavg()[0]}
    if cuda:
        row["images_per_s_per_gpu"] = r_ours["samples_per_s"]
        row["paper_images_per_s_per_gpu"] = PAPER_IMAGES_PER_S / PAPER_GPUS
        if case.stage == 1:
            row["targets"] = {**TARGETS, "met": row["ratio"] >= TARGETS["min_ratio"]
                              and row["memory_ratio"] <= TARGETS["max_memory_ratio"]}
    del ours, ref
    gc.collect()
    if cuda:
        torch.cuda.empty_cache()
    return row


def summary(row: dict) -> str:
    o, r = row["ours"], row["reference"]
    mb = 2 ** 20
    line = (f"{row['case']}: ours {o['samples_per_s']:.2f} samples/s, reference {r['samples_per_s']:.2f} samples/s, "
            f"ratio {row['ratio']:.2f}; peak memory ours {o['peak_memory_bytes'] / mb:.0f} MB "
            f"(extra {o['peak_extra_bytes'] / mb:.0f}) / reference {r['peak_memory_bytes'] / mb:.0f} MB "
            f"(extra {r['peak_extra_bytes'] / mb:.0f}), memory ratio {row['memory_ratio']:.2f}")
    if "images_per_s_per_gpu" in row:
        line += (f"; {row['images_per_s_per_gpu']:.1f} images/s per GPU (paper, stage 1: >= 810 over 16 A100s, "
                 f"~{row['paper_images_per_s_per_gpu']:.1f} per GPU)")
    return line


def record(row: dict, results_dir: str | None) -> str:
    return harness.append_result(row, results_dir)


# ---------------------------------------------------------------------------- pytest
if __name__ != "__main__":
    NEEDS_GPU = pytest.mark.skipif(not torch.cuda.is_available(), reason=GPU_SKIP)
    CASES = [pytest.param(c, id=c.id) for c in CPU_CASES] + [pytest.param(c, id=c.id, marks=NEEDS_GPU)
                                                             for c in GPU_CASES]

    @pytest.mark.parametrize("case", CASES)
    def test_train_step(benchmark, bench_options, case: Case):
        row = run_case(case, bench_options["rounds"], benchmark, bench_options["quick"])
        benchmark.extra_info.update({k: v for k, v in row.items() if k not in ("device", "config")})
        if bench_options["record"]:
            record(row, bench_options["results_dir"])
        print("\n" + summary(row))


# ---------------------------------------------------------------------------- script
def table(rows: list[dict]) -> str:
    head = ("case", "ours samples/s", "ref samples/s", "ratio", "ours peak MB", "ref peak MB", "mem ratio",
            "img/s/GPU (paper ~50.6)")
    lines = [head]
    for row in rows:
        o, r = row["ours"], row["reference"]
        lines.append((row["case"], f"{o['samples_per_s']:.2f}", f"{r['samples_per_s']:.2f}", f"{row['ratio']:.2f}",
                      f"{o['peak_memory_bytes'] / 2**20:.0f}", f"{r['peak_memory_bytes'] / 2**20:.0f}",
                      f"{row['memory_ratio']:.2f}",
                      f"{row['images_per_s_per_gpu']:.1f}" if "images_per_s_per_gpu" in row else "-"))
    widths = [max(len(line[i]) for line in lines) for i in range(len(head))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(line, widths)) for line in lines)


def main(rounds: int = 3, stage: str = "all", device: str = "all", record_rows: bool = True,
         results_dir: str | None = None) -> list[dict]:
    if rounds < 1:
        raise ValueError(f"rounds must be >= 1, got {rounds}")
    cases = [c for c in CPU_CASES + GPU_CASES if stage in ("all", str(c.stage)) and device in ("all", c.device)]
    rows = []
    for case in cases:
        if case.device == "cuda" and not torch.cuda.is_available():
            print(f"{case.id}: skipped, {GPU_SKIP}")
            continue
        row = run_case(case, rounds)
        rows.append(row)
        if record_rows:
            record(row, results_dir)
        print(summary(row), flush=True)
    if rows:
        print("\n" + table(rows))
    return rows


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--rounds", type=int, default=3, help="timed rounds per side (default 3)")
    parser.add_argument("--stage", choices=("1", "2", "all"), default="all")
    parser.add_argument("--device", choices=("cpu", "cuda", "all"), default="all")
    parser.add_argument("--no-record", action="store_true", help="do not append result rows")
    parser.add_argument("--results-dir", default=None, help="folder for <device>.jsonl rows (default bench/results)")
    args = parser.parse_args()
    main(args.rounds, args.stage, args.device, not args.no_record, args.results_dir)

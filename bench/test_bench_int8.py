"""int8 weight-only GEMV / GEMM microbenchmarks (kernels/int8_matmul.py), same inputs, same run.

CPU (always): for OPT-2.7B-like layers (N x K) and M activation rows, in fp32 activations:
  fp32         F.linear with fp32 weights: the baseline every ratio is against
  ours         int8_linear (the dispatcher: native GEMV/GEMM, torch int8pack or dequant, timed)
  native_gemv  the C library's GEMV kernel;  native_gemm  its packed GEMM (M > 4 only)
  torch_int8   dequantise-and-matmul (always available)
plus bf16 activations at M = 1 (baseline bf16 F.linear; torch_int8pack is torch._weight_int8pack_mm)
and "cold" M = 1 cases that cycle through enough weight copies to overflow the last-level
cache, as a decode step through many layers does (the hot cases keep one layer in cache).
CUDA (when present): bf16 F.linear against ours (Triton split-K / GEMM) and bitsandbytes'
Linear8bitLt (LLM.int8(), when installed), M = 1, 16, 128.

Reported in benchmark.extra_info: us per call (median of rounds), GB/s of weight bytes read
(int8: N*K + scales; fp32 4*N*K; bf16 2*N*K), baseline_us and ratio = baseline time / this
time (> 1: faster than the dense baseline). The baseline round is timed in pytest-benchmark's
(untimed) setup of every round, so the two alternate and share the machine's state; on a shared
CPU compare rows of one run only. Rows go to bench/results/<device>.jsonl through bench/harness.py
when it is present (it is optional here).

`python bench/test_bench_int8.py [--threads 1 2] [--rounds 15]` prints the table recorded in
bench/results/int8_matmul_cpu.md (min over interleaved rounds, per thread count).
"""
from __future__ import annotations

import argparse
import importlib
import math
import statistics
import time
from dataclasses import dataclass

import pytest
import torch
import torch.nn.functional as F

from blip2_fast.kernels import dispatch, native
from blip2_fast.kernels import int8_matmul as im

CUDA = torch.cuda.is_available()
LAYERS = {"512x2048": (512, 2048), "qkv-2560x2560": (2560, 2560), "fc1-10240x2560": (10240, 2560),
          "fc2-2560x10240": (2560, 10240)}
CPU_MS = [1, 4, 40, 128]  # decode, 4 beams, 32 queries + a short prompt, a longer prefill
LLC_BYTES = 128 << 20  # cold cases cycle through copies totalling at least this much
ROUND_SECONDS = 0.02

try:
    harness = importlib.import_module("harness")  # bench/harness.py (result rows), optional
except ImportError:
    harness = None


@dataclass(frozen=True)
class Case:
    layer: str
    m: int
    dtype: torch.dtype = torch.float32
    cold: bool = False

    @property
    def id(self) -> str:
        return f"{self.layer}-m{self.m}-{str(self.dtype)[6:]}{'-cold' if self.cold else ''}"


CPU_CASES = ([Case(layer, m) for layer in LAYERS for m in CPU_MS]
             + [Case(layer, 1, torch.bfloat16) for layer in LAYERS]
             + [Case("fc2-2560x10240", 1, cold=True), Case("fc1-10240x2560", 1, cold=True)])
CPU_IMPLS = ["ours", "native_gemv", "native_gemm", "torch_int8", "torch_int8pack"]
GPU_CASES = [Case(layer, m, torch.bfloat16) for layer in LAYERS for m in (1, 16, 128)]
GPU_IMPLS = ["ours", "triton_gemm", "bnb"]


def _copies(nbytes: int, cold: bool) -> int:
    return max(1, math.ceil(LLC_BYTES / nbytes)) if cold else 1


def make_layer(case: Case, device: str):
    """Weights (copies for cold cases), activations, and the dense baseline's weights."""
    n, k = LAYERS[case.layer]
    g = torch.Generator().manual_seed(0)
    w = (torch.randn(n, k, generator=g) / math.sqrt(k))
    q, s = im.quantize_weight(w, None)
    x = torch.randn(case.m, k, generator=g).to(case.dtype).to(device)
    dense_dtype = case.dtype
    dense = [w.to(dense_dtype).to(device) for _ in range(_copies(w.numel() * w.element_size(), case.cold))]
    quant = [(q.clone().to(device), s.clone().to(device)) for _ in range(_copies(q.numel(), case.cold))]
    return x, dense, quant


def cycler(items):
    state = {"i": 0}

    def nxt():
        item = items[state["i"] % len(items)]
        state["i"] += 1
        return item
    return nxt


def implementation(name: str, case: Case, x, quant):
    """A zero-argument callable running one layer, or a string saying why it cannot run."""
    nxt = cycler(quant)
    if name == "ours":
        return lambda: im.int8_linear(x, *nxt())
    if name.startswith("native_"):
        algo = name.split("_")[1]
        if native.load() is None:
            return f"native library unavailable: {native.unavailable_reason()}"
        if algo == "gemm" and case.m <= im.GEMV_ONLY_M:
            return f"M = {case.m}: the GEMM is not used for decode shapes"
        return lambda: im.int8_linear_native(x, *nxt(), algo=algo)
    if name == "torch_int8":
        return lambda: im.int8_linear_dequant(x, *nxt())
    if name == "torch_int8pack":
        reasons = dict(im.int8_linear_backends(x, *quant[0]))["torch:int8pack"]
        return "; ".join(reasons) if reasons else (lambda: im.int8_linear_int8pack(x, *nxt()))
    if name == "triton_gemm":
        return lambda: im.int8_linear_triton_gemm(x, *nxt())
    if name == "bnb":
        try:
            import bitsandbytes as bnb
        except ImportError:
            return "bitsandbytes is not installed (pip install 'blip2_fast[int8]')"
        n, k = LAYERS[case.layer]
        lin = torch.nn.Linear(k, n, bias=False, dtype=torch.float16)
        mod = bnb.nn.Linear8bitLt(k, n, bias=False, has_fp16_weights=False, threshold=6.0)
        mod.weight = bnb.nn.Int8Params(lin.weight.data, requires_grad=False, has_fp16_weights=False)
        mod = mod.cuda()
        xh = x.to(torch.float16)
        return lambda: mod(xh)
    raise ValueError(name)


def sync(device):
    if device == "cuda":
        torch.cuda.synchronize()


def calls_per_round(fn, device) -> int:
    sync(device)
    t0 = time.perf_counter()
    fn()
    sync(device)
    return max(1, min(1000, math.ceil(ROUND_SECONDS / max(time.perf_counter() - t0, 1e-7))))


def timed_round(fn, n, device) -> float:
    sync(device)
    t0 = time.perf_counter()
    for _ in range(n):
        fn()
    sync(device)
    return (time.perf_counter() - t0) / n


def weight_bytes(case: Case, kind: str) -> int:
    n, k = LAYERS[case.layer]
    if kind == "dense":
        return n * k * torch.finfo(case.dtype).bits // 8
    return n * k + 4 * n  # int8 codes + float32 scales


def run_case(benchmark, options: dict, case: Case, impl: str, device: str):
    with torch.no_grad():
        x, dense, quant = make_layer(case, device)
        fn = implementation(impl, case, x, quant)
        if isinstance(fn, str):
            pytest.skip(f"{impl}: {fn}")
        nd = cycler(dense)
        base = lambda: F.linear(x, nd())  # noqa: E731
        for f in (fn, base):  # untimed first calls: library load, CPU backend timing, compile
            for _ in range(2):
                f()
        n, nb = calls_per_round(fn, device), calls_per_round(base, device)
        base_times = []

        def setup():  # pytest-benchmark does not time setup: the baseline round goes here
            base_times.append(timed_round(base, nb, device))

        def round_of_calls():
            for _ in range(n):
                fn()
            sync(device)

        benchmark.group = case.id
        benchmark.pedantic(round_of_calls, setup=setup, rounds=options["rounds"],
                           warmup_rounds=options["warmup_rounds"])
        if benchmark.stats is not None:
            seconds = benchmark.stats.stats.median / n
        else:  # --benchmark-disable
            seconds = timed_round(fn, n, device)
            setup()
    base_s = statistics.median(base_times)
    row = {"bench": "int8", "case": case.id, "impl": impl, "m": case.m, "layer": case.layer,
           "dtype": str(case.dtype), "cold": case.cold, "us": seconds * 1e6,
           "gbps": weight_bytes(case, "int8") / seconds / 1e9, "baseline_us": base_s * 1e6,
           "baseline_gbps": weight_bytes(case, "dense") / base_s / 1e9, "ratio": base_s / seconds,
           "threads": torch.get_num_threads(), "calls_per_round": n, "rounds": options["rounds"],
           "chosen": dispatch.explain("int8_linear").get("chosen") if impl == "ours" else impl,
           "quick": options["quick"]}
    benchmark.extra_info.update(row)
    if harness is not None and options["record"]:
        harness.append_result({**row, "device": harness.device_info(device)}, options["results_dir"])
    print(f"\n{case.id} {impl}: {row['us']:.0f} us, {row['gbps']:.1f} GB/s, x{row['ratio']:.2f} vs dense "
          f"({row['baseline_us']:.0f} us)")


@pytest.fixture
def options(request) -> dict:
    try:
        return request.getfixturevalue("bench_options")  # bench/conftest.py
    except pytest.FixtureLookupError:
        return {"quick": False, "rounds": 3, "warmup_rounds": 1, "record": False, "results_dir": None}


@pytest.fixture(autouse=True)
def _fresh_decisions():
    dispatch.clear_decisions("int8_linear")
    yield


@pytest.mark.parametrize("impl", CPU_IMPLS)
@pytest.mark.parametrize("case", CPU_CASES, ids=lambda c: c.id)
def test_cpu_int8(benchmark, options, case, impl):
    run_case(benchmark, options, case, impl, "cpu")


@pytest.mark.skipif(not CUDA, reason="GPU int8 kernels are benchmarked on CUDA only")
@pytest.mark.parametrize("impl", GPU_IMPLS)
@pytest.mark.parametrize("case", GPU_CASES, ids=lambda c: c.id)
def test_gpu_int8(benchmark, options, case, impl):
    run_case(benchmark, options, case, impl, "cuda")


# ------------------------------------------------------------------------------------ table

def table(threads: list[int], rounds: int, layers: list[str], ms: list[int]) -> None:
    """Min over interleaved rounds (one call of each implementation per round): on a shared
    machine the minimum is the least disturbed run of each."""
    for nt in threads:
        torch.set_num_threads(nt)
        for layer in layers:
            for m in ms:
                for cold in ([False, True] if m == 1 else [False]):
                    case = Case(layer, m, cold=cold)
                    with torch.no_grad():
                        x, dense, quant = make_layer(case, "cpu")
                        nd = cycler(dense)
                        fns = {"fp32": lambda: F.linear(x, nd())}
                        for name in ("native_gemv", "native_gemm", "torch_int8"):
                            fn = implementation(name, case, x, quant)
                            if not isinstance(fn, str) and not (name == "torch_int8" and m > 4):
                                fns[name] = fn
                        best = {k: float("inf") for k in fns}
                        for f in fns.values():
                            f()
                        for _ in range(rounds):
                            for k, f in fns.items():
                                t0 = time.perf_counter()
                                f()
                                best[k] = min(best[k], time.perf_counter() - t0)
                    n, k = LAYERS[layer]
                    native_best = min(v for kk, v in best.items() if kk.startswith("native"))
                    cells = " ".join(f"{kk} {v * 1e6:.0f} us" for kk, v in best.items())
                    print(f"threads={nt} {case.id}: {cells} | int8 native {n * k / native_best / 1e9:.1f} GB/s, "
                          f"fp32 {4 * n * k / best['fp32'] / 1e9:.1f} GB/s, x{best['fp32'] / native_best:.2f}",
                          flush=True)


def main(threads: list[int], rounds: int, layers: list[str], ms: list[int]) -> None:
    print(f"torch {torch.__version__}, native {native.info().get('best_isa')}, cpu threads {threads}")
    table(threads, rounds, layers, ms)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--layers", nargs="+", default=["512x2048", "fc2-2560x10240"], choices=list(LAYERS))
    parser.add_argument("--m", type=int, nargs="+", default=[1, 4, 40])
    args = parser.parse_args()
    main(args.threads, args.rounds, args.layers, args.m)

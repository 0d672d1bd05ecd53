"""Ahead-of-time compile of every Triton kernel configuration the dispatch can choose, for sm_80
(A100) and sm_90 (H100/H200), on a machine without a GPU.

What is compiled. The launchers' own choice functions decide the configurations
(`qformer_attention.launch_config`, `int8_matmul.gemm_config` / `splitk_config` /
`splitk_reduce_config`); this file sweeps their inputs over the whole domain the dispatch lets
through and keeps each distinct result:
  * Q-Former attention, forward and backward: fp16, bf16, fp32 (fp32 dots in IEEE precision and,
    when torch allows TF32, in TF32); head dims 1..128; sequence lengths crossing every
    power-of-two boundary up to 4096; the call sites qformer_attention (self-attention: Lq == Lk,
    the three modes, with and without padding) and cross_attention (bidirectional, no padding,
    any Lq and Lk; it has no Triton kernel of its own, it launches these two);
  * int8 GEMM (any M), split-K GEMV (M <= 16) and the split-K reduction: fp32, bf16, fp16
    activations, per-channel scales and every group size the Triton backends accept, with and
    without bias.
HEAD_DIM and GROUP_SIZE are constexprs too, so every head dim or group size is in principle its
own binary; each configuration is compiled once, with the largest head dim that maps to its
BLOCK_D (the most live data) and the smallest group size that maps to its BLOCK_K.

How. `triton.compile(ASTSource(...), target=GPUTarget("cuda", arch, 32))` with the signature,
constexprs and argument specialisation that Triton's own launcher computes for representative
arguments (pointer arguments are 16-byte aligned, as torch allocations are; strides of
contiguous BLIP-2-sized tensors), in subprocesses without TRITON_INTERPRET (the interpreter
replaces triton.jit), one per architecture, in a fresh Triton cache. Triton's bundled ptxas
prints registers, stack frame and spills (TRITON_DUMP_PTXAS_LOG=1); Triton's metadata gives the
shared memory the launch will request.

Fails on: a compile error; shared memory above the architecture's per-block opt-in limit
(sm_80 163 KB, sm_90 227 KB); more than 255 registers per thread, or a block needing more
registers than one SM has (65536). Spills are reported, not failed.

Run time: the full set is 491 configurations x 2 architectures; the fp32 IEEE-precision ones
(FMA dots) spill tens of KB and take 10-40 s each to compile, and the whole took ~53 minutes on a
shared, loaded 2-core machine. So by default (CI) the test compiles every *tile configuration*
(kernel, dtype, dot precision, BLOCK_*, num_warps, num_stages: what sets shared memory and
registers), each in its heaviest reachable mode/padding variant, except fp16 (the same tiles
and sizes as bf16) and fp32 IEEE with a 64-wide tile or in the int8 GEMM; plus every mode x
padding variant of the binaries the BLIP-2 models run (bf16, head dim 64, 32x32 and 32x64
tiles): 110 configurations x 2, ~3 minutes on two cores. BLIP2_FAST_AOT_FULL=1 compiles all of
them (bench/results/aot_compile.md is that run's table).
`pytest -s` prints the table; BLIP2_FAST_AOT_TABLE=path also writes it as markdown.
"""
from __future__ import annotations

import functools
import itertools
import json
import os
import subprocess
import sys
from dataclasses import dataclass, field

import torch

if __name__ != "__main__":
    import pytest

import blip2_fast.kernels.int8_matmul as im
import blip2_fast.kernels.qformer_attention as qa

ARCHS = (80, 90)
SHARED_LIMIT = {80: 163 * 1024, 90: 227 * 1024}  # per-block opt-in maximum (CUDA programming guide)
MAX_REGS_PER_THREAD = 255
REGS_PER_SM = 65536
FULL = os.environ.get("BLIP2_FAST_AOT_FULL") == "1"
# every power of two up to 4096 and its neighbours: crosses any power-of-two threshold of a choice function
LENGTHS = sorted({max(1, (1 << i) + d) for i in range(13) for d in (-1, 0, 1)})
BLIP2_HEAD_DIM = 64
BLIP2_TILES = ((32, 32), (32, 64))  # stage 1's 32 + 32 tokens; 32 queries x 257 image tokens
DTYPE_NAMES = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32"}


@dataclass(frozen=True)
class KernelConfig:
    """One binary: a kernel, its activation dtype, its constexprs and launch options."""
    kernel: str  # attribute name in its module
    module: str  # "qformer_attention" | "int8_matmul"
    dtype: str  # fp16 | bf16 | fp32 (activations / q, k, v)
    meta: tuple  # sorted (name, value) pairs: constexprs and num_warps / num_stages
    why: str = field(default="", compare=False)  # the call site that picks it

    @property
    def id(self) -> str:
        short = {"_qformer_attn_fwd_kernel": "attn_fwd", "_qformer_attn_bwd_kernel": "attn_bwd",
                 "_int8_gemm_kernel": "int8_gemm", "_int8_splitk_kernel": "int8_splitk",
                 "_int8_splitk_reduce_kernel": "int8_reduce"}[self.kernel]
        m = dict(self.meta)
        parts = [short, self.dtype]
        for name, label in (("MODE", ""), ("HAS_PAD", "pad"), ("PRECISION", ""), ("INPUT_PRECISION", ""),
                            ("HEAD_DIM", "d"), ("BLOCK_M", "m"), ("BLOCK_N", "n"), ("BLOCK_K", "k"),
                            ("GROUP_SIZE", "g"), ("HAS_BIAS", "bias"), ("PER_CHANNEL", "perchan"),
                            ("num_warps", "w"), ("num_stages", "s")):
            if name not in m:
                continue
            value = m[name]
            if name == "MODE":
                parts.append(qa.MODES[value])
            elif isinstance(value, bool):
                if value:
                    parts.append(label)
            elif name in ("PRECISION", "INPUT_PRECISION"):
                if self.dtype == "fp32":
                    parts.append(value)
            else:
                parts.append(f"{label}{value}")
        return "-".join(parts)


# ----------------------------------------------------------------------------- enumeration
def _attention_calls():
    """(dtype, lq, lk, head_dim, mode_id, has_pad, allow_tf32, site) for every shape class the
    dispatch sends to the Triton attention kernels."""
    bidirectional = qa.MODES.index("bidirectional")
    variants = list(itertools.product(range(len(qa.MODES)), (False, True)))
    pairs = list(itertools.product(LENGTHS, LENGTHS))
    for dtype, tf32 in itertools.product(qa._TRITON_DTYPES, (False, True)):
        for head_dim in range(1, qa._MAX_TRITON_HEAD_DIM + 1):
            for length in LENGTHS:  # qformer_attention: self-attention, every mode, padding or not
                for mode_id, has_pad in variants:
                    yield dtype, length, length, head_dim, mode_id, has_pad, tf32, "qformer_attention"
            for lq, lk in pairs:  # cross_attention: no mask, any lengths
                yield dtype, lq, lk, head_dim, bidirectional, False, tf32, "cross_attention"


def attention_configs() -> list[KernelConfig]:
    """Distinct (dtype, launch_config without HEAD_DIM), each for the forward and the backward
    kernel; HEAD_DIM = the largest head dim that maps to it."""
    best = {}  # (dtype, meta without HEAD_DIM) -> (head_dim, site)
    for dtype, lq, lk, head_dim, mode_id, has_pad, tf32, site in _attention_calls():
        meta = qa.launch_config(dtype, lq, lk, head_dim, mode_id, has_pad, allow_tf32=tf32)
        del meta["HEAD_DIM"]
        key = (dtype, tuple(meta.items()))
        if key not in best or head_dim > best[key][0]:
            best[key] = (head_dim, site)
    out = []
    for (dtype, items), (head_dim, site) in best.items():
        meta = tuple(sorted(dict(items, HEAD_DIM=head_dim).items()))
        for kernel in ("_qformer_attn_fwd_kernel", "_qformer_attn_bwd_kernel"):
            out.append(KernelConfig(kernel, "qformer_attention", DTYPE_NAMES[dtype], meta, site))
    return out


def _group_sizes():
    """0 (per-channel scales) and every group size the Triton backends accept up to 4096."""
    return [0] + list(range(16, 4097, 16))


def int8_configs() -> list[KernelConfig]:
    """Distinct configurations of the three int8 kernels; GROUP_SIZE = the smallest group size
    (0 for per channel) that maps to each."""
    found = {}
    for dtype in im.FLOAT_DTYPES:
        name = DTYPE_NAMES[dtype]
        for group in _group_sizes():
            for has_bias in (False, True):
                for m in LENGTHS:  # any M: prefill and batched decode
                    meta = im.gemm_config(dtype, m, group, has_bias, on_gpu=True)
                    _keep_group(found, "_int8_gemm_kernel", name, meta, group, "int8_linear triton:gemm")
                reduce = im.splitk_reduce_config(group, has_bias, on_gpu=True)
                _keep_group(found, "_int8_splitk_reduce_kernel", name, reduce, group, "int8_linear triton:splitk")
            meta = im.splitk_config(dtype, group, on_gpu=True)
            _keep_group(found, "_int8_splitk_kernel", name, meta, group, "int8_linear triton:splitk")
    return [config for _, config in found.values()]


def _keep_group(found, kernel, dtype, meta, group, site):
    """Keep the smallest group size per configuration (GROUP_SIZE itself aside, and apart from
    whether there are groups at all: per-channel scales take another code path)."""
    key_meta = tuple(sorted((k, v) for k, v in meta.items() if k != "GROUP_SIZE"))
    key = KernelConfig(kernel, "int8_matmul", dtype, key_meta + (("grouped", group > 0),))
    if key not in found or group < found[key][0]:
        full = tuple(sorted(dict(meta, GROUP_SIZE=group).items())) if "GROUP_SIZE" in meta else tuple(sorted(meta.items()))
        found[key] = (group, KernelConfig(kernel, "int8_matmul", dtype, full, site))


@functools.lru_cache(maxsize=1)
def all_configs() -> tuple[KernelConfig, ...]:
    """Every configuration, enumerated once per process (the sweep takes a few seconds)."""
    return tuple(attention_configs() + int8_configs())


# ----------------------------------------------------------------------------- default subset
def default_subset(configs) -> list[KernelConfig]:
    """What CI compiles (module docstring): every tile configuration once, in its heaviest
    reachable variant (padding on, then the causal mode: the most masking work), except the
    slow duplicates that `_full_run_only` names; plus every mode and padding variant of the
    binaries the BLIP-2 models run (bf16, head dim 64, BLIP2_TILES)."""
    def tiles(c: KernelConfig):
        return (c.kernel, c.dtype, tuple((k, v) for k, v in c.meta if k not in ("MODE", "HAS_PAD")))

    def weight(c: KernelConfig):
        m = dict(c.meta)
        return (m.get("HAS_PAD", False), m.get("MODE") == qa.MODES.index("causal"), m.get("MODE", 0))

    heaviest = {}
    for c in configs:
        if _full_run_only(c):
            continue
        if tiles(c) not in heaviest or weight(c) > weight(heaviest[tiles(c)]):
            heaviest[tiles(c)] = c
    chosen = set(heaviest.values())
    chosen |= {c for c in configs if c.module == "qformer_attention" and c.dtype == "bf16"
               and dict(c.meta)["HEAD_DIM"] == BLIP2_HEAD_DIM and _tile(c) in BLIP2_TILES}
    return [c for c in configs if c in chosen]


def _full_run_only(c: KernelConfig) -> bool:
    """fp16 (the same tiles and sizes as bf16, the same MMA shapes), and fp32 in IEEE precision
    with a 64-wide tile or in the int8 GEMM: FMA dots that spill tens of KB and take 7-36 s each
    to compile (see the table). BLIP2_FAST_AOT_FULL=1 compiles them."""
    if c.dtype == "fp16":
        return True
    m = dict(c.meta)
    ieee = c.dtype == "fp32" and "ieee" in (m.get("PRECISION"), m.get("INPUT_PRECISION"))
    if not ieee:
        return False
    return c.kernel == "_int8_gemm_kernel" or (c.module == "qformer_attention" and max(_tile(c)) > 32)


def _tile(c: KernelConfig) -> tuple:
    m = dict(c.meta)
    return m.get("BLOCK_M"), m.get("BLOCK_N")


# ----------------------------------------------------------------------------- representative arguments
@dataclass
class Sizes:
    """Representative BLIP-2 sizes for the non-constexpr arguments (only their specialisation
    matters to the compiler: a value of 1, a multiple of 16, or neither)."""
    batch: int = 64
    heads: int = 12
    num_query: int = 32
    length: int = 64  # 257 when a tile is 64 wide (the image tokens of ViT-g at 224 px)
    m: int = 1
    n: int = 2560
    k: int = 2560


def _pointer(dtype):
    from triton.runtime.jit import MockTensor  # a 16-byte aligned stand-in, as torch allocations are
    return MockTensor(dtype)


def attention_args(config: KernelConfig) -> list:
    meta = dict(config.meta)
    dtype = {v: k for k, v in DTYPE_NAMES.items()}[config.dtype]
    s = Sizes(length=257 if max(meta["BLOCK_M"], meta["BLOCK_N"]) > 32 else 64)
    d, L, H = meta["HEAD_DIM"], s.length, s.heads
    # q/k/v/o and their gradients: (B, H, L, D) views of (B, L, H, D) buffers, as the model passes them
    strides = {"b": L * H * d, "h": d, "m": H * d, "n": H * d}
    values = {"LSE": _pointer(torch.float32), "PAD": _pointer(torch.uint8 if meta["HAS_PAD"] else dtype),
              "stride_pb": L if meta["HAS_PAD"] else 0, "H": H, "NQ": s.num_query, "LQ": L, "LK": L,
              "NUM_KV_BLOCKS": -(-L // meta["BLOCK_N"]), "qk_scale": d ** -0.5 * 1.4426950408889634,
              "sm_scale": d ** -0.5}
    args = []
    for name in (n for n in _kernel(config).arg_names if n not in meta):
        if name in values:
            args.append(values[name])
        elif name.startswith("stride_"):
            args.append(strides[name[-1]])
        else:  # Q, K, V, O, DO, DQ, DK, DV
            args.append(_pointer(dtype))
    return args


def int8_args(config: KernelConfig) -> list:
    meta = dict(config.meta)
    dtype = {v: k for k, v in DTYPE_NAMES.items()}[config.dtype]
    # M: 1 for the split-K GEMV and its reduction (decode), else rows of the GEMM's own tile range
    s = Sizes(m={16: 1, 64: 64, 128: 256}[meta.get("BLOCK_M", 16)])
    groups = s.k // meta["GROUP_SIZE"] if meta.get("GROUP_SIZE") else 1
    has_bias = meta.get("HAS_BIAS", False)
    values = {"x_ptr": _pointer(dtype), "w_ptr": _pointer(torch.int8), "s_ptr": _pointer(torch.float32),
              "b_ptr": _pointer(dtype if has_bias else torch.float32), "y_ptr": _pointer(dtype),
              "p_ptr": _pointer(torch.float32), "M": s.m, "N": s.n, "K": s.k, "K_PER_SPLIT": 256, "SPLIT_K": 10,
              "stride_xm": s.k, "stride_xk": 1, "stride_wn": s.k, "stride_wk": 1, "stride_sn": groups,
              "stride_sg": 1, "stride_ym": s.n, "stride_yn": 1}
    return [values[name] for name in _kernel(config).arg_names if name not in meta]


def _kernel(config: KernelConfig):
    module = qa if config.module == "qformer_attention" else im
    return getattr(module, config.kernel)


# ----------------------------------------------------------------------------- compiling (worker side)
def compile_one(config: KernelConfig, arch: int) -> dict:
    """Compile `config` for sm_<arch> as Triton's launcher would; returns shared memory (bytes the
    launch requests), registers, spills, stack frame and compile seconds, or the error."""
    import contextlib
    import io
    import re
    import time

    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource, make_backend
    from triton.runtime.jit import create_function_from_signature

    fn = _kernel(config)
    args = attention_args(config) if config.module == "qformer_attention" else int8_args(config)
    kwargs = dict(config.meta)
    target = GPUTarget("cuda", arch, 32)
    backend = make_backend(target)
    # the launcher's own binding: signature, constexprs and the 1 / multiple-of-16 specialisation
    binder = create_function_from_signature(fn.signature, fn.params, backend)
    bound, specialization, options = binder(*args, **kwargs)
    options, signature, constexprs, attrs = fn._pack_args(backend, kwargs, bound, specialization, options)
    log = io.StringIO()
    start = time.perf_counter()
    try:
        with contextlib.redirect_stdout(log):  # ptxas -v, printed by Triton (TRITON_DUMP_PTXAS_LOG=1)
            kernel = triton.compile(ASTSource(fn, signature, constexprs, attrs), target=target,
                                    options=options.__dict__)
    except Exception as err:  # noqa: BLE001 - every compile failure is a result to report, with its text
        return {"error": f"{type(err).__name__}: {str(err)[-2000:]}", "seconds": time.perf_counter() - start}
    text = log.getvalue()
    regs = re.search(r"Used (\d+) registers", text)
    frame = re.search(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads", text)
    if regs is None or frame is None:
        return {"error": f"no ptxas statistics in Triton's log (TRITON_DUMP_PTXAS_LOG): {text[-500:]!r}",
                "seconds": time.perf_counter() - start}
    return {"shared": int(kernel.metadata.shared), "registers": int(regs.group(1)),
            "stack": int(frame.group(1)), "spill_stores": int(frame.group(2)), "spill_loads": int(frame.group(3)),
            "num_warps": int(kernel.metadata.num_warps), "seconds": time.perf_counter() - start}


def worker(arch: int, configs_path: str, results_path: str) -> None:
    """Compile the configs of `configs_path` (JSON lines) for sm_<arch>; append one JSON result
    line per config to `results_path` as soon as it is done."""
    with open(configs_path, encoding="utf-8") as f:
        raws = [json.loads(line) for line in f]
    with open(results_path, "a", encoding="utf-8") as out:
        for raw in raws:
            config = KernelConfig(raw["kernel"], raw["module"], raw["dtype"], tuple(tuple(p) for p in raw["meta"]))
            result = compile_one(config, arch)
            out.write(json.dumps({"id": config.id, "arch": arch, **result}) + "\n")
            out.flush()


# ----------------------------------------------------------------------------- compiling (test side)
def compile_all(configs: list[KernelConfig], cache_dir: str, timeout_s: float = 3600) -> dict:
    """{(arch, config id): result}: one worker subprocess per architecture, side by side, each in
    a clean environment (no TRITON_INTERPRET, which would replace triton.jit; a fresh Triton
    cache so every config is really compiled and ptxas really runs)."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    repo = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    env.update(TRITON_DUMP_PTXAS_LOG="1", TRITON_DEFAULT_FP_FUSION="1",  # fusion: Triton's launch default
               PYTHONPATH=os.pathsep.join(filter(None, [repo, env.get("PYTHONPATH")])))
    configs_path = os.path.join(cache_dir, "configs.jsonl")
    with open(configs_path, "w", encoding="utf-8") as f:
        for c in configs:
            f.write(json.dumps({"kernel": c.kernel, "module": c.module, "dtype": c.dtype, "meta": c.meta}) + "\n")
    procs = {}
    for arch in ARCHS:  # side by side; files, not pipes, so neither can block on a full pipe
        results_path = os.path.join(cache_dir, f"results_sm{arch}.jsonl")
        log_path = os.path.join(cache_dir, f"worker_sm{arch}.log")
        with open(log_path, "w", encoding="utf-8") as log:
            proc = subprocess.Popen(
                [sys.executable, os.path.abspath(__file__), "--worker", str(arch), configs_path, results_path],
                stdout=log, stderr=subprocess.STDOUT, env=dict(env, TRITON_CACHE_DIR=os.path.join(cache_dir, f"sm{arch}")),
                cwd=repo)
        procs[arch] = (proc, results_path, log_path)
    results = {}
    for arch, (proc, results_path, log_path) in procs.items():
        proc.wait(timeout=timeout_s)
        if proc.returncode != 0:
            with open(log_path, encoding="utf-8") as f:
                raise RuntimeError(f"sm_{arch} compile worker exited {proc.returncode}:\n{f.read()[-3000:]}")
        with open(results_path, encoding="utf-8") as f:
            for line in f:
                row = json.loads(line)
                results[(row["arch"], row["id"])] = row
    return results


def problems(config: KernelConfig, result: dict) -> list[str]:
    """Why this binary could not launch on its architecture (empty: it can)."""
    if "error" in result:
        return [f"compile error: {result['error']}"]
    arch = result["arch"]
    found = []
    if result["shared"] > SHARED_LIMIT[arch]:
        found.append(f"shared memory {result['shared']} B > sm_{arch}'s {SHARED_LIMIT[arch]} B per block")
    if result["registers"] > MAX_REGS_PER_THREAD:
        found.append(f"{result['registers']} registers per thread > {MAX_REGS_PER_THREAD}")
    if result["registers"] * 32 * result["num_warps"] > REGS_PER_SM:
        found.append(f"{result['registers']} registers x {32 * result['num_warps']} threads > {REGS_PER_SM} per SM")
    return found


def table(configs: list[KernelConfig], results: dict) -> str:
    """Markdown: one row per config, shared memory / registers / spills for each architecture."""
    head = "| config | call site | " + " | ".join(f"sm_{a} shared KB | sm_{a} regs | sm_{a} spills (st/ld B)"
                                                  for a in ARCHS) + " |"
    lines = [head, "|" + "---|" * (2 + 3 * len(ARCHS))]
    for c in configs:
        cells = [c.id, c.why]
        for arch in ARCHS:
            r = results[(arch, c.id)]
            if "error" in r:
                cells += ["error", "-", "-"]
            else:
                cells += [f"{r['shared'] / 1024:.1f}", str(r["registers"]), f"{r['spill_stores']}/{r['spill_loads']}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


# ----------------------------------------------------------------------------- tests
if __name__ != "__main__":
    @pytest.fixture(scope="module")
    def compiled(tmp_path_factory):
        """Compile once per session (both architectures side by side); print the table."""
        configs = list(all_configs()) if FULL else default_subset(all_configs())
        results = compile_all(configs, str(tmp_path_factory.mktemp("aot")))
        text = table(configs, results)
        spilled = sum(1 for r in results.values() if r.get("spill_stores"))
        print(f"\n{len(configs)} configurations ({'all' if FULL else 'default subset; BLIP2_FAST_AOT_FULL=1: all'} "
              f"of {len(all_configs())}), {spilled} binaries spill\n{text}")
        path = os.environ.get("BLIP2_FAST_AOT_TABLE")
        if path:
            with open(path, "w", encoding="utf-8") as f:
                f.write(text + "\n")
        return configs, results

    @pytest.mark.timeout(3600)  # minutes of compiling on two cores (module docstring)
    @pytest.mark.parametrize("arch", ARCHS)
    def test_every_config_compiles_within_limits(compiled, arch):
        configs, results = compiled
        missing = [c.id for c in configs if (arch, c.id) not in results]
        assert not missing, f"sm_{arch}: no result for {missing[:5]}"
        bad = {c.id: problems(c, results[(arch, c.id)]) for c in configs}
        bad = {k: v for k, v in bad.items() if v}
        assert not bad, f"sm_{arch}: {len(bad)} configurations cannot launch: " + "; ".join(
            f"{k}: {', '.join(v)}" for k, v in list(bad.items())[:10])

    def test_problems_flags_each_limit():
        config = KernelConfig("_int8_splitk_reduce_kernel", "int8_matmul", "bf16", ())
        ok = {"arch": 80, "shared": 163 * 1024, "registers": 255, "num_warps": 8, "spill_stores": 900}
        assert problems(config, ok) == []  # at the limits, and spills are reported only
        assert "shared memory" in problems(config, dict(ok, shared=163 * 1024 + 1))[0]
        assert problems(config, dict(ok, arch=90, shared=227 * 1024)) == []
        assert "registers per thread" in problems(config, dict(ok, registers=256))[0]
        assert "per SM" in problems(config, dict(ok, num_warps=16))[0]  # 255 x 512 threads > 65536
        assert problems(config, {"arch": 90, "error": "CompilationError: x"})[0].startswith("compile error")

    def test_enumeration_holds_the_launch_choices():
        """The sweep finds the tiles the choice functions give the BLIP-2 shapes and their limits."""
        by_id = {c.id for c in all_configs()}
        for mode in qa.MODES:  # stage 1: 32 queries + 32 text tokens, D 64, bf16, padded text
            assert f"attn_fwd-bf16-{mode}-pad-d64-m32-n32-w4-s2" in by_id
            assert f"attn_bwd-bf16-{mode}-pad-d64-m32-n32-w4-s2" in by_id
        assert "attn_fwd-bf16-bidirectional-d64-m32-n64-w4-s2" in by_id  # cross-attention, 32 x 257
        assert "attn_bwd-fp32-bidirectional-tf32-d128-m32-n32-w4-s2" in by_id  # fp32 at D 128: never 64 wide
        assert not any(i.startswith("attn_") and "fp32" in i and "d128" in i and "n64" in i for i in by_id)
        for g, k in ((0, 128), (16, 16), (32, 32), (64, 64), (128, 128)):
            assert f"int8_splitk-bf16-m16-n64-k{k}-g{g}-w4-s4" in by_id
        assert "int8_gemm-fp16-m128-n128-k64-g0-bias-w8-s3" in by_id
        assert len(by_id) == len(all_configs())  # ids are unique: one per binary

    def test_launchers_use_the_enumerated_choice(monkeypatch):
        """The forward and backward launchers take their constexprs from launch_config."""
        seen = []
        real = qa.launch_config

        def spy(*args, **kwargs):
            seen.append(real(*args, **kwargs))
            return seen[-1]
        monkeypatch.setattr(qa, "launch_config", spy)
        monkeypatch.setenv("BLIP2_FAST_BACKEND", "triton")
        if os.environ.get("TRITON_INTERPRET") != "1" and not torch.cuda.is_available():
            pytest.skip("needs CUDA or TRITON_INTERPRET=1 (tests/conftest.py sets it on a CPU machine)")
        device = "cuda" if torch.cuda.is_available() else "cpu"
        q, k, v = (torch.randn(1, 2, 40, 16, device=device, requires_grad=True) for _ in range(3))
        qa.qformer_attention(q, k, v, "causal", 32).sum().backward()
        assert len(seen) == 2  # forward, backward
        want = real(torch.float32, 40, 40, 16, qa.MODES.index("causal"), False)
        assert seen == [want, want]


if __name__ == "__main__":
    if sys.argv[1:2] == ["--worker"]:
        worker(int(sys.argv[2]), sys.argv[3], sys.argv[4])
    else:
        print(f"{len(all_configs())} configurations, {len(default_subset(all_configs()))} in the default subset")

"""The GPU suite's kernel cases, run through the pytest-benchmark suites' own code.

- `run_qformer_attention`: the Q-Former's fused masked attention (kernels/qformer_attention.py),
  bf16, 12 heads, 32 queries + 32 right-padded text tokens, D 64, batch 256 and 32, the three
  mode, fwd and fwd+bwd, through `bench/test_bench_attention.py: run_case` (ours, torch SDPA
  with the explicit mask, and FlexAttention, torch.compile'd with a block mask). Ours and SDPA
  for every shape first; FlexAttention after them, since each of its shapes costs a compile.
- `run_cross_attention`: 32 queries x 257 (224 px) and 677 (364 px) image tokens, batch 64 and
  256, fwd and fwd+bwd: ours (the autotuned entry), our Triton kernel forced, SDPA without a
  mask, flash-attn and xformers (skipped with the reason when not importable).
- `run_int8_layers`: `bench/test_bench_int8.py: run_case` on OPT-2.7B's layers: int8 weight-only
  (ours, dispatched: the split-K GEMV for M <= 16) against the bf16 F.linear at M 1 (decode),
  16 and 128, and bitsandbytes' Linear8bitLt when installed.
Summary lines: ours against each reference as a time ratio (> 1: ours faster).

`check_*` functions serve `--dry-run`: they validate every planned shape against the launchers'
own contracts on meta tensors and compute the launch configuration and grid, without a GPU.
"""
from __future__ import annotations

import torch

from suite_support import Budget, PedanticBench, Suite, bench_module, missing, options

HEADS, HEAD_DIM, NUM_QUERY, TEXT_LEN = 12, 64, 32, 32
SELF_BATCHES = (256, 32)
SELF_PASSES = ("fwd", "fwd+bwd")
CROSS_SHAPES = [(b, keys) for keys in (257, 677) for b in (256, 64)]
CROSS_IMPLS = ("ours", "triton", "sdpa_best", "flash_attn", "xformers")
INT8_ORDER = [(layer, m) for m in (1, 16, 128) for layer in ("qkv-2560x2560", "fc1-10240x2560", "fc2-2560x10240")]
MAX_GRID_YZ = 65535
MAX_GRID_X = 2 ** 31 - 1
H100_SMS = 132


def _row(bench: PedanticBench) -> dict:
    return dict(bench.extra_info)


def _attention_step(budget: Budget, out_dir: str, case, impl: str, pass_name: str, estimate_s: float, kind: str):
    tba = bench_module("test_bench_attention")

    def run():
        bench = PedanticBench()
        tba.run_case(bench, options(out_dir), case, impl, pass_name)
        return _row(bench)
    return budget.step(f"{case.id} {pass_name} {impl}", estimate_s, run, kind=kind)


def run_qformer_attention(suite: Suite, budget: Budget) -> None:
    tba = bench_module("test_bench_attention")
    rows = {}
    cases = [tba.Case("self", b, mode, padded=True) for b in SELF_BATCHES for mode in tba.qa.MODES]
    impls = ["ours", "sdpa_mask", "flex"]  # flex last: every shape is a torch.compile
    flex_missing = missing("torch.nn.attention.flex_attention")
    if flex_missing:
        suite.record_status("qformer_attention", "flex", "skipped", flex_missing)
        impls.remove("flex")
    # ours and SDPA everywhere first; then FlexAttention forward for every shape before its
    # backward (a forward compile is the cheaper one)
    plan = [(impl, case, p) for impl in impls if impl != "flex" for case in cases for p in SELF_PASSES]
    plan += [("flex", case, p) for p in SELF_PASSES for case in cases if "flex" in impls]
    for impl, case, pass_name in plan:
        kind = f"flex {pass_name}" if impl == "flex" else "eager-like"
        est = budget.estimate_like(kind, {"fwd": 15.0, "fwd+bwd": 30.0}[pass_name] if impl == "flex" else 1.5)
        rows[(case.id, pass_name, impl)] = _attention_step(budget, suite.out_dir, case, impl, pass_name, est, kind)
    for case in cases:
        for pass_name in SELF_PASSES:
            ours = rows.get((case.id, pass_name, "ours"))
            for ref in ("sdpa_mask", "flex"):
                other = rows.get((case.id, pass_name, ref))
                if ours and other:
                    _time_line(suite, f"Q-Former attention {case.id} {pass_name}: ours vs {ref}", ours["ms"], other["ms"])


def run_cross_attention(suite: Suite, budget: Budget) -> None:
    tba = bench_module("test_bench_attention")
    rows = {}
    for batch, keys in CROSS_SHAPES:
        case = tba.Case("cross", batch, keys=keys)
        for pass_name in SELF_PASSES:
            for impl in CROSS_IMPLS:
                rows[(case.id, pass_name, impl)] = _attention_step(
                    budget, suite.out_dir, case, impl, pass_name, budget.estimate_like("cross", 2.0), "cross")
            ours = rows.get((case.id, pass_name, "ours"))
            for ref in ("sdpa_best", "flash_attn", "xformers"):
                other = rows.get((case.id, pass_name, ref))
                if ours and other:
                    _time_line(suite, f"cross-attention {case.id} {pass_name}: ours vs {ref}", ours["ms"], other["ms"])


def _time_line(suite: Suite, figure: str, ours_ms: float, ref_ms: float) -> None:
    ratio = ref_ms / ours_ms
    suite.add(figure, "faster than the reference (ratio > 1)",
              f"{ours_ms * 1e3:.1f} us vs {ref_ms * 1e3:.1f} us: x{ratio:.2f}", ratio > 1)


def run_int8_layers(suite: Suite, budget: Budget) -> None:
    tbi = bench_module("test_bench_int8")
    from blip2_fast.kernels import dispatch
    for layer, m in INT8_ORDER:
        case = tbi.Case(layer, m, torch.bfloat16)
        for impl in ("ours", "bnb"):
            def run(case=case, impl=impl):
                dispatch.clear_decisions("int8_linear")  # the suite's autouse fixture: decide per case
                bench = PedanticBench()
                tbi.run_case(bench, options(suite.out_dir), case, impl, "cuda")
                return _row(bench)
            row = budget.step(f"{case.id} {impl}", budget.estimate_like("int8", 2.0), run, kind="int8")
            if row:  # ratio: bf16 F.linear time / this time
                suite.add(f"int8 {case.id} {impl} ({row['chosen']}) vs bf16 F.linear",
                          "faster than bf16 (ratio > 1)",
                          f"{row['us']:.1f} us vs {row['baseline_us']:.1f} us: x{row['ratio']:.2f}", row["ratio"] > 1)


# ----------------------------------------------------------------------------- dry run
def _grid_ok(grid) -> None:
    x, *rest = grid
    if not 1 <= x <= MAX_GRID_X or any(not 1 <= g <= MAX_GRID_YZ for g in rest):
        raise ValueError(f"grid {grid} outside CUDA's limits")


def _tile_ok(meta: dict, names) -> None:
    for name in names:
        value = meta[name]
        if value < 16 or value & (value - 1):
            raise ValueError(f"{name} = {value}: tl.dot needs powers of two >= 16")
    if meta.get("num_warps", 4) not in (1, 2, 4, 8, 16, 32):
        raise ValueError(f"num_warps {meta['num_warps']}")


def _attention_launch(batch: int, lq: int, lk: int, mode: str, padded: bool) -> str:
    import blip2_fast.kernels.qformer_attention as qa
    mode_id = qa.MODES.index(mode)
    q = torch.empty(batch, lq, HEADS, HEAD_DIM, device="meta", dtype=torch.bfloat16).transpose(1, 2)
    k = torch.empty(batch, lk, HEADS, HEAD_DIM, device="meta", dtype=torch.bfloat16).transpose(1, 2)
    pad = torch.empty(batch, lk, device="meta", dtype=torch.uint8) if padded else None
    qa._check_qkv(q, k, k, mode_id, NUM_QUERY if lq == lk else 0, pad)  # the launcher's own contract
    meta = qa.launch_config(torch.bfloat16, lq, lk, HEAD_DIM, mode_id, padded)
    _tile_ok(meta, ("BLOCK_M", "BLOCK_N", "BLOCK_D"))
    fwd = (batch * HEADS, -(-lq // meta["BLOCK_M"]))
    bwd = (batch * HEADS, -(-lk // meta["BLOCK_N"]) + -(-lq // meta["BLOCK_M"]))
    _grid_ok(fwd)
    _grid_ok(bwd)
    return f"tiles {meta['BLOCK_M']}x{meta['BLOCK_N']}x{meta['BLOCK_D']}, grid fwd {fwd} bwd {bwd}"


def check_qformer_attention() -> list[str]:
    tba = bench_module("test_bench_attention")
    import blip2_fast.kernels.qformer_attention as qa
    assert (tba.HEADS, tba.HEAD_DIM, tba.NUM_QUERY, tba.TEXT_LEN) == (HEADS, HEAD_DIM, NUM_QUERY, TEXT_LEN)
    out = []
    for batch in SELF_BATCHES:
        for mode in qa.MODES:
            case = tba.Case("self", batch, mode, padded=True)
            out.append(f"{case.id}: {_attention_launch(batch, NUM_QUERY + TEXT_LEN, NUM_QUERY + TEXT_LEN, mode, True)}")
    return out


def check_cross_attention() -> list[str]:
    tba = bench_module("test_bench_attention")
    out = []
    for batch, keys in CROSS_SHAPES:
        case = tba.Case("cross", batch, keys=keys)
        out.append(f"{case.id}: {_attention_launch(batch, NUM_QUERY, keys, 'bidirectional', False)}")
    return out


def check_int8_layers() -> list[str]:
    tbi = bench_module("test_bench_int8")
    import blip2_fast.kernels.int8_matmul as im
    out = []
    for layer, m in INT8_ORDER:
        n, k = tbi.LAYERS[layer]
        x = torch.empty(m, k, device="meta", dtype=torch.bfloat16)
        w = torch.empty(n, k, device="meta", dtype=torch.int8)
        group = im._check(x, w, torch.empty(n, device="meta"), None)  # the launcher's own contract
        if m <= im.SPLITK_MAX_M:
            meta = im.splitk_config(torch.bfloat16, group, on_gpu=True)
            split, per = im.splitk_split(n, k, meta["BLOCK_N"], meta["BLOCK_K"], H100_SMS)
            if per % meta["BLOCK_K"] or split * per < k or (split - 1) * per >= k:
                raise ValueError(f"split-K {split} x {per} does not tile K = {k}")
            _grid_ok((-(-n // meta["BLOCK_N"]), split))
            what = f"split-K GEMV {split} x {per}, tiles {meta['BLOCK_N']}x{meta['BLOCK_K']}"
        else:
            meta = im.gemm_config(torch.bfloat16, m, group, False, on_gpu=True)
            _grid_ok((-(-m // meta["BLOCK_M"]) * -(-n // meta["BLOCK_N"]),))
            what = f"GEMM tiles {meta['BLOCK_M']}x{meta['BLOCK_N']}x{meta['BLOCK_K']}"
        _tile_ok(meta, ("BLOCK_M", "BLOCK_N", "BLOCK_K"))
        out.append(f"{tbi.Case(layer, m, torch.bfloat16).id}: {what}")
    return out

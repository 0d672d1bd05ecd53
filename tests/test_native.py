"""The native CPU library (kernels/csrc, loaded by kernels/native.py).

Every compiled ISA path this CPU can run (AVX-512, AVX2, scalar) x both algorithms (GEMV, packed
GEMM, forced regardless of M) x fp32 / bf16 / fp16 activations, against the float64 reference
of the dequantised product with the two-tier tolerance of tests/kernels/test_int8_matmul.py.
The library is optional: without it these tests skip, saying why, unless
BLIP2_FAST_REQUIRE_NATIVE=1 (set by CI, which builds it), where its absence is a failure.
"""
from __future__ import annotations

import math
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from blip2_fast.kernels import dispatch, native
from blip2_fast.kernels import int8_matmul as im

REQUIRED = os.environ.get("BLIP2_FAST_REQUIRE_NATIVE") == "1"
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
ISAS = ["avx512", "avx2", "scalar"]
# odd N and K: not multiples of 4/8 rows, 16-wide vectors, 64-byte unrolls, 32-column panels or
# 256-deep K blocks; the last two also take groups of 16 and 32
SHAPES = [(5, 3), (37, 123), (70, 257), (33, 520), (45, 96), (19, 544)]
MS = [1, 3, 17, 128]


def test_native_library_loads_when_required():
    lib = native.load()
    if lib is None and not REQUIRED:
        pytest.skip(f"native library not built: {native.unavailable_reason()} "
                    "(set BLIP2_FAST_REQUIRE_NATIVE=1 to make this a failure)")
    assert lib is not None, f"BLIP2_FAST_REQUIRE_NATIVE=1 but the native library did not load: {native.unavailable_reason()}"
    assert native.isa_supported("scalar")


@pytest.fixture(scope="module")
def lib():
    lib = native.load()
    if lib is None:
        pytest.skip(f"native library not available: {native.unavailable_reason()}")
    return lib


def _isa_or_skip(isa: str):
    if not native.isa_supported(isa):
        pytest.skip(f"{isa} is not compiled into the library or not supported by this CPU")


def make(m, n, k, group, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=g) / math.sqrt(k)
    q, s = im.quantize_weight(w, group)
    return torch.randn(m, k, generator=g).to(dtype), q, s, torch.randn(n, generator=g).to(dtype)


def assert_two_tier(y, x, q, s, b, what):
    ref = im.int8_linear_ref(x, q, s, b)
    base = F.linear(x, im.dequantize_weight(q, s, x.dtype), None if b is None else b.to(x.dtype))
    assert y.shape == ref.shape and y.dtype == x.dtype, what
    err = (y.double() - ref).abs().max().item()
    base_err = (base.double() - ref).abs().max().item()
    floor = 4 * torch.finfo(x.dtype).eps * ref.abs().max().item()
    assert err <= 2 * base_err + floor, f"{what}: error {err:.3e} > 2 x torch's {base_err:.3e} + {floor:.3e}"


@pytest.mark.parametrize("algo", ["gemv", "gemm"])
@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("m", MS)
@pytest.mark.parametrize("n,k", SHAPES)
def test_kernels_match_reference(lib, n, k, m, isa, algo):
    _isa_or_skip(isa)
    for group in (None, 16, 32):
        if group and k % group:
            continue
        for dtype in DTYPES:
            x, q, s, b = make(m, n, k, group, dtype)
            y = im.int8_linear_native(x, q, s, b, isa=isa, algo=algo)
            assert_two_tier(y, x, q, s, b, f"{isa} {algo} M={m} N={n} K={k} group={group} {dtype}")


@pytest.mark.parametrize("isa", ISAS)
def test_llm_sized_gemv_and_gemm(lib, isa):
    """K spans many 256-deep blocks and N many panels; grouped scales of 128."""
    _isa_or_skip(isa)
    for m, algo in ((1, "gemv"), (4, "gemv"), (40, "gemm")):
        x, q, s, b = make(m, 300, 2048 + 16, None, torch.float32)
        assert_two_tier(im.int8_linear_native(x, q, s, b, isa=isa, algo=algo), x, q, s, b, f"{isa} {algo} M={m}")
        x, q, s, b = make(m, 300, 2048, 128, torch.bfloat16)
        assert_two_tier(im.int8_linear_native(x, q, s, b, isa=isa, algo=algo), x, q, s, b, f"{isa} {algo} M={m} g128")


def test_group_sizes_outside_the_simd_rule_fall_back_correctly(lib):
    """G % 16 != 0 runs the scalar kernel inside the library (the dispatcher prefers torch)."""
    x, q, s, b = make(3, 21, 40, 8, torch.float32)
    for algo in ("gemv", "gemm"):
        assert_two_tier(im.int8_linear_native(x, q, s, b, algo=algo), x, q, s, b, f"G=8 {algo}")


def test_strided_x_bias_dtypes_and_no_bias(lib):
    x, q, s, b = make(5, 40, 96, None, torch.bfloat16)
    wide = torch.cat([x[:, :7], x, x[:, :89]], dim=1)[:, 7:103]  # x again, row stride 192: read in place
    assert wide.stride() == (192, 1) and torch.equal(wide, x)
    for algo in ("gemv", "gemm"):
        assert_two_tier(im.int8_linear_native(wide, q, s, b.float(), algo=algo), x, q, s, b.float(), "fp32 bias")
        assert_two_tier(im.int8_linear_native(wide, q, s, None, algo=algo), x, q, s, None, "no bias")


def test_thread_count_does_not_change_results(lib):
    """Each output is reduced by one thread in a fixed order: 1 and 2 threads agree bitwise."""
    x, q, s, b = make(9, 70, 300, None, torch.float32)
    for algo in ("gemv", "gemm"):
        y1 = im.int8_linear_native(x, q, s, b, algo=algo, num_threads=1)
        y2 = im.int8_linear_native(x, q, s, b, algo=algo, num_threads=2)
        assert torch.equal(y1, y2), algo


def _raw_call(lib, x, out, m, n=1, k=1, w=None, scale=None, **kw):
    """Call the C ABI directly (dtype codes for x and y chosen independently)."""
    w = w if w is not None else torch.ones(n, k, dtype=torch.int8)
    scale = scale if scale is not None else torch.ones(n)
    args = dict(x=x.data_ptr(), x_dtype=native.DTYPE_CODES[str(x.dtype)[6:]], ldx=k, w=w.data_ptr(),
                scale=scale.data_ptr(), group=0, bias=None, bias_dtype=0, y=out.data_ptr(),
                y_dtype=native.DTYPE_CODES[str(out.dtype)[6:]], ldy=n, M=m, N=n, K=k, threads=1, isa=-1, algo=-1)
    args.update(kw)
    return lib.b2f_int8_linear(*args.values())


@pytest.mark.parametrize("out_dtype", [torch.bfloat16, torch.float16], ids=str)
def test_output_rounding_matches_torch_bitwise(lib, out_dtype):
    """y = x * 1 * 1 with K = 1: the library's fp32 -> bf16 / fp16 conversion must equal torch's
    round-to-nearest-even, including ties, subnormals, overflow to inf and NaN."""
    g = torch.Generator().manual_seed(0)
    vals = torch.cat([torch.randn(4096, generator=g) * 10.0 ** torch.randint(-9, 6, (4096,), generator=g).float(),
                      # (no -0.0: a dot product starts from +0, so -0.0 * 1 comes out +0)
                      torch.tensor([0.0, 65504.0, 65519.0, 65520.0, 1e6, -1e30, float("inf"), -float("inf"),
                                    2.0 ** -24, 2.0 ** -25, 3 * 2.0 ** -26, 2.0 ** -14 - 2.0 ** -26, 1e-40]),
                      # exact ties in bf16 (lowest 16 bits 0x8000) and fp16 (lowest 13 bits 0x1000)
                      (torch.randint(0x3f000000, 0x40000000, (512,), generator=g) | 0x8000).view(torch.float32),
                      (torch.randint(0x3f000000, 0x40000000, (512,), generator=g) & ~0x1fff | 0x1000).view(torch.float32)])
    x = vals.reshape(-1, 1).contiguous()
    y = torch.empty(x.shape, dtype=out_dtype)
    assert _raw_call(lib, x, y, x.shape[0]) == 0
    assert torch.equal(y.view(torch.int16), x.to(out_dtype).view(torch.int16))
    nan = torch.full((1, 1), float("nan"))
    ynan = torch.empty(1, 1, dtype=out_dtype)
    assert _raw_call(lib, nan, ynan, 1) == 0 and bool(ynan.isnan().all())


@pytest.mark.parametrize("in_dtype", [torch.bfloat16, torch.float16], ids=str)
def test_input_conversion_is_exact(lib, in_dtype):
    """Every finite 16-bit pattern converts to the fp32 value torch gives (y = x * 1 * 1)."""
    x = torch.arange(-32768, 32768, dtype=torch.int32).to(torch.int16).view(in_dtype).reshape(-1, 1)
    x = x[torch.isfinite(x.float()).reshape(-1)].contiguous()
    y = torch.empty(x.shape, dtype=torch.float32)
    assert _raw_call(lib, x, y, x.shape[0]) == 0
    assert torch.equal(y, x.float())


def test_error_codes(lib):
    x, y = torch.ones(1, 1), torch.empty(1, 1)
    assert _raw_call(lib, x, y, 1) == 0 and float(y) == 1.0
    assert _raw_call(lib, x, y, 1, x_dtype=7) == 1
    assert _raw_call(lib, x, y, 0) == 2
    assert _raw_call(lib, x, y, 1, ldx=0) == 2
    assert _raw_call(lib, x, y, 1, group=-1) == 3
    assert _raw_call(lib, x, y, 1, isa=9) == 4
    assert _raw_call(lib, x, y, 1, algo=5) == 7
    assert _raw_call(lib, x, y, 1, y=None) == 5
    for code in range(8):
        assert lib.b2f_strerror(code)


def test_dispatcher_uses_native_or_says_why(lib):
    dispatch.clear_decisions("int8_linear")
    x, q, s, b = make(1, 64, 256, None, torch.float32)
    im.int8_linear(x, q, s, b)
    decision = dispatch.explain("int8_linear")
    assert (decision["chosen"] == "native:gemv"
            or "measured slower" in " ".join(decision["refused"]["native:gemv"])), decision
    assert any("M = 1 <= 4" in r for r in dict(im.int8_linear_backends(x, q, s, b))["native:gemm"])
    x, q, s, b = make(9, 64, 256, None, torch.float32)
    im.int8_linear(x, q, s, b)
    decision = dispatch.explain("int8_linear", im.int8_linear_key(x, q, s, b))
    assert {"native:gemv", "native:gemm"} <= set(decision["timings"])  # both algorithms timed above 4 rows
    dispatch.clear_decisions("int8_linear")


def test_disabled_library_is_refused_with_its_reason(monkeypatch):
    """BLIP2_FAST_NO_NATIVE=1: no library, a logged reason, and the torch path serves."""
    monkeypatch.setenv("BLIP2_FAST_NO_NATIVE", "1")
    monkeypatch.setattr(im, "_lib", None)
    native.reset()
    dispatch.clear_decisions("int8_linear")
    try:
        assert native.load() is None
        assert "BLIP2_FAST_NO_NATIVE" in native.unavailable_reason()
        x, q, s, b = make(2, 16, 32, None, torch.float32)
        y = im.int8_linear(x, q, s, b)
        assert_two_tier(y, x, q, s, b, "no native")
        decision = dispatch.explain("int8_linear")
        assert decision["chosen"] == "torch:dequant"
        assert any("BLIP2_FAST_NO_NATIVE" in r for r in decision["refused"]["native:gemv"])
    finally:
        monkeypatch.undo()
        native.reset()
        dispatch.clear_decisions("int8_linear")


def test_search_paths_and_unloadable_files(monkeypatch, tmp_path):
    """$BLIP2_FAST_NATIVE_LIB comes first, the package directory is searched, and a file that
    is not a loadable library is skipped and named in the reason."""
    monkeypatch.delenv("BLIP2_FAST_NO_NATIVE", raising=False)
    bogus = tmp_path / "nothing.so"
    monkeypatch.setenv("BLIP2_FAST_NATIVE_LIB", str(bogus))
    paths = native.candidate_paths()
    assert paths[0] == str(bogus)
    assert os.path.join(os.path.dirname(native.__file__), native.library_filename(native.CPU_LIB)) in paths
    broken = tmp_path / native.library_filename(native.CPU_LIB)
    broken.write_bytes(b"not a shared library")
    monkeypatch.setenv("BLIP2_FAST_NATIVE_LIB", str(tmp_path))  # a directory: the file name is added
    assert native.candidate_paths()[0] == str(broken)
    monkeypatch.setattr(native, "candidate_paths", lambda name=native.CPU_LIB: [str(broken), str(bogus)])
    lib, path, reason = native._try_load(native.CPU_LIB)
    assert lib is None and path is None
    assert str(broken) in reason and f"{bogus}: not found" in reason


def test_module_cli_info():
    out = subprocess.run([sys.executable, "-m", "blip2_fast.kernels.native", "--info"], capture_output=True,
                         text=True, timeout=120)
    assert "cpu_library:" in out.stdout, out.stderr
    assert out.returncode == (0 if native.load() is not None else 2)

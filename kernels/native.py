"""Loader of the optional native libraries built from kernels/csrc by CMakeLists.txt.

Two plain C ABI shared libraries, loaded with ctypes (no torch headers: a torch upgrade never
breaks them):
  blip2_fast_native       CPU int8 weight-only GEMV/GEMM (OpenMP; AVX-512 / AVX2 / scalar code
                          chosen at run time by the library)
  blip2_fast_native_cuda  the same op for CUDA, built only where CMake finds a CUDA compiler

Where they are looked for, in order (the first file that loads and has our ABI version wins):
  1. $BLIP2_FAST_NATIVE_LIB / $BLIP2_FAST_NATIVE_CUDA_LIB: a file, or a directory holding it
  2. this package's directory: where setup.py installs it (blip2_fast/kernels/), and, in a source
     checkout or an editable install, kernels/ itself (CMake's default output directory)
  3. <checkout>/build/native (a manual CMake build with that output directory)
Importing this module loads and builds nothing. The first `load()` tries the places above; when
none serves, the reasons are logged once (WARNING) and kept for `unavailable_reason()`, which the
kernel dispatchers report as the refusal reason of the native backend. BLIP2_FAST_NO_NATIVE=1
disables the libraries (the same variable makes setup.py skip building them).

Building in a checkout or an editable install (which does not run CMake into the source tree):
    python -m blip2_fast.kernels.native --build     # cmake configure + build into kernels/
    python -m blip2_fast.kernels.native --info      # what loaded, from where, which ISA
"""
from __future__ import annotations

import argparse
import ctypes
import logging
import os
import shutil
import subprocess
import sys
import threading

log = logging.getLogger("blip2_fast.kernels")

CPU_LIB = "blip2_fast_native"
CUDA_LIB = "blip2_fast_native_cuda"
ABI_VERSION = 1  # must equal kAbiVersion in csrc/int8_gemm.cpp
CUDA_ABI_VERSION = 1
ISA_CODES = {"scalar": 0, "avx2": 1, "avx512": 2}
DTYPE_CODES = {"float32": 0, "bfloat16": 1, "float16": 2}

_PKG_DIR = os.path.dirname(os.path.abspath(__file__))
_ENV = {CPU_LIB: "BLIP2_FAST_NATIVE_LIB", CUDA_LIB: "BLIP2_FAST_NATIVE_CUDA_LIB"}

_lock = threading.Lock()
_state: dict[str, tuple[ctypes.CDLL | None, str | None, str | None]] = {}  # name -> (lib, path, reason)


def library_filename(name: str) -> str:
    if sys.platform.startswith("win"):
        return f"{name}.dll"
    if sys.platform == "darwin":
        return f"lib{name}.dylib"
    return f"lib{name}.so"


def source_root() -> str | None:
    """The checkout holding CMakeLists.txt next to this package, if any (not in a wheel install)."""
    root = os.path.dirname(_PKG_DIR)
    return root if os.path.isfile(os.path.join(root, "CMakeLists.txt")) else None


def candidate_paths(name: str = CPU_LIB) -> list[str]:
    fname = library_filename(name)
    paths = []
    env = os.environ.get(_ENV[name], "").strip()
    if env:
        paths.append(os.path.join(env, fname) if os.path.isdir(env) else env)
    paths.append(os.path.join(_PKG_DIR, fname))
    root = source_root()
    if root is not None:
        paths.append(os.path.join(root, "build", "native", fname))
    return paths


def _declare_cpu(lib: ctypes.CDLL) -> None:
    i64, vp, ci = ctypes.c_int64, ctypes.c_void_p, ctypes.c_int
    lib.b2f_abi_version.restype = ci
    lib.b2f_abi_version.argtypes = []
    lib.b2f_isa_supported.restype = ci
    lib.b2f_isa_supported.argtypes = [ci]
    lib.b2f_best_isa.restype = ci
    lib.b2f_best_isa.argtypes = []
    lib.b2f_isa_name.restype = ctypes.c_char_p
    lib.b2f_isa_name.argtypes = [ci]
    lib.b2f_has_openmp.restype = ci
    lib.b2f_has_openmp.argtypes = []
    lib.b2f_max_threads.restype = ci
    lib.b2f_max_threads.argtypes = []
    lib.b2f_gemv_max_m.restype = i64
    lib.b2f_gemv_max_m.argtypes = []
    lib.b2f_strerror.restype = ctypes.c_char_p
    lib.b2f_strerror.argtypes = [ci]
    # x, x_dtype, ldx, w, scale, group, bias, bias_dtype, y, y_dtype, ldy, M, N, K, threads, isa, algo
    lib.b2f_int8_linear.restype = ci
    lib.b2f_int8_linear.argtypes = [vp, ci, i64, vp, vp, i64, vp, ci, vp, ci, i64, i64, i64, i64, ci, ci, ci]


def _declare_cuda(lib: ctypes.CDLL) -> None:
    i64, vp, ci = ctypes.c_int64, ctypes.c_void_p, ctypes.c_int
    lib.b2f_cuda_abi_version.restype = ci
    lib.b2f_cuda_abi_version.argtypes = []
    lib.b2f_cuda_strerror.restype = ctypes.c_char_p
    lib.b2f_cuda_strerror.argtypes = [ci]
    # x, dtype, ldx, w, scale, group, bias, y, ldy, M, N, K, device, stream
    lib.b2f_cuda_int8_linear.restype = ci
    lib.b2f_cuda_int8_linear.argtypes = [vp, ci, i64, vp, vp, i64, vp, vp, i64, i64, i64, i64, ci, vp]


def _try_load(name: str) -> tuple[ctypes.CDLL | None, str | None, str | None]:
    if os.environ.get("BLIP2_FAST_NO_NATIVE", "").strip() not in ("", "0"):
        return None, None, "disabled by BLIP2_FAST_NO_NATIVE"
    # torch first: its libgomp.so.1 is then the OpenMP runtime the CPU library binds to (one
    # thread pool for both, no oversubscription), and the CUDA library finds the driver loaded.
    import torch  # noqa: F401
    abi_fn, want, declare = (("b2f_abi_version", ABI_VERSION, _declare_cpu) if name == CPU_LIB
                             else ("b2f_cuda_abi_version", CUDA_ABI_VERSION, _declare_cuda))
    tried = []
    for path in candidate_paths(name):
        if not os.path.exists(path):
            tried.append(f"{path}: not found")
            continue
        try:
            lib = ctypes.CDLL(path)
            got = getattr(lib, abi_fn)()
        except (OSError, AttributeError) as err:  # unloadable file or not our library
            tried.append(f"{path}: {err}")
            continue
        if got != want:
            tried.append(f"{path}: ABI version {got}, this Python code needs {want} (stale build: rebuild it)")
            continue
        declare(lib)
        return lib, path, None
    how = ("build it with `python -m blip2_fast.kernels.native --build`" if source_root()
           else "reinstall blip2_fast with CMake and a C++ compiler available")
    return None, None, f"{library_filename(name)} not loadable ({'; '.join(tried)}); {how}"


def _get(name: str):
    with _lock:
        if name not in _state:
            _state[name] = _try_load(name)
            lib, path, reason = _state[name]
            if lib is None:
                level = logging.INFO if name == CUDA_LIB else logging.WARNING
                log.log(level, "blip2_fast native library unavailable: %s", reason)
            else:
                log.info("blip2_fast native library loaded from %s", path)
        return _state[name]


def load() -> ctypes.CDLL | None:
    """The CPU library (loaded on first call, then cached), or None; see unavailable_reason()."""
    return _get(CPU_LIB)[0]


def load_cuda() -> ctypes.CDLL | None:
    """The CUDA library, or None (it exists only where it was built with a CUDA compiler)."""
    return _get(CUDA_LIB)[0]


def unavailable_reason(name: str = CPU_LIB) -> str | None:
    return _get(name)[2]


def library_path(name: str = CPU_LIB) -> str | None:
    return _get(name)[1]


def reset() -> None:
    """Forget what was loaded (tests, or after --build in the same process)."""
    with _lock:
        _state.clear()


def isa_supported(isa: str) -> bool:
    lib = load()
    return bool(lib is not None and isa in ISA_CODES and lib.b2f_isa_supported(ISA_CODES[isa]))


def info() -> dict:
    lib = load()
    out = {"cpu_library": library_path(), "cpu_unavailable": unavailable_reason()}
    if lib is not None:
        out.update(abi=lib.b2f_abi_version(), best_isa=lib.b2f_isa_name(lib.b2f_best_isa()).decode(),
                   supported_isas=[n for n, c in ISA_CODES.items() if lib.b2f_isa_supported(c)],
                   openmp=bool(lib.b2f_has_openmp()), max_threads=lib.b2f_max_threads(),
                   gemv_max_m=lib.b2f_gemv_max_m())
    out["cuda_library"] = library_path(CUDA_LIB)
    out["cuda_unavailable"] = unavailable_reason(CUDA_LIB)
    return out


def build(build_dir: str | None = None, output_dir: str | None = None, jobs: int | None = None,
          cuda: str = "AUTO", build_type: str = "Release") -> str:
    """Configure and build with CMake from a source checkout; returns the CPU library's path.

    Raises RuntimeError (with the command and its exit status) when CMake is missing or fails.
    """
    root = source_root()
    if root is None:
        raise RuntimeError(f"no CMakeLists.txt next to {_PKG_DIR}: building needs a source checkout "
                           "(an installed wheel ships the library prebuilt, or not at all)")
    cmake = shutil.which("cmake")
    if cmake is None:
        raise RuntimeError("cmake not found on PATH (pip install cmake, or your system's package)")
    build_dir = build_dir or os.path.join(root, "build", "native")
    output_dir = os.path.abspath(output_dir or _PKG_DIR)
    commands = [
        [cmake, "-S", root, "-B", build_dir, f"-DCMAKE_BUILD_TYPE={build_type}",
         f"-DBLIP2_FAST_OUTPUT_DIR={output_dir}", f"-DBLIP2_FAST_NATIVE_CUDA={cuda}"],
        [cmake, "--build", build_dir, "-j", str(jobs or os.cpu_count() or 1)],
    ]
    for cmd in commands:
        proc = subprocess.run(cmd)
        if proc.returncode != 0:
            raise RuntimeError(f"`{' '.join(cmd)}` failed with exit status {proc.returncode}")
    reset()
    return os.path.join(output_dir, library_filename(CPU_LIB))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m blip2_fast.kernels.native", description=__doc__.split("\n")[0])
    parser.add_argument("--build", action="store_true", help="build the libraries with CMake into the package directory")
    parser.add_argument("--build-dir", default=None, help="CMake build directory (default <checkout>/build/native)")
    parser.add_argument("--output-dir", default=None, help="where the libraries go (default: this package's directory)")
    parser.add_argument("--cuda", default="AUTO", choices=["AUTO", "ON", "OFF"], help="build the CUDA library")
    parser.add_argument("--jobs", type=int, default=None)
    parser.add_argument("--info", action="store_true", help="print what loads and from where")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if args.build:
        try:
            print("built", build(args.build_dir, args.output_dir, args.jobs, args.cuda))
        except RuntimeError as err:
            print(f"error: {err}", file=sys.stderr)
            return 1
    if args.info or not args.build:
        for key, value in info().items():
            print(f"{key}: {value}")
    return 0 if load() is not None else 2


if __name__ == "__main__":
    sys.exit(main())

"""What every benchmark row carries: device, telemetry, commit, versions, timings, peak memory.

- `device_info(device)`: torch's device name; on the CPU the model name from /proc/cpuinfo and
  the thread count torch uses (the number that matters most for CPU timings).
- `gpu_telemetry(index)`: NVML (nvidia-ml-py) snapshot — GPU name, memory used, power, SM
  clock — taken right after the timed rounds, so clocks show what the work ran at.
- `Stopwatch`: wraps a callable so every call is timed with the device synchronised before the
  clock is read (CUDA work is asynchronous: without it a timer measures only the launches).
  Warm-up calls are timed too but reported apart (`measured(rounds)` keeps the last rounds).
- `PeakMemory`: on CUDA `torch.cuda.max_memory_allocated` (exact, allocator-level). On the CPU
  torch allocates through the C library, so the analogue is glibc's count of bytes in use
  (`mallinfo2`: heap + mmap chunks), sampled every 0.5 ms by a thread: an estimate that can
  miss a spike shorter than that. Not RSS on purpose: freed memory the allocator keeps is
  reused without raising RSS, so a second model measured after a first would look smaller.
  Without glibc >= 2.33 it falls back to sampled RSS (/proc/self/statm). `kind` says which.
  Sampling costs a little CPU: measure memory in an untimed call.
- `append_result(row)`: one JSON line per run in bench/results/<device-name-slug>.jsonl.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import datetime as _dt
import json
import os
import platform
import re
import resource
import subprocess
import threading
import time
from importlib import metadata

import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULTS_DIR = os.path.join(REPO, "bench", "results")


# ---------------------------------------------------------------------------- environment
def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown cpu"


def device_info(device: str | torch.device = "cpu") -> dict:
    device = torch.device(device)
    if device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        props = torch.cuda.get_device_properties(index)
        return {"type": "cuda", "name": torch.cuda.get_device_name(index), "memory_bytes": props.total_memory,
                "capability": f"{props.major}.{props.minor}", "cuda": torch.version.cuda}
    return {"type": "cpu", "name": cpu_model(), "threads": torch.get_num_threads(), "cores": os.cpu_count()}


def gpu_telemetry(index: int = 0) -> dict | None:
    """NVML snapshot, or None without an NVIDIA GPU; {"error": ...} when NVML itself fails."""
    if not torch.cuda.is_available() or torch.version.hip:
        return None
    try:
        import pynvml
    except ImportError:
        return {"error": "nvidia-ml-py is not installed (pip install nvidia-ml-py)"}
    try:
        pynvml.nvmlInit()
        try:
            h = pynvml.nvmlDeviceGetHandleByIndex(index)
            name = pynvml.nvmlDeviceGetName(h)
            return {"name": name.decode() if isinstance(name, bytes) else name,
                    "memory_used_bytes": pynvml.nvmlDeviceGetMemoryInfo(h).used,
                    "power_w": pynvml.nvmlDeviceGetPowerUsage(h) / 1000,
                    "sm_clock_mhz": pynvml.nvmlDeviceGetClockInfo(h, pynvml.NVML_CLOCK_SM),
                    "temperature_c": pynvml.nvmlDeviceGetTemperature(h, pynvml.NVML_TEMPERATURE_GPU)}
        finally:
            pynvml.nvmlShutdown()
    except pynvml.NVMLError as err:  # e.g. no permission in a container: say so in the row
        return {"error": f"NVML: {err}"}


def git_commit() -> str | None:
    """HEAD, with "+dirty" when the tree has changes or new files (numbers then belong to no
    commit); result rows themselves do not count."""
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True,
                              timeout=10, check=True).stdout.strip()
        status = subprocess.run(["git", "status", "--porcelain"], cwd=REPO, capture_output=True, text=True,
                                timeout=10).stdout.splitlines()
    except (OSError, subprocess.SubprocessError):
        return None
    dirty = [line for line in status if not line[3:].startswith("bench/results/")]
    return head + ("+dirty" if dirty else "")


def versions() -> dict:
    out = {"python": platform.python_version()}
    for dist in ("torch", "transformers", "triton", "blip2_fast"):
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            out[dist] = None
    return out


# ---------------------------------------------------------------------------- timing
def synchronize(device: str | torch.device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


class Stopwatch:
    """`sw = Stopwatch(fn, device)`; calling `sw()` runs fn and records its synchronised time."""

    def __init__(self, fn, device: str | torch.device):
        self.fn, self.device, self.times = fn, device, []

    def __call__(self):
        synchronize(self.device)  # work queued before us is not ours to time
        start = time.perf_counter()
        result = self.fn()
        synchronize(self.device)
        self.times.append(time.perf_counter() - start)
        return result

    def measured(self, rounds: int) -> list[float]:
        """The last `rounds` timings: the calls after warm-up."""
        return self.times[-rounds:]


def median(xs: list[float]) -> float:
    s = sorted(xs)
    n = len(s)
    return s[n // 2] if n % 2 else (s[n // 2 - 1] + s[n // 2]) / 2


# ---------------------------------------------------------------------------- memory
def _rss_bytes() -> int:
    with open("/proc/self/statm", encoding="ascii") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _malloc_in_use():
    """A function returning glibc's in-use bytes, or None where mallinfo2 is missing."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        fn = libc.mallinfo2
    except (OSError, AttributeError):
        return None

    class MallInfo2(ctypes.Structure):
        _fields_ = [(n, ctypes.c_size_t) for n in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks",
                                                   "fsmblks", "uordblks", "fordblks", "keepcost")]

    fn.restype = MallInfo2

    def in_use() -> int:
        m = fn()
        return m.uordblks + m.hblkhd  # allocated heap chunks + mmap-ed chunks (large tensors)
    return in_use


_IN_USE = _malloc_in_use()


class PeakMemory:
    """`with PeakMemory(device) as m: ...` then m.peak_extra_bytes (above what was allocated at
    entry: activations, KV cache, workspaces) and m.kind."""

    def __init__(self, device: str | torch.device):
        self.device = torch.device(device)
        self.peak_extra_bytes = 0
        self._read = _IN_USE or _rss_bytes
        self.kind = ("torch.cuda.max_memory_allocated" if self.device.type == "cuda" else
                     "glibc mallinfo2 in-use bytes sampled every 0.5 ms" if _IN_USE else
                     "rss sampled every 0.5 ms (/proc/self/statm); may under-report")

    def __enter__(self):
        if self.device.type == "cuda":
            synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self._base = torch.cuda.memory_allocated(self.device)
        else:
            self._base = self._peak = self._read()
            self._stop = threading.Event()
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        return self

    def _sample(self):
        while not self._stop.wait(0.0005):
            self._peak = max(self._peak, self._read())

    def __exit__(self, *exc):
        if self.device.type == "cuda":
            synchronize(self.device)
            self.peak_extra_bytes = torch.cuda.max_memory_allocated(self.device) - self._base
        else:
            self._stop.set()
            self._thread.join()
            self.peak_extra_bytes = max(self._peak, self._read()) - self._base
        return False


def max_rss_bytes() -> int:
    """Process-wide high-water mark since start (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def weights_bytes(model: torch.nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in list(model.parameters()) + list(model.buffers()))


# ---------------------------------------------------------------------------- results
def slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-") or "unknown"


def append_result(row: dict, results_dir: str | None = None) -> str:
    """Append `row` (plus time, commit and versions when absent) as one JSON line to
    <results_dir>/<device-name-slug>.jsonl; returns the file's path."""
    row = dict(row)
    row.setdefault("time", _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"))
    row.setdefault("device", device_info("cpu"))
    row.setdefault("commit", git_commit())
    row.setdefault("versions", versions())
    folder = results_dir or os.environ.get("BLIP2_FAST_BENCH_RESULTS") or RESULTS_DIR
    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, slug(row["device"]["name"]) + ".jsonl")
    with open(path, "a", encoding="utf-8") as f:  # one write per row: lines never interleave
        f.write(json.dumps(row, sort_keys=True) + "\n")
    return path


__all__ = ["device_info", "cpu_model", "gpu_telemetry", "git_commit", "versions", "synchronize", "Stopwatch",
           "median", "PeakMemory", "max_rss_bytes", "weights_bytes", "slug", "append_result"]

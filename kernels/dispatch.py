"""The dispatch registry: every kernel entry point picks its backend here, per call.

An op registers once, at import, with `register(name, backends, reasons, timing=None)`:
  backends  its candidate backends in preference order. The family of a backend is the part
            before ':' ("triton:splitk" is in the triton family; "native" is a family of its own);
  reasons   reasons(*args) -> {backend: [reasons it refuses this input]} for every backend, in
            that order (an empty list: it can serve);
  timing    optional: timing(usable, *args) -> (device, {backend: zero-argument call}) when the
            backends able to serve should be timed on this input, or None to keep the
            preference order. The registry times them with `time_backends`, the one timing helper.
Each call then asks `entry.select(key, *args)` with a hashable key the op builds from what its
reasons and timing depend on (shapes, dtypes, devices, ...). A key seen before is one dict
lookup: no reasons recomputed, no timing. A new key computes the reasons, times the usable
backends when the op asks for it, keeps the first backend in preference order that neither
refused nor lost the timing, and caches that decision.

`BLIP2_FAST_BACKEND=torch|triton` forces a family: only its backends are considered, and when
all of them refuse, BackendRefused names each with its reasons (no silent fallback). The
environment is part of every cache key, so changing it between calls decides anew.

Each refusal is logged once per (op, backend, reasons): at DEBUG when the only reason is the
tensors' device (every CPU call refuses the CUDA backends), else at INFO. `explain(op)` reports
the decision that served the latest call of `op` (from the cache or fresh), `explain(op, key)`
the decision cached for `key`; `decisions()` lists every cached decision of every op and
`clear_decisions()` forgets them.
"""
from __future__ import annotations

import contextlib
import logging
import os
import time
from dataclasses import dataclass
from typing import Callable, Mapping, Sequence

log = logging.getLogger("blip2_fast.kernels")

_logged: set[tuple] = set()
_TIMING_REPS = 3  # timed calls per backend after the first one
_TIMING_BUDGET_S = 0.05  # per backend: stop repeating once it has run this long


class BackendRefused(RuntimeError):
    """No backend (or no backend of the forced family) can serve this input; the message names
    each refused backend with its reasons."""


class DeviceReason(str):
    """A refusal reason that is only about the tensors' device (see `device_reason`)."""


def device_reason(device, needs: str) -> str:
    """'tensor on cpu (<needs>)': the backend does not run on this device. Logged at DEBUG, not
    INFO, since every call on that device expects it."""
    return DeviceReason(f"tensor on {getattr(device, 'type', device)} ({needs})")


def forced_backend() -> str | None:
    value = os.environ.get("BLIP2_FAST_BACKEND", "").strip().lower()
    if value in ("", "auto"):
        return None
    if value not in ("torch", "triton"):
        raise ValueError(f"BLIP2_FAST_BACKEND must be 'torch', 'triton' or 'auto', got {value!r}")
    return value


def _env_reader(name: str) -> Callable[[], str | None]:
    """A cheap os.environ.get(name) for the per-call path. os.environ.get costs ~3 us when the
    variable is unset (a KeyError is raised and caught inside), more than the rest of a cached
    decision; os.environ's own dict, keyed as os.environ encodes keys, answers in ~0.15 us and
    sees every change made through os.environ. Plain os.environ.get where that dict is absent."""
    encode, decode = getattr(os.environ, "encodekey", None), getattr(os.environ, "decodevalue", None)
    if encode is None or decode is None or not isinstance(getattr(os.environ, "_data", None), dict):
        return lambda: os.environ.get(name)
    key = encode(name)

    def read():
        value = os.environ._data.get(key)
        return None if value is None else decode(value)
    return read


_read_forced = _env_reader("BLIP2_FAST_BACKEND")
_read_interpret = _env_reader("TRITON_INTERPRET")


def _env_key():
    # Everything in the environment that reasons depend on; TRITON_INTERPRET matters only when a
    # backend is forced, so the common case reads one variable.
    forced = _read_forced()
    return forced and (forced, _read_interpret())


def _family(backend: str) -> str:
    return backend.split(":")[0]


@dataclass(frozen=True)
class Decision:
    """The backend chosen for one key and why the others were not."""
    op: str
    key: tuple
    chosen: str
    refused: dict  # {backend: [reasons]}: refused the input, or measured slower / failed while timed
    timings: dict | None  # {backend: seconds or "failed: ..."} when timing decided, else None
    forced: str | None  # the BLIP2_FAST_BACKEND family in force, if any

    def as_dict(self) -> dict:
        return {"op": self.op, "key": self.key, "chosen": self.chosen,
                "refused": {name: list(reasons) for name, reasons in self.refused.items()},
                "timings": None if self.timings is None else dict(self.timings), "forced": self.forced}


@dataclass(frozen=True)
class Timing:
    winner: str
    seconds: dict  # {backend: best seconds per call, or "failed: <error>"}
    output: object  # the winner's output of its last timed call


class OpEntry:
    """One op's backends, refusal reasons, timing hook and decision cache (see the module docstring)."""

    def __init__(self, name: str, backends: Sequence[str], reasons: Callable, timing: Callable | None = None):
        self.name = name
        self.backends = tuple(backends)
        self.reasons = reasons
        self.timing = timing
        self.cache: dict[tuple, Decision] = {}
        self.latest: Decision | None = None

    def select(self, key, *args) -> tuple[str, object]:
        """(backend for this call, the timed winner's output when this call was just timed, else None)."""
        decision = self.cache.get((key, _env_key()))
        if decision is not None:  # the steady state: one lookup, nothing recomputed
            self.latest = decision
            return decision.chosen, None
        return self._decide(key, args)

    def _decide(self, key, args) -> tuple[str, object]:
        forced = forced_backend()
        reasons = dict(self.reasons(*args))
        if list(reasons) != list(self.backends):
            raise RuntimeError(f"{self.name}: reasons given for {list(reasons)}, registered {list(self.backends)}")
        considered = [n for n in self.backends if forced is None or _family(n) == forced]
        if not considered:
            raise BackendRefused(f"{self.name}: BLIP2_FAST_BACKEND={forced} but {self.name} has no {forced} "
                                 f"backend (it has {', '.join(self.backends)})")
        refused = {n: list(reasons[n]) for n in considered if reasons[n]}
        usable = [n for n in considered if n not in refused]
        if not usable:
            listing = "; ".join(f"{n}: {', '.join(r)}" for n, r in refused.items())
            if forced is not None:
                raise BackendRefused(f"{self.name}: BLIP2_FAST_BACKEND={forced} but every {forced} backend "
                                     f"refused: {listing}")
            raise BackendRefused(f"{self.name}: no backend can serve this input: {listing}")
        timing = None
        plan = self.timing(usable, *args) if self.timing is not None and len(usable) > 1 else None
        if plan is not None:
            device, runs = plan
            timing = time_backends(self.name, runs, device)
            for name, seconds in timing.seconds.items():
                if name != timing.winner:
                    refused[name] = [seconds if isinstance(seconds, str) else
                                     f"measured slower for this shape: {seconds * 1e6:.0f} us vs "
                                     f"{timing.winner} {timing.seconds[timing.winner] * 1e6:.0f} us"]
        chosen = next(n for n in usable if n not in refused)
        decision = Decision(self.name, key, chosen, {n: refused[n] for n in considered if n in refused},
                            None if timing is None else timing.seconds, forced)
        self.cache[(key, _env_key())] = decision
        self.latest = decision
        _log_decision(decision)
        return chosen, (timing.output if timing is not None and timing.winner == chosen else None)


_REGISTRY: dict[str, OpEntry] = {}


def register(name: str, backends: Sequence[str], reasons: Callable, timing: Callable | None = None) -> OpEntry:
    """Register (or, on a module reload, replace) an op; returns the entry its calls select through."""
    entry = OpEntry(name, backends, reasons, timing)
    _REGISTRY[name] = entry
    return entry


def registered(name: str) -> OpEntry:
    return _REGISTRY[name]


def explain(op: str, key=None) -> dict:
    """What served `op`: without a key, the decision behind its latest call (cached or fresh);
    with one, the decision cached for that key under the current environment. The dict holds
    op, key, chosen, refused ({backend: [reasons]}), timings and forced; {} when there is none."""
    entry = _REGISTRY.get(op)
    if entry is None:
        return {}
    decision = entry.latest if key is None else entry.cache.get((key, _env_key()))
    return {} if decision is None else decision.as_dict()


def decisions(op: str | None = None) -> list[dict]:
    """Every cached decision (of one op, or of all), as explain() reports them."""
    entries = _REGISTRY.values() if op is None else [_REGISTRY[op]]
    return [d.as_dict() for entry in entries for d in entry.cache.values()]


def clear_decisions(op: str | None = None) -> None:
    """Forget cached decisions (of one op, or of all): the next call per key decides anew."""
    for entry in (_REGISTRY.values() if op is None else [_REGISTRY[op]]):
        entry.cache.clear()
        entry.latest = None


def _log_decision(decision: Decision) -> None:
    timed = decision.timings or {}
    for name, reasons in decision.refused.items():
        mark = (decision.op, name, tuple(reasons))
        if name in timed or mark in _logged:  # timing results are logged below, once per decision
            continue
        _logged.add(mark)
        level = logging.DEBUG if all(isinstance(r, DeviceReason) for r in reasons) else logging.INFO
        log.log(level, "%s: backend %s refused (%s); using %s", decision.op, name, "; ".join(reasons), decision.chosen)
    if timed:
        log.info("%s %s: timed %s -> %s", decision.op, decision.key,
                 ", ".join(f"{n} {t if isinstance(t, str) else f'{t * 1e6:.1f} us'}" for n, t in timed.items()),
                 decision.chosen)


# ------------------------------------------------------------------------------------- timing

def time_backends(op: str, runs: Mapping[str, Callable[[], object]], device) -> Timing:
    """Time each zero-argument call on `device` and return the fastest (best time per call).

    CPU: the first call is already a sample (timing a backend at prefill sizes is expensive, so
    none is wasted); a backend whose first call is 3x slower than the best so far stops there,
    the others repeat up to _TIMING_REPS times within _TIMING_BUDGET_S. CUDA: the first call is
    a warm-up (Triton compiles, libraries initialise), then _TIMING_REPS calls, each between two
    CUDA events after a device synchronisation, on `device` made current. A backend that raises
    is dropped (its error replaces its time, with a warning); if every one raises, RuntimeError.
    """
    import torch  # the registry itself is torch-free; timing is not

    cuda = getattr(device, "type", device) == "cuda"
    best, outputs, failed = {}, {}, {}
    with torch.cuda.device(device) if cuda else contextlib.nullcontext():
        for name, run in runs.items():
            try:
                seconds, out = _clock(run, cuda)
                samples = [] if cuda else [seconds]
                spent = 0.0 if cuda else seconds
                if not (samples and best and seconds >= 3 * min(best.values())):
                    for _ in range(_TIMING_REPS):
                        if spent > _TIMING_BUDGET_S:
                            break
                        seconds, out = _clock(run, cuda)
                        samples.append(seconds)
                        spent += seconds
            except (RuntimeError, ValueError, NotImplementedError) as err:  # it would fail the real call too
                failed[name] = f"failed: {err}"
                log.warning("%s: backend %s failed while timed (%s); not used for this shape", op, name, err)
                continue
            best[name], outputs[name] = min(samples), out
    if not best:
        raise RuntimeError(f"{op}: every backend failed while timed: {failed}")
    winner = min(best, key=best.get)
    return Timing(winner, {**best, **failed}, outputs[winner])


def _clock(run: Callable[[], object], cuda: bool) -> tuple[float, object]:
    """(seconds, output) of one call; on CUDA between events, the device idle before the start."""
    if not cuda:
        t0 = time.perf_counter()
        out = run()
        return time.perf_counter() - t0, out
    import torch
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda.synchronize()
    start.record()
    out = run()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / 1e3, out

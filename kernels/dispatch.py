"""The one dispatch rule (DESIGN.md §3), shared by every kernel entry point.

Each entry point asks `choose(op, candidates)` with an ordered list of
(backend name, list of refusal reasons) pairs. The first backend with no reasons wins.
`BLIP2_FAST_BACKEND=torch|triton` forces one (a forced backend that refuses the input raises,
naming its reasons, rather than silently falling back). Every refusal is logged once per
(op, backend, reasons) so users can see why a fast path was not taken; `explain(op)` returns
the last decision for an op.
"""
from __future__ import annotations

import logging
import os
from typing import Sequence

log = logging.getLogger("blip2_fast.kernels")

_logged: set[tuple] = set()
_last: dict[str, dict] = {}


class BackendRefused(RuntimeError):
    """A forced backend cannot serve this input; the message lists the reasons."""


def forced_backend() -> str | None:
    value = os.environ.get("BLIP2_FAST_BACKEND", "").strip().lower()
    if value in ("", "auto"):
        return None
    if value not in ("torch", "triton"):
        raise ValueError(f"BLIP2_FAST_BACKEND must be 'torch', 'triton' or 'auto', got {value!r}")
    return value


def triton_usable(*tensors) -> list[str]:
    """Reasons our Triton kernels cannot run on these tensors (empty list: they can)."""
    reasons = []
    try:
        import triton  # noqa: F401
    except ImportError as err:  # triton is optional off Linux
        return [f"triton is not importable ({err})"]
    # On the CPU the interpreter is a correctness tool, far slower than torch: it serves only
    # when asked for by name (BLIP2_FAST_BACKEND=triton with TRITON_INTERPRET=1).
    interpret_ok = os.environ.get("TRITON_INTERPRET") == "1" and forced_backend() == "triton"
    for t in tensors:
        if t is None:
            continue
        if t.device.type != "cuda" and not interpret_ok:
            reasons.append(f"tensor on {t.device.type} (Triton needs CUDA; on the CPU only "
                           f"BLIP2_FAST_BACKEND=triton with TRITON_INTERPRET=1)")
            break
    return reasons


def choose(op: str, candidates: Sequence[tuple[str, list[str]]]) -> str:
    """Pick the first backend with no refusal reasons, honouring BLIP2_FAST_BACKEND.

    `candidates` is ordered by preference; the family of a backend is the part before ':'
    ("triton:split_k" belongs to the triton family) so the environment variable can force
    a family. The torch family must always be present as the last resort.
    """
    forced = forced_backend()
    refused = {}
    for name, reasons in candidates:
        family = name.split(":")[0]
        if forced is not None and family != forced:
            continue
        if reasons:
            refused[name] = list(reasons)
            continue
        _record(op, name, refused)
        return name
    if forced is not None:
        raise BackendRefused(f"{op}: BLIP2_FAST_BACKEND={forced} but every {forced} backend refused: {refused}")
    raise BackendRefused(f"{op}: no backend can serve this input: {refused}")


def _record(op: str, chosen: str, refused: dict) -> None:
    _last[op] = {"chosen": chosen, "refused": refused}
    for name, reasons in refused.items():
        key = (op, name, tuple(reasons))
        if key not in _logged:
            _logged.add(key)
            log.info("%s: backend %s refused (%s); using %s", op, name, "; ".join(reasons), chosen)


def explain(op: str) -> dict:
    """The last decision made for `op`: {'chosen': name, 'refused': {name: [reasons]}}."""
    return dict(_last.get(op, {}))

"""The machinery of the one-call GPU suite (bench/gpu_suite.py): budgets, result rows, the
summary table, and access to the pytest-benchmark suites' code from a plain script.

- `Budget`: a case's time budget inside the suite's global deadline. `step(name, estimate_s,
  fn)` runs one measured step when its estimate still fits; once a step does not fit, it and
  every later step of the case are recorded as skipped ("skip the rest of a case when its budget
  is spent"). A step that raises is recorded as failed with its error and the case goes on: one
  broken figure must not cost the others. Estimates learn: `estimate_like(kind, default)` returns
  the last measured time of a step of the same kind.
- `Suite`: where rows go (`harness.append_result` into one folder: $OUT on the device runner, else
  bench/results), the summary lines (figure, target, value, met), and their markdown table,
  rewritten after every case so that a run cut short still leaves its table.
- `bench_module(name)`: imports bench/<name>.py. The pytest-benchmark suites call
  `pytest.importorskip("pytest_benchmark")` at import so that pytest skips them without the
  plugin; the functions this suite calls never use the plugin, so where it is missing (the CPU
  dry run in CI) the gate is lifted for that one import by a placeholder module that is removed
  again right after. The GPU image has the plugin, and then nothing is replaced.
- `PedanticBench`: the `benchmark` fixture's `pedantic` / `extra_info` / `group` / `stats`
  surface, running warm-up and timed rounds plainly (setup before each round, as
  pytest-benchmark does), so the suites' `run_case` functions run unchanged; their own
  stopwatches do the timing (with `stats` None they time their own rounds).
"""
from __future__ import annotations

import importlib
import os
import sys
import time
import traceback
import types
from dataclasses import dataclass, field

BENCH_DIR = os.path.dirname(os.path.abspath(__file__))
if BENCH_DIR not in sys.path:  # the suites import their helpers as top-level modules (harness, ...)
    sys.path.insert(0, BENCH_DIR)

import harness  # noqa: E402


# ----------------------------------------------------------------------------- the suites' code
def bench_module(name: str):
    """bench/<name>.py imported as the top-level module `name` (as pytest imports it)."""
    if name in sys.modules:
        return sys.modules[name]
    if not missing("pytest_benchmark"):
        return importlib.import_module(name)
    absent = object()
    before = sys.modules.get("pytest_benchmark", absent)
    sys.modules["pytest_benchmark"] = types.ModuleType("pytest_benchmark")  # the gate's import succeeds
    try:
        return importlib.import_module(name)
    finally:  # put back exactly what was there (nothing, or an import-blocking None)
        if before is absent:
            del sys.modules["pytest_benchmark"]
        else:
            sys.modules["pytest_benchmark"] = before


class PedanticBench:
    """Stand-in for pytest-benchmark's fixture (see the module docstring)."""

    def __init__(self):
        self.extra_info: dict = {}
        self.group = None
        self.stats = None  # "not timed by the plugin": the suites then time their own rounds

    def pedantic(self, target, setup=None, rounds: int = 1, warmup_rounds: int = 0, **_):
        for _ in range(warmup_rounds + rounds):
            if setup is not None:
                setup()
            target()


def options(out_dir: str, rounds: int = 3) -> dict:
    """The suites' `bench_options`: record rows into out_dir, one warm-up round."""
    return {"quick": False, "rounds": rounds, "warmup_rounds": 1, "record": True, "results_dir": out_dir}


def skip_exception() -> type[BaseException]:
    """pytest.skip's exception: the suites' run_case raise it for an implementation that cannot run."""
    import pytest
    return pytest.skip.Exception


def missing(module: str) -> str | None:
    """None when `module` imports, else why not (flash-attn, xformers, bitsandbytes...)."""
    try:
        importlib.import_module(module)
    except (ImportError, OSError) as err:  # OSError: a wheel built for another torch or CUDA
        return f"{module} not importable ({type(err).__name__}: {err})"
    return None


# ----------------------------------------------------------------------------- budgets
class BudgetSpent(Exception):
    """Raised by Budget.require when a case cannot even start its first, unavoidable step."""


class Budget:
    """One case's time (see the module docstring)."""

    def __init__(self, suite: "Suite", case: str, seconds: float):
        self.suite, self.case = suite, case
        self.end = min(time.monotonic() + seconds, suite.deadline)
        self.spent = False
        self.learned: dict[str, float] = {}

    def left(self) -> float:
        return self.end - time.monotonic()

    def estimate_like(self, kind: str, default: float) -> float:
        return self.learned.get(kind, default)

    def step(self, name: str, estimate_s: float, fn, kind: str | None = None):
        """fn()'s result, or None when skipped (budget) or failed (recorded either way)."""
        if not self.spent and self.left() < estimate_s:
            self.spent = True
        if self.spent:
            self.suite.record_status(self.case, name, "skipped",
                                     f"budget spent: {max(self.left(), 0):.0f} s left, step estimated {estimate_s:.0f} s")
            return None
        start = time.monotonic()
        try:
            result = fn()
        except skip_exception() as why:  # an implementation that cannot run here (missing library)
            self.suite.record_status(self.case, name, "skipped", str(why))
            return None
        except Exception as err:  # noqa: BLE001 - the suite's boundary: record, then measure the rest
            self.suite.record_status(self.case, name, "failed", f"{type(err).__name__}: {err}",
                                     traceback.format_exc(limit=8))
            return None
        self.learned[kind or name] = time.monotonic() - start
        return result


# ----------------------------------------------------------------------------- rows and summary
@dataclass
class Line:
    figure: str
    target: str
    value: str
    met: bool | None  # None: no target applies, or nothing measured


@dataclass
class Suite:
    out_dir: str
    device: dict
    deadline: float
    lines: list = field(default_factory=list)
    statuses: list = field(default_factory=list)

    @property
    def slug(self) -> str:
        return harness.slug(self.device["name"])

    def record(self, row: dict) -> None:
        """One row into <out_dir>/<device>.jsonl (commit and versions added by harness)."""
        harness.append_result({"device": self.device, **row}, self.out_dir)

    def record_status(self, case: str, step: str, status: str, reason: str, detail: str | None = None) -> None:
        self.statuses.append((case, step, status, reason))
        self.record({"bench": "gpu_suite", "case": case, "step": step, "status": status, "reason": reason,
                     "detail": detail})
        print(f"  [{status}] {case} / {step}: {reason}", flush=True)

    def add(self, figure: str, target: str, value: str, met: bool | None) -> None:
        self.lines.append(Line(figure, target, value, met))
        print(f"  {figure}: {value} (target {target}: {_met(met)})", flush=True)

    def markdown(self) -> str:
        out = [f"# GPU suite on {self.device['name']}", "",
               "| figure | target | value | met |", "|---|---|---|---|"]
        out += [f"| {x.figure} | {x.target} | {x.value} | {_met(x.met)} |" for x in self.lines]
        skipped = [s for s in self.statuses if s[2] != "ok"]
        if skipped:
            out += ["", "| case | step | status | reason |", "|---|---|---|---|"]
            out += [f"| {c} | {s} | {st} | {r.splitlines()[0][:200]} |" for c, s, st, r in skipped]
        return "\n".join(out) + "\n"

    def write_summary(self) -> str:
        os.makedirs(self.out_dir, exist_ok=True)
        path = os.path.join(self.out_dir, f"gpu_summary_{self.slug}.md")
        with open(path, "w", encoding="utf-8") as f:
            f.write(self.markdown())
        return path


def _met(met: bool | None) -> str:
    return "-" if met is None else ("yes" if met else "NO")


def ratio_line(suite: Suite, figure: str, ours: float, reference: float, unit: str, higher_is_better: bool = True,
               target: float = 1.0, target_text: str = "faster than the reference (ratio > 1)") -> float:
    """Add "ours X unit vs reference Y unit, ratio R" with its target; returns the ratio."""
    ratio = ours / reference if higher_is_better else reference / ours
    suite.add(figure, target_text, f"ours {ours:.4g} {unit} vs {reference:.4g} {unit}: x{ratio:.2f}", ratio > target)
    return ratio

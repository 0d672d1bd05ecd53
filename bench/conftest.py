"""Options for the benchmark suites (`pytest bench/`).

--quick (or BLIP2_FAST_BENCH_QUICK=1): one timed round, no warm-up round beyond the untimed
    first call, for a smoke run; numbers from it are noisy and are not recorded.
--rounds N: timed rounds per implementation (default 3; more on a busy machine).
--results-dir DIR: where rows are appended (default bench/results; env BLIP2_FAST_BENCH_RESULTS).
--no-record: measure and report, append nothing (for trying changes out).
GPU cases skip with a reason on a machine without CUDA, so `pytest bench/` runs the CPU cases
anywhere.
"""
import os

import pytest


def pytest_addoption(parser):
    group = parser.getgroup("blip2_fast benchmarks")
    group.addoption("--quick", action="store_true", help="one timed round; results are not recorded")
    group.addoption("--rounds", type=int, default=3, help="timed rounds per implementation (default 3)")
    group.addoption("--results-dir", default=None, help="folder for <device>.jsonl rows (default bench/results)")
    group.addoption("--no-record", action="store_true", help="do not append result rows")


@pytest.fixture(scope="session")
def bench_options(request) -> dict:
    quick = request.config.getoption("--quick") or os.environ.get("BLIP2_FAST_BENCH_QUICK") == "1"
    rounds = 1 if quick else request.config.getoption("--rounds")
    if rounds < 1:
        raise pytest.UsageError(f"--rounds must be >= 1, got {rounds}")
    return {"quick": quick, "rounds": rounds, "warmup_rounds": 0 if quick else 1,
            "record": not (quick or request.config.getoption("--no-record")),
            "results_dir": request.config.getoption("--results-dir")}

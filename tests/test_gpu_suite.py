"""The one-call GPU suite (bench/gpu_suite.py) on a machine without a GPU: its --dry-run lists
every case with an estimate and a budget that together fit in 8 minutes, and checks each case
(imports, configs, meta-device models, launch parameters); its budget bookkeeping skips and
records as it promises."""
import os
import re
import subprocess
import sys

import pytest
import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BENCH = os.path.join(REPO, "bench")
EIGHT_MINUTES = 480
ROW = re.compile(r"^\s*(\d+)\s+(\w+)\s+(\d+)\s+(\d+)\s+\(")
# the figures the suite must cover: (a) Q-Former attention, (b) cross-attention, (c) captioning
# at both LLM families, (d) int8 layers and decode, (e) the stage-1 step, (f) 6.7B int8 memory
CASES = ("qformer_attention", "cross_attention", "caption_opt", "caption_t5", "int8_layers", "int8_decode",
         "train_stage1", "memory_opt67b")

# Makes pytest_benchmark unimportable in the child, as on CI (the [test] extra has no plugin):
# a None entry in sys.modules makes `import pytest_benchmark` raise ImportError
NO_PLUGIN = "import sys\nsys.modules['pytest_benchmark'] = None\n"


def _child_env():
    env = {k: v for k, v in os.environ.items() if k not in ("OUT", "TRITON_INTERPRET")}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [REPO, env.get("PYTHONPATH")]))
    return env


@pytest.fixture(scope="module")
def dry_run():
    proc = subprocess.run([sys.executable, "-m", "bench.gpu_suite", "--dry-run"], cwd=REPO, env=_child_env(),
                          capture_output=True, text=True, timeout=600)
    return proc


def _listed(dry_run) -> dict:
    rows = [ROW.match(line) for line in dry_run.stdout.splitlines()]
    return {m.group(2): (int(m.group(3)), int(m.group(4))) for m in rows if m}


def test_dry_run_exits_0(dry_run):
    assert dry_run.returncode == 0, f"stdout:\n{dry_run.stdout[-4000:]}\nstderr:\n{dry_run.stderr[-4000:]}"


def test_dry_run_lists_every_case_with_estimate_and_budget(dry_run):
    listed = _listed(dry_run)
    assert set(CASES) <= set(listed), dry_run.stdout[:3000]
    for name, (estimate, budget) in listed.items():
        assert 0 < estimate <= budget, (name, estimate, budget)
    total = re.search(r"^total: estimate (\d+) s, budgets (\d+) s \+ start-up (\d+) s <= (\d+) s$", dry_run.stdout, re.M)
    assert total, dry_run.stdout[:3000]
    estimate, budgets, startup, deadline = map(int, total.groups())
    assert budgets == sum(b for _, b in listed.values()) and estimate == sum(e for e, _ in listed.values())
    assert budgets + startup <= EIGHT_MINUTES and deadline == EIGHT_MINUTES


def test_dry_run_checks_every_case(dry_run):
    for name in _listed(dry_run):
        assert re.search(rf"^  {name}: ok \(", dry_run.stdout, re.M), f"{name} not checked ok:\n{dry_run.stdout}"
    assert "FAILED" not in dry_run.stdout


def test_bench_suites_import_without_pytest_benchmark():
    """CI's case: the suites' modules still import (their pytest-benchmark gate is lifted for it)."""
    code = NO_PLUGIN + (
        f"sys.path.insert(0, {BENCH!r})\n"
        "import suite_support\n"
        "for name in ('test_bench_attention', 'test_bench_caption', 'test_bench_int8', 'test_bench_train'):\n"
        "    suite_support.bench_module(name)\n"
        "assert sys.modules['pytest_benchmark'] is None\n"  # the block is back after every import
        "print('imported')\n")
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=_child_env(), capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0 and "imported" in proc.stdout, proc.stderr[-3000:]


def test_budget_skips_the_rest_and_records_failures(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(BENCH)
    import suite_support

    suite = suite_support.Suite(str(tmp_path), {"type": "cpu", "name": "test device"}, deadline=1e12)
    budget = suite_support.Budget(suite, "case", seconds=100)
    assert budget.step("fits", 1.0, lambda: 42) == 42
    assert budget.step("breaks", 1.0, lambda: 1 / 0) is None  # failed, recorded, the case goes on
    assert budget.step("too long", 1000.0, lambda: 1) is None  # skipped: does not fit
    assert budget.step("small but after", 0.1, lambda: 1) is None  # the rest of the case is skipped too
    statuses = [(step, status) for _, step, status, _ in suite.statuses]
    assert statuses == [("breaks", "failed"), ("too long", "skipped"), ("small but after", "skipped")]
    rows = (tmp_path / "test-device.jsonl").read_text().splitlines()
    assert len(rows) == 3 and '"status": "failed"' in rows[0] and "ZeroDivisionError" in rows[0]
    suite.add("figure", "ratio > 1", "x1.50", True)
    text = open(suite.write_summary()).read()
    assert "| figure | ratio > 1 | x1.50 | yes |" in text and "too long" in text


def test_t5_caption_measurement_on_tiny_models(tmp_path, monkeypatch):
    """The suite's own FlanT5 captioning measurement (the GPU case's code) on a tiny fp32 pair:
    both sides generate the same ids, and the row has what the summary reads."""
    monkeypatch.syspath_prepend(BENCH)
    import suite_caption
    import suite_support
    from blip2_fast.models.blip2 import Blip2ForConditionalGeneration
    from blip2_fast.testing import make_tiny_folder

    hf = make_tiny_folder(str(tmp_path), text="t5", with_processor=False, qformer_heads=3, vision_heads=3).eval()
    ours = Blip2ForConditionalGeneration.from_pretrained(str(tmp_path))
    case = suite_support.bench_module("test_bench_caption").Case("tiny-t5", "cpu", "float32", 2, 1, 4, 0.02)
    row = suite_caption.caption_t5_row(case, ours, hf, rounds=1)
    assert row["ids_identical"] and row["first_token_match"] == 1.0
    assert row["ratio"] == row["ours"]["images_per_s"] / row["transformers"]["images_per_s"] > 0
    assert len(row["ours"]["times_s"]) == 1


def test_streamed_int8_model_decodes(monkeypatch):
    """The memory case's streamed build (meta device, quantize_, one tensor at a time) gives a
    complete int8 model whose decode-rate measurement runs."""
    monkeypatch.syspath_prepend(BENCH)
    import suite_caption
    import suite_memory
    from blip2_fast.quantization import Int8Linear

    model = suite_memory.streamed_model("blip2-small", int8=True, device="cpu")
    linears = [m for m in model.language_model.modules() if isinstance(m, Int8Linear)]
    assert linears and all(m.weight.dtype == torch.int8 and not m.weight.is_meta for m in linears)
    assert model.qformer.layernorm.weight.dtype == torch.float32  # the loader's rule: Q-Former in fp32
    rates = suite_caption.decode_tokens_per_s(model, batch=2, tokens=3, rounds=2)
    assert len(rates) == 2 and all(r > 0 for r in rates)

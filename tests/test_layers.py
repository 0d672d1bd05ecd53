"""The package's layers import one way only (the contracts in .importlinter), and inference
loads nothing of training or the command line."""
from __future__ import annotations

import os
import re
import subprocess
import sys


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_import_linter_contracts_are_kept():
    # in a subprocess: import-linter configures logging in-process, which would silence ours
    code = ("import sys; from importlinter.cli import lint_imports; "
            f"sys.exit(lint_imports(config_filename={os.path.join(ROOT, '.importlinter')!r}, no_cache=True))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    assert "BROKEN" not in proc.stdout and "KEPT" in proc.stdout


def test_the_contracts_cover_every_module_of_the_package():
    """A new top-level module must be placed in a layer, or the contract says nothing about it."""
    text = open(os.path.join(ROOT, ".importlinter"), encoding="utf-8").read()
    package = os.path.join(ROOT, "blip2_fast")
    names = {n[:-3] if n.endswith(".py") else n for n in os.listdir(package)
             if (n.endswith(".py") and n != "__init__.py") or os.path.isfile(os.path.join(package, n, "__init__.py"))}
    placed = set(re.findall(r"blip2_fast\.(\w+)", text))
    missing = sorted(names - placed)
    assert not missing, f"modules in no layer of .importlinter: {missing}"


def test_inference_loads_nothing_of_training_or_the_command_line():
    code = ("import sys, blip2_fast.engine, blip2_fast.retrieval, blip2_fast.models.features; "
            "print(sorted(m for m in sys.modules if m.startswith(('blip2_fast.training', 'blip2_fast.cli', "
            "'blip2_fast.miniature'))))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                          env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "[]", proc.stdout

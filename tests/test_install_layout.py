"""The repository's top-level `kernels/` folder never hides the PyPI package `kernels`.

transformers (5.2x) imports the PyPI package `kernels`; `python -m pytest`, `python -c` and
notebooks put the current directory first on sys.path, so from the repository root a regular
package called `kernels` there would be found first and break transformers. Each check below
runs a fresh interpreter with the repository root as its working directory, as a user would.
"""
from __future__ import annotations

import importlib.metadata
import os
import re
import subprocess
import sys
import warnings
import zipfile

import pytest

from blip2_fast import world

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OUR_OPS = os.path.join(ROOT, "kernels")


def run_in(cwd: str, *args: str, env: dict | None = None, timeout: int = 600) -> subprocess.CompletedProcess:
    full_env = dict(os.environ, OMP_NUM_THREADS="1", **(env or {}))
    full_env.pop("PYTHONSAFEPATH", None)  # the point is the default sys.path, current directory first
    return subprocess.run([sys.executable, *args], cwd=cwd, capture_output=True, text=True, env=full_env,
                          timeout=timeout)


def installed_kernels_dir() -> str | None:
    """The folder of the PyPI `kernels` package, when that distribution is installed."""
    try:
        dist = importlib.metadata.distribution("kernels")
    except importlib.metadata.PackageNotFoundError:
        return None
    return os.path.realpath(str(dist.locate_file("kernels")))


def test_top_level_folder_is_not_a_regular_package():
    assert os.path.isfile(os.path.join(OUR_OPS, "dispatch.py"))
    assert not os.path.exists(os.path.join(OUR_OPS, "__init__.py")), \
        "kernels/__init__.py makes the folder a regular package that shadows the PyPI `kernels`"


def test_import_kernels_from_the_root_is_never_ours():
    proc = run_in(ROOT, "-c", "import kernels; print(getattr(kernels, '__file__', None)); "
                              "print(list(getattr(kernels, '__path__', [])))")
    installed = installed_kernels_dir()
    if installed is not None:  # transformers >= 5.25 brings it: that one must be what `import kernels` gives
        assert proc.returncode == 0, proc.stderr
        file, _ = proc.stdout.splitlines()
        assert os.path.dirname(os.path.realpath(file)) == installed
    else:  # without it, the folder may at most be an empty namespace portion, never our package
        assert proc.returncode != 0 or proc.stdout.splitlines()[0] == "None", proc.stdout


def test_transformers_blip2_imports_from_the_root():
    proc = run_in(ROOT, "-c", "import blip2_fast, transformers; from transformers import Blip2ForConditionalGeneration; "
                              "import blip2_fast.kernels.dispatch as d; print(d.__file__)")
    assert proc.returncode == 0, proc.stderr
    assert os.path.realpath(proc.stdout.strip()) == os.path.realpath(os.path.join(OUR_OPS, "dispatch.py"))


def test_pytest_collects_every_test_from_the_root():
    proc = run_in(ROOT, "-m", "pytest", "tests", "-q", "--collect-only", "-p", "no:cacheprovider")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    last = proc.stdout.strip().splitlines()[-1]
    assert "collected" in last and "error" not in last, last
    assert os.path.basename(__file__) in proc.stdout  # this very file was collected too


def test_python_m_blip2_fast_captions_from_the_root(tmp_path):
    scene = world.sample_scene(world.scene_rng(7, 0, "eval"))
    image = tmp_path / "scene.png"
    world.render(scene, 64).save(image)
    proc = run_in(ROOT, "-m", "blip2_fast", "caption", str(image), "--device", "cpu")
    assert proc.returncode == 0, proc.stderr
    assert world.parse_caption(proc.stdout.strip()) is not None, proc.stdout  # a sentence of the world's grammar


def test_wheel_installs_the_ops_under_blip2_fast_only(tmp_path):
    """A wheel holds blip2_fast/kernels/<op>.py and nothing called `kernels` at its top level;
    unpacked onto sys.path, it imports its own ops and leaves `import kernels` to the PyPI one."""
    wheels = tmp_path / "wheels"
    proc = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                           "-w", str(wheels), ROOT], capture_output=True, text=True, timeout=900,
                          env=dict(os.environ, BLIP2_FAST_NO_NATIVE="1", PIP_DISABLE_PIP_VERSION_CHECK="1"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    (wheel,) = wheels.glob("blip2_fast-*.whl")
    with zipfile.ZipFile(wheel) as archive:
        names = archive.namelist()
        site = tmp_path / "site"
        archive.extractall(site)
    tops = {name.split("/")[0] for name in names}
    assert "kernels" not in tops, sorted(tops)
    ops = sorted(f for f in os.listdir(OUR_OPS) if f.endswith(".py"))
    assert {f"blip2_fast/kernels/{f}" for f in ops + ["__init__.py"]} <= set(names)
    assert any(name.startswith("blip2_fast/kernels/csrc/") for name in names)
    source = os.path.join(ROOT, "blip2_fast")
    modules = {os.path.relpath(os.path.join(d, f), ROOT).replace(os.sep, "/")
               for d, _, files in os.walk(source) if "__pycache__" not in d for f in files if f.endswith(".py")}
    assert modules <= set(names), sorted(modules - set(names))  # every module of every sub-package

    check = ("import blip2_fast, blip2_fast.kernels.dispatch as d, blip2_fast.kernels as k; "
             "print(blip2_fast.__file__); print(d.__file__); print(len(k.__path__))")
    proc = run_in(str(tmp_path), "-c", check, env={"PYTHONPATH": str(site)})
    assert proc.returncode == 0, proc.stderr
    package, dispatch, path_len = proc.stdout.split()
    assert package.startswith(str(site)) and dispatch.startswith(str(site)), proc.stdout
    assert path_len == "1"  # the wheel's own folder only
    installed = installed_kernels_dir()
    if installed is not None:
        proc = run_in(str(site), "-c", "import kernels; print(kernels.__file__)")
        assert proc.returncode == 0, proc.stderr
        assert os.path.dirname(os.path.realpath(proc.stdout.strip())) == installed


def test_transformers_outside_the_tested_range_warns_once(monkeypatch):
    from blip2_fast import versions

    monkeypatch.setattr(versions, "_warned", False)
    newest = versions.TESTED_TRANSFORMERS[1]
    too_new = ".".join([str(int(newest.split(".")[0]) + 1), "0", "0"])
    with pytest.warns(UserWarning, match=re.escape(f"transformers {too_new} is outside the range blip2_fast is tested with ({versions.TESTED_TRANSFORMERS[0]} to {newest})")):
        assert versions.check_transformers(too_new) is False
    with warnings.catch_warnings(record=True) as again:
        warnings.simplefilter("always")
        assert versions.check_transformers(too_new) is False
    assert again == []  # once per process
    monkeypatch.setattr(versions, "_warned", False)
    with pytest.warns(UserWarning, match="transformers 4.46.3 "):
        assert versions.check_transformers("4.46.3") is False
    assert versions.check_transformers(versions.TESTED_TRANSFORMERS[0]) is True
    assert versions.check_transformers(newest) is True

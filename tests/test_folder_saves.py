"""Folder saves (`save_pretrained`, the training export) interrupted between their steps: by an
exception, or by a real kill (a forked child that dies with os._exit, so no cleanup runs). The
old folder must stay loadable and unmixed, the next save must clean what the dead one left, and
a sharded save must not leave the weights of an earlier single-file save (nor the reverse)."""
import os
import shutil

import pytest
import safetensors.torch
import torch

from blip2_fast import atomic
from blip2_fast.models.blip2 import Blip2ForConditionalGeneration
from blip2_fast.testing import make_tiny_folder

pytestmark = pytest.mark.skipif(not hasattr(os, "fork"), reason="kills are simulated in a forked child")


class Boom(Exception):
    pass


@pytest.fixture()
def saved(tmp_path):
    """A model folder, its files' bytes, and a model with other weights to save over it."""
    folder = str(tmp_path / "tiny")
    make_tiny_folder(folder, vocab_size=41)
    before = snapshot(folder)
    model = Blip2ForConditionalGeneration.from_pretrained(folder)
    with torch.no_grad():
        model.language_projection.bias.fill_(0.25)
    return folder, before, model


def snapshot(folder) -> dict:
    out = {}
    for root, _, files in os.walk(folder):
        for name in files:
            path = os.path.join(root, name)
            out[os.path.relpath(path, folder)] = open(path, "rb").read()
    return out


def leftovers(folder) -> list[str]:
    parent, name = os.path.split(folder)
    return sorted(n for n in os.listdir(parent) if n.startswith(f".{name}."))


def bias(folder) -> float:
    return float(Blip2ForConditionalGeneration.from_pretrained(folder).language_projection.bias[0])


def die_or_raise(how: str):
    if how == "kill":
        os._exit(9)  # what SIGKILL or a power cut does: no finally, no except runs
    raise Boom()


def run_save(how: str, arrange, save) -> None:
    """`arrange()` sets the trap, then `save()` runs: in this process (a raise) or in a child that
    dies at the trap (a kill)."""
    if how == "raise":
        arrange()
        with pytest.raises(Boom):
            save()
        return
    pid = os.fork()
    if pid == 0:
        try:
            arrange()
            save()
        finally:
            os._exit(0)  # never return into pytest from the child
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 9, "the save was not killed where intended"


def trap_weights_file(how: str, nth: int) -> None:
    """The nth safetensors file written is left half written, then the save dies (or raises)."""
    real, calls = safetensors.torch.save_file, {"n": 0}

    def save_file(tensors, path, metadata=None):
        calls["n"] += 1
        if calls["n"] == nth:
            with open(path, "wb") as f:
                f.write(b"half a shard")
            die_or_raise(how)
        return real(tensors, path, metadata=metadata)

    safetensors.torch.save_file = save_file


@pytest.mark.parametrize("how", ["raise", "kill"])
def test_a_save_stopped_while_writing_leaves_the_old_folder(saved, how):
    folder, before, model = saved
    real = safetensors.torch.save_file
    try:
        run_save(how, lambda: trap_weights_file(how, 2),
                 lambda: model.save_pretrained(folder, max_shard_size="20KB"))
    finally:
        safetensors.torch.save_file = real
    assert snapshot(folder) == before  # not one file of the new save mixed in
    assert bias(folder) != 0.25
    if how == "raise":
        assert leftovers(folder) == []  # cleaned on the way out
    else:
        assert [n for n in leftovers(folder) if n.startswith(".tiny.saving-")]
    model.save_pretrained(folder)  # the next save cleans what a killed one left
    assert leftovers(folder) == [] and bias(folder) == 0.25


@pytest.mark.parametrize("how", ["raise", "kill"])
def test_a_save_stopped_after_the_swap_leaves_the_new_folder(saved, how, monkeypatch):
    """Killed after the new folder took the old one's place, before the old one was deleted."""
    folder, _, model = saved
    real_rmtree = shutil.rmtree

    def arrange():
        monkeypatch.setattr(atomic.shutil, "rmtree", lambda path, ignore_errors=False: die_or_raise(how))

    run_save(how, arrange, lambda: model.save_pretrained(folder))
    monkeypatch.setattr(atomic.shutil, "rmtree", real_rmtree)
    assert bias(folder) == 0.25 and "model.safetensors" in os.listdir(folder)
    model.save_pretrained(folder)
    assert leftovers(folder) == []


def test_a_save_killed_between_the_two_renames_is_undone_by_the_next(saved, monkeypatch):
    """Where the folders cannot be swapped in one step (not Linux), a kill between moving the old
    folder aside and moving the new one in leaves no folder: the next save puts the old one back
    before anything else, so it is never lost."""
    folder, before, model = saved
    real_replace, calls = os.replace, {"n": 0}

    def arrange():
        monkeypatch.setattr(atomic, "exchange", lambda a, b: False)

        def replace(src, dst):
            calls["n"] += 1
            if calls["n"] == 2:  # the first moved the old folder aside
                os._exit(9)
            return real_replace(src, dst)

        monkeypatch.setattr(atomic.os, "replace", replace)

    run_save("kill", arrange, lambda: model.save_pretrained(folder))
    assert not os.path.exists(folder)
    atomic.remove_leftovers(folder)  # the first thing the next save does
    assert snapshot(folder) == before and bias(folder) != 0.25 and leftovers(folder) == []


def test_the_exchange_swaps_in_one_step_on_linux(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir()
    b.mkdir()
    (a / "new").write_text("new")
    (b / "old").write_text("old")
    if not atomic.exchange(str(a), str(b)):
        pytest.skip("no renameat2 RENAME_EXCHANGE here: the two-rename fallback serves")
    assert os.listdir(b) == ["new"] and os.listdir(a) == ["old"]


def test_sharded_over_single_and_single_over_sharded_leave_no_stale_weights(saved):
    folder, _, model = saved
    assert "model.safetensors" in os.listdir(folder)
    model.save_pretrained(folder, max_shard_size="20KB")
    names = set(os.listdir(folder))
    shards = {n for n in names if n.startswith("model-") and n.endswith(".safetensors")}
    assert len(shards) > 1 and "model.safetensors.index.json" in names and "model.safetensors" not in names
    assert bias(folder) == 0.25
    with torch.no_grad():
        model.language_projection.bias.fill_(0.5)
    model.save_pretrained(folder)
    names = set(os.listdir(folder))
    assert "model.safetensors" in names and "model.safetensors.index.json" not in names
    assert not {n for n in names if n.startswith("model-")}
    assert bias(folder) == 0.5


@pytest.mark.parametrize("how", ["raise", "kill"])
def test_a_training_export_stopped_midway_leaves_the_previous_export(saved, tmp_path, how):
    from blip2_fast.training.export import export_folder

    start, _, model = saved
    out = str(tmp_path / "run" / "model")
    export_folder(start, {"language_projection.bias": torch.full_like(model.language_projection.bias, 0.75)}, out)
    before = snapshot(out)
    real = safetensors.torch.save_file
    trained = {"language_projection.bias": torch.full_like(model.language_projection.bias, 0.125)}
    try:
        run_save(how, lambda: trap_weights_file(how, 1), lambda: export_folder(start, trained, out))
    finally:
        safetensors.torch.save_file = real
    assert snapshot(out) == before and bias(out) == 0.75
    export_folder(start, trained, out)
    assert bias(out) == 0.125 and leftovers(out) == []

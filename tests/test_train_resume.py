"""A training run's output folder under trouble: checkpoints that would run code, damaged
checkpoints, a second run on the same --out, SIGINT / SIGTERM, resuming with other data.
Stage 1 on the tiny model of test_train_loop (CPU)."""
import json
import os
import pickle
import signal
import subprocess
import sys

import pytest
import torch

from blip2_fast.cli import main
from blip2_fast.training import tasks
from blip2_fast.training.checkpoint import FORMAT, load_checkpoint
from blip2_fast.training.loop import train
from test_train_loop import config, losses, make_stage1_folder
from blip2_fast.world import generate_dataset


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("world_resume")
    return generate_dataset(str(root), n=24, seed=1, resolution=28, with_questions=False)


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    path = tmp_path_factory.mktemp("resume_model")
    make_stage1_folder(str(path))
    return str(path)


def argv(folder, data, out, *extra):
    return ["train", "--stage", "1", "--model", folder, "--data", str(data), "--out", str(out), "--batch-size", "4",
            "--lr", "3e-4", "--warmup-steps", "2", "--log-every", "1", "--seed", "3", "--no-progress", *map(str, extra)]


class RunsCode:
    """What a tampered checkpoint holds: unpickling it calls os.system."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


# ---------------------------------------------------------------------------- item 1: weights_only
def test_checkpoint_is_plain_data_that_weights_only_reads(folder, world, tmp_path):
    out = tmp_path / "run"
    train(config(folder, world, out, steps=2, export=False))
    state = torch.load(out / "checkpoints" / "last.pt", map_location="cpu", weights_only=True)
    assert state["format"] == FORMAT and state["step"] == 2
    rng = state["rng"][0]
    assert isinstance(rng["python"]["state"], list) and isinstance(rng["numpy"]["keys"], list)
    assert state["config"]["steps"] == 2 and state["data_size"] == 24


@pytest.mark.parametrize("where", ["resume_file", "planted_last", "raw_pickle"])
def test_a_checkpoint_whose_pickle_runs_code_is_refused_unrun(folder, world, tmp_path, capsys, where):
    marker = tmp_path / "code_ran"
    out = tmp_path / "run"
    if where == "planted_last":
        path = out / "checkpoints" / "last.pt"
        path.parent.mkdir(parents=True)
        resume = "auto"
    else:
        path = tmp_path / "evil.pt"
        resume = str(path)
    payload = {"format": FORMAT, "step": 1, "rng": RunsCode(marker)}
    if where == "raw_pickle":  # the legacy (non-zip) format torch.load also reads
        path.write_bytes(pickle.dumps(payload))
    else:
        torch.save(payload, path)
    code = main(argv(folder, world, out, "--steps", 2, "--resume", resume))
    err = capsys.readouterr().err
    assert not marker.exists(), "the checkpoint's code ran"
    assert code == 2
    lines = [line for line in err.splitlines() if line.startswith("blip2-fast: error:")]
    assert len(lines) == 1 and "refused" in lines[0] and "system" in lines[0] and str(path) in lines[0]
    assert "Traceback" not in err


# ---------------------------------------------------------------------------- item 4: one run per --out
def test_a_second_run_on_the_same_out_is_refused_naming_the_holder(folder, world, tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    holder = subprocess.Popen(
        [sys.executable, "-c", "import fcntl, os, sys, time\n"
         f"fd = os.open({str(out / '.lock')!r}, os.O_RDWR | os.O_CREAT)\n"
         "fcntl.flock(fd, fcntl.LOCK_EX)\nos.write(fd, f'{os.getpid()}\\n'.encode())\n"
         "print('locked', flush=True)\ntime.sleep(120)\n"], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        code = main(argv(folder, world, out, "--steps", 1, "--no-export"))
        err = capsys.readouterr().err
        assert code == 2 and f"pid {holder.pid}" in err and "another training run" in err
        assert not os.path.exists(out / "checkpoints")
    finally:
        holder.kill()
        holder.wait()
    assert main(argv(folder, world, out, "--steps", 1, "--no-export")) == 0  # the lock died with its holder


# ---------------------------------------------------------------------------- item 5: signals and resume
@pytest.mark.parametrize("signum,exit_code", [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_a_signal_saves_after_the_step_and_auto_resume_continues_exactly(folder, world, tmp_path, capsys,
                                                                          monkeypatch, caplog, signum, exit_code):
    train(config(folder, world, tmp_path / "full", steps=6, export=False))
    real_inputs, calls = tasks.Stage1Task.inputs, {"n": 0}

    def signalled_in_step_3(self, batch, generator):
        calls["n"] += 1
        if calls["n"] == 3:
            os.kill(os.getpid(), signum)
        return real_inputs(self, batch, generator)

    monkeypatch.setattr(tasks.Stage1Task, "inputs", signalled_in_step_3)
    cut = tmp_path / "cut"
    assert main(argv(folder, world, cut, "--steps", 6, "--no-export")) == exit_code
    err = capsys.readouterr().err
    assert f"stopped by {signal.Signals(signum).name} after step 3" in err and "--resume auto" in err
    assert load_checkpoint(str(cut / "checkpoints" / "last.pt"))["step"] == 3
    monkeypatch.setattr(tasks.Stage1Task, "inputs", real_inputs)
    assert signal.getsignal(signum) in (signal.SIG_DFL, signal.default_int_handler)  # handlers restored

    with caplog.at_level("INFO", logger="blip2_fast"):
        assert main(argv(folder, world, cut, "--steps", 6, "--no-export", "--resume", "auto")) == 0
    assert "continuing after step 3" in caplog.text
    assert "resume     step 3 from" in capsys.readouterr().err  # the run summary names the resume point
    assert losses(cut) == losses(tmp_path / "full")  # steps 1..6 once each, bit for bit


def test_the_previous_checkpoint_serves_when_the_last_is_damaged(folder, world, tmp_path, caplog):
    """Two checkpoints kept; a damaged last.pt falls back to previous.pt with a warning; a killed
    save's temporary file is removed; metrics.jsonl is cut back to the resumed step."""
    train(config(folder, world, tmp_path / "full", steps=6, save_every=2, export=False))
    cut = tmp_path / "cut"
    train(config(folder, world, cut, steps=6, save_every=2, export=False), stop_after_step=4)
    ckpts = cut / "checkpoints"
    assert sorted(os.listdir(ckpts)) == ["last.pt", "previous.pt"]
    assert load_checkpoint(str(ckpts / "previous.pt"))["step"] == 2 and load_checkpoint(str(ckpts))["step"] == 4
    data = (ckpts / "last.pt").read_bytes()
    (ckpts / "last.pt").write_bytes(data[: len(data) // 2])  # a copy cut short
    (ckpts / ".last.pt.tmp-killed").write_bytes(b"what a killed save left")
    assert [r[0] for r in losses(cut)] == [1, 2, 3, 4]
    with caplog.at_level("INFO", logger="blip2_fast"):
        train(config(folder, world, cut, steps=6, save_every=2, resume="auto", export=False))
    assert "last.pt: cannot read the checkpoint" in caplog.text and "previous checkpoint" in caplog.text
    assert "continuing after step 2" in caplog.text
    assert not (ckpts / ".last.pt.tmp-killed").exists()
    assert losses(cut) == losses(tmp_path / "full")  # rows 3 and 4 of the first try were dropped


def test_a_damaged_checkpoint_named_explicitly_is_an_error(folder, world, tmp_path, capsys):
    path = tmp_path / "cut_short.pt"
    path.write_bytes(b"PK\x03\x04 not a whole checkpoint")
    code = main(argv(folder, world, tmp_path / "run", "--steps", 2, "--resume", str(path)))
    err = capsys.readouterr().err
    assert code == 2 and "cannot read the checkpoint" in err and "Traceback" not in err


def test_resuming_with_another_data_set_size_is_refused(folder, world, tmp_path, capsys):
    out = tmp_path / "run"
    train(config(folder, world, out, steps=2, export=False))
    half = tmp_path / "half.jsonl"
    rows = open(world).read().splitlines()[:12]
    root = os.path.dirname(world)
    half.write_text("".join(json.dumps({**json.loads(r), "image": os.path.join(root, json.loads(r)["image"])}) + "\n"
                            for r in rows))
    code = main(argv(folder, half, out, "--steps", 4, "--resume", "auto"))
    err = capsys.readouterr().err
    assert code == 2 and "24 records" in err and "12" in err and "Traceback" not in err


def test_a_full_disk_is_named_with_its_path(folder, world, tmp_path, capsys, monkeypatch):
    import errno

    def no_space(obj, f, *a, **kw):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(torch, "save", no_space)
    out = tmp_path / "run"
    code = main(argv(folder, world, out, "--steps", 1, "--no-export"))
    err = capsys.readouterr().err
    assert code == 2 and "disk is full" in err and str(out / "checkpoints" / "last.pt") in err
    assert "Traceback" not in err and os.listdir(out / "checkpoints") == []

"""blip2_fast.atomic: a file or folder is replaced whole or not at all, and leftovers are cleaned."""
from __future__ import annotations

import os

import pytest

from blip2_fast import atomic


class Boom(Exception):
    pass


def test_write_file_replaces_and_leaves_nothing_beside(tmp_path):
    path = tmp_path / "a.txt"
    path.write_text("old")
    atomic.write_file(str(path), lambda tmp: open(tmp, "w").write("new"))
    assert path.read_text() == "new"
    assert os.listdir(tmp_path) == ["a.txt"]


def test_write_file_failing_midway_keeps_the_old_content(tmp_path):
    path = tmp_path / "a.txt"
    path.write_text("old")

    def half_then_fail(tmp):
        with open(tmp, "w") as f:
            f.write("half")
        raise Boom()

    with pytest.raises(Boom):
        atomic.write_file(str(path), half_then_fail)
    assert path.read_text() == "old"
    assert os.listdir(tmp_path) == ["a.txt"]


def test_replace_folder_swaps_whole_and_cleans_killed_saves(tmp_path):
    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "old.bin").write_text("old")
    # what a save killed between its steps leaves beside the folder
    (tmp_path / ".model.saving-x").mkdir()
    (tmp_path / ".model.old-y").mkdir()

    def fill(tmp):
        with open(os.path.join(tmp, "new.bin"), "w") as f:
            f.write("new")

    atomic.replace_folder(str(folder), fill)
    assert os.listdir(folder) == ["new.bin"]  # no mix of old and new files
    assert sorted(os.listdir(tmp_path)) == ["model"]


def test_replace_folder_failing_keeps_the_old_folder(tmp_path):
    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "old.bin").write_text("old")

    def fail(tmp):
        open(os.path.join(tmp, "partial.bin"), "w").close()
        raise Boom()

    with pytest.raises(Boom):
        atomic.replace_folder(str(folder), fail)
    assert os.listdir(folder) == ["old.bin"]
    assert sorted(os.listdir(tmp_path)) == ["model"]


def test_save_pretrained_keeps_the_folders_other_files_and_drops_stale_weights(tmp_path):
    import torch

    from blip2_fast.models.blip2 import Blip2ForConditionalGeneration
    from blip2_fast.testing import make_tiny_folder

    folder = str(tmp_path / "tiny")
    make_tiny_folder(folder, vocab_size=41)
    with open(os.path.join(folder, "pytorch_model.bin"), "wb") as f:
        f.write(b"stale weights of an older save")
    before = set(os.listdir(folder))
    model = Blip2ForConditionalGeneration.from_pretrained(folder)
    with torch.no_grad():
        model.language_projection.bias.fill_(0.25)
    model.save_pretrained(folder)
    after = set(os.listdir(folder))
    assert "pytorch_model.bin" not in after
    assert (before - {"pytorch_model.bin"}) <= after, before - after  # tokenizer, processor files kept
    again = Blip2ForConditionalGeneration.from_pretrained(folder)
    assert torch.all(again.language_projection.bias == 0.25)
    assert not [n for n in os.listdir(tmp_path) if n.startswith(".")]

"""The command line on inputs that used to end in a traceback or a silently wrong result, and its
fit: help with defaults, unknown flags, --threads, rank-0 printing, skipped images, the retrieve
header. Tiny random models (CPU)."""
from __future__ import annotations

import io
import json
import os
import shutil
import struct
import subprocess
import sys
import zlib
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

from blip2_fast import cli
from blip2_fast.images import ImageSpec, preprocess, to_rgb
from blip2_fast.testing import make_tiny_folder
from test_retrieval import make_retrieval_folder

QUICK = ["--beams", "1", "--max-new-tokens", "3"]


def png_bomb(path, side=20000):
    """A valid 1-bit PNG of side x side pixels (400 M for 20000): 50 KB on disk, streamed."""
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)
    pack, row = zlib.compressobj(9), b"\0" * (1 + (side + 7) // 8)
    idat = b"".join(pack.compress(row) for _ in range(side)) + pack.flush()
    with open(path, "wb") as f:
        f.write(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", side, side, 1, 0, 0, 0, 0))
                + chunk(b"IDAT", idat) + chunk(b"IEND", b""))
    return str(path)


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    root = tmp_path_factory.mktemp("robust")
    gen, ret = str(root / "gen"), str(root / "ret")
    make_tiny_folder(gen, vocab_size=41)
    make_retrieval_folder(ret, seed=2)
    rs = np.random.RandomState(0)
    images = root / "images"
    images.mkdir()
    for i in range(3):
        Image.fromarray(rs.randint(0, 256, (30, 30, 3), dtype=np.uint8)).save(images / f"img{i}.png")
    bad = root / "bad"
    bad.mkdir()
    (bad / "notes.png").write_text("not an image")
    whole = (images / "img0.png").read_bytes()
    (bad / "cut.png").write_bytes(whole[: len(whole) // 2])  # the header reads, the pixels do not
    texts = root / "texts.txt"
    texts.write_text("a red circle\nthe cat\n")
    return SimpleNamespace(root=root, gen=gen, ret=ret, images=images, bad=bad, texts=str(texts),
                           good=[str(images / f"img{i}.png") for i in range(3)], bomb=png_bomb(root / "bomb.png"))


def run(capsys, *argv) -> tuple[int, str, str]:
    code = cli.main([str(a) for a in argv])
    out = capsys.readouterr()
    return code, out.out, out.err


def one_error_line(code, out, err, *words):
    assert code == 2, err
    assert "Traceback" not in err and out == ""
    lines = [line for line in err.splitlines() if line.startswith("blip2-fast: error:")]
    assert len(lines) == 1, err
    for word in words:
        assert word in lines[0], (word, lines[0])


# ---------------------------------------------------------------------------- item 6: one-line errors
def test_a_decompression_bomb_is_refused_in_caption_vqa_and_retrieve(env, capsys, tmp_path):
    one_error_line(*run(capsys, "caption", env.bomb, "--model", env.gen), "bomb.png", "too large")
    one_error_line(*run(capsys, "vqa", env.bomb, "-q", "what color", "--model", env.gen), "bomb.png", "too large")
    gallery = tmp_path / "gallery"
    shutil.copytree(env.images, gallery)
    shutil.copy(env.bomb, gallery / "bomb.png")
    one_error_line(*run(capsys, "retrieve", "--images", gallery, "--texts", env.texts, "--model", env.ret,
                        "--strict"), "bomb.png", "too large")


def test_a_prompt_or_max_new_tokens_past_the_context(env, capsys):
    long_prompt = " ".join(["a photo of the cat"] * 20)  # 100 words; the tiny OPT has 64 positions
    one_error_line(*run(capsys, "caption", env.good[0], "--model", env.gen, "--prompt", long_prompt),
                   "64 positions", "--max-new-tokens")
    one_error_line(*run(capsys, "caption", env.good[0], "--model", env.gen, "--max-new-tokens", 100),
                   "64 positions", "at most")


def test_chat_answers_the_error_of_a_turn_and_goes_on(env, capsys, monkeypatch):
    long_question = " ".join(["what color is the cat"] * 20)
    monkeypatch.setattr(sys, "stdin", io.StringIO(f"{long_question}\nwhat color\n"))
    code, out, err = run(capsys, "chat", env.good[0], "--model", env.gen, "--json", *QUICK)
    assert code == 0 and "Traceback" not in err
    assert [json.loads(line)["question"] for line in out.splitlines()] == ["what color"]
    assert "positions" in err


@pytest.mark.parametrize("template", ["{} {}", "{name}", "{0}", "Question: { Answer:"])
def test_a_question_template_with_other_fields(env, capsys, template):
    one_error_line(*run(capsys, "vqa", env.good[0], "-q", "why", "--model", env.gen, "--prompt", template),
                   "--prompt")


@pytest.mark.parametrize("section", ["text_config", "vision_config"])
def test_a_config_without_a_section_names_it(env, capsys, tmp_path, section):
    folder = tmp_path / "model"
    shutil.copytree(env.gen, folder)
    d = json.loads((folder / "config.json").read_text())
    d.pop(section)
    (folder / "config.json").write_text(json.dumps(d))
    one_error_line(*run(capsys, "caption", env.good[0], "--model", folder), section)


def test_the_wrong_kind_of_model_folder_is_named(env, capsys):
    one_error_line(*run(capsys, "vqa", env.good[0], "-q", "what color", "--model", env.ret), "retrieval",
                   "blip2-fast retrieve")
    one_error_line(*run(capsys, "retrieve", "--images", env.images, "--texts", env.texts, "--model", env.gen),
                   "captioning", "no ITM head")


def test_an_unknown_device(env, capsys, tmp_path):
    one_error_line(*run(capsys, "caption", env.good[0], "--model", env.gen, "--device", "foo"), "--device foo")
    one_error_line(*run(capsys, "retrieve", "--images", env.images, "--texts", env.texts, "--model", env.ret,
                        "--device", "foo"), "--device foo")
    one_error_line(*run(capsys, "train", "--stage", "2", "--model", env.gen, "--data", env.images, "--out",
                        tmp_path / "run", "--device", "foo"), "device 'foo'")


def test_a_batch_larger_than_the_data_set(env, capsys, tmp_path):
    data = tmp_path / "data.jsonl"
    data.write_text("".join(json.dumps({"image": p, "caption": "a red circle"}) + "\n" for p in env.good))
    one_error_line(*run(capsys, "train", "--stage", "2", "--model", env.gen, "--data", data, "--out",
                        tmp_path / "run", "--batch-size", 8, "--steps", 1), "--batch-size 8", "3 usable records")


def test_a_full_disk_while_writing_the_retrieval_cache(env, capsys, tmp_path, monkeypatch):
    import safetensors.torch

    def no_space(*a, **kw):  # what safetensors raises: its own error type, errno only in the text
        raise RuntimeError("Error while serializing: I/O error: No space left on device (os error 28)")

    monkeypatch.setattr(safetensors.torch, "save_file", no_space)
    cache = tmp_path / "gallery.safetensors"
    one_error_line(*run(capsys, "retrieve", "--images", env.images, "--texts", env.texts, "--model", env.ret,
                        "--cache", cache), "disk is full", str(cache))


@pytest.mark.parametrize("damage", ["nan", "names", "count", "shape"])
def test_a_crafted_or_nan_retrieval_cache(env, capsys, tmp_path, damage):
    from safetensors import safe_open
    from safetensors.torch import save_file

    cache = tmp_path / "gallery.safetensors"
    argv = ["retrieve", "--images", env.images, "--texts", env.texts, "--model", env.ret, "--cache", cache]
    assert run(capsys, *argv)[0] == 0
    with safe_open(str(cache), framework="pt") as f:
        meta, tensors = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
    if damage == "nan":
        tensors["features"][1, 0, 0] = float("nan")
    elif damage == "names":
        meta["names"] = "not json ["
    elif damage == "count":
        meta["names"] = json.dumps(json.loads(meta["names"])[:2])
    else:
        tensors["features"] = tensors["features"][:, :, :3].contiguous()
    save_file(tensors, str(cache), metadata=meta)
    one_error_line(*run(capsys, *argv), str(cache), "delete it to rebuild")


# ---------------------------------------------------------------------------- item 7: silent wrong results
@pytest.mark.parametrize("mode", ["I;16", "I"])
def test_16_bit_greyscale_is_scaled_not_clipped(tmp_path, mode):
    levels = np.arange(0, 256, dtype=np.uint16).reshape(16, 16)
    if mode == "I;16":  # what Pillow makes of a 16-bit greyscale PNG
        Image.fromarray(levels * 257).save(tmp_path / "wide.png")
        img = Image.open(tmp_path / "wide.png")
    else:  # 32-bit integer greyscale holding 16-bit levels (older Pillows, TIFFs)
        img = Image.fromarray((levels * 257).astype(np.int32))
    assert img.mode == mode
    assert np.array_equal(np.asarray(to_rgb(img))[..., 0], levels)  # 65535 -> 255, 257 -> 1, not white
    spec = ImageSpec(height=16, width=16)
    assert torch.equal(preprocess([img], spec), preprocess([Image.fromarray(levels.astype(np.uint8))], spec))


def test_an_empty_question_is_refused(env, capsys):
    for question in ("", "   "):
        one_error_line(*run(capsys, "vqa", env.good[0], "-q", question, "--model", env.gen), "empty")


def test_caption_skips_bad_images_and_counts_them(env, capsys):
    paths = [env.good[0], str(env.bad / "notes.png"), str(env.bad / "cut.png"), env.good[1]]
    code, out, err = run(capsys, "caption", *paths, "--model", env.gen, *QUICK)
    assert code == 0 and "Traceback" not in err
    assert [line.split("\t")[0] for line in out.splitlines()] == [env.good[0], env.good[1]]
    assert "skipped " + paths[1] in err and "skipped " + paths[2] in err
    assert err.strip().splitlines()[-1].startswith("blip2-fast: 2 of 4 images captioned, 2 skipped")
    one_error_line(*run(capsys, "caption", *paths, "--model", env.gen, "--strict", *QUICK), "notes.png")


def test_retrieve_skips_bad_images_and_counts_them(env, capsys, tmp_path):
    gallery = tmp_path / "gallery"
    shutil.copytree(env.images, gallery)
    for name in os.listdir(env.bad):
        shutil.copy(env.bad / name, gallery / name)
    code, out, err = run(capsys, "retrieve", "--images", gallery, "--texts", env.texts, "--model", env.ret,
                         "--top", 5)
    assert code == 0 and "Traceback" not in err
    ranked = {row.split("\t")[1] for row in out.splitlines() if row.startswith("i2t")}
    assert ranked == {str(gallery / f"img{i}.png") for i in range(3)}
    assert "cut.png" in err and "notes.png" in err
    assert err.strip().splitlines()[-1].startswith("blip2-fast: 3 images ranked, 2 skipped")
    one_error_line(*run(capsys, "retrieve", "--images", gallery, "--texts", env.texts, "--model", env.ret,
                        "--strict"), "notes.png")  # headers are checked first, before the model loads
    (gallery / "notes.png").unlink()
    one_error_line(*run(capsys, "retrieve", "--images", gallery, "--texts", env.texts, "--model", env.ret,
                        "--strict"), "cut.png")


# ---------------------------------------------------------------------------- item 8: fit
def subcommand_parsers():
    return cli.build_parser().subcommand_parsers


@pytest.mark.parametrize("name", ["caption", "vqa", "chat", "retrieve", "train", "demo"])
def test_help_says_what_each_flag_does_and_its_default(name):
    parser = subcommand_parsers()[name]
    formatter = parser._get_formatter()
    for action in parser._actions:
        if action.dest == "help":
            continue
        shown = formatter._expand_help(action)  # the flag's text as --help prints it
        assert action.help and len(action.help) > 8, (name, action.dest)
        if action.option_strings and not action.required:
            assert "default" in shown, (name, action.option_strings, shown)
    text = " ".join(parser.format_help().split())
    if name == "train":
        assert "steps between checkpoints" in text and "(default: 500)" in text
    if name == "retrieve":
        assert "--beams" not in text and "--max-new-tokens" not in text


def test_an_unknown_flag_prints_the_subcommands_usage(env, capsys):
    with pytest.raises(SystemExit) as stop:
        cli.main(["retrieve", "--images", "x", "--texts", "y", "--beams", "3"])
    err = capsys.readouterr().err
    assert stop.value.code == 2 and "usage: blip2-fast retrieve" in err and "--beams" in err


def test_threads_flag(env, capsys):
    before = torch.get_num_threads()
    try:
        code, out, _ = run(capsys, "caption", env.good[0], "--model", env.gen, "--threads", 1, *QUICK)
        assert code == 0 and out.strip() and torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)
    one_error_line(*run(capsys, "caption", env.good[0], "--model", env.gen, "--threads", 0), "--threads")


def test_only_rank_0_prints(env, capsys, monkeypatch):
    monkeypatch.setenv("RANK", "1")
    code, out, err = run(capsys, "caption", env.good[0], "--model", env.gen, *QUICK)
    assert code == 0 and out == ""
    code, out, err = run(capsys, "vqa", env.good[0], "-q", "", "--model", env.gen)
    assert code == 2 and err == ""  # rank 0 reports it
    monkeypatch.setenv("RANK", "0")
    code, out, _ = run(capsys, "caption", env.good[0], "--model", env.gen, *QUICK)
    assert code == 0 and out.strip()


def test_retrieve_prints_a_comment_header_then_parseable_rows(env, capsys):
    argv = ["retrieve", "--images", env.images, "--texts", env.texts, "--model", env.ret, "--top", 2]
    code, out, _ = run(capsys, *argv)
    lines = out.splitlines()
    assert code == 0 and lines[0].startswith("#") and lines[0].count("\t") == 4
    rows = [line.split("\t") for line in lines[1:]]
    assert len(rows) == 2 * 2 + 3 * 2 and all(len(r) == 5 and r[0] in ("t2i", "i2t") for r in rows)
    code, out, _ = run(capsys, *argv, "--json")
    assert code == 0 and all(isinstance(json.loads(line), dict) for line in out.splitlines())


def test_training_from_the_shell_prints_a_summary_and_no_cpu_kernel_refusals(env, tmp_path):
    """A fresh process (the kernel registry logs each refusal once per process): the run summary
    comes first, and on the CPU the GPU-only backends' refusals stay at DEBUG."""
    data = tmp_path / "data.jsonl"
    data.write_text("".join(json.dumps({"image": p, "caption": "a red circle"}) + "\n" for p in env.good * 2))
    out = tmp_path / "run"
    proc = subprocess.run([sys.executable, "-m", "blip2_fast", "train", "--stage", "2", "--model", env.gen, "--data",
                           str(data), "--out", str(out), "--steps", "2", "--batch-size", "2", "--no-progress",
                           "--no-export", "--threads", "1"], capture_output=True, text=True, timeout=600,
                          env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert proc.returncode == 0, proc.stderr
    for row in ("stage", "model", "data", "steps", "batch", "precision", "output", "resume"):
        assert f"\n  {row} " in proc.stderr, row
    assert "6 records" in proc.stderr and "none: a fresh start" in proc.stderr
    assert "refused" not in proc.stderr, proc.stderr
    assert proc.stdout.startswith("step 2:")

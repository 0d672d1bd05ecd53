"""The command line and image preprocessing, against transformers as the independent reference.

Every expected caption is computed twice without the CLI: transformers' `Blip2Processor` builds
the inputs, then our `generate` and transformers' `generate` each produce ids, decoded the same
way (new tokens only, special tokens skipped). The CLI must print exactly those texts.
"""
from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

from blip2_fast import cli
from blip2_fast.engine import Engine, Settings
from blip2_fast.images import ImageSpec, load_images, preprocess
from blip2_fast.testing import make_tiny_folder

GEN = dict(max_new_tokens=7, min_new_tokens=3)  # short, and long enough for captions to differ


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A tiny OPT BLIP-2 folder whose LLM vocabulary is the tokenizer's (41 ids), so every
    generated id decodes to a word, plus images of several sizes and modes."""
    root = tmp_path_factory.mktemp("cli")
    folder = str(root / "model")
    ref = make_tiny_folder(folder, vocab_size=41)
    rs = np.random.RandomState(0)
    arrays = [((40, 57, 3), "RGB"), ((64, 64, 3), "RGB"), ((20, 90, 4), "RGBA"), ((33, 17), "L")]
    paths = []
    for i, (shape, mode) in enumerate(arrays):
        path = str(root / f"img{i}.png")
        Image.fromarray(rs.randint(0, 256, shape, dtype=np.uint8), mode).save(path)
        paths.append(path)
    return SimpleNamespace(root=root, folder=folder, ref=ref, images=paths)


@pytest.fixture(scope="module")
def models(tiny):
    from transformers import Blip2Processor

    from blip2_fast.models.blip2 import Blip2ForConditionalGeneration
    return SimpleNamespace(ours=Blip2ForConditionalGeneration.from_pretrained(tiny.folder), ref=tiny.ref,
                           processor=Blip2Processor.from_pretrained(tiny.folder))


def expected(models, paths, prompts=None, **gen) -> tuple[list[str], list[str]]:
    """(ours, transformers) texts for `paths`, inputs built by Blip2Processor."""
    images = [Image.open(p) for p in paths]
    inputs = models.processor(images=images, text=prompts, return_tensors="pt", padding=True)
    if models.ours.config.is_encoder_decoder:
        start = 1  # the decoder start token
    else:  # the prompt comes back in front; without one, transformers starts from placeholders + BOS
        start = inputs["input_ids"].shape[1] if prompts else models.ours.config.num_query_tokens + 1
    texts = []
    for model in (models.ours, models.ref):
        with torch.no_grad():
            out = model.generate(**inputs, **gen)
        texts.append([t.strip() for t in models.processor.batch_decode(out[:, start:], skip_special_tokens=True)])
    return texts[0], texts[1]


def run(capsys, *argv) -> tuple[int, str, str]:
    code = cli.main([str(a) for a in argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def gen_args(**gen):
    return ["--max-new-tokens", gen["max_new_tokens"], "--min-new-tokens", gen["min_new_tokens"]]


# ---------------------------------------------------------------------------- images
def test_pixels_identical_to_blip2_processor(tiny, models):
    images = [Image.open(p) for p in tiny.images]
    palette = Image.open(tiny.images[0]).convert("P")
    palette.info["transparency"] = 3  # transparency without an alpha band: composited onto white
    images.append(palette)
    ref = models.processor.image_processor(images, return_tensors="pt")["pixel_values"]
    ours = preprocess(images, ImageSpec.from_folder(tiny.folder))
    assert ours.shape == ref.shape == (len(images), 3, 28, 28)
    # same operations in the same dtypes as transformers: equal bit for bit, not merely close
    assert torch.equal(ours, ref)


def test_image_spec_defaults_without_processor_config(tmp_path):
    spec = ImageSpec.from_folder(str(tmp_path), default_size=224)
    assert (spec.height, spec.width, spec.resample) == (224, 224, Image.Resampling.BICUBIC)
    assert spec.image_mean[0] == pytest.approx(0.48145466)


def test_load_images_names_bad_file(tmp_path):
    bad = tmp_path / "notes.jpg"
    bad.write_text("not an image")
    with pytest.raises(ValueError, match="notes.jpg"):
        load_images([str(bad)], ImageSpec())


def test_prompt_ids_match_blip2_processor(tiny, models):
    engine = Engine.load(tiny.folder)
    prompts = ["a photo of", "what", "question : what color is the"]
    ids, mask = engine.encode(prompts)
    ref = models.processor(images=[Image.open(tiny.images[0])] * 3, text=prompts, return_tensors="pt", padding=True)
    assert torch.equal(ids, ref["input_ids"]) and torch.equal(mask, ref["attention_mask"])
    assert (mask[:, 0] == 1).all() and (mask[1, 5:7] == 0).all()  # left padding after the placeholders


# ---------------------------------------------------------------------------- caption
@pytest.mark.parametrize("beams", [1, 5])
@pytest.mark.parametrize("prompt", [None, "a photo of"])
def test_caption_matches_ours_and_transformers(tiny, models, capsys, beams, prompt):
    paths = tiny.images[:3]
    ours, ref = expected(models, paths, [prompt] * 3 if prompt else None, num_beams=beams, **GEN)
    assert ours == ref
    assert all(ours)  # non-empty: an equality of empty strings would prove nothing
    argv = ["caption", *paths, "--model", tiny.folder, "--beams", beams, "--json", *gen_args(**GEN)]
    code, out, _ = run(capsys, *argv, *(["--prompt", prompt] if prompt else []))
    assert code == 0
    rows = [json.loads(line) for line in out.splitlines()]
    assert [r["image"] for r in rows] == paths
    assert [r["caption"] for r in rows] == ref


def test_batches_equal_one_at_a_time(tiny, capsys):
    argv = ["caption", *tiny.images, "--model", tiny.folder, "--beams", 3, *gen_args(**GEN)]
    _, batched, err = run(capsys, *argv, "--batch-size", 3)
    assert "4/4" in err  # several batches: a tqdm progress bar on stderr
    _, single, _ = run(capsys, *argv, "--batch-size", 1)
    assert batched == single
    lines = batched.splitlines()
    assert [line.split("\t")[0] for line in lines] == tiny.images


def test_subprocess_python_m(tiny, models):
    ours, _ = expected(models, tiny.images[:1], num_beams=1, **GEN)
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-m", "blip2_fast", "caption", tiny.images[0], "--model", tiny.folder,
                           "--beams", "1", *map(str, gen_args(**GEN))], capture_output=True, text=True, env=env,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == ours[0]  # one image: the caption alone


# ---------------------------------------------------------------------------- vqa and chat
def test_vqa_uses_opt_template_and_defaults(tiny, models, capsys, monkeypatch):
    seen = []
    real = Engine.generate
    monkeypatch.setattr(Engine, "generate", lambda self, px, prompts, s, **kw: seen.append((prompts, s)) or
                        real(self, px, prompts, s, **kw))
    code, out, _ = run(capsys, "vqa", tiny.images[1], "--question", "what color", "--model", tiny.folder)
    assert code == 0
    assert seen[0][0] == ["Question: what color Answer:"]
    assert seen[0][1] == Settings(beams=5, max_new_tokens=10, min_new_tokens=0, length_penalty=-1.0)
    _, ref = expected(models, tiny.images[1:2], ["Question: what color Answer:"], num_beams=5,
                      max_new_tokens=10, length_penalty=-1.0)
    assert out.strip() == ref[0]


def test_t5_vqa_and_caption(tiny, capsys):
    """FlanT5-style models: "Short answer:" template; no-prompt captions tokenise "" (EOS)."""
    from transformers import Blip2Processor

    from blip2_fast.models.blip2 import Blip2ForConditionalGeneration
    folder = str(tiny.root / "t5")
    ref = make_tiny_folder(folder, text="t5", vocab_size=41)
    models = SimpleNamespace(ours=Blip2ForConditionalGeneration.from_pretrained(folder), ref=ref,
                             processor=Blip2Processor.from_pretrained(folder))
    question = "Question: what color Short answer:"
    ours, ref_texts = expected(models, tiny.images[:1], [question], num_beams=5, max_new_tokens=10, length_penalty=-1.0)
    assert ours == ref_texts and ours[0]
    code, out, _ = run(capsys, "vqa", tiny.images[0], "-q", "what color", "--model", folder)
    assert code == 0 and out.strip() == ref_texts[0]
    ours, ref_texts = expected(models, tiny.images[:2], ["", ""], num_beams=1, **GEN)
    assert ours == ref_texts and all(ours)
    code, out, _ = run(capsys, "caption", *tiny.images[:2], "--model", folder, "--beams", 1, *gen_args(**GEN))
    assert code == 0 and [line.split("\t")[1] for line in out.splitlines()] == ref_texts


def test_chat_reads_two_questions(tiny, models, capsys, monkeypatch):
    monkeypatch.setattr(sys, "stdin", io.StringIO("what color\nhow many shapes\nexit\nnever asked\n"))
    code, out, _ = run(capsys, "chat", tiny.images[0], "--model", tiny.folder, "--json", "--beams", 1,
                       *gen_args(**GEN))
    assert code == 0
    rows = [json.loads(line) for line in out.splitlines()]
    assert [r["question"] for r in rows] == ["what color", "how many shapes"]  # stops at 'exit'
    gen = dict(num_beams=1, length_penalty=-1.0, **GEN)
    first = "Question: what color Answer:"
    _, a1 = expected(models, tiny.images[:1], [first], **gen)
    _, a2 = expected(models, tiny.images[:1], [f"{first} {a1[0]} Question: how many shapes Answer:"], **gen)
    assert [r["answer"] for r in rows] == [a1[0], a2[0]]


# ---------------------------------------------------------------------------- question-reading Q-Former
@pytest.fixture(scope="module")
def reader(tiny):
    """The tiny folder made question-reading (as a VQA finetune leaves it), with transformers'
    InstructBLIP on the same weights as the reference and BLIP-2's processor for the LLM side."""
    import shutil

    from transformers import Blip2Processor

    from blip2_fast.testing import add_question_reading_, instructblip_reference, make_qformer_tokenizer
    folder = str(tiny.root / "reader")
    shutil.copytree(tiny.folder, folder)
    add_question_reading_(folder)
    return SimpleNamespace(folder=folder, ref=instructblip_reference(folder), qtok=make_qformer_tokenizer(),
                           processor=Blip2Processor.from_pretrained(folder))


def instructblip_answers(reader, path, prompts, questions, **gen):
    """New tokens of InstructBLIP, the question tokenised by the Q-Former tokenizer itself."""
    inputs = reader.processor(images=[Image.open(path)] * len(prompts), text=prompts, return_tensors="pt",
                              padding=True)
    q = reader.qtok(questions, return_tensors="pt", padding=True)
    with torch.no_grad():
        out = reader.ref.generate(**inputs, qformer_input_ids=q["input_ids"],
                                  qformer_attention_mask=q["attention_mask"], **gen)
    new = out[:, inputs["input_ids"].shape[1]:]
    return [t.strip() for t in reader.processor.batch_decode(new, skip_special_tokens=True)]


def test_vqa_and_chat_feed_the_question_to_a_question_reading_qformer(tiny, models, reader, capsys, monkeypatch):
    """vqa and chat answer as InstructBLIP does with the question in its Q-Former (chat: the
    conversation to the LLM, the question at hand to the Q-Former); captions run the queries
    alone, as transformers' BLIP-2 does."""
    gen = dict(num_beams=1, length_penalty=-1.0, **GEN)
    first = "Question: what color Answer:"
    want = instructblip_answers(reader, tiny.images[0], [first], ["what color"], **gen)
    code, out, _ = run(capsys, "vqa", tiny.images[0], "-q", "what color", "--model", reader.folder, "--beams", 1,
                       *gen_args(**GEN))
    assert code == 0 and out.strip() == want[0]
    _, unread = expected(models, tiny.images[:1], [first], **gen)  # the same weights, the question unread
    other = instructblip_answers(reader, tiny.images[0], [first], ["how many shapes"], **gen)
    assert want != unread or want != other  # the Q-Former's question matters here

    monkeypatch.setattr(sys, "stdin", io.StringIO("what color\nhow many shapes\n"))
    code, out, _ = run(capsys, "chat", tiny.images[0], "--model", reader.folder, "--json", "--beams", 1,
                       *gen_args(**GEN))
    second = f"{first} {want[0]} Question: how many shapes Answer:"
    assert code == 0 and [json.loads(line)["answer"] for line in out.splitlines()] == \
        want + instructblip_answers(reader, tiny.images[0], [second], ["how many shapes"], **gen)

    _, captions = expected(models, tiny.images[:2], None, num_beams=1, **GEN)
    code, out, _ = run(capsys, "caption", *tiny.images[:2], "--model", reader.folder, "--beams", 1, *gen_args(**GEN))
    assert code == 0 and [line.split("\t")[1] for line in out.splitlines()] == captions


def test_a_question_reading_model_without_its_qformer_tokenizer_is_refused(reader, tiny, capsys, tmp_path):
    import shutil
    folder = tmp_path / "no_qtok"
    shutil.copytree(reader.folder, folder)
    shutil.rmtree(folder / "qformer_tokenizer")
    code, out, err = run(capsys, "vqa", tiny.images[0], "-q", "what color", "--model", folder)
    assert code == 2 and "no qformer_tokenizer/" in err and "Traceback" not in err and out == ""


# ---------------------------------------------------------------------------- errors
def test_errors_exit_2_with_a_message(tiny, capsys, tmp_path, monkeypatch):
    import blip2_fast.engine as engine
    monkeypatch.setattr(engine, "default_model", lambda kind="generation": None)  # an install without one
    bad = tmp_path / "bad.png"
    bad.write_text("this is text")
    no_tokenizer = tmp_path / "weights_only"
    no_tokenizer.mkdir()
    for name in ("config.json", "model.safetensors"):
        (no_tokenizer / name).write_bytes((tiny.root / "model" / name).read_bytes())
    cases = [
        (["caption", bad, "--model", tiny.folder], "bad.png: not an image"),
        (["caption", tmp_path / "missing.jpg", "--model", tiny.folder], "missing.jpg: no such file"),
        (["caption", tiny.images[0], "--model", tmp_path / "nowhere"], "nowhere: no such folder"),
        (["caption", tiny.images[0], "--model", no_tokenizer], "has no tokenizer"),
        (["caption", tiny.images[0]], "no model given"),
        (["vqa", tiny.images[0], "-q", "why", "--model", tiny.folder, "--prompt", "no slot"], "needs '{}'"),
        (["caption", tiny.images[0], "--model", tiny.folder, "--beams", 0], "--beams >= 1"),
    ]
    for argv, message in cases:
        code, out, err = run(capsys, *argv)
        assert code == 2, argv
        assert message in err and "Traceback" not in err and out == ""

"""Fuzzing with Hypothesis: image files (random, truncated, mutated, crafted PNG / JPEG headers),
config dicts and request parameters (generation settings, prompts, questions) each end in a
result or in one of our own error types, never in another exception. Small budgets, no
deadline: a few hundred cases in all, on the tiny model."""
from __future__ import annotations

import io
import json
import os
import struct
import zlib

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from blip2_fast.config import Blip2Config, ConfigError
from blip2_fast.engine import Engine, EngineError, check_question, settings_for
from blip2_fast.images import ImageError, ImageSpec, check_image, load_images, open_image
from blip2_fast.loading import CheckpointError
from blip2_fast.retrieval import RetrievalError
from blip2_fast.testing import hf_config, make_tiny_folder
from blip2_fast.tokenizers import TokenizerError
from blip2_fast.training.data import DataError

OUR_ERRORS = (EngineError, TokenizerError, ImageError, CheckpointError, ConfigError, DataError, RetrievalError)
HUNT = os.environ.get("BLIP2_FAST_FUZZ_EXAMPLES")  # a larger budget, random cases: a longer hunt


def fuzz(examples: int):
    """Derandomized by default (the same cases each run: CI stays reproducible), no example
    database written into the repository, no deadline (the first generate call is slow)."""
    return settings(max_examples=int(HUNT or examples), deadline=None, derandomize=not HUNT, database=None,
                    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])


# ---------------------------------------------------------------------------- image bytes
def encoded(mode: str, fmt: str, width: int, height: int, seed: int) -> bytes:
    rs = np.random.RandomState(seed)
    if mode == "I;16":
        img = Image.fromarray(rs.randint(0, 65536, (height, width), dtype=np.uint16))
    else:
        bands = {"L": 1, "1": 1, "P": 1, "RGB": 3, "RGBA": 4, "CMYK": 4, "LA": 2}[mode]
        shape = (height, width) if bands == 1 else (height, width, bands)
        base = Image.fromarray(rs.randint(0, 256, shape, dtype=np.uint8),
                               "L" if bands == 1 else {2: "LA", 3: "RGB", 4: "RGBA"}[bands])
        img = base.convert(mode) if mode not in ("L", "LA", "RGB", "RGBA") else base
    buf = io.BytesIO()
    img.save(buf, format=fmt)
    return buf.getvalue()


def png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


# (bit depth, colour type) pairs PNG allows: grey, RGB, palette, grey + alpha, RGBA
PNG_DEPTH_COLOUR = [(d, 0) for d in (1, 2, 4, 8, 16)] + [(8, 2), (16, 2)] + [(d, 3) for d in (1, 2, 4, 8)] + \
    [(8, 4), (16, 4), (8, 6), (16, 6)]


@st.composite
def image_files(draw) -> bytes:
    kind = draw(st.sampled_from(["valid", "truncated", "mutated", "png_header", "jpeg_header", "random"]))
    if kind == "random":
        return draw(st.binary(max_size=512))
    if kind == "png_header":  # an IHDR of any size (mostly a valid depth and colour type), then any data
        side = st.integers(0, 64) | st.integers(0, 2 ** 31 - 1)
        depth, colour = draw(st.sampled_from(PNG_DEPTH_COLOUR) | st.tuples(st.integers(0, 17), st.integers(0, 7)))
        ihdr = struct.pack(">IIBBBBB", draw(side), draw(side), depth, colour, draw(st.integers(0, 1)), 0,
                           draw(st.integers(0, 2)))
        data = zlib.compress(draw(st.binary(max_size=256))) if draw(st.booleans()) else draw(st.binary(max_size=64))
        return b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", ihdr) + png_chunk(b"IDAT", data) + png_chunk(b"IEND", b"")
    if kind == "jpeg_header":  # SOI, a SOF0 of any size and components, then random bytes
        sof = struct.pack(">BHHB", 8, draw(st.integers(0, 65535)), draw(st.integers(0, 65535)),
                          draw(st.integers(0, 4)))
        return b"\xff\xd8\xff\xc0" + struct.pack(">H", len(sof) + 2) + sof + draw(st.binary(max_size=256))
    fmt = draw(st.sampled_from(["PNG", "JPEG", "GIF", "BMP", "TIFF", "WEBP"]))
    modes = {"JPEG": ["L", "RGB", "CMYK"], "GIF": ["L", "P", "RGB"], "BMP": ["1", "L", "RGB"],
             "PNG": ["1", "L", "LA", "P", "RGB", "RGBA", "I;16"], "TIFF": ["L", "RGB", "RGBA", "CMYK", "I;16"],
             "WEBP": ["RGB", "RGBA"]}[fmt]
    data = encoded(draw(st.sampled_from(modes)), fmt, draw(st.integers(1, 40)), draw(st.integers(1, 40)),
                   draw(st.integers(0, 9)))
    if kind == "truncated":
        return data[: draw(st.integers(0, len(data) - 1))]
    if kind == "mutated":
        raw = bytearray(data)
        for _ in range(draw(st.integers(1, 8))):
            raw[draw(st.integers(0, len(raw) - 1))] = draw(st.integers(0, 255))
        return bytes(raw)
    return data


@fuzz(300)  # about 3 s
@given(data=image_files())
def test_image_bytes_end_in_pixels_or_an_image_error(tmp_path, data):
    path = str(tmp_path / "image")
    with open(path, "wb") as f:
        f.write(data)
    spec = ImageSpec(height=28, width=28)
    for step in (lambda: check_image(path), lambda: open_image(path), lambda: load_images([path], spec)):
        try:
            out = step()
        except ImageError:
            continue
        if isinstance(out, torch.Tensor):
            assert out.shape == (1, 3, 28, 28) and torch.isfinite(out).all()


# ---------------------------------------------------------------------------- config dicts
JSON_VALUES = st.recursive(st.none() | st.booleans() | st.integers(-3, 10 ** 6) | st.text(max_size=6)
                           | st.floats(allow_nan=True, allow_infinity=True),
                           lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=4), inner,
                                                                                       max_size=3), max_leaves=6)
VALID = {text: hf_config(text=text).to_dict() for text in ("opt", "t5")}


@st.composite
def config_dicts(draw) -> dict:
    """A transformers BLIP-2 config with some of its entries (at any depth) replaced or removed."""
    d = json.loads(json.dumps(VALID[draw(st.sampled_from(sorted(VALID)))]))
    for _ in range(draw(st.integers(1, 6))):
        where = d
        for section in ("vision_config", "qformer_config", "text_config", None):
            if section is None or draw(st.booleans()):
                break
            where = where.get(section) if isinstance(where.get(section), dict) else where
        if not where:
            continue
        key = draw(st.sampled_from(sorted(where)))
        if draw(st.integers(0, 3)) == 0:
            del where[key]
        else:
            where[key] = draw(JSON_VALUES)
    return d


@fuzz(150)
@given(d=config_dicts())
def test_config_dicts_end_in_a_config_or_a_config_error(tmp_path, d):
    try:
        config = Blip2Config.from_hf_dict(d)
    except ConfigError:
        return
    assert config.vision.hidden_size >= 1 and config.num_query_tokens >= 1
    path = tmp_path / "config.json"
    path.write_text(json.dumps(config.to_hf_dict()))
    again = Blip2Config.from_json_file(str(path)).to_hf_dict()
    assert json.dumps(again, sort_keys=True) == json.dumps(config.to_hf_dict(), sort_keys=True)  # NaN != NaN


@fuzz(60)
@given(raw=st.binary(max_size=64) | st.text(max_size=64).map(str.encode))
def test_config_files_of_any_bytes_end_in_a_config_error(tmp_path, raw):
    path = tmp_path / "config.json"
    path.write_bytes(raw)
    with pytest.raises(ConfigError):
        Blip2Config.from_json_file(str(path))


# ---------------------------------------------------------------------------- request parameters
@pytest.fixture(scope="module")
def engine(tmp_path_factory):
    folder = str(tmp_path_factory.mktemp("fuzz_model"))
    make_tiny_folder(folder, vocab_size=41)
    return Engine.load(folder, device="cpu")


WORDS = st.sampled_from(["a", "photo", "of", "the", "red", "circle", "what", "color", "?", "{}", "{", "}", "{0}",
                         "<image>", "</s>", "<pad>", "Question:", "Answer:", "\u00e9\u00e8", "\U0001f600", "\x00",
                         " ", "\n", "\t"])
TEXTS = st.lists(WORDS, max_size=30).map(" ".join) | st.text(max_size=40)
SETTING = st.none() | st.integers(-2, 70)


@fuzz(60)  # about 8 s
@given(task=st.sampled_from(["caption", "vqa", "chat"]), beams=st.none() | st.integers(-1, 6),
       max_new_tokens=SETTING, min_new_tokens=st.none() | st.integers(-2, 8),
       length_penalty=st.none() | st.floats(allow_nan=True, allow_infinity=True),
       prompt=st.none() | TEXTS, question=TEXTS)
def test_requests_end_in_texts_or_our_errors(engine, task, beams, max_new_tokens, min_new_tokens, length_penalty,
                                            prompt, question):
    pixels = torch.zeros(1, 3, 28, 28)
    try:
        config = settings_for(task, beams, max_new_tokens, min_new_tokens, length_penalty)
        if task == "caption":
            texts = engine.generate(pixels, [prompt or ""], config)
        else:
            check_question(question)
            turn = engine.question_template(prompt).format(question)
            full = engine.chat_prompt([], turn, config.max_new_tokens) if task == "chat" else turn
            texts = engine.generate(pixels, [full], config, questions=[question])
    except OUR_ERRORS:
        return
    assert len(texts) == 1 and isinstance(texts[0], str)

"""The world-of-shapes generator and its BPE tokenizer: determinism, geometry measured from
pixels, caption/question consistency, the JSONL format and tokenizer loading."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from blip2_fast import world as W
from blip2_fast.bpe import SPECIAL_TOKENS, train_bpe_tokenizer, world_corpus


def _scenes(n, seed=0, split="train"):
    """(scene, rng) pairs; the rng continues where sample_scene left it, as in the dataset."""
    out = []
    for i in range(n):
        rng = W.scene_rng(seed, i, split)
        out.append((W.sample_scene(rng), rng))
    return out


def _foreground(img, background):
    """Pixels that differ from the background colour by more than the noise could explain."""
    diff = np.abs(np.asarray(img, dtype=np.int16) - np.array(W.BACKGROUNDS[background], dtype=np.int16))
    return diff.max(axis=-1) > 40


def _extent(mask):
    """(x0, y0, x1, y1) of the True pixels, x1/y1 exclusive."""
    ys, xs = np.nonzero(mask)
    return xs.min(), ys.min(), xs.max() + 1, ys.max() + 1


def test_same_seed_same_files_and_other_seed_differs(tmp_path):
    paths = [W.generate_dataset(str(tmp_path / d), 6, seed, resolution=64)
             for d, seed in (("a", 3), ("b", 3), ("c", 4))]
    read = lambda p: open(p, "rb").read()
    assert read(paths[0]) == read(paths[1]) and read(paths[0]) != read(paths[2])
    for i in range(6):
        name = f"images/train_{i:06d}.png"
        assert read(tmp_path / "a" / name) == read(tmp_path / "b" / name)
    # A larger n extends the same sequence; another split gives other scenes.
    small = W.generate_dataset(str(tmp_path / "d"), 3, 3, resolution=64)
    assert read(paths[0]).splitlines()[:3] == read(small).splitlines()
    assert [W.caption(s) for s, _ in _scenes(20, 3, "val")] != [W.caption(s) for s, _ in _scenes(20, 3)]


def test_captions_parse_back_to_the_scene():
    for scene, _ in _scenes(300):
        text = W.caption(scene)
        truth = [{"size": o.size, "color": o.color, "shape": o.shape} for o in scene.objects]
        assert W.parse_caption(text) == truth
        assert W.caption_attributes_correct(text, scene)
        messy = "  " + text.upper().replace(" ", "   ") + ". \n"
        assert W.caption_attributes_correct(messy, scene)
        wrong = text.replace(scene.objects[-1].color, "green" if scene.objects[-1].color != "green" else "red")
        assert not W.caption_attributes_correct(wrong, scene)
        if len(scene.objects) == 2:  # left/right swapped is wrong unless both objects agree
            a, b = [(o.size, o.color, o.shape) for o in scene.objects]
            swapped = "a {} {} {} on the left and a {} {} {} on the right".format(*b, *a)
            assert W.caption_attributes_correct(swapped, scene) == (a == b)


@pytest.mark.parametrize("junk", [
    "", "a", "a red circle", "a small red", "a tiny red circle", "a small pink circle",
    "a small red hexagon", "small red circle", "a red small circle", "a small red circle!",
    "a small red circle on the left", "a small red circle on the left and a large blue star",
    "a small red circle on the right and a large blue star on the left",
    "a small red circle and a large blue star", "a small red circle a small red circle", None, 42,
])
def test_parse_caption_rejects_junk(junk):
    assert W.parse_caption(junk) is None


@pytest.mark.parametrize("resolution", [64, 224])
def test_rendered_sizes_and_halves_measured_from_pixels(resolution):
    tol = 2 / resolution  # pixel rounding of both box edges plus the inclusive last pixel
    seen = set()
    for scene, rng in _scenes(40, seed=resolution):
        img = W.render(scene, resolution, rng)
        fg = _foreground(img, scene.background)
        half = resolution // 2
        if len(scene.objects) == 2:
            # No object pixel on the two columns around the midline: each stays in its half.
            assert not fg[:, half - 1:half + 1].any()
            regions = [(scene.objects[0], fg[:, :half], 0), (scene.objects[1], fg[:, half:], half)]
        else:
            regions = [(scene.objects[0], fg, 0)]
        for obj, mask, x_off in regions:
            x0, y0, x1, y1 = _extent(mask)
            w, h = (x1 - x0) / resolution, (y1 - y0) / resolution
            lo, hi = W.PAIRED_LARGE_RANGE if (obj.size == "large" and len(scene.objects) == 2) else W.SIZE_RANGE[obj.size]
            assert lo - tol <= w <= hi + tol and lo - tol <= h <= hi + tol, (obj, w, h)
            # The pixels sit where the scene says (not only the right size).
            assert np.allclose([(x0 + x_off) / resolution, y0 / resolution], obj.bbox[:2], atol=tol)
            seen.add((obj.size, obj.shape, len(scene.objects)))
    assert len(seen) >= 10  # the seeds exercised most (size, shape, count) combinations


def test_two_object_geometry_and_lone_object_centred():
    for scene, _ in _scenes(500, seed=7):
        boxes = [o.bbox for o in scene.objects]
        for x0, y0, x1, y1 in boxes:
            assert 0 <= x0 < x1 <= 1 and 0 <= y0 < y1 <= 1 and abs((x1 - x0) - (y1 - y0)) < 1e-9
        if len(boxes) == 2:
            assert boxes[0][2] <= 0.5 - W.MARGIN + 1e-9 and boxes[1][0] >= 0.5 + W.MARGIN - 1e-9
        else:
            cx, cy = (boxes[0][0] + boxes[0][2]) / 2, (boxes[0][1] + boxes[0][3]) / 2
            assert abs(cx - 0.5) <= W.CENTRE_JITTER + 1e-9 and abs(cy - 0.5) <= W.CENTRE_JITTER + 1e-9


def test_questions_consistent_with_scene_and_yes_no_balanced():
    answers = {"yes": 0, "no": 0}
    types = set()
    for scene, rng in _scenes(400, seed=1):
        objs = scene.objects
        present = {(o.color, o.shape) for o in objs}
        shapes = [o.shape for o in objs]
        qa = W.questions(scene, rng)
        assert len(qa) == len(set(qa))
        for q, a in qa:
            if q == "how many shapes are there?":
                assert a == {1: "one", 2: "two"}[len(objs)]
            elif q.startswith("what color is the "):
                shape = q.removeprefix("what color is the ").removesuffix("?")
                assert shapes.count(shape) == 1 and a == objs[shapes.index(shape)].color
            elif q.startswith("what shape is on the "):
                assert len(objs) == 2 and a == objs[0 if "left" in q else 1].shape
            else:
                color, shape = q.removeprefix("is there a ").removesuffix("?").split()
                assert a == ("yes" if (color, shape) in present else "no")
                answers[a] += 1
            types.add(q.split()[0] + " " + q.split()[1])
        # Every applicable type is asked.
        n_color = sum(shapes.count(s) == 1 for s in shapes)
        assert sum(q.startswith("what color") for q, _ in qa) == n_color
        assert sum(q.startswith("what shape") for q, _ in qa) == (2 if len(objs) == 2 else 0)
    assert answers["yes"] == answers["no"] == 400
    assert types == {"how many", "what color", "what shape", "is there"}


def test_colours_distinct_and_readable_on_every_background():
    fills = list(W.COLORS.values())
    assert len(set(fills)) == len(fills)
    for rgb in fills:
        outline = [round(c * W.OUTLINE_SHADE) for c in rgb]
        for bg in W.BACKGROUNDS.values():
            assert max(abs(a - b) for a, b in zip(rgb, bg)) > 60
            assert max(abs(a - b) for a, b in zip(outline, bg)) > 60


def test_jsonl_records_and_images_load(tmp_path):
    path = W.generate_dataset(str(tmp_path), 5, 0, resolution=64, split="val")
    assert path == os.path.join(str(tmp_path), "val.jsonl")
    lines = open(path, encoding="utf-8").read().splitlines()
    assert len(lines) == 5
    for line in lines:
        rec = json.loads(line)
        assert {"image", "caption", "questions", "objects"} <= rec.keys()
        assert not os.path.isabs(rec["image"])
        with Image.open(os.path.join(str(tmp_path), rec["image"])) as im:
            assert im.mode == "RGB" and im.size == (64, 64)
        parsed = W.parse_caption(rec["caption"])
        assert parsed == [{k: o[k] for k in ("size", "color", "shape")} for o in rec["objects"]]
        assert rec["questions"] and all(set(q) == {"question", "answer"} for q in rec["questions"])
    no_qa = W.generate_dataset(str(tmp_path / "nq"), 1, 0, resolution=32, with_questions=False)
    assert json.loads(open(no_qa, encoding="utf-8").readline())["questions"] == []


def test_cli_writes_dataset(tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    subprocess.run([sys.executable, "-m", "blip2_fast.world", "--out", str(tmp_path), "--n", "2",
                    "--seed", "5", "--resolution", "32"], check=True, env=env, capture_output=True)
    assert len(open(tmp_path / "train.jsonl").read().splitlines()) == 2
    assert sorted(os.listdir(tmp_path / "images")) == ["train_000000.png", "train_000001.png"]


def test_bpe_round_trips_and_loads_with_auto_tokenizer(tmp_path):
    corpus = list(world_corpus(150, seed=0))
    assert any(t.startswith("Question: ") and " Answer: " in t for t in corpus)
    assert any(W.parse_caption(t) is not None for t in corpus)
    tok = train_bpe_tokenizer(corpus, 320, str(tmp_path))
    assert [tok.token_to_id(t) for t in SPECIAL_TOKENS] == [0, 1, 2, 3]
    for text in corpus[:50] + ["Unseen: Héllo wörld 🙂  two  spaces"]:
        enc = tok.encode(text)
        assert enc.ids[0] == 1 and 2 not in enc.ids  # BOS </s> first; bytes never need <unk>
        assert tok.decode(enc.ids) == text
    assert sorted(os.listdir(tmp_path)) == ["special_tokens_map.json", "tokenizer.json", "tokenizer_config.json"]

    transformers = pytest.importorskip("transformers")
    hf = transformers.AutoTokenizer.from_pretrained(str(tmp_path))
    assert (hf.bos_token, hf.eos_token, hf.pad_token, hf.unk_token) == ("</s>", "</s>", "<pad>", "<unk>")
    assert hf.padding_side == "left" and hf.convert_tokens_to_ids("<image>") == 3
    batch = hf(["a small red circle", corpus[1]], padding=True)
    ids, mask = batch["input_ids"], batch["attention_mask"]
    assert ids[0][0] == hf.pad_token_id and mask[0][0] == 0 and ids[1][0] == hf.bos_token_id
    assert hf.decode(ids[1], skip_special_tokens=True) == corpus[1]
    assert hf("<image> a star")["input_ids"][:2] == [1, 3]  # <image> stays one token

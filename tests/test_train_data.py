"""Training data pipeline: every source format against records written out by hand in the test,
tar members byte-identical, transforms against `images.preprocess`, sampler coverage / sharding /
resume against torch.randperm, DataLoader workers, and every kind of bad input."""
import csv
import io
import json
import os
import tarfile

import numpy as np
import pytest
import torch
from PIL import Image

from blip2_fast import world as W
from blip2_fast.images import ImageSpec, preprocess
from blip2_fast.testing import make_tokenizer
from blip2_fast.tokenizers import tokenize_texts
from blip2_fast.training.data import (DataError, ImageTransform, PairDataset, Record, ResumableSampler, SkipLog,
                                      TextCollator, _Draws, make_loader, random_resized_crop_box, read_image_bytes,
                                      read_records)


def _png(path, seed=0, size=(20, 14), mode="RGB"):
    """A small random image saved as PNG; returns the file's bytes."""
    rng = np.random.default_rng(seed)
    ch = {"RGB": 3, "RGBA": 4, "L": 1}[mode]
    arr = rng.integers(0, 256, (size[1], size[0], ch), dtype=np.uint8)
    img = Image.fromarray(arr[..., 0] if ch == 1 else arr, mode)
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb") as f:
        f.write(buf.getvalue())
    return buf.getvalue()


def _add(tar, name, data: bytes):
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


# ----------------------------------------------------------------------------------- sources

def test_world_jsonl_captions_and_questions(tmp_path):
    path = W.generate_dataset(str(tmp_path / "w"), 4, seed=1, resolution=32)
    lines = [json.loads(line) for line in open(path)]
    img = lambda d: str(tmp_path / "w" / d["image"])
    recs, skips = read_records(path)
    assert recs == [Record(img(d), d["caption"]) for d in lines] and skips.total == 0
    qa, _ = read_records(path, task="vqa")
    assert qa == [Record(img(d), q["answer"], q["question"]) for d in lines for q in d["questions"]]
    assert len(qa) > len(lines)  # several questions per image, each its own record


def test_vqa_plus_caption_reads_each_caption_and_then_its_questions(tmp_path):
    path = W.generate_dataset(str(tmp_path / "w"), 4, seed=1, resolution=32)
    lines = [json.loads(line) for line in open(path)]
    img = lambda d: str(tmp_path / "w" / d["image"])
    both, skips = read_records(path, task="vqa+caption")
    assert skips.total == 0
    assert both == [r for d in lines for r in [Record(img(d), d["caption"])] +
                    [Record(img(d), q["answer"], q["question"]) for q in d["questions"]]]
    # objects with only one of the two, and an empty question (skipped, not made a caption)
    extra = tmp_path / "extra.jsonl"
    _png(str(tmp_path / "a.png"))
    extra.write_text("\n".join(json.dumps(o) for o in (
        {"image": "a.png", "caption": "only a caption"}, {"image": "a.png", "question": "q?", "answer": "yes"},
        {"image": "a.png", "question": " ", "answer": "no"})))
    recs, skips = read_records(str(extra), task="vqa+caption")
    a = str(tmp_path / "a.png")
    assert recs == [Record(a, "only a caption"), Record(a, "yes", "q?")] and skips.counts == {"empty text": 1}
    with pytest.raises(DataError, match="missing key 'question'"):  # plain vqa still wants a question
        read_records(str(extra), task="vqa")
    asked = tmp_path / "asked.jsonl"
    asked.write_text("\n".join(json.dumps(o) for o in (
        {"image": "a.png", "question": "q?", "answer": "yes"}, {"image": "a.png", "question": " ", "answer": "no"})))
    recs, skips = read_records(str(asked), task="vqa")  # plain vqa skips a blank question too
    assert recs == [Record(a, "yes", "q?")] and skips.counts == {"empty text": 1}


def test_collator_keeps_captions_beside_questions():
    item = lambda i, q: {"pixel_values": torch.zeros(3, 4, 4), "text": f"t{i}", "question": q, "index": i,
                         "skipped": []}
    mixed = TextCollator()([item(0, None), item(1, "q?")])
    assert mixed["questions"] == [None, "q?"] and mixed["texts"] == ["t0", "t1"]
    assert TextCollator()([item(0, None), item(1, None)])["questions"] is None


def test_jsonl_paths_text_key_blank_lines_and_root(tmp_path):
    _png(str(tmp_path / "imgs" / "a.png"))
    absolute = str(tmp_path / "elsewhere" / "b.png")
    _png(absolute, seed=1)
    meta = tmp_path / "meta"
    meta.mkdir()
    (meta / "d.jsonl").write_text(
        '{"image": "../imgs/a.png", "caption": " a cat \\n"}\n\n   \n'
        + json.dumps({"image": absolute, "text": "a dog"}) + "\n")
    recs, _ = read_records(str(meta / "d.jsonl"))
    assert recs == [Record(str(tmp_path / "imgs" / "a.png"), "a cat"), Record(absolute, "a dog")]
    (meta / "r.jsonl").write_text('{"image": "imgs/a.png", "caption": "x"}\n')
    recs, _ = read_records(str(meta / "r.jsonl"), root=str(tmp_path))
    assert recs == [Record(str(tmp_path / "imgs" / "a.png"), "x")]
    (meta / "q.jsonl").write_text('{"image": "../imgs/a.png", "question": "what?", "answer": "red"}\n')
    assert read_records(str(meta / "q.jsonl"), task="vqa")[0] == [Record(str(tmp_path / "imgs" / "a.png"),
                                                                          "red", "what?")]


def test_csv_caption_and_vqa(tmp_path):
    for name in ("a.png", "b.png"):
        _png(str(tmp_path / name))
    with open(tmp_path / "c.csv", "w", newline="") as f:
        csv.writer(f).writerows([["image", "caption"], ["a.png", "a cat, sitting"], ["b.png", 'say "hi"']])
    recs, _ = read_records(str(tmp_path / "c.csv"))
    assert recs == [Record(str(tmp_path / "a.png"), "a cat, sitting"), Record(str(tmp_path / "b.png"), 'say "hi"')]
    with open(tmp_path / "q.csv", "w", newline="") as f:
        csv.writer(f).writerows([["answer", "image", "question"], ["two", "b.png", "how many?"]])
    assert read_records(str(tmp_path / "q.csv"), task="vqa")[0] == [Record(str(tmp_path / "b.png"), "two", "how many?")]


def test_folder_with_txt_captions_and_with_captions_jsonl(tmp_path):
    root = tmp_path / "f"
    _png(str(root / "b.png"))
    _png(str(root / "a.JPG"), seed=2)  # extension match is case-insensitive (bytes need not be JPEG here)
    _png(str(root / "sub" / "c.webp"), seed=3)
    _png(str(root / "nocap.png"), seed=4)
    (root / "b.txt").write_text("a blue square\n")
    (root / "a.txt").write_text("a red circle")
    (root / "sub" / "c.txt").write_text("a star")
    (root / "notes.txt").write_text("not a caption of any image")
    recs, skips = read_records(str(root))
    assert recs == [Record(str(root / "a.JPG"), "a red circle"), Record(str(root / "b.png"), "a blue square"),
                    Record(str(root / "sub" / "c.webp"), "a star")]
    assert skips.counts == {"missing caption": 1} and str(root / "nocap.png") in skips.summary()
    (root / "captions.jsonl").write_text('{"image": "b.png", "caption": "from the index"}\n')
    assert read_records(str(root))[0] == [Record(str(root / "b.png"), "from the index")]


def _make_shards(tmp_path):
    """Two shards; returns {member name: bytes} of the images and the expected (key, text) order."""
    images, expected = {}, []
    for s in range(2):
        with tarfile.open(tmp_path / f"shard-{s:03d}.tar", "w") as tar:
            for k in range(3):
                key = f"part{s}/sample{k}"
                data = _png(str(tmp_path / "src" / f"{s}{k}.png"), seed=10 * s + k, size=(9 + k, 11))
                _add(tar, key + ".png", data)
                _add(tar, key + ".cls", b"7")  # an extension we do not use: ignored
                if k == 1:
                    _add(tar, key + ".json", json.dumps({"caption": f"json {s}{k}", "question": "q?",
                                                         "answer": f"ans {s}{k}"}).encode())
                else:
                    _add(tar, key + ".txt", f"text {s}{k}\n".encode())
                images[f"shard-{s:03d}.tar#{key}.png"] = data
                expected.append((s, key, f"json {s}{k}" if k == 1 else f"text {s}{k}"))
    return images, expected


def test_tar_shards_by_pattern_list_and_bytes(tmp_path):
    images, expected = _make_shards(tmp_path)
    want = [Record(f"tar://{tmp_path}/shard-{s:03d}.tar#{key}.png", text) for s, key, text in expected]
    for source in (str(tmp_path / "shard-{000..001}.tar"), str(tmp_path / "shard-*.tar"),
                   [str(tmp_path / "shard-000.tar"), str(tmp_path / "shard-001.tar")]):
        recs, skips = read_records(source)
        assert recs == want and skips.total == 0
    for rec in recs:
        assert read_image_bytes(rec) == images[rec.image[len(f"tar://{tmp_path}/"):]]
        # a Record built by hand (no offset) finds the member through its own shard index
        assert read_image_bytes(Record(rec.image, rec.text)) == read_image_bytes(rec)
    qa, skips = read_records(str(tmp_path / "shard-000.tar"), task="vqa")
    assert qa == [Record(f"tar://{tmp_path}/shard-000.tar#part0/sample1.png", "ans 01", "q?")]
    assert skips.counts == {"no questions": 2}  # the two .txt-only samples
    both, skips = read_records(str(tmp_path / "shard-000.tar"), task="vqa+caption")
    member = lambda k: f"tar://{tmp_path}/shard-000.tar#part0/sample{k}.png"
    assert both == [Record(member(0), "text 00"), Record(member(1), "json 01"), Record(member(1), "ans 01", "q?"),
                    Record(member(2), "text 02")] and skips.total == 0  # .txt captions, the .json's caption + question
    ds = PairDataset(recs, ImageTransform(8))
    ref = preprocess([Image.open(tmp_path / "src" / "00.png")], ImageSpec(height=8, width=8))[0]
    assert torch.equal(ds[0]["pixel_values"], ref)


# -------------------------------------------------------------------------------- transforms

@pytest.mark.parametrize("mode", ["RGB", "RGBA", "L"])
def test_eval_transform_equals_preprocess(tmp_path, mode):
    _png(str(tmp_path / "x.png"), size=(23, 17), mode=mode)
    img = Image.open(tmp_path / "x.png")
    out = ImageTransform(19)(img)
    assert out.shape == (3, 19, 19) and out.dtype == torch.float32
    assert torch.equal(out, preprocess([img], ImageSpec(height=19, width=19))[0])


def test_train_transform_reproducible_and_seed_dependent(tmp_path):
    _png(str(tmp_path / "x.png"), size=(40, 30))
    img, t = Image.open(tmp_path / "x.png"), ImageTransform(16, train=True)
    a = t(img, np.random.default_rng(5))
    assert torch.equal(a, t(img, np.random.default_rng(5)))
    assert torch.equal(t(img, torch.Generator().manual_seed(3)), t(img, torch.Generator().manual_seed(3)))
    others = [t(img, np.random.default_rng(s)) for s in range(6, 10)]
    assert all(not torch.equal(a, o) for o in others)
    with pytest.raises(ValueError, match="generator"):
        t(img)


def test_flip_only_when_hflip(tmp_path):
    # scale (1, 1) on a square image keeps the whole image, so the only change left is the flip
    _png(str(tmp_path / "x.png"), size=(24, 24))
    img = Image.open(tmp_path / "x.png")
    plain = preprocess([img], ImageSpec(height=12, width=12))[0]
    flipped = plain.flip(-1)
    on = [ImageTransform(12, train=True, scale=(1, 1))(img, np.random.default_rng(s)) for s in range(40)]
    n_flip = sum(torch.equal(o, flipped) for o in on)
    assert all(torch.equal(o, plain) or torch.equal(o, flipped) for o in on) and 8 <= n_flip <= 32
    off = ImageTransform(12, train=True, scale=(1, 1), hflip=False)
    assert all(torch.equal(off(img, np.random.default_rng(s)), plain) for s in range(40))


def test_crop_boxes_respect_scale_and_ratio():
    draws = _Draws(np.random.default_rng(0))
    for _ in range(300):
        l, t, r, b = random_resized_crop_box(200, 120, (0.3, 0.6), (3 / 4, 4 / 3), draws)
        assert 0 <= l < r <= 200 and 0 <= t < b <= 120
        w, h = r - l, b - t
        if (w, h) != (160, 120):  # not the centre-crop fallback
            assert 0.3 - 0.02 <= w * h / (200 * 120) <= 0.6 + 0.02 and 3 / 4 - 0.05 <= w / h <= 4 / 3 + 0.05


# ------------------------------------------------------------------------------ dataset, sampler

def test_dataset_items_depend_on_seed_epoch_index_only(tmp_path):
    recs = [Record(str(tmp_path / f"{i}.png"), f"t{i}") for i in range(3)]
    for i in range(3):
        _png(recs[i].image, seed=i, size=(30, 30))
    a, b = PairDataset(recs, ImageTransform(10, train=True), seed=1), PairDataset(recs, ImageTransform(10, train=True), seed=1)
    x = a[2]
    assert x["text"] == "t2" and x["index"] == 2 and x["skipped"] == [] and x["question"] is None
    assert torch.equal(b[2]["pixel_values"], x["pixel_values"])  # another "worker", same sample
    a.set_epoch(1)
    assert not torch.equal(a[2]["pixel_values"], x["pixel_values"])
    assert not torch.equal(PairDataset(recs, ImageTransform(10, train=True), seed=2)[2]["pixel_values"],
                           x["pixel_values"])


def test_corrupt_image_is_replaced_by_the_next_record(tmp_path):
    recs = [Record(str(tmp_path / f"{i}.png"), f"t{i}") for i in range(3)]
    _png(recs[0].image)
    _png(recs[2].image, seed=2)
    with open(recs[1].image, "wb") as f:
        f.write(b"\x00garbage, not a png" * 5)
    ds = PairDataset(recs, ImageTransform(8))
    item = ds[1]
    assert item["index"] == 2 and item["text"] == "t2"
    assert len(item["skipped"]) == 1 and item["skipped"][0].startswith(f"unreadable image: {recs[1].image}")
    batch = TextCollator()([ds[0], item])
    assert batch["skipped"] == 1 and batch["indices"].tolist() == [0, 2] and batch["texts"] == ["t0", "t2"]
    with open(recs[0].image, "wb") as f:
        f.write(b"junk")
    with pytest.raises(DataError, match="unreadable"):
        PairDataset(recs[:2], ImageTransform(8))[0]
    # the same inside a tar shard: the reason names the member
    with tarfile.open(tmp_path / "s.tar", "w") as tar:
        for k, data in enumerate([b"\x89PNG but no more", open(recs[2].image, "rb").read()]):
            _add(tar, f"k{k}.png", data)
            _add(tar, f"k{k}.txt", f"tar {k}".encode())
    trecs, _ = read_records(str(tmp_path / "s.tar"))
    item = PairDataset(trecs, ImageTransform(8))[0]
    assert item["index"] == 1 and item["text"] == "tar 1"
    assert item["skipped"][0].startswith(f"unreadable image: tar://{tmp_path}/s.tar#k0.png")


def _ref_order(n, seed, epoch):
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed + epoch)).tolist()


def test_sampler_epochs_cover_all_indices_once():
    s = ResumableSampler(10, seed=4)
    assert list(s) == _ref_order(10, 4, 0) and sorted(s) == list(range(10))
    s.set_epoch(1)
    assert list(s) == _ref_order(10, 4, 1) != _ref_order(10, 4, 0)
    assert list(ResumableSampler(5, shuffle=False)) == [0, 1, 2, 3, 4]


@pytest.mark.parametrize("drop_last", [True, False])
def test_sampler_rank_shards(drop_last):
    n, ws, bs = 14, 3, 2
    shards = [list(ResumableSampler(n, seed=1, rank=r, world_size=ws, batch_size=bs, drop_last=drop_last))
              for r in range(ws)]
    order = _ref_order(n, 1, 0)
    assert len({len(s) for s in shards}) == 1 and len(shards[0]) % bs == 0
    if drop_last:  # 12 of 14 fit in whole batches: the first 12 of the order, each once
        assert sorted(sum(shards, [])) == sorted(order[:12])
        assert shards[0] == order[:12][0::3]
    else:  # padded to 18 by wrapping round to the order's start
        padded = order + order[:4]
        assert [padded[r::ws] for r in range(ws)] == shards and set(sum(shards, [])) == set(range(n))


def test_sampler_resume_mid_epoch_and_advance():
    s = ResumableSampler(9, seed=2, batch_size=2, drop_last=False)  # padded to 10
    full = list(s)
    s.set_epoch(3)
    full3 = list(s)
    next(iter(s)), next(iter(s))  # iterating (prefetch) does not consume
    assert s.state_dict() == {"epoch": 3, "position": 0}
    s.advance(4)
    assert len(s) == 6 and list(s) == full3[4:]
    t = ResumableSampler(9, seed=2, batch_size=2, drop_last=False)
    t.load_state_dict(s.state_dict())
    assert list(t) == full3[4:] and t.state_dict() == {"epoch": 3, "position": 4}
    with pytest.raises(ValueError, match="advance"):
        t.advance(7)
    t.set_epoch(0)
    assert list(t) == full and len(t) == 10
    with pytest.raises(ValueError, match="position"):
        t.load_state_dict({"epoch": 0, "position": 11})
    with pytest.raises(ValueError, match="cannot fill"):
        ResumableSampler(3, batch_size=2, world_size=2)


class _TaggedDataset(PairDataset):
    """Records which DataLoader worker produced each item, to prove the workers really ran."""

    def __getitem__(self, i):
        info = torch.utils.data.get_worker_info()
        return dict(super().__getitem__(i), worker=None if info is None else info.id)


def _tagged_collate(items):
    return dict(TextCollator()(items), workers=[it["worker"] for it in items])


def _world_records(tmp_path, n=12):
    return read_records(W.generate_dataset(str(tmp_path / "w"), n, seed=0, resolution=32))[0]


def test_loader_workers_match_single_process_and_resume(tmp_path):
    recs = _world_records(tmp_path)
    ds = _TaggedDataset(recs, ImageTransform(16, train=True), seed=3)

    def run(workers, sampler):
        return [b for b in make_loader(ds, sampler, 4, num_workers=workers, collate_fn=_tagged_collate)]

    ref, par = run(0, ResumableSampler(12, seed=5, batch_size=4)), run(2, ResumableSampler(12, seed=5, batch_size=4))
    assert {w for b in par for w in b["workers"]} == {0, 1} and {w for b in ref for w in b["workers"]} == {None}
    assert len(ref) == 3 and [b["indices"].tolist() for b in ref] == [b["indices"].tolist() for b in par]
    assert all(torch.equal(a["pixel_values"], b["pixel_values"]) and a["texts"] == b["texts"] for a, b in zip(ref, par))
    assert ref[0]["texts"] == [recs[i].text for i in _ref_order(12, 5, 0)[:4]] and ref[0]["questions"] is None
    # train on one batch, checkpoint, resume in a fresh sampler+loader: exactly the remaining batches
    s = ResumableSampler(12, seed=5, batch_size=4)
    it = iter(make_loader(ds, s, 4, num_workers=2))
    next(it)
    s.advance(4)
    del it
    t = ResumableSampler(12, seed=5, batch_size=4)
    t.load_state_dict(s.state_dict())
    rest = run(0, t)
    assert [b["indices"].tolist() for b in rest] == [b["indices"].tolist() for b in ref[1:]]
    assert all(torch.equal(a["pixel_values"], b["pixel_values"]) for a, b in zip(rest, ref[1:]))


# ---------------------------------------------------------------------------------- bad input

def test_missing_and_empty_are_counted_skips(tmp_path):
    _png(str(tmp_path / "a.png"))
    (tmp_path / "d.jsonl").write_text("\n".join(json.dumps(d) for d in [
        {"image": "a.png", "caption": "ok"}, {"image": "gone.png", "caption": "lost"},
        {"image": "a.png", "caption": "  \t"}, {"image": "gone2.png", "caption": "lost too"}]))
    recs, skips = read_records(str(tmp_path / "d.jsonl"))
    assert recs == [Record(str(tmp_path / "a.png"), "ok")]
    assert skips.counts == {"missing image": 2, "empty text": 1} and skips.total == 3
    assert str(tmp_path / "gone.png") in skips.summary() and "d.jsonl line 3" in skips.summary()
    recs, skips = read_records(str(tmp_path / "d.jsonl"), check_files=False)
    assert len(recs) == 3 and skips.counts == {"empty text": 1}
    merged = SkipLog().merge(skips).merge(skips)
    assert merged.counts == {"empty text": 2}
    (tmp_path / "none.jsonl").write_text(json.dumps({"image": "gone.png", "caption": "x"}) + "\n")
    with pytest.raises(DataError, match=r"none\.jsonl: no usable record .*missing image"):
        read_records(str(tmp_path / "none.jsonl"))


@pytest.mark.parametrize("content,match", [
    ('{"image": "a.png", "caption": "ok"}\n\n{"image": "a.png", "caption": \n', r"line 3: not valid JSON"),
    ('{"image": "a.png"}\n', r"line 1: missing key 'caption' or 'text'"),
    ('{"caption": "x"}\n', r"line 1: missing key 'image'"),
    ('["a.png", "x"]\n', r"line 1: expected a JSON object"),
    ('{"image": "a.png", "caption": 3}\n', r"line 1: key 'caption' must be a string"),
])
def test_malformed_jsonl_names_file_and_line(tmp_path, content, match):
    (tmp_path / "bad.jsonl").write_text(content)
    with pytest.raises(DataError, match=r"bad\.jsonl " + match):
        read_records(str(tmp_path / "bad.jsonl"))


def test_unknown_or_missing_sources(tmp_path):
    (tmp_path / "x.txt").write_text("hi")
    with pytest.raises(DataError, match="unknown data source"):
        read_records(str(tmp_path / "x.txt"))
    with pytest.raises(DataError, match="does not exist"):
        read_records(str(tmp_path / "nope.jsonl"))
    with pytest.raises(DataError, match="matches no file"):
        read_records(str(tmp_path / "*.tar"))
    with pytest.raises(DataError, match="do not exist"):
        read_records(str(tmp_path / "s-{0..2}.tar"))
    with open(tmp_path / "c.csv", "w") as f:
        f.write("image,text_wrong\na.png,x\n")
    with pytest.raises(DataError, match=r"c\.csv: header .* lacks column\(s\) \['caption'\]"):
        read_records(str(tmp_path / "c.csv"))
    with pytest.raises(DataError, match="task"):
        read_records(str(tmp_path / "c.csv"), task="chat")
    with open(tmp_path / "c.csv", "w") as f:
        f.write("image,caption\na.png,x,extra\n")
    with pytest.raises(DataError, match=r"c\.csv line 2: the number of fields"):
        read_records(str(tmp_path / "c.csv"))
    (tmp_path / "folder").mkdir()
    with pytest.raises(DataError, match="has no questions"):
        read_records(str(tmp_path / "folder"), task="vqa")
    empty = W.generate_dataset(str(tmp_path / "w"), 2, seed=0, resolution=32, with_questions=False)
    with pytest.raises(DataError, match="2 x no questions"):
        read_records(empty, task="vqa")
    (tmp_path / "z.tar").write_bytes(b"not a tar at all" * 40)
    with pytest.raises(DataError, match=r"z\.tar: cannot index"):
        read_records(str(tmp_path / "z.tar"))


def test_tokenize_counts_truncation_and_pads():
    tok = make_tokenizer()
    vid = tok.convert_tokens_to_ids
    bos, pad = vid("</s>"), vid("<pad>")
    texts = ["a red circle", "a small large red green blue", "yes"]
    ids, mask, n_trunc = tokenize_texts(tok, texts, max_length=5)
    assert n_trunc == 1
    assert ids.tolist() == [[bos] + vid(["a", "red", "circle"]) + [pad], [bos] + vid(["a", "small", "large", "red"]),
                            [bos, vid("yes"), pad, pad, pad]]
    assert mask.tolist() == [[1, 1, 1, 1, 0], [1] * 5, [1, 1, 0, 0, 0]]
    ids, mask, n_trunc = tokenize_texts(tok, texts, max_length=5, add_eos=True, padding_side="left")
    assert n_trunc == 1  # BOS + 3 words + EOS = 5 fits; the long text is cut and gets no EOS
    assert ids.tolist() == [[bos] + vid(["a", "red", "circle"]) + [bos], [bos] + vid(["a", "small", "large", "red"]),
                            [pad, pad, bos, vid("yes"), bos]]
    assert mask[2].tolist() == [0, 0, 1, 1, 1]
    ids, _, n_trunc = tokenize_texts(tok, texts[:1], max_length=4, add_eos=True)
    assert n_trunc == 1 and ids.tolist() == [[bos] + vid(["a", "red", "circle"])]  # only the EOS did not fit
    ids, _, n_trunc = tokenize_texts(tok, texts, max_length=20)
    assert n_trunc == 0 and ids.shape == (3, 7)

"""Blip2ForImageTextRetrieval against transformers (tiny random models, fp32), and the retrieval
engine against brute-force scoring of every pair, recall@k, caching and bad inputs."""
import json
import os

import pytest
import torch

from blip2_fast.images import ImageError
from blip2_fast.loading import CheckpointError
from blip2_fast.models.retrieval_heads import Blip2ForImageTextRetrieval
from blip2_fast.cli.retrieve import retrieve_main
from blip2_fast.retrieval import RetrievalError, Retriever, list_images, read_texts, recall_at_k
from blip2_fast.testing import hf_config, make_tokenizer, random_pixels, randomize_

Q = 5


def make_retrieval_folder(folder, seed=0, image_token_index=None, drop_text_config=False, **cfg_kw):
    """A random transformers Blip2ForImageTextRetrieval with tokenizer and processor; returns it."""
    from transformers import Blip2ForImageTextRetrieval as HF, Blip2Processor, BlipImageProcessor

    cfg = hf_config(num_query_tokens=Q, image_token_index=image_token_index, **cfg_kw)
    torch.manual_seed(seed)
    model = randomize_(HF(cfg), seed).eval()
    model.save_pretrained(folder)
    size = cfg.vision_config.image_size
    Blip2Processor(image_processor=BlipImageProcessor(size={"height": size, "width": size}),
                   tokenizer=make_tokenizer(), num_query_tokens=Q).save_pretrained(folder)
    if drop_text_config:  # a stage-1 config with no LLM at all
        path = os.path.join(folder, "config.json")
        with open(path) as f:
            d = json.load(f)
        d.pop("text_config")
        with open(path, "w") as f:
            json.dump(d, f)
    return model


def text_batch(n, width, seed=0, placeholders=None):
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(4, 50, (n, width), generator=gen)
    mask = torch.ones_like(ids)
    for row in range(1, n):  # right padding of varied lengths, row 0 full
        mask[row, max(1, width - row):] = 0
    ids = ids.masked_fill(mask == 0, 1)
    if placeholders is not None:
        ids = torch.cat([torch.full((n, Q), placeholders), ids], 1)
        mask = torch.cat([torch.ones(n, Q, dtype=torch.long), mask], 1)
    return ids, mask


CASES = {"plain": dict(), "placeholders": dict(image_token_index=len(make_tokenizer())),
         "no-llm-config": dict(drop_text_config=True, cross_attention_frequency=1)}


@pytest.fixture(scope="module", params=sorted(CASES))
def pair(request, tmp_path_factory):
    folder = str(tmp_path_factory.mktemp(request.param))
    hf = make_retrieval_folder(folder, **CASES[request.param])
    return hf, Blip2ForImageTextRetrieval.from_pretrained(folder), CASES[request.param].get("image_token_index"), folder


def test_itc_matches_transformers(pair):
    hf, ours, tok, _ = pair
    pixels, (ids, mask) = random_pixels(3, seed=1), text_batch(4, 6, placeholders=tok)
    with torch.no_grad():
        ref = hf(pixel_values=pixels, input_ids=ids, attention_mask=mask)
        out = ours(pixels, ids, mask)
    assert out.logits_per_image.shape == (3, 4) and out.image_embeds.shape[:2] == (3, Q)
    for name in ("logits_per_image", "logits_per_text", "text_embeds", "image_embeds"):
        assert (getattr(ref, name) - getattr(out, name)).abs().max() <= 1e-4, name
    assert out.logits_per_image.std() > 1e-3  # the comparison is not between constants


def test_itm_matches_transformers(pair):
    hf, ours, tok, _ = pair
    pixels, (ids, mask) = random_pixels(3, seed=2), text_batch(3, 7, seed=1, placeholders=tok)
    with torch.no_grad():
        ref = hf(pixel_values=pixels, input_ids=ids, attention_mask=mask, use_image_text_matching_head=True)
        out = ours(pixels, ids, mask, use_image_text_matching_head=True)
    assert out.logits_per_image.shape == (3, 2)
    for name in ("logits_per_image", "logits_per_text", "text_embeds", "image_embeds"):
        assert (getattr(ref, name) - getattr(out, name)).abs().max() <= 1e-4, name


def test_attention_mask_defaults_to_ones(pair):
    hf, ours, tok, _ = pair
    pixels, (ids, _) = random_pixels(2, seed=7), text_batch(2, 5, seed=3, placeholders=tok)
    ones = torch.ones_like(ids)
    with torch.no_grad():
        for itm in (False, True):
            a = ours(pixels, ids, None, use_image_text_matching_head=itm).logits_per_image
            assert (a - ours(pixels, ids, ones, use_image_text_matching_head=itm).logits_per_image).abs().max() <= 1e-6
        if tok is not None:  # transformers accepts a missing mask here only
            ref = hf(pixel_values=pixels, input_ids=ids, use_image_text_matching_head=True).logits_per_image
            assert (ref - a).abs().max() <= 1e-4


def test_building_blocks_equal_forward_and_batching(pair):
    _, ours, tok, _ = pair
    pixels, (ids, mask) = random_pixels(4, seed=3), text_batch(5, 6, seed=2)
    with torch.no_grad():
        tokens, feats = ours.encode_image(pixels)
        one_by_one = torch.cat([ours.encode_image(pixels[i:i + 1])[1] for i in range(4)])
        assert (feats - one_by_one).abs().max() <= 1e-5
        text = ours.encode_text(ids, mask)
        assert (ours.encode_text(ids[2:3, :5], mask[2:3, :5]) - text[2:3]).abs().max() <= 1e-5  # padding trimmed
        itc = (feats @ text.t()).amax(1)
        assert (itc - ours(pixels, ids, mask).logits_per_image).abs().max() <= 1e-5
        # every (image, text) pair at once, K/V computed once per image and shared via image_index
        kv = ours.qformer.image_kv(tokens)
        img, txt = torch.arange(4).repeat_interleave(5), torch.arange(5).repeat(4)
        batched = ours.itm_logits(kv, img, ids[txt], mask[txt])
        for i, t in [(0, 0), (1, 3), (3, 4), (2, 1)]:
            single = ours(pixels[i:i + 1], ids[t:t + 1], mask[t:t + 1], use_image_text_matching_head=True)
            assert (batched[i * 5 + t] - single.logits_per_image[0]).abs().max() <= 1e-5


def test_bad_inputs(pair):
    _, ours, tok, _ = pair
    pixels, (ids, mask) = random_pixels(2, seed=4), text_batch(3, 4)
    with pytest.raises(ValueError, match="pairs"):
        ours(pixels, ids, mask, use_image_text_matching_head=True)
    with pytest.raises(ValueError, match="does not match"):
        ours(pixels, ids, mask[:, :2])
    if tok is not None:
        partial = ids.clone()
        partial[:, :2] = tok
        with pytest.raises(ValueError, match="image tokens"):
            ours(pixels, partial, mask)


def test_text_free_checkpoint_refuses_text(tmp_path):
    make_retrieval_folder(str(tmp_path), use_qformer_text_input=False)
    ours = Blip2ForImageTextRetrieval.from_pretrained(str(tmp_path))
    assert ours.encode_image(random_pixels(1))[1].shape[:2] == (1, Q)
    with pytest.raises(ValueError, match="use_qformer_text_input"):
        ours.encode_text(*text_batch(1, 3))


def test_save_and_reload_round_trip(pair, tmp_path):
    from transformers import Blip2ForImageTextRetrieval as HF
    hf, ours, tok, _ = pair
    ours.save_pretrained(str(tmp_path))
    again = Blip2ForImageTextRetrieval.from_pretrained(str(tmp_path))
    for (name, a), b in zip(ours.state_dict().items(), again.state_dict().values()):
        assert torch.equal(a, b), name
    theirs = HF.from_pretrained(str(tmp_path)).eval()  # transformers reads what we write
    pixels, (ids, mask) = random_pixels(2, seed=8), text_batch(2, 4, placeholders=tok)
    with torch.no_grad():
        for itm in (False, True):
            a = theirs(pixel_values=pixels, input_ids=ids, attention_mask=mask, use_image_text_matching_head=itm)
            b = hf(pixel_values=pixels, input_ids=ids, attention_mask=mask, use_image_text_matching_head=itm)
            assert torch.equal(a.logits_per_image, b.logits_per_image)
    with open(tmp_path / "config.json") as f:
        d = json.load(f)
    d["num_query_tokens"] = Q + 1
    with open(tmp_path / "config.json", "w") as f:
        json.dump(d, f)
    with pytest.raises(CheckpointError, match="query_tokens"):
        Blip2ForImageTextRetrieval.from_pretrained(str(tmp_path))


# ---------------------------------------------------------------------------- engine
def brute_force(model, pixels, ids, mask):
    """(N_images, N_texts) ITM positive logit + ITC, each pair through `forward` on its own."""
    with torch.no_grad():
        itc = model(pixels, ids, mask).logits_per_image
        itm = torch.tensor([[model(pixels[i:i + 1], ids[t:t + 1], mask[t:t + 1],
                                   use_image_text_matching_head=True).logits_per_image[0, 1]
                             for t in range(ids.shape[0])] for i in range(pixels.shape[0])])
    return itm + itc, itc


@pytest.fixture(scope="module")
def engine_case(tmp_path_factory):
    folder = str(tmp_path_factory.mktemp("engine"))
    make_retrieval_folder(folder, seed=3)
    model = Blip2ForImageTextRetrieval.from_pretrained(folder)
    pixels, (ids, mask) = random_pixels(6, seed=5), text_batch(7, 9, seed=6)
    score, itc = brute_force(model, pixels, ids, mask)
    return model, pixels, (ids, mask), score, itc


def test_ranking_equals_brute_force_when_k_covers_gallery(engine_case):
    model, pixels, texts, score, itc = engine_case
    eng = Retriever(model, batch_size=4, itm_batch_size=5, progress=False)  # chunks split images and pairs
    gallery, text_set = eng.encode_images(pixels), eng.encode_texts(texts)
    res = eng.retrieve(gallery, text_set, k=128)  # k above both sizes: clamped, everything ranked
    assert (res.similarity - itc).abs().max() <= 1e-5
    t2i, i2t = res.text_to_image, res.image_to_text
    assert t2i.indices.shape == (7, 6) and i2t.indices.shape == (6, 7)
    assert torch.equal(t2i.indices, score.t().argsort(dim=1, descending=True))
    assert torch.equal(i2t.indices, score.argsort(dim=1, descending=True))
    assert (t2i.scores - score.t().gather(1, t2i.indices)).abs().max() <= 1e-4
    assert (i2t.scores - score.gather(1, i2t.indices)).abs().max() <= 1e-4
    assert not torch.equal(t2i.indices, itc.t().argsort(dim=1, descending=True))  # ITM changed the order


def test_small_k_reranks_the_itc_candidates_each_pair_once(engine_case, monkeypatch):
    model, pixels, texts, score, itc = engine_case
    eng = Retriever(model, batch_size=2, itm_batch_size=3, progress=False)
    gallery, text_set = eng.encode_images(pixels), eng.encode_texts(texts)
    calls = {"kv_rows": 0, "pairs": 0}
    real_kv, real_itm = model.qformer.image_kv, model.itm_logits

    def counted_kv(x):
        calls["kv_rows"] += x.shape[0]
        return real_kv(x)

    def counted_itm(kv, index, ids, mask):
        calls["pairs"] += ids.shape[0]
        return real_itm(kv, index, ids, mask)

    monkeypatch.setattr(model.qformer, "image_kv", counted_kv)
    monkeypatch.setattr(model, "itm_logits", counted_itm)
    res = eng.retrieve(gallery, text_set, k=2)
    cand_t2i = itc.t().topk(2, dim=1).indices
    cand_i2t = itc.topk(2, dim=1).indices
    for t in range(7):
        assert set(res.text_to_image.indices[t].tolist()) == set(cand_t2i[t].tolist())
        assert torch.equal(res.text_to_image.indices[t], cand_t2i[t][score[cand_t2i[t], t].argsort(descending=True)])
    for i in range(6):
        assert torch.equal(res.image_to_text.indices[i], cand_i2t[i][score[i, cand_i2t[i]].argsort(descending=True)])
    union = {(int(i), t) for t in range(7) for i in cand_t2i[t]} | {(i, int(t)) for i in range(6) for t in cand_i2t[i]}
    assert calls["pairs"] == len(union)  # a pair wanted by both directions is scored once
    assert calls["kv_rows"] <= 6  # each image's cross-attention K/V at most once


def test_recall_at_k_hand_made():
    rankings = torch.tensor([[3, 1, 2, 0], [0, 1, 2, 3], [2, 3, 0, 1]])
    truth = [1, {3, 2}, [1]]  # query 0: rank 2; query 1: rank 3 (first of 2, 3); query 2: rank 4
    assert recall_at_k(rankings, truth, ks=(1, 2, 3, 4, 10)) == pytest.approx(
        {1: 0.0, 2: 1 / 3, 3: 2 / 3, 4: 1.0, 10: 1.0})
    assert recall_at_k([[5, 6]], [(6, 9)], ks=(1, 2)) == {1: 0.0, 2: 1.0}
    with pytest.raises(RetrievalError, match="query 1 has no correct item"):
        recall_at_k(rankings, [1, [], 2])
    with pytest.raises(RetrievalError, match="ground truth for 2"):
        recall_at_k(rankings, [1, 2])


def test_end_to_end_recall_against_brute_force_truth(engine_case):
    model, pixels, texts, score, _ = engine_case
    eng = Retriever(model, progress=False)
    res = eng.retrieve(eng.encode_images(pixels), eng.encode_texts(texts), k=6)
    best, worst = score.t().argmax(1).tolist(), score.t().argmin(1).tolist()
    assert recall_at_k(res.text_to_image.indices, best, ks=(1,)) == {1: 1.0}
    assert recall_at_k(res.text_to_image.indices, worst, ks=(5, 6)) == {5: 0.0, 6: 1.0}
    pair_truth = [[b, w] for b, w in zip(best, worst)]  # several correct items: the best one counts
    assert recall_at_k(res.text_to_image.indices, pair_truth, ks=(1,)) == {1: 1.0}


# ---------------------------------------------------------------------------- files, cache, CLI
def _write_images(folder, n, size=28):
    from PIL import Image
    os.makedirs(folder, exist_ok=True)
    gen = torch.Generator().manual_seed(n)
    for i in range(n):
        arr = (torch.rand(size, size, 3, generator=gen) * 255).to(torch.uint8).numpy()
        Image.fromarray(arr).save(os.path.join(folder, f"img{i}.png"))


def test_list_images_and_read_texts(tmp_path):
    folder = tmp_path / "imgs"
    _write_images(str(folder), 3)
    (folder / ".DS_Store").write_bytes(b"\0junk")  # hidden: skipped
    (folder / "sub").mkdir()  # sub-folder: skipped
    assert [os.path.basename(p) for p in list_images(str(folder))] == ["img0.png", "img1.png", "img2.png"]
    (folder / "notes.txt").write_text("not an image")
    with pytest.raises(ImageError, match="notes.txt"):
        list_images(str(folder))
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(RetrievalError, match="no image files"):
        list_images(str(empty))
    with pytest.raises(RetrievalError, match="no such folder"):
        list_images(str(tmp_path / "missing"))
    good = tmp_path / "t.txt"
    good.write_text("a red circle\n  a blue square \n")
    assert read_texts(str(good)) == ["a red circle", "a blue square"]
    bad = tmp_path / "bad.txt"
    bad.write_text("a red circle\n\na cat\n")
    with pytest.raises(RetrievalError, match="line 2 is empty"):
        read_texts(str(bad))
    trailing = tmp_path / "trailing.txt"
    trailing.write_text("a cat\n\n")
    with pytest.raises(RetrievalError, match="line 2 is empty"):
        read_texts(str(trailing))


def test_gallery_cache_reuse_and_model_check(tmp_path, monkeypatch):
    folder = str(tmp_path / "model")
    make_retrieval_folder(folder, seed=4)
    images = str(tmp_path / "imgs")
    _write_images(images, 3)
    eng = Retriever.from_pretrained(folder, progress=False)
    cache = str(tmp_path / "gallery.safetensors")
    paths = list_images(images)
    first = eng.encode_images(paths, cache=cache)
    encoded = []
    real = eng._encode_files
    monkeypatch.setattr(eng, "_encode_files", lambda p: encoded.append(list(p)) or real(p))
    again = eng.encode_images(paths, cache=cache)
    assert encoded == [] and torch.equal(first.features, again.features)
    assert torch.equal(first.vision_tokens, again.vision_tokens)
    os.utime(paths[1], ns=(1, 1))  # a changed file (new stamp) is encoded again, alone
    eng.encode_images(paths, cache=cache)
    assert encoded == [[paths[1]]]
    other = str(tmp_path / "other")
    make_retrieval_folder(other, seed=5)
    with pytest.raises(RetrievalError, match="different model"):
        Retriever.from_pretrained(other, progress=False).encode_images(paths, cache=cache)


def test_retrieve_cli(tmp_path, capsys):
    import io
    folder = str(tmp_path / "model")
    make_retrieval_folder(folder, seed=6)
    images = str(tmp_path / "imgs")
    _write_images(images, 4)
    texts = tmp_path / "texts.txt"
    texts.write_text("a red circle\na blue square on the left\nthe cat\n")
    out = io.StringIO()
    args = dict(model=folder, images=images, texts=str(texts), k=None, batch_size=2, device="cpu",
                dtype=None, top=2, json=False, out=out)
    assert retrieve_main(args) == 0
    header, *rows = out.getvalue().splitlines()
    assert header.startswith("#")  # the columns, as a comment line
    lines = [line.split("\t") for line in rows]
    assert len(lines) == 3 * 2 + 4 * 2
    assert {tuple(line[:3]) for line in lines if line[0] == "t2i"} == {
        ("t2i", t, str(r)) for t in ("a red circle", "a blue square on the left", "the cat") for r in (1, 2)}
    out = io.StringIO()
    assert retrieve_main({**args, "json": True, "out": out, "k": 1}) == 0
    records = [json.loads(line) for line in out.getvalue().splitlines()]
    assert len(records) == 7 and all(len(r["results"]) == 1 for r in records)  # top clamped by k
    from blip2_fast.cli import CLIError
    texts.write_text("a red circle\n\nthe cat\n")
    with pytest.raises(CLIError, match="line 2 is empty"):
        retrieve_main(args)


def test_retrieve_through_the_console_entry(tmp_path, capsys):
    from blip2_fast.cli import main
    folder = str(tmp_path / "model")
    make_retrieval_folder(folder, seed=7)
    images = str(tmp_path / "imgs")
    _write_images(images, 3)
    texts = tmp_path / "texts.txt"
    texts.write_text("a red circle\nthe cat\n")
    assert main(["retrieve", "--model", folder, "--images", images, "--texts", str(texts), "--top", "1",
                 "--device", "cpu"]) == 0
    lines = [line for line in capsys.readouterr().out.splitlines() if not line.startswith("#")]
    assert len(lines) == 2 + 3 and lines[0].startswith("t2i\ta red circle\t1\t")
    texts.write_text("a red circle\n\n")
    assert main(["retrieve", "--model", folder, "--images", images, "--texts", str(texts)]) == 2
    assert "line 2 is empty" in capsys.readouterr().err

"""The shipped miniature BLIP-2 retrieval model (`blip2-shapes-itm`): it loads, it
reaches the shipped model's recall@1 on galleries of scenes rendered now from a seed never trained on,
transformers computes the same scores from the same folder, and the CLI and the demo use it
when no --model is given. The judge is the world itself (`world.caption`), not the model.
The captioning/VQA model (`blip2-shapes`) is tested in test_default_generation.py."""
import json
import os

import pytest
import torch

from blip2_fast import world
from blip2_fast.cli import main
from blip2_fast.engine import default_model
from blip2_fast.miniature.evaluate import render_scenes, retrieval_recall

SEED = 2026  # the recipe evaluates on 12345; any seed of the "eval" split is unseen in training
MAX_MEGABYTES = 20


@pytest.fixture(scope="module")
def retriever():
    from blip2_fast.retrieval import Retriever
    return Retriever.from_pretrained(default_model("retrieval"), device="cpu", progress=False)


@pytest.fixture(scope="module")
def scenes():
    return render_scenes(200, SEED)


def test_the_retrieval_folder_ships_inside_the_package_under_20_megabytes():
    folder = default_model("retrieval")
    assert folder is not None and os.path.dirname(folder).endswith(os.path.join("blip2_fast", "default_model"))
    size = sum(os.path.getsize(os.path.join(folder, f)) for f in os.listdir(folder))
    assert size <= MAX_MEGABYTES * 2 ** 20, size


def test_recall_at_1_is_90_percent_both_ways_in_galleries_of_100(retriever, scenes):
    recall = retrieval_recall(retriever, scenes, gallery=100)
    assert recall["galleries"] == 2
    assert recall["text_to_image_r1"] >= 0.90 and recall["image_to_text_r1"] >= 0.90, recall


def test_a_wrong_attribute_scores_below_the_true_caption(retriever, scenes):
    """ITM + ITC of the true caption beats the same caption with one attribute changed, for
    most images: the model reads size, colour and shape, not only the template."""
    from blip2_fast.images import preprocess

    data = [(img, s) for img, s in zip(scenes.images, scenes.scenes) if len(s.objects) == 1][:40]
    wins = 0
    for img, scene in data:
        obj = scene.objects[0]
        other_color = next(c for c in world.COLORS if c != obj.color)
        other_shape = next(s for s in world.SHAPES if s != obj.shape)
        texts = [world.caption(scene), f"a {obj.size} {other_color} {obj.shape}", f"a {obj.size} {obj.color} {other_shape}"]
        result = retriever.retrieve(retriever.encode_images(preprocess([img], retriever.spec)),
                                    retriever.encode_texts(texts), k=3)
        wins += int(result.image_to_text.indices[0, 0]) == 0
    assert wins >= 0.9 * len(data), (wins, len(data))


def test_transformers_scores_the_shipped_folder_the_same(retriever, scenes):
    from transformers import Blip2ForImageTextRetrieval as HF

    from blip2_fast.images import preprocess

    theirs = HF.from_pretrained(default_model("retrieval")).eval()
    texts = [world.caption(s) for s in scenes.scenes[:4]]
    enc = retriever.tokenizer(texts, padding=True, return_tensors="pt")
    pixels = preprocess(scenes.images[:4], retriever.spec)
    for itm in (True, False):
        with torch.no_grad():
            ours = retriever.model(pixels, enc["input_ids"], enc["attention_mask"], use_image_text_matching_head=itm)
            ref = theirs(pixel_values=pixels, input_ids=enc["input_ids"], attention_mask=enc["attention_mask"],
                         use_image_text_matching_head=itm)
        a = ours.logits_per_image if hasattr(ours, "logits_per_image") else ours[0]
        assert (a - ref.logits_per_image).abs().max() <= 1e-4, itm


def test_retrieve_and_demo_use_the_shipped_model_without_model_flag(tmp_path, capsys):
    scenes = [world.sample_scene(world.scene_rng(SEED, i, "eval")) for i in range(4)]
    folder = tmp_path / "images"
    folder.mkdir()
    for i, s in enumerate(scenes):
        world.render(s, 64).save(folder / f"{i}.png")
    texts = tmp_path / "texts.txt"
    texts.write_text("\n".join(world.caption(s) for s in scenes) + "\n")
    assert main(["retrieve", "--images", str(folder), "--texts", str(texts), "--device", "cpu", "--json"]) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    best = {r["query"]: r["results"][0]["item"] for r in rows if r["direction"] == "t2i"}
    captions = [world.caption(s) for s in scenes]
    assert len(best) == len(set(captions))
    for caption in best:  # the top image has the query's caption (the world's own, not the model's)
        assert captions[int(os.path.basename(best[caption]).split(".")[0])] == caption, caption
    assert main(["demo", "--n", "4", "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    assert "Retrieval over these scenes" in out

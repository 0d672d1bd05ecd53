"""Judging the miniature BLIP-2 against the world's truth, on freshly rendered scenes.

- captioning: the generated caption parses back (`world.parse_caption`) to exactly the scene's
  objects (size, colour, shape, left/right) — "all attributes right";
- VQA: exact match of the generated answer with the world's answer, over every question the
  world asks of each scene (`world.questions`);
- retrieval: galleries of 100 scenes, each with its caption; text -> image and image -> text
  recall@1 through the retrieval engine (ITC over all pairs, ITM rerank of the top k). Two
  scenes can share a caption (background is not in it): every image with the query's caption
  counts as correct for text -> image, every text equal to the image's caption for image -> text.

Scenes come from `world.scene_rng(seed, i, "eval")`: a split never used for training.
"""
from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from .. import world
from ..engine import DEFAULTS, Engine, Settings
from ..images import preprocess
from ..retrieval import Retriever, recall_at_k

EVAL_SPLIT = "eval"


@dataclass
class Scenes:
    scenes: list
    images: list          # PIL images
    qa: list              # per scene: [(question, answer), ...]


def render_scenes(n: int, seed: int, resolution: int = 64, split: str = EVAL_SPLIT) -> Scenes:
    scenes, images, qa = [], [], []
    for i in range(n):
        rng = world.scene_rng(seed, i, split)
        scene = world.sample_scene(rng)
        scenes.append(scene)
        images.append(world.render(scene, resolution, rng))
        qa.append(world.questions(scene, rng))
    return Scenes(scenes, images, qa)


def _pixels(engine, images):
    return preprocess(images, engine.spec).to(engine.model.device)


def caption_accuracy(engine, data: Scenes, batch_size: int = 32, **settings) -> tuple[float, list[str], float]:
    """(fraction of captions with every attribute right, the captions, images/s)."""
    s = Settings(**{**DEFAULTS["caption"], **settings})
    captions, start = [], time.perf_counter()
    for i in range(0, len(data.images), batch_size):
        chunk = data.images[i:i + batch_size]
        captions += engine.generate(_pixels(engine, chunk), [""] * len(chunk), s)
    rate = len(captions) / (time.perf_counter() - start)
    ok = [world.caption_attributes_correct(c, sc) for c, sc in zip(captions, data.scenes)]
    return sum(ok) / len(ok), captions, rate


def vqa_accuracy(engine, data: Scenes, batch_size: int = 32, **settings) -> tuple[float, list, float]:
    """(exact-match fraction over all questions, [(question, answer, predicted)], questions/s)."""
    s = Settings(**{**DEFAULTS["vqa"], **settings})
    items = [(img, q, a) for img, pairs in zip(data.images, data.qa) for q, a in pairs]
    out, start = [], time.perf_counter()
    for i in range(0, len(items), batch_size):
        chunk = items[i:i + batch_size]
        prompts = [engine.template.format(q) for _, q, _ in chunk]
        preds = engine.generate(_pixels(engine, [c[0] for c in chunk]), prompts, s, questions=[q for _, q, _ in chunk])
        out += [(q, a, p) for (_, q, a), p in zip(chunk, preds)]
    rate = len(out) / (time.perf_counter() - start)
    return sum(p.strip().lower() == a for _, a, p in out) / len(out), out, rate


def question_type(question: str) -> str:
    """The world's question with its colour and shape words replaced by C and S
    ("is there a C S?"): the key of the per-type accuracies."""
    words = [("C" if w in world.COLORS else "S" if w in world.SHAPES else w) for w in question[:-1].split()]
    return " ".join(words) + question[-1]


def accuracy_by_type(answers: list) -> dict:
    """{question type: exact-match fraction} over [(question, answer, predicted)]."""
    hits: dict[str, list[bool]] = {}
    for q, a, p in answers:
        hits.setdefault(question_type(q), []).append(p.strip().lower() == a)
    return {k: sum(v) / len(v) for k, v in sorted(hits.items())}


def retrieval_recall(retriever, data: Scenes, gallery: int = 100, k: int = 16) -> dict:
    """Mean text->image and image->text recall@1 over consecutive galleries of `gallery` scenes."""
    t2i, i2t, n_img, start = [], [], 0, time.perf_counter()
    for g in range(0, len(data.scenes) - gallery + 1, gallery):
        scenes, images = data.scenes[g:g + gallery], data.images[g:g + gallery]
        captions = [world.caption(s) for s in scenes]
        pixels = preprocess(images, retriever.spec).to(retriever.model.device)
        result = retriever.retrieve(retriever.encode_images(pixels), retriever.encode_texts(captions), k)
        same = [[j for j, c in enumerate(captions) if c == cap] for cap in captions]
        t2i.append(recall_at_k(result.text_to_image.indices, same, ks=(1,))[1])
        i2t.append(recall_at_k(result.image_to_text.indices, same, ks=(1,))[1])
        n_img += gallery
    if not t2i:
        raise ValueError(f"need at least {gallery} scenes for one gallery, got {len(data.scenes)}")
    return {"text_to_image_r1": sum(t2i) / len(t2i), "image_to_text_r1": sum(i2t) / len(i2t),
            "galleries": len(t2i), "images_per_s": n_img / (time.perf_counter() - start)}


def caption_score(folder: str, n: int, seed: int = 99, device: str = "cpu") -> float:
    """Fraction of n fresh scenes whose caption by `folder` has every attribute right."""
    engine = Engine.load(folder, device=device)
    with torch.no_grad():
        return caption_accuracy(engine, render_scenes(n, seed, engine.spec.height))[0]


def mcnemar(right_a: list[bool], right_b: list[bool]) -> dict:
    """Paired accuracies of two models on the same items: each accuracy, the discordant counts
    (items only A / only B gets right) and McNemar's z = (only_a - only_b) / sqrt(only_a + only_b),
    0 when they never disagree."""
    if len(right_a) != len(right_b) or not right_a:
        raise ValueError(f"paired results must be non-empty and of one length, got {len(right_a)} and {len(right_b)}")
    only_a = sum(x and not y for x, y in zip(right_a, right_b))
    only_b = sum(y and not x for x, y in zip(right_a, right_b))
    return {"items": len(right_a), "accuracy_a": sum(right_a) / len(right_a), "accuracy_b": sum(right_b) / len(right_b),
            "only_a": only_a, "only_b": only_b,
            "mcnemar_z": (only_a - only_b) / (only_a + only_b) ** 0.5 if only_a + only_b else 0.0}


def paired_comparison(folder_a: str, folder_b: str, n: int = 1000, seed: int = 99, device: str = "cpu") -> dict:
    """Two generation folders on the same n fresh scenes (the ablation's test).

    For captions and for VQA: each model's accuracy, the discordant counts (items only A gets
    right, only B gets right) and McNemar's z = (only_a - only_b) / sqrt(only_a + only_b). Pairing
    cancels the luck of the scenes drawn, so a gap of a point or two over 1000 scenes can be told
    from noise (|z| > 2 is p < 0.05); it says nothing about the luck of the training run."""
    data, right = None, {}
    for tag, folder in (("a", folder_a), ("b", folder_b)):
        engine = Engine.load(folder, device=device)
        if data is None:  # rendered once, at the first model's resolution, for both
            data = render_scenes(n, seed, engine.spec.height)
        with torch.no_grad():
            _, captions, _ = caption_accuracy(engine, data)
            _, answers, _ = vqa_accuracy(engine, data)
        right[tag] = {"caption": [world.caption_attributes_correct(c, s) for c, s in zip(captions, data.scenes)],
                      "vqa": [p.strip().lower() == a for _, a, p in answers], "by_type": accuracy_by_type(answers)}
    out = {"images": n, "seed": seed, "vqa_accuracy_by_type": {t: right[t]["by_type"] for t in ("a", "b")}}
    for key in ("caption", "vqa"):
        out[key] = mcnemar(right["a"][key], right["b"][key])
    return out


def evaluate(folder: str, retrieval_folder: str | None, n: int = 200, seed: int = 12345,
             device: str = "cpu", progress: bool = False) -> dict:
    """Every metric of the shipped model's bar (captions, VQA, retrieval) for a generation folder (and a retrieval folder)."""
    engine = Engine.load(folder, device=device)
    resolution = engine.spec.height
    data = render_scenes(n, seed, resolution)
    with torch.no_grad():
        cap, captions, cap_rate = caption_accuracy(engine, data)
        vqa, answers, vqa_rate = vqa_accuracy(engine, data)
    report = {"images": n, "seed": seed, "caption_accuracy": cap, "captions_per_s": cap_rate,
              "vqa_accuracy": vqa, "questions": len(answers), "answers_per_s": vqa_rate,
              "vqa_accuracy_by_type": accuracy_by_type(answers),
              "caption_examples": [(world.caption(s), c) for s, c in zip(data.scenes[:5], captions[:5])],
              "vqa_examples": answers[:5]}
    if retrieval_folder:
        retriever = Retriever.from_pretrained(retrieval_folder, device=device, progress=progress)
        report.update(retrieval_recall(retriever, data))
    return report


__all__ = ["Scenes", "render_scenes", "caption_accuracy", "vqa_accuracy", "question_type", "accuracy_by_type",
           "retrieval_recall", "evaluate", "caption_score", "mcnemar", "paired_comparison"]

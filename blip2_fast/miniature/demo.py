"""`blip2-fast demo`: the shipped miniature BLIP-2 on scenes rendered on the spot.

Renders `n` fresh scenes of the world of shapes (split "demo", never trained on), then prints
three tables, each row with the truth beside the model's output:
- captions (beam search, the CLI's caption defaults);
- one question per scene, cycling through the world's question types;
- a small retrieval over the same n scenes: the best image for each caption and the best
  caption for each image (ITC over all pairs, ITM rerank);
and the throughput of each part. The models are the shipped `blip2-shapes` and
`blip2-shapes-itm` unless --model / --retrieval-model name others; in an install without the
captioning folder the first two tables are skipped with a line saying so. `--save DIR` also
writes the images, to try the other commands on.
"""
from __future__ import annotations

import os
import time

import torch

from .. import world
from ..engine import Engine, EngineError, default_device, default_model, resolve_model
from ..images import preprocess
from ..retrieval import Retriever
from .evaluate import Scenes, caption_accuracy, vqa_accuracy
from .preset import IMAGE_SIZE

DEMO_SPLIT = "demo"


def _table(headers: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(headers)]
    line = lambda cells: "  ".join(c.ljust(w) for c, w in zip(cells, widths)).rstrip()  # noqa: E731
    return "\n".join([line(headers), line(["-" * w for w in widths])] + [line(r) for r in rows])


def _mark(ok: bool) -> str:
    return "ok" if ok else "WRONG"


def demo(n: int = 8, seed: int = 0, model: str | None = None, retrieval_model: str | None = None,
         device: str | None = None, save: str | None = None, out=print) -> dict:
    """Run the demo, print its tables through `out`; return the accuracies and throughputs."""
    if n < 2:
        raise EngineError(f"--n {n}: the demo needs at least 2 scenes for its retrieval")
    scenes, images, questions = [], [], []
    for i in range(n):
        rng = world.scene_rng(seed, i, DEMO_SPLIT)
        scene = world.sample_scene(rng)
        pairs = world.questions(scene, rng)
        scenes.append(scene)
        images.append(world.render(scene, IMAGE_SIZE, rng))  # models resize to their own size
        questions.append(pairs[i % len(pairs)])
    if save:
        os.makedirs(save, exist_ok=True)
        for i, img in enumerate(images):
            img.save(os.path.join(save, f"scene_{i:03d}.png"))
    truth = [world.caption(s) for s in scenes]
    report = {}
    if model is None and default_model("generation") is None:
        out("Captions and questions: skipped, this install ships no captioning model yet (only the "
            "retrieval one); pass --model with a BLIP-2 folder to run them.")
    else:
        report.update(_generation(Engine.load(model, device=device), scenes, images, questions, truth, out))
    device = default_device(device)
    retriever = Retriever.from_pretrained(resolve_model(retrieval_model, "retrieval"), device=device, progress=False)
    t = time.perf_counter()
    result = retriever.retrieve(retriever.encode_images(preprocess(images, retriever.spec).to(retriever.model.device)),
                                retriever.encode_texts(truth), k=n)
    report["retrieval_images_per_s"] = n / (time.perf_counter() - t)
    best_image = result.text_to_image.indices[:, 0].tolist()
    best_text = result.image_to_text.indices[:, 0].tolist()
    # two scenes may share a caption (the background is not in it): any image with it is right
    t2i_ok = [truth[best_image[i]] == truth[i] for i in range(n)]
    i2t_ok = [truth[best_text[i]] == truth[i] for i in range(n)]
    report.update(text_to_image_r1=sum(t2i_ok) / n, image_to_text_r1=sum(i2t_ok) / n)
    out("\nRetrieval over these scenes\n" + _table(
        ["#", "caption", "best image", "image's best caption", ""],
        [[str(i), truth[i], f"#{best_image[i]}", truth[best_text[i]], _mark(t2i_ok[i] and i2t_ok[i])]
         for i in range(n)]))
    summary = [f"recall@1 text->image {report['text_to_image_r1']:.0%}, image->text {report['image_to_text_r1']:.0%}",
               f"retrieval {report['retrieval_images_per_s']:.1f} images/s"]
    if "caption_accuracy" in report:
        summary[0] = f"caption accuracy {report['caption_accuracy']:.0%}, VQA {report['vqa_accuracy']:.0%}, " + summary[0]
        summary[1] = f"{report['captions_per_s']:.1f} captions/s, {report['answers_per_s']:.1f} answers/s, " + summary[1]
    out(f"\n{summary[0]}\nthroughput on {device}: {summary[1]} (n={n}: the first call includes warm-up)")
    return report


def _generation(engine, scenes, images, questions, truth, out) -> dict:
    """Caption every scene and ask its question (`evaluate`'s judges, the CLI's defaults); print
    both tables; return accuracies and rates."""
    n = len(scenes)
    data = Scenes(scenes, images, [[qa] for qa in questions])
    with torch.no_grad():
        cap_acc, captions, cap_rate = caption_accuracy(engine, data, batch_size=n)
        vqa_acc, answers, vqa_rate = vqa_accuracy(engine, data, batch_size=n)
    cap_ok = [world.caption_attributes_correct(c, s) for c, s in zip(captions, scenes)]
    out("Captions\n" + _table(["#", "true caption", "model's caption", ""],
                              [[str(i), truth[i], captions[i], _mark(cap_ok[i])] for i in range(n)]))
    out("\nQuestions\n" + _table(["#", "question", "true", "model", ""],
                                 [[str(i), q, a, p, _mark(p.strip().lower() == a)] for i, (q, a, p) in enumerate(answers)]))
    return {"caption_accuracy": cap_acc, "captions_per_s": cap_rate, "vqa_accuracy": vqa_acc, "answers_per_s": vqa_rate}


__all__ = ["demo"]

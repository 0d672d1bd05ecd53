"""The whole miniature BLIP-2 from scratch, as the paper trains the real one:

  1. unimodal pretraining (`pretrain.pretrain`): tokenizers, the ViT, the OPT-shaped LM, the
     BERT-shaped text encoder, assembled into one initial BLIP-2 folder;
  2. stage 1 (`blip2-fast train --stage 1`): frozen ViT, ITC + ITM + ITG;
  3. stage 2 (`blip2-fast train --stage 2`): frozen ViT and LM, LM loss on the world's captions and
     its "Question: {q} Answer: {a}" lines (the text the LM was pretrained on), frozen-ViT
     features cached on disk (no augmentation in this world: flips and crops would falsify
     "left", "right" and sizes);
  4. a short finetune (`blip2-fast train --stage vqa --vqa-captions`): each image's answers
     behind "Question: {q} Answer:" (answer tokens only) and its caption behind the empty prompt
     captioning uses. One model both answers and captions: measured, a VQA-only finetune taught
     the soft prompt to end every text at once and the captions came out empty. As in the
     paper's VQA finetune, the question also goes to the Q-Former (with the queries, in the
     bidirectional mode), so the soft prompt carries what the question asks about; caption rows
     run the queries alone, as captioning does. Measured from the stage-4 model of a run
     without it: 0.75 -> 0.94 VQA after 1000 such steps (0.49 -> 0.94 on "what shape is on
     the left?"), where 300 more steps without the question left it at 0.75: the frozen 3-layer
     LM reads a caption-like prompt too poorly to answer from it (`pretrain_lm`). Unfreezing the
     ViT for these 1000 steps (as the paper's finetunes do) changed nothing measurable (captions
     0.900, VQA 0.940 on 200 scenes) and took 7.8 min instead of 4.2 (no feature cache). Captions,
     with no question, are what transformers' Blip2ForConditionalGeneration computes too;
     answers need the question in the Q-Former (transformers' InstructBLIP does the same);
  5. the shipped folders: `blip2-shapes` (captioning, VQA, chat: the stage-4 model) and
     `blip2-shapes-itm` (retrieval: the stage-1 Q-Former with its ITC/ITM heads, since stages 3-4
     retrain the Q-Former for the LLM and BLIP-2 ships its retrieval model from stage 1 too);
  6. evaluation on fresh seeds (`evaluate.evaluate`) and, with `ablation=True`, the paper's
     ablation in miniature: stage 2 (+ the same VQA finetune) without stage 1, judged on 200
     scenes like the recipe and, paired with the recipe's model, on 1000 other scenes
     (`evaluate.paired_comparison`, McNemar's z: a gap of a point or two needs a paired test
     on that many scenes to be told from the luck of the draw).

What the ablation measured, one training run each (seed 0), is the paper's finding only at the
start of stage 2. Stage 2 on captions alone (`early_stage2`, 400 scenes judged): after 100
steps 0.573 of captions right from the stage-1 Q-Former against 0.005 from the initial one
(whose captions do not yet parse), and 0.573 / 0.575 / 0.580 against 0.010 / 0.013 / 0.005 with
stage-2 seeds 1, 2, 3 on the same folders; after 300 steps 0.943 against 0.940. At the recipe's full
budget (1500 stage-2 steps + the finetune) the two models are level: captions 0.983 against
0.982 (paired over 1000 scenes, McNemar z 0.33), VQA 0.969 against 0.975 (z -2.2, the run
without stage 1 ahead). An earlier run with a 10000-step ViT had stage 1 ahead at the end
(0.910 / 0.894, z 2.5; 0.933 / 0.918, z 3.6) and behind after 300 caption steps (0.58 / 0.87):
run-to-run differences of that size mean one run per arm settles little beyond the first
hundred steps.

`python -m blip2_fast.miniature reproduce --out DIR [--ablation] [--quick]`.
"""
from __future__ import annotations

import json
import os
import shutil
import time

from .. import world
from ..models.retrieval_heads import Blip2ForImageTextRetrieval
from ..training.loop import train
from ..training.train_config import TrainConfig
from .evaluate import caption_score, evaluate, paired_comparison
from .pretrain import pretrain

# measured on a 2-core CPU; --quick shrinks everything to a smoke test
FULL = dict(train_images=6000, stage1=dict(steps=1500, batch_size=64, lr=1e-3),
            stage2=dict(steps=1500, batch_size=64, lr=1e-3), vqa=dict(steps=1000, batch_size=64, lr=5e-4),
            eval_images=200, ablation_images=1000, early_steps=(100, 300), early_images=400)
QUICK = dict(train_images=64, stage1=dict(steps=3, batch_size=8, lr=1e-3), stage2=dict(steps=3, batch_size=8, lr=1e-3),
             vqa=dict(steps=2, batch_size=8, lr=3e-4), eval_images=100, ablation_images=100, early_steps=(2,),
             early_images=8)
RETRIEVAL_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.txt")


def write_stage2_texts(train_jsonl: str, out: str, questions: bool = True) -> str:
    """One record per caption and (questions=True) per "Question: q Answer: a" line of each
    training image."""
    root = os.path.dirname(os.path.abspath(train_jsonl))
    with open(train_jsonl, encoding="utf-8") as f, open(out, "w", encoding="utf-8") as g:
        for line in f:
            rec = json.loads(line)
            image = os.path.join(root, rec["image"])
            texts = [rec["caption"]] + ([f"Question: {q['question']} Answer: {q['answer']}" for q in rec["questions"]]
                                        if questions else [])
            for t in texts:
                g.write(json.dumps({"image": image, "caption": t}) + "\n")
    return out


def _train(stage: str, model: str, data: str, out: str, seed: int, progress: bool, **kw) -> str:
    """One run of the training core (what `blip2-fast train` runs); returns the exported folder."""
    fields = dict(stage=stage, model=model, data=[data], out=out, seed=seed, log_every=25, save_every=500,
                  warmup_steps=50, min_lr=1e-5, progress=progress, **kw)
    result = train(TrainConfig.from_dict(fields, f"recipe stage {stage}"))
    if not result["exported"]:
        raise RuntimeError(f"training stage {stage} into {out} exported no model")
    return result["exported"]


def early_stage2(starts: dict, train_jsonl: str, out: str, seed: int, progress: bool, steps=(100, 300),
                 n: int = 400, **train_kw) -> dict:
    """The paper's Figure 5 in miniature: stage 2 on the captions alone, from each start folder
    (name -> folder), for each of a few short budgets; the captions judged on n fresh scenes.
    Returns {"images", "steps": {budget: {name: caption accuracy}}}."""
    os.makedirs(out, exist_ok=True)
    captions = write_stage2_texts(train_jsonl, os.path.join(out, "captions.jsonl"), questions=False)
    result = {"images": n, "steps": {}}
    for budget in steps:
        row = result["steps"][str(budget)] = {}
        for name, start in starts.items():
            tag = name.replace(" ", "-")
            folder = _train("2", start, captions, os.path.join(out, f"{tag}-{budget}"), seed, progress,
                            cache_features=True, steps=budget, **train_kw)
            row[name] = caption_score(folder, n)
    return result


def write_retrieval_folder(stage1_model: str, qformer_tokenizer: str, out: str) -> str:
    """The stage-1 model as a transformers Blip2ForImageTextRetrieval folder whose tokenizer is
    the Q-Former's (what the retrieval engine and transformers' processor read)."""
    model = Blip2ForImageTextRetrieval.from_pretrained(stage1_model, skip_unused=True)
    model.config.text = None  # no LLM in this folder
    model.config.image_token_index = None  # the OPT tokenizer's "<image>" id means another token here
    model.config.extra["architectures"] = ["Blip2ForImageTextRetrieval"]
    model.save_pretrained(out)
    for name in os.listdir(qformer_tokenizer):
        shutil.copy2(os.path.join(qformer_tokenizer, name), os.path.join(out, name))
    for name in ("processor_config.json", "preprocessor_config.json"):
        src = os.path.join(stage1_model, name)
        if os.path.exists(src):
            with open(src, encoding="utf-8") as f:
                d = json.load(f)
            d.pop("tokenizer", None)
            with open(os.path.join(out, "preprocessor_config.json" if name == "processor_config.json" else name),
                      "w", encoding="utf-8") as f:
                json.dump(d.get("image_processor", d), f, indent=2)
    return out


def reproduce(out: str, quick: bool = False, seed: int = 0, ablation: bool = False, progress: bool = True,
              pretrained: str | None = None) -> dict:
    """Run the recipe into `out`; returns {"times", "final", "itm", "report", ("ablation",
    "ablation_paired", "ablation_early")}.
    `pretrained`: reuse a finished step-1 folder instead of pretraining again."""
    sizes, times = (QUICK if quick else FULL), {}
    t0 = time.perf_counter()
    pre = pretrained or os.path.join(out, "pretrain")
    if pretrained is None:
        pretrain(pre, quick=quick, seed=seed, progress=progress)
    times["unimodal pretraining"] = time.perf_counter() - t0
    initial, qtok = os.path.join(pre, "initial"), os.path.join(pre, "qformer_tokenizer")

    t = time.perf_counter()
    data_dir = os.path.join(out, "data")
    train_jsonl = world.generate_dataset(data_dir, sizes["train_images"], seed, resolution=64, split="train")
    texts = write_stage2_texts(train_jsonl, os.path.join(data_dir, "stage2.jsonl"))
    times["data"] = time.perf_counter() - t

    def run_stage2_and_vqa(start: str, tag: str) -> str:
        t = time.perf_counter()
        s2 = _train("2", start, texts, os.path.join(out, f"stage2{tag}"), seed, progress, cache_features=True,
                    **sizes["stage2"])
        times[f"stage 2{tag}"] = time.perf_counter() - t
        t = time.perf_counter()
        final = _train("vqa", s2, train_jsonl, os.path.join(out, f"vqa{tag}"), seed, progress,
                       vqa_qformer_question=True, vqa_captions=True, cache_features=True, **sizes["vqa"])
        times[f"vqa finetune{tag}"] = time.perf_counter() - t
        return final

    t = time.perf_counter()
    s1 = _train("1", initial, train_jsonl, os.path.join(out, "stage1"), seed, progress, qformer_tokenizer=qtok,
                **sizes["stage1"])
    times["stage 1"] = time.perf_counter() - t
    final = run_stage2_and_vqa(s1, "")
    shipped = os.path.join(out, "blip2-shapes")
    if os.path.exists(shipped):
        shutil.rmtree(shipped)
    shutil.copytree(final, shipped)
    itm = write_retrieval_folder(s1, qtok, os.path.join(out, "blip2-shapes-itm"))
    times["total training"] = time.perf_counter() - t0

    result = {"times": times, "final": shipped, "itm": itm,
              "report": evaluate(shipped, itm, n=sizes["eval_images"], progress=progress)}
    if ablation:
        no_s1 = run_stage2_and_vqa(initial, "-without-stage1")
        result["ablation"] = evaluate(no_s1, None, n=sizes["eval_images"], progress=progress)
        t = time.perf_counter()
        result["ablation_paired"] = paired_comparison(shipped, no_s1, n=sizes["ablation_images"])
        times["paired evaluation"] = time.perf_counter() - t
        t = time.perf_counter()
        result["ablation_early"] = early_stage2({"recipe": s1, "without stage 1": initial}, train_jsonl,
                                                os.path.join(out, "early-stage2"), seed, progress,
                                                steps=sizes["early_steps"], n=sizes["early_images"],
                                                batch_size=sizes["stage2"]["batch_size"], lr=sizes["stage2"]["lr"])
        times["early stage 2 (both starts)"] = time.perf_counter() - t
    with open(os.path.join(out, "reproduce.json"), "w", encoding="utf-8") as f:
        json.dump(result, f, indent=1)
    return result


__all__ = ["reproduce", "write_stage2_texts", "early_stage2", "write_retrieval_folder", "FULL", "QUICK"]

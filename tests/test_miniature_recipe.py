"""The miniature recipe end to end at smoke-test size (`reproduce(quick=True)`): every stage runs
through `blip2-fast train`, the shipped folders load in transformers with our outputs, and the
evaluation reports every metric of the shipped model's bar. The numbers of a quick run mean nothing; this checks
the plumbing, the formats and the metric code."""
import json
import os

import pytest
import torch
from types import SimpleNamespace

from blip2_fast import world
from blip2_fast.miniature.evaluate import render_scenes, retrieval_recall
from blip2_fast.miniature.recipe import write_stage2_texts


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """Through the command line the README gives (`python -m blip2_fast.miniature reproduce`)."""
    import contextlib
    import io

    from blip2_fast.miniature.__main__ import main as miniature_main
    out = tmp_path_factory.mktemp("recipe")
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        result = miniature_main(["reproduce", "--out", str(out), "--quick", "--ablation"])
    result["printed"] = printed.getvalue()
    return result, out


def test_reproduce_prints_both_columns_of_the_table(run):
    result, _ = run
    lines = result["printed"].splitlines()  # the training runs' own step lines come first
    header = next(line for line in lines if line.startswith("metric "))
    assert "recipe" in header and "without stage 1" in header
    row = next(line for line in lines if line.startswith("VQA exact answers")).split()
    assert [float(x) for x in row[-2:]] == pytest.approx([result["report"]["vqa_accuracy"],
                                                         result["ablation"]["vqa_accuracy"]], abs=5e-4)
    assert any(line.startswith("stage 1 ") for line in lines)
    assert any(line.strip().startswith("after 2 steps") for line in lines)  # the early stage-2 rows
    assert any(line.startswith("VQA exact answers") and len(line.split()) == 8 for line in lines)  # paired row


def test_every_stage_ran_through_the_cli_and_wrote_its_metrics(run):
    result, out = run
    for stage in ("stage1", "stage2", "vqa", "stage2-without-stage1", "vqa-without-stage1"):
        rows = [json.loads(line) for line in open(out / stage / "metrics.jsonl")]
        assert rows and all(r["loss"] == r["loss"] for r in rows), stage  # logged, finite
    assert json.load(open(out / "reproduce.json"))["report"]["images"] == 100


def test_report_has_every_metric(run):
    report = run[0]["report"]
    for key in ("caption_accuracy", "vqa_accuracy", "text_to_image_r1", "image_to_text_r1"):
        assert 0.0 <= report[key] <= 1.0, key
    assert report["questions"] > report["images"]  # several questions per scene
    assert set(report["vqa_accuracy_by_type"]) == {"how many shapes are there?", "is there a C S?",
                                                   "what color is the S?", "what shape is on the left?",
                                                   "what shape is on the right?"}
    assert "caption_accuracy" in run[0]["ablation"]
    paired, early = run[0]["ablation_paired"], run[0]["ablation_early"]
    for key in ("caption", "vqa"):  # the discordant counts bound the accuracy gap
        p = paired[key]
        assert abs(p["accuracy_a"] - p["accuracy_b"]) * p["items"] == pytest.approx(abs(p["only_a"] - p["only_b"]))
    assert set(early["steps"]["2"]) == {"recipe", "without stage 1"}


def test_the_finetune_taught_the_qformer_to_read_the_question(run):
    """As the paper's VQA finetune: the shipped model's config says its Q-Former reads the question,
    so the CLI and the evaluation feed it (tests/test_cli.py checks that against InstructBLIP)."""
    from blip2_fast.engine import Engine

    engine = Engine.load(run[0]["final"], device="cpu")
    assert engine.model.reads_question and engine.qformer_tokenizer is not None
    assert engine.encode_questions([None, "how many shapes are there?"])["qformer_attention_mask"][0].sum() == 0


def test_shipped_generation_folder_matches_transformers(run):
    from transformers import Blip2ForConditionalGeneration as HF

    from blip2_fast.models.blip2 import Blip2ForConditionalGeneration

    folder = run[0]["final"]
    ours, theirs = Blip2ForConditionalGeneration.from_pretrained(folder), HF.from_pretrained(folder).eval()
    pixels = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    ids = torch.tensor([[ours.config.image_token_index] * ours.config.num_query_tokens + [1, 40, 41]] * 2)
    with torch.no_grad():
        a = ours(pixels, ids).logits
        b = theirs(pixel_values=pixels, input_ids=ids).logits
    assert (a - b).abs().max() <= 1e-4


def test_shipped_retrieval_folder_matches_transformers(run):
    from transformers import Blip2ForImageTextRetrieval as HF

    from blip2_fast.retrieval import Retriever

    folder = run[0]["itm"]
    engine = Retriever.from_pretrained(folder, progress=False)
    theirs = HF.from_pretrained(folder).eval()
    enc = engine.tokenizer(["a small red circle", "a large blue star"], padding=True, return_tensors="pt")
    pixels = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ours = engine.model(pixels, enc["input_ids"], enc["attention_mask"], use_image_text_matching_head=True)
        ref = theirs(pixel_values=pixels, input_ids=enc["input_ids"], attention_mask=enc["attention_mask"],
                     use_image_text_matching_head=True)
    a = ours.logits_per_image if hasattr(ours, "logits_per_image") else ours[0]
    assert (a - ref.logits_per_image).abs().max() <= 1e-4


def test_stage2_texts_hold_captions_and_qa_lines(tmp_path):
    jsonl = world.generate_dataset(str(tmp_path), n=3, seed=0, resolution=32)
    rows = [json.loads(line) for line in open(write_stage2_texts(jsonl, str(tmp_path / "s2.jsonl")))]
    src = [json.loads(line) for line in open(jsonl)]
    assert len(rows) == sum(1 + len(r["questions"]) for r in src)
    assert rows[0]["caption"] == src[0]["caption"] and os.path.isabs(rows[0]["image"])
    assert rows[1]["caption"] == f"Question: {src[0]['questions'][0]['question']} Answer: " \
                                 f"{src[0]['questions'][0]['answer']}"


class _Oracle:
    """A retriever stand-in that scores pairs by parsing the true caption of each rendered scene:
    recall@1 must then be exactly 1, and a scrambled version must score low."""

    def __init__(self, data, scramble=False):
        from blip2_fast.images import ImageSpec
        self.data, self.scramble, self.spec = data, scramble, ImageSpec(height=16, width=16)
        self.model = SimpleNamespace(device=torch.device("cpu"))

    def encode_images(self, pixels):
        return pixels

    def encode_texts(self, captions):
        return captions

    def retrieve(self, pixels, captions, k):
        n = len(captions)
        truth = [world.caption(s) for s in self.data.scenes]
        start = next(g for g in range(0, len(truth), n) if truth[g:g + n] == list(captions))
        score = torch.tensor([[float(truth[start + i] == c) for c in captions] for i in range(n)])
        if self.scramble:
            score = score[torch.randperm(n, generator=torch.Generator().manual_seed(0))]
        i2t = score.argsort(dim=1, descending=True, stable=True)
        t2i = score.t().argsort(dim=1, descending=True, stable=True)
        return SimpleNamespace(text_to_image=SimpleNamespace(indices=t2i), image_to_text=SimpleNamespace(indices=i2t))


def test_retrieval_recall_counts_duplicate_captions_as_correct():
    data = render_scenes(200, seed=3, resolution=16)
    perfect = retrieval_recall(_Oracle(data), data, gallery=100)
    assert perfect["text_to_image_r1"] == 1.0 and perfect["image_to_text_r1"] == 1.0 and perfect["galleries"] == 2
    scrambled = retrieval_recall(_Oracle(data, scramble=True), data, gallery=100)
    assert scrambled["text_to_image_r1"] < 0.2 and scrambled["image_to_text_r1"] < 0.2


def test_mcnemar_counts_the_items_only_one_model_gets_right():
    from blip2_fast.miniature.evaluate import mcnemar

    a = [True, True, True, False, False, True, True, False]
    b = [False, True, False, True, False, True, False, False]
    # by hand: only a right at items 0, 2, 6; only b at 3 -> z = (3 - 1) / sqrt(4) = 1
    assert mcnemar(a, b) == {"items": 8, "accuracy_a": 5 / 8, "accuracy_b": 3 / 8, "only_a": 3, "only_b": 1,
                             "mcnemar_z": 1.0}
    assert mcnemar(a, a)["mcnemar_z"] == 0.0 and mcnemar(b, a)["mcnemar_z"] == -1.0
    with pytest.raises(ValueError, match="one length"):
        mcnemar(a, b[:-1])


def test_answers_are_scored_per_question_type():
    from blip2_fast.miniature.evaluate import accuracy_by_type, question_type

    assert question_type("is there a purple star?") == "is there a C S?"
    assert question_type("what shape is on the left?") == "what shape is on the left?"
    answers = [("what color is the star?", "red", "red"), ("what color is the circle?", "blue", " Green"),
               ("how many shapes are there?", "two", "Two ")]  # judged case- and space-blind, as vqa_accuracy
    assert accuracy_by_type(answers) == {"how many shapes are there?": 1.0, "what color is the S?": 0.5}


def test_demo_prints_three_tables_and_scores_them_against_the_world(run, capsys):
    from blip2_fast.cli import main

    folder, itm = run[0]["final"], run[0]["itm"]
    assert main(["demo", "--n", "4", "--model", folder, "--retrieval-model", itm, "--device", "cpu"]) == 0
    text = capsys.readouterr().out
    for title in ("Captions", "Questions", "Retrieval over these scenes", "captions/s"):
        assert title in text, title
    # the true captions printed are the world's own for the demo split
    truth = world.caption(world.sample_scene(world.scene_rng(0, 0, "demo")))
    assert truth in text
    from blip2_fast.miniature.demo import demo
    lines = []
    report = demo(n=4, model=folder, retrieval_model=itm, device="cpu", out=lines.append)
    ok_rows = sum(row.endswith(" ok") for row in lines[0].splitlines()[3:])
    assert report["caption_accuracy"] == ok_rows / 4  # the table's marks are the reported accuracy


def test_demo_refuses_a_single_scene(run, capsys):
    from blip2_fast.cli import main

    assert main(["demo", "--n", "1", "--model", run[0]["final"], "--retrieval-model", run[0]["itm"]]) == 2
    assert "--n 1" in capsys.readouterr().err

"""The loop on stages 2 / caption / vqa (CPU, tiny random transformers models): the LM loss falls
on a small set, resume is exact (including FlanT5's random prefix split), the int8 LLM trains,
the frozen-ViT feature cache gives the same losses as the ViT, and the export loads in
transformers."""
import json
import os

import pytest
import torch

from blip2_fast.testing import make_qformer_tokenizer, make_tiny_folder
from blip2_fast.training.loop import train
from blip2_fast.training.metrics import read_metrics
from blip2_fast.training.train_config import TrainConfig
from blip2_fast.world import generate_dataset


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("world2")
    return generate_dataset(str(root), n=24, seed=2, resolution=28)


@pytest.fixture(scope="module", params=["opt", "t5"])
def folder(request, tmp_path_factory):
    path = tmp_path_factory.mktemp(f"stage2_{request.param}")
    make_tiny_folder(str(path), text=request.param)
    make_qformer_tokenizer(os.path.join(str(path), "qformer_tokenizer"))
    return str(path)


def config(folder, data, out, **kw):
    base = dict(stage="2", model=folder, data=[data], out=str(out), steps=5, batch_size=4, lr=1e-3, warmup_steps=1,
                log_every=1, save_every=100, progress=False, seed=5)
    base.update(kw)
    return TrainConfig.from_dict(base)


def losses(out):
    return [(r["step"], r["loss"]) for r in read_metrics(str(out))]


def test_stage2_resume_is_exact(folder, world, tmp_path):
    train(config(folder, world, tmp_path / "full", steps=4))
    train(config(folder, world, tmp_path / "cut", steps=4), stop_after_step=2)
    train(config(folder, world, tmp_path / "cut", steps=4, resume="auto"))
    assert losses(tmp_path / "full") == losses(tmp_path / "cut")


def test_captioning_loss_falls_on_a_small_set(folder, world, tmp_path):
    """Fixed targets ("caption": no random prefix split), 24 images, the same batches in both runs:
    training the soft prompt (the LLM is frozen and random) ends below a run that does not learn."""
    kw = dict(stage="caption", steps=20, log_every=5, export=False)
    train(config(folder, world, tmp_path / "run", lr=3e-3, **kw))
    train(config(folder, world, tmp_path / "control", lr=1e-9, warmup_lr=1e-9, **kw))
    trained, control = losses(tmp_path / "run"), losses(tmp_path / "control")
    assert trained[-1][1] < control[-1][1] - 0.15, (trained, control)


@pytest.mark.parametrize("stage", ["caption", "vqa"])
def test_finetune_stages_run_and_export(folder, world, tmp_path, stage):
    from transformers import Blip2ForConditionalGeneration as HF

    result = train(config(folder, world, tmp_path / stage, stage=stage, steps=3))
    rows = losses(tmp_path / stage)
    assert len(rows) == 3 and all(r[1] == r[1] for r in rows)  # logged, not NaN
    theirs = HF.from_pretrained(result["exported"]).eval()
    trained = result["task"].trainable_state_dict()
    ref = dict(theirs.named_parameters())
    assert torch.equal(ref["language_projection.weight"].detach(), trained["language_projection.weight"])


def test_vqa_with_question_in_the_qformer(world, tmp_path):
    """A folder whose Q-Former has text embeddings: the question conditions the queries, the
    embeddings are trained (their values change), and the export says its Q-Former reads the
    question (config `vqa_qformer_question`), which a later finetune without it takes back."""
    from blip2_fast.models.blip2 import Blip2ForConditionalGeneration
    from blip2_fast.training.stage2 import Blip2Stage2

    folder = tmp_path / "model"
    make_tiny_folder(str(folder))
    make_qformer_tokenizer(str(folder / "qformer_tokenizer"))
    from blip2_fast.models.qformer import QFormerTextEmbeddings

    net = Blip2ForConditionalGeneration.from_pretrained(str(folder))
    assert net.embeddings is None  # a transformers folder has no Q-Former text embeddings
    torch.manual_seed(0)
    net.embeddings = QFormerTextEmbeddings(net.config.qformer)
    net.save_pretrained(str(folder))
    result = train(config(str(folder), world, tmp_path / "run", stage="vqa", steps=3))
    trained = result["task"].trainable_state_dict()
    assert "embeddings.word_embeddings.weight" in trained
    assert not torch.equal(trained["embeddings.word_embeddings.weight"], net.embeddings.word_embeddings.weight)
    assert not net.reads_question  # the start folder's Q-Former was never taught to
    exported = Blip2ForConditionalGeneration.from_pretrained(result["exported"])
    with open(os.path.join(result["exported"], "config.json"), encoding="utf-8") as f:
        assert json.load(f)["vqa_qformer_question"] is True
    assert exported.reads_question
    again = train(config(result["exported"], world, tmp_path / "plain", stage="vqa", steps=1,
                         vqa_qformer_question=False))
    with open(os.path.join(again["exported"], "config.json"), encoding="utf-8") as f:
        assert "vqa_qformer_question" not in json.load(f)
    assert not Blip2ForConditionalGeneration.from_pretrained(again["exported"]).reads_question


def test_feature_cache_gives_the_same_losses(world, tmp_path):
    folder = tmp_path / "model"
    make_tiny_folder(str(folder))
    train(config(str(folder), world, tmp_path / "pixels", steps=3))
    train(config(str(folder), world, tmp_path / "cached", steps=3, cache_features=True))
    assert os.path.exists(tmp_path / "cached" / "vision_cache" / "manifest.json")
    # the cache stores fp16 features: equal to fp16 rounding of the ViT output, not bit for bit
    for (_, a), (_, b) in zip(losses(tmp_path / "pixels"), losses(tmp_path / "cached")):
        assert a == pytest.approx(b, rel=2e-3)


def test_int8_llm_trains(world, tmp_path):
    folder = tmp_path / "model"
    make_tiny_folder(str(folder))
    float_run = train(config(str(folder), world, tmp_path / "f", steps=3, export=False))
    int8_run = train(config(str(folder), world, tmp_path / "q", steps=3, load_in_8bit=True, export=False))
    a, b = losses(tmp_path / "f"), losses(tmp_path / "q")
    assert b[0][1] == pytest.approx(a[0][1], rel=0.05)  # same start up to the weight rounding
    assert int8_run["counters"]["skipped_steps"] == 0
    from blip2_fast.models.blip2 import Blip2ForConditionalGeneration
    start = Blip2ForConditionalGeneration.from_pretrained(str(folder)).query_tokens
    trained = int8_run["task"].trainable_state_dict()["query_tokens"]
    assert not torch.equal(trained, start)  # gradients reached the queries through the int8 LLM
    from blip2_fast.quantization import Int8Linear
    assert any(isinstance(m, Int8Linear) for m in int8_run["task"].model.model.language_model.modules())


def test_caption_finetune_with_the_vision_encoder_at_a_higher_resolution(world, tmp_path):
    """unfreeze_vision + image_size 42 (the model's is 28): positions interpolated, the ViT trained
    with gradient checkpointing, the LLM untouched."""
    from blip2_fast.models.blip2 import Blip2ForConditionalGeneration

    folder = tmp_path / "model"
    make_tiny_folder(str(folder))
    result = train(config(str(folder), world, tmp_path / "run", stage="caption", steps=2, unfreeze_vision=True,
                          image_size=42, grad_checkpointing=True))
    trained = result["task"].trainable_state_dict()
    start = Blip2ForConditionalGeneration.from_pretrained(str(folder)).state_dict()
    assert not torch.equal(trained["vision_model.encoder.layers.0.mlp.fc1.weight"],
                           start["vision_model.encoder.layers.0.mlp.fc1.weight"])
    assert not any(k.startswith("language_model.") for k in trained)


def test_feature_cache_is_rebuilt_for_other_data_in_the_same_out(tmp_path_factory, tmp_path, caplog):
    """Train on data set A, then on data set B (as many records) in the same --out with
    cache_features: the cache is rebuilt, with a message saying why, and holds B's features, as a
    cache built from B alone does."""
    from blip2_fast.training.feature_cache import VisionFeatureCache

    folder = tmp_path / "model"
    make_tiny_folder(str(folder))
    a = generate_dataset(str(tmp_path_factory.mktemp("data_a")), n=8, seed=11, resolution=28)
    b = generate_dataset(str(tmp_path_factory.mktemp("data_b")), n=8, seed=12, resolution=28)
    kw = dict(steps=1, cache_features=True, export=False)
    train(config(str(folder), a, tmp_path / "run", **kw))
    cache = str(tmp_path / "run" / "vision_cache")
    features_a = {i: VisionFeatureCache(cache)[i].clone() for i in VisionFeatureCache(cache).indices}
    with caplog.at_level("INFO", logger="blip2_fast"):
        train(config(str(folder), b, tmp_path / "run", **kw))
    assert "built from other data" in caplog.text
    train(config(str(folder), b, tmp_path / "only_b", **kw))
    shared, alone = VisionFeatureCache(cache), VisionFeatureCache(str(tmp_path / "only_b" / "vision_cache"))
    assert shared.indices == alone.indices == sorted(features_a)
    assert all(torch.equal(shared[i], alone[i]) for i in alone.indices)
    assert not all(torch.equal(shared[i], features_a[i]) for i in alone.indices)  # A's were replaced

"""The training loop on stage 1 (CPU): exact resume, checkpoints, bad configs, the fp16/non-finite
guard, export, the CLI. Data: the world of shapes at 28 px; model: a tiny random transformers
Blip2ForImageTextRetrieval folder with a word-level Q-Former tokenizer."""
import json
import os

import pytest
import torch

from blip2_fast.config import ConfigError
from blip2_fast.loading import CheckpointError
from blip2_fast.testing import hf_config, make_qformer_tokenizer, randomize_
from blip2_fast.training.checkpoint import load_checkpoint
from blip2_fast.training.loop import train
from blip2_fast.training.metrics import read_metrics
from blip2_fast.training.train_config import TrainConfig
from blip2_fast.world import generate_dataset


def make_stage1_folder(folder, seed=0, dropout=0.1, std=0.1, linear_vision=False, **cfg_kw):
    from transformers import Blip2ForImageTextRetrieval

    cfg = hf_config(use_qformer_text_input=True, **cfg_kw)
    cfg.qformer_config.hidden_dropout_prob = cfg.qformer_config.attention_probs_dropout_prob = dropout
    torch.manual_seed(seed)
    model = randomize_(Blip2ForImageTextRetrieval(cfg), seed, std=std).eval()
    if linear_vision:  # residual branches off: the frozen encoder is LayerNorm(patch embedding + position)
        with torch.no_grad():
            for layer in model.vision_model.encoder.layers:
                layer.self_attn.projection.weight.zero_()
                layer.mlp.fc2.weight.zero_()
    model.save_pretrained(folder)
    make_qformer_tokenizer(os.path.join(folder, "qformer_tokenizer"))
    return model


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("world")
    return generate_dataset(str(root), n=40, seed=0, resolution=28, with_questions=False)


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    path = tmp_path_factory.mktemp("stage1_model")
    make_stage1_folder(str(path))
    return str(path)


def config(folder, data, out, **kw):
    base = dict(stage="1", model=folder, data=[data], out=str(out), steps=6, batch_size=4, lr=3e-4, warmup_steps=2,
                log_every=1, save_every=100, progress=False, seed=3)
    base.update(kw)
    return TrainConfig.from_dict(base)


def losses(out):
    return [(r["step"], r["loss"], r.get("loss_itc"), r.get("loss_itm"), r.get("loss_itg")) for r in read_metrics(out)]


def test_resume_continues_exactly(folder, world, tmp_path):
    full = tmp_path / "full"
    train(config(folder, world, full))
    cut = tmp_path / "cut"
    train(config(folder, world, cut), stop_after_step=3)
    assert not os.path.exists(cut / "model"), "a preempted run must not export"
    assert load_checkpoint(str(cut / "checkpoints" / "last.pt"))["step"] == 3
    train(config(folder, world, cut, resume="auto"))
    a, b = losses(full), losses(cut)
    assert [r[0] for r in b] == [1, 2, 3, 4, 5, 6]
    assert a == b  # bit-identical: same data order, dropout masks, ITM negatives and optimiser state
    ta = load_checkpoint(str(full / "checkpoints" / "last.pt"))["trainable"]
    tb = load_checkpoint(str(cut / "checkpoints" / "last.pt"))["trainable"]
    assert all(torch.equal(ta[k], tb[k]) for k in ta)


def test_resume_is_not_a_restart(folder, world, tmp_path):
    """Control for the test above: resuming without the saved state would differ."""
    full, fresh = tmp_path / "full", tmp_path / "fresh"
    train(config(folder, world, full, steps=4))
    train(config(folder, world, fresh, steps=4, seed=4))
    assert losses(full) != losses(fresh)


def one_object_jsonl(world_jsonl, out):
    """The one-object records of a world data set (absolute image paths)."""
    root = os.path.dirname(world_jsonl)
    recs = [json.loads(line) for line in open(world_jsonl)]
    with open(out, "w") as f:
        for r in recs:
            if len(r["objects"]) == 1:
                f.write(json.dumps({"image": os.path.join(root, r["image"]), "caption": r["caption"]}) + "\n")
    return str(out)


def test_losses_fall_and_itc_accuracy_rises(tmp_path_factory, tmp_path):
    """Stage 1 on 79 one-object scenes (36 distinct captions, chance 1/36) with a frozen linear patch
    encoder: all three losses fall and image->text ITC top-1 rises far above chance."""
    root = tmp_path_factory.mktemp("world_big")
    data = one_object_jsonl(generate_dataset(str(root), n=160, seed=1, resolution=28, with_questions=False),
                            tmp_path / "one.jsonl")
    folder = tmp_path / "model"
    make_stage1_folder(str(folder), linear_vision=True)
    out = tmp_path / "run"
    result = train(config(str(folder), data, out, steps=250, batch_size=16, lr=3e-3, warmup_steps=5, log_every=25))
    rows = read_metrics(str(out))
    for key in ("loss_itc", "loss_itm", "loss_itg"):
        assert rows[-1][key] < rows[0][key], (key, rows[0][key], rows[-1][key])
    from blip2_fast.models.retrieval_heads import Blip2ForImageTextRetrieval
    trained = Blip2ForImageTextRetrieval.from_pretrained(result["exported"], skip_unused=True)
    untrained = Blip2ForImageTextRetrieval.from_pretrained(str(folder))
    acc_after, acc_before = itc_accuracy(trained, data), itc_accuracy(untrained, data)
    assert acc_after >= max(4 * acc_before, 5 / 36), (acc_before, acc_after)  # measured: 0.04 -> 0.32


def itc_accuracy(model, jsonl):
    """Image -> text top-1 over the data set's distinct captions."""
    from blip2_fast.images import ImageSpec, load_images

    recs = [json.loads(line) for line in open(jsonl)]
    pixels = load_images([r["image"] for r in recs], ImageSpec(height=28, width=28))
    captions = sorted({r["caption"] for r in recs})
    enc = make_qformer_tokenizer()(captions, padding=True, return_tensors="pt")
    with torch.no_grad():
        out = model(pixels, enc["input_ids"], enc["attention_mask"], use_image_text_matching_head=False)
    sim = out.logits_per_image if hasattr(out, "logits_per_image") else out[0]
    best = sim.argmax(1).tolist()
    return sum(captions[b] == r["caption"] for b, r in zip(best, recs)) / len(recs)


def test_checkpoint_from_another_model_is_refused(folder, world, tmp_path):
    out = tmp_path / "a"
    train(config(folder, world, out, steps=2))
    other = tmp_path / "other_model"
    make_stage1_folder(str(other), qformer_layers=2)
    with pytest.raises(CheckpointError, match="another model|no tensor|shape"):
        train(config(str(other), world, tmp_path / "b", steps=4, resume=str(out / "checkpoints" / "last.pt")))


def test_interrupted_save_keeps_the_previous_checkpoint(folder, world, tmp_path, monkeypatch):
    out = tmp_path / "run"
    train(config(folder, world, out, steps=2, export=False))
    path = out / "checkpoints" / "last.pt"
    before = path.read_bytes()
    real_save = torch.save

    def dying_save(obj, f, *a, **kw):
        if isinstance(f, (str, os.PathLike)):
            with open(f, "wb") as partial:
                partial.write(b"partial bytes of a checkpoint")
        else:
            f.write(b"partial bytes of a checkpoint")
        raise KeyboardInterrupt("killed while saving")

    monkeypatch.setattr(torch, "save", dying_save)
    with pytest.raises(KeyboardInterrupt):
        train(config(folder, world, out, steps=4, resume="auto", export=False))
    monkeypatch.setattr(torch, "save", real_save)
    assert path.read_bytes() == before
    assert load_checkpoint(str(path))["step"] == 2
    assert not [n for n in os.listdir(path.parent) if n != "last.pt"], "temporary files left behind"


def test_non_finite_step_is_skipped_and_counted(folder, world, tmp_path, monkeypatch, caplog):
    from blip2_fast.training import stage1

    real = stage1.Blip2Stage1.forward
    calls = {"n": 0}

    def poisoned(self, *a, **kw):
        out = real(self, *a, **kw)
        calls["n"] += 1
        if calls["n"] == 2:  # the second step's loss is inf
            out["loss"] = out["loss"] * float("inf")
        return out

    monkeypatch.setattr(stage1.Blip2Stage1, "forward", poisoned)
    out = tmp_path / "run"
    with caplog.at_level("WARNING"):
        result = train(config(folder, world, out, steps=3, export=False))
    assert result["counters"]["skipped_steps"] == 1
    assert "step 2 skipped: non-finite gradients" in caplog.text
    state = load_checkpoint(str(out / "checkpoints" / "last.pt"))
    assert all(torch.isfinite(v).all() for v in state["trainable"].values())


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_low_precision_runs(folder, world, tmp_path, precision):
    result = train(config(folder, world, tmp_path / precision, steps=2, precision=precision, export=False))
    assert all(torch.isfinite(torch.tensor(r[1])) for r in losses(str(tmp_path / precision)))
    assert result["counters"]["skipped_steps"] <= 1  # fp16 may skip its first step while the scale settles


def test_grad_accumulation_equals_the_big_batch(tmp_path, world):
    """2 micro-batches of 4 then a step = one batch of 8 then a step, for ITG on texts of equal
    length (the token mean of the halves is then the mean of the whole); dropout off."""
    folder = tmp_path / "model"
    make_stage1_folder(str(folder), dropout=0.0)
    one = one_object_jsonl(world, tmp_path / "one_object.jsonl")  # captions of equal token length
    kw = dict(steps=2, use_itc=False, use_itm=False, export=False)  # 2 steps: within one epoch for both
    train(config(str(folder), str(one), tmp_path / "big", batch_size=8, **kw))
    train(config(str(folder), str(one), tmp_path / "acc", batch_size=4, grad_accum=2, **kw))
    train(config(str(folder), str(one), tmp_path / "small", batch_size=4, **kw))
    big, acc, small = (losses(str(tmp_path / n)) for n in ("big", "acc", "small"))
    for (_, a, *_), (_, b, *_) in zip(big, acc):
        assert a == pytest.approx(b, rel=1e-5, abs=1e-6)
    assert [r[1] for r in small] != pytest.approx([r[1] for r in big], rel=1e-3)  # the control differs


def test_unknown_config_field_and_bad_values(tmp_path):
    with pytest.raises(ConfigError, match="unknown field.*learning_rate"):
        TrainConfig.from_dict(dict(model="m", data=["d"], learning_rate=1e-4))
    with pytest.raises(ConfigError, match="precision"):
        TrainConfig.from_dict(dict(model="m", data=["d"], precision="fp8"))
    with pytest.raises(ConfigError, match="steps"):
        TrainConfig.from_dict(dict(model="m", data=["d"], steps="many"))
    path = tmp_path / "c.yaml"
    path.write_text("stage: 1\nmodel: m\ndata: d\nbatch: 3\n")
    with pytest.raises(ConfigError, match=r"c.yaml: unknown field\(s\) batch"):
        TrainConfig.from_yaml(str(path))


def test_cli_train_with_yaml_and_flags(folder, world, tmp_path, capsys):
    from blip2_fast.cli import main

    cfg = tmp_path / "stage1.yaml"
    cfg.write_text(f"stage: 1\nmodel: {folder}\ndata: {world}\nsteps: 50\nbatch_size: 4\n")
    out = tmp_path / "run"
    assert main(["train", "--config", str(cfg), "--steps", "2", "--out", str(out), "--no-progress"]) == 0
    printed = capsys.readouterr().out
    assert "step 2:" in printed and "samples/s" in printed
    assert [r["step"] for r in read_metrics(str(out))] == [2]
    assert os.path.exists(out / "model" / "model.safetensors")
    assert main(["train", "--config", str(cfg), "--out", str(out), "--precision", "fp8"]) == 2
    assert main(["train", "--stage", "1", "--model", folder, "--data", str(tmp_path / "none.jsonl"),
                 "--out", str(out)]) == 2
    assert "none.jsonl" in capsys.readouterr().err


def test_export_loads_in_transformers(folder, world, tmp_path):
    from transformers import Blip2ForImageTextRetrieval as HF

    result = train(config(folder, world, tmp_path / "run", steps=2))
    theirs = HF.from_pretrained(result["exported"]).eval()
    trained = result["task"].trainable_state_dict()
    ref = dict(theirs.named_parameters())
    for key in ("qformer.encoder.layer.0.attention.attention.query.weight", "query_tokens", "itm_head.weight"):
        assert torch.equal(ref[key].detach(), trained[key].cpu())
    start = HF.from_pretrained(folder)
    assert not torch.equal(dict(start.named_parameters())["itm_head.weight"], trained["itm_head.weight"].cpu())


def test_bad_records_are_counted_and_logged(folder, world, tmp_path, caplog):
    """A missing image, an empty caption and a corrupt image are skipped (counted, logged); a caption
    over max_text_length is truncated and counted."""
    root = os.path.dirname(world)
    recs = [json.loads(line) for line in open(world)][:16]
    (tmp_path / "corrupt.png").write_bytes(b"not a png at all")
    rows = [{"image": os.path.join(root, r["image"]), "caption": r["caption"]} for r in recs]
    rows[0]["caption"] = " ".join(["a small red circle on the left and"] * 6)  # 42 words
    rows += [{"image": str(tmp_path / "missing.png"), "caption": "a small red circle"},
             {"image": os.path.join(root, recs[1]["image"]), "caption": "   "},
             {"image": str(tmp_path / "corrupt.png"), "caption": "a large blue star"}]
    data = tmp_path / "bad.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    with caplog.at_level("WARNING"):
        result = train(config(folder, str(data), tmp_path / "run", steps=5, batch_size=4, max_text_length=12,
                              export=False))
    counters = result["counters"]
    assert counters["skipped_records"] >= 2  # missing + empty at read time (+ corrupt each time it is drawn)
    assert counters["truncated_texts"] >= 1
    assert "missing image" in caplog.text and "empty text" in caplog.text
    last = read_metrics(str(tmp_path / "run"))[-1]
    assert last["truncated_texts"] == counters["truncated_texts"]


def test_dataloader_workers_and_tensorboard_switch(folder, world, tmp_path, caplog):
    """2 DataLoader workers give the losses of the in-process loader; tensorboard=True without the
    package installed says so and goes on (with it installed, event files appear)."""
    train(config(folder, world, tmp_path / "w0", steps=3, export=False))
    with caplog.at_level("WARNING"):
        train(config(folder, world, tmp_path / "w2", steps=3, num_workers=2, tensorboard=True, export=False))
    assert losses(str(tmp_path / "w0")) == losses(str(tmp_path / "w2"))
    try:
        import torch.utils.tensorboard  # noqa: F401
    except ImportError:
        assert "tensorboard requested but not usable" in caplog.text
    else:
        assert os.listdir(tmp_path / "w2" / "tensorboard")

"""The miniature BLIP-2's recipe step 1: preset, tokenizers, the three unimodal pretrainings
(each lowers its loss on a fixed batch and its weights load into the target module) and the
assembled folder (loads in ours and in transformers, equal logits). References are
independent: transformers' own OPT / BLIP-2 classes, the world's caption parser, pixels."""
import dataclasses
import json
import os

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from blip2_fast import world as W
from blip2_fast.bpe import train_bpe_tokenizer, world_corpus
from blip2_fast.miniature import preset as P
from blip2_fast.miniature.__main__ import main
from blip2_fast.miniature.qformer_tokenizer import SPECIAL_TOKENS, qformer_corpus, train_qformer_tokenizer

transformers = pytest.importorskip("transformers")
WORDS = set(W.SHAPES) | set(W.COLORS) | set(W.SIZE_RANGE) | set("a on the left and right what color is shape how many "
                                                                   "shapes are there one two yes no".split())


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """`python -m blip2_fast.miniature pretrain --quick` once for the module (about 15 s)."""
    out = str(tmp_path_factory.mktemp("mini"))
    summary = main(["pretrain", "--out", out, "--quick"])
    return out, summary


def _scene(i, seed=5):
    rng = W.scene_rng(seed, i, "test")
    return W.sample_scene(rng), rng


# ------------------------------------------------------------------ preset and tokenizers
def test_preset_round_trips_through_transformers_config():
    cfg = P.miniature_config(300, 100, 5)
    hf = transformers.Blip2Config(**cfg.to_hf_dict())
    v, q, t = hf.vision_config, hf.qformer_config, hf.text_config
    assert (v.image_size, v.patch_size, v.hidden_size, v.num_hidden_layers, v.intermediate_size) == (64, 8, 96, 4, 384)
    assert (q.hidden_size, q.num_hidden_layers, q.intermediate_size, q.cross_attention_frequency) == (128, 4, 512, 2)
    assert q.use_qformer_text_input and q.encoder_hidden_size == 96 and q.vocab_size == 100
    assert (t.hidden_size, t.num_hidden_layers, t.ffn_dim, t.vocab_size, t.bos_token_id, t.pad_token_id) == \
        (128, 3, 512, 300, 1, 0)
    assert hf.num_query_tokens == 16 and hf.image_token_index == 3 and hf.image_text_hidden_size == 64
    back = type(cfg).from_hf_dict(json.loads(json.dumps(cfg.to_hf_dict())))
    assert back.qformer.extra["dec_token_id"] == 5  # where Blip2Stage1 reads it
    with pytest.raises(ValueError, match="dec_token_id 100"):
        P.miniature_config(300, 100, 100)


def test_qformer_tokenizer_loads_with_autotokenizer_and_round_trips(tmp_path):
    train_qformer_tokenizer(qformer_corpus(300, 0), str(tmp_path))
    tok = transformers.AutoTokenizer.from_pretrained(str(tmp_path))
    assert [tok.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS] == list(range(6))
    assert (tok.pad_token_id, tok.cls_token_id, tok.sep_token_id, tok.mask_token_id) == (0, 2, 3, 4)
    for w in WORDS:  # every world word is one token: the Q-Former reads words, not pieces
        assert len(tok.tokenize(w)) == 1, w
    texts = [W.caption(_scene(i)[0]) for i in range(4)] + ["what color is the star?", "how many shapes are there?"]
    enc = tok(texts, padding=True)
    for ids, mask, text in zip(enc["input_ids"], enc["attention_mask"], texts):
        n = sum(mask)
        assert ids[0] == 2 and ids[n - 1] == 3 and all(i == 0 for i in ids[n:])
        assert tok.decode(ids, skip_special_tokens=True) == text
    assert tok("What COLOR")["input_ids"] == tok("what color")["input_ids"]  # lower-cased


def test_opt_tokenizer_loads_and_round_trips(tmp_path):
    train_bpe_tokenizer(world_corpus(300, 0), 512, str(tmp_path))
    tok = transformers.AutoTokenizer.from_pretrained(str(tmp_path))
    assert tok.convert_tokens_to_ids("<image>") == P.IMAGE_TOKEN_INDEX and tok.pad_token_id == P.PAD_ID
    line = "Question: what shape is on the left? Answer: star"
    ids = tok(line)["input_ids"]
    assert ids[0] == P.EOS_ID and tok.unk_token_id not in ids
    assert tok.decode(ids, skip_special_tokens=True) == line


# ------------------------------------------------------------------ vision
def test_vision_targets_agree_with_the_caption_parser():
    from blip2_fast.miniature.pretrain_vision import ATTRS, IGNORE, TARGETS, scene_targets
    for i in range(40):
        scene, _ = _scene(i)
        row = dict(zip(TARGETS, scene_targets(scene)))
        objs = W.parse_caption(W.caption(scene))
        slots = ["single"] if len(objs) == 1 else ["left", "right"]
        assert row["count"] == len(objs) - 1
        for slot in ("single", "left", "right"):
            for attr, names in ATTRS.items():
                want = names.index(objs[slots.index(slot)][attr]) if slot in slots else IGNORE
                assert row[f"{slot}_{attr}"] == want


def test_patch_targets_agree_with_rendered_pixels():
    from blip2_fast.miniature.pretrain_vision import ATTRS, patch_targets
    bg = len(W.SHAPES)
    checked = 0
    for i in range(30):
        scene, _ = _scene(i)
        img = np.asarray(W.render(scene, 64))  # no noise: exact colours
        for k, (shape, color, _) in enumerate(patch_targets(scene, 8)):
            r, c = divmod(k, 8)
            x, y = (c + 0.5) / 8, (r + 0.5) / 8
            if any(min(abs(x - o.bbox[0]), abs(x - o.bbox[2]), abs(y - o.bbox[1]), abs(y - o.bbox[3])) < 2 / 64
                   for o in scene.objects):
                continue  # within 2 px of a box edge: pixel rounding decides, not the label
            pixel = tuple(img[r * 8 + 4, c * 8 + 4])  # the pixel right of / below the patch centre
            if shape == bg:  # outside every box: background
                assert pixel == W.BACKGROUNDS[scene.background]
            elif W.SHAPES[shape] == "square":  # a square fills its box: its colour or outline
                fill = W.COLORS[list(ATTRS["color"])[color]]
                assert pixel in (fill, tuple(round(x * W.OUTLINE_SHADE) for x in fill))
                checked += 1
    assert checked > 10


def test_vision_pretraining_lowers_loss_and_weights_load(tmp_path):
    from blip2_fast.miniature.pretrain_vision import load_vision_model, pretrain_vision
    m = pretrain_vision(str(tmp_path), steps=40, batch_size=8, n_val=8, lr=2e-3, warmup=5, fixed_batch=True,
                        progress=False)
    assert m["loss_last"] < 0.5 * m["loss_first"], (m["loss_first"], m["loss_last"])
    model = load_vision_model(str(tmp_path))  # strict: exactly VisionModel's keys
    out = model(torch.randn(2, 3, 64, 64))
    assert out.shape == (2, 65, 96)


# ------------------------------------------------------------------ language model
def test_lm_pretraining_lowers_loss_and_matches_transformers_opt(tmp_path):
    from blip2_fast.miniature.pretrain_lm import load_language_model, pretrain_lm
    train_bpe_tokenizer(world_corpus(300, 0), 512, str(tmp_path / "tok"))
    m = pretrain_lm(str(tmp_path / "lm"), str(tmp_path / "tok"), steps=30, batch_size=8, n_val_scenes=5, lr=3e-3,
                    warmup=3, fixed_batch=True, progress=False)
    assert m["loss_last"] < 0.5 * m["loss_first"], (m["loss_first"], m["loss_last"])
    assert m["val_perplexity"] == pytest.approx(np.exp(m["val_loss"]))
    ours = load_language_model(str(tmp_path / "lm"), m["vocab_size"])
    cfg = P.miniature_opt_config(m["vocab_size"])
    fields = {k: v for k, v in dataclasses.asdict(cfg).items() if k not in ("extra", "model_type")}
    ref = transformers.OPTForCausalLM(transformers.OPTConfig(**fields))
    assert set(ref.state_dict()) == set(ours.state_dict())  # the keys BLIP-2 prefixes with language_model.
    ref.load_state_dict(ours.state_dict())
    ref.eval()
    ids = torch.tensor([[1, 40, 41, 42, 43, 1], [1, 50, 51, 52, 0, 0]])
    mask = (torch.arange(6) < torch.tensor([[6], [4]])).long()
    with torch.no_grad():
        want = ref(input_ids=ids, attention_mask=mask).logits
        got = ours(ours.get_input_embeddings()(ids), mask)
    assert torch.allclose(got[mask.bool()], want[mask.bool()], atol=1e-5)


def test_lm_loss_behind_a_random_prefix_predicts_only_the_text():
    from blip2_fast.miniature.pretrain_lm import lm_loss
    from blip2_fast.models.opt import OPTLM

    torch.manual_seed(0)
    model = P.init_weights_(OPTLM(P.miniature_opt_config(64))).eval()
    model.tie_weights()
    ids = torch.tensor([[1, 40, 41, 42, 43, 1], [1, 50, 51, 52, 0, 0]])
    mask = (torch.arange(6) < torch.tensor([[6], [4]])).long()
    with torch.no_grad():
        plain = lm_loss(model, ids, mask)
        behind = [lm_loss(model, ids, mask, 8, torch.Generator().manual_seed(s)) for s in (1, 1, 2)]
        # by hand: the text's logits when 8 given vectors sit in front of it, all attended
        noise = torch.randn(2, 8, 128, generator=torch.Generator().manual_seed(1)) * \
            model.get_input_embeddings().weight.std()
        logits = model(torch.cat([noise, model.get_input_embeddings()(ids)], 1),
                       torch.cat([torch.ones(2, 8, dtype=torch.long), mask], 1))[:, 8:]
    target = ids[:, 1:].masked_fill(mask[:, 1:] == 0, -100)
    want = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, 64), target.reshape(-1), ignore_index=-100)
    assert plain[2] == behind[0][2] == 8  # the same 8 predicted tokens: none in the prefix
    assert torch.allclose(behind[0][0], want) and torch.equal(behind[0][0], behind[1][0])
    assert not torch.allclose(behind[0][0], plain[0]) and not torch.allclose(behind[0][0], behind[2][0])


# ------------------------------------------------------------------ text encoder
def test_text_encoder_pretraining_lowers_loss_and_initialises_the_qformer(tmp_path):
    from blip2_fast.miniature.pretrain_text_encoder import load_text_encoder, pretrain_text_encoder
    train_qformer_tokenizer(qformer_corpus(300, 0), str(tmp_path / "tok"))
    m = pretrain_text_encoder(str(tmp_path / "te"), str(tmp_path / "tok"), steps=30, batch_size=8, n_val_scenes=5,
                              lr=3e-3, warmup=3, fixed_batch=True, progress=False)
    assert m["loss_last"] < 0.5 * m["loss_first"], (m["loss_first"], m["loss_last"])
    model = load_text_encoder(str(tmp_path / "te"), m["vocab_size"], 5)
    for layer in model.qformer.encoder.layer:  # LAVIS: query FFN = copy of the text FFN
        assert torch.equal(layer.intermediate_query.dense.weight, layer.intermediate.dense.weight)
        assert torch.equal(layer.output_query.LayerNorm.weight, layer.output.LayerNorm.weight)
        if layer.has_cross_attention:  # never trained: still the N(0, 0.02) initialisation
            w = layer.crossattention.attention.key.weight
            assert abs(float(w.std()) - 0.02) < 0.002 and float(w.mean().abs()) < 0.002


# ------------------------------------------------------------------ assembled folder
def test_cli_prints_the_table_and_writes_every_part(built, capsys):
    out, summary = built
    for part in ("tokenizer", "qformer_tokenizer", "vision", "lm", "text_encoder", "initial"):
        assert os.path.isdir(os.path.join(out, part)), part
    assert set(summary) == {"tokenizers", "vision", "lm", "text", "assemble"}
    assert summary["assemble"]["megabytes"] < 20
    with open(os.path.join(out, "summary.json"), encoding="utf-8") as f:
        assert json.load(f)["lm"]["val_loss"] == pytest.approx(summary["lm"]["val_loss"])


def _inputs(folder):
    processor = transformers.Blip2Processor.from_pretrained(folder)
    images = [W.render(_scene(i)[0], res, _scene(i)[1]) for i, res in ((0, 224), (1, 64))]
    return processor(images=images, text=["Question: what color is the star? Answer:", "a small"],
                     return_tensors="pt", padding=True)


def test_assembled_folder_loads_in_ours_and_transformers_with_equal_logits(built):
    import blip2_fast
    folder = os.path.join(built[0], "initial")
    inputs = _inputs(folder)
    assert (inputs["input_ids"] == P.IMAGE_TOKEN_INDEX).sum(1).tolist() == [P.NUM_QUERY_TOKENS] * 2
    ref = transformers.Blip2ForConditionalGeneration.from_pretrained(folder).eval()
    ours = blip2_fast.Blip2ForConditionalGeneration.from_pretrained(folder, skip_unused=True)
    with torch.no_grad():
        want = ref(**inputs).logits
        got = ours(inputs["pixel_values"], inputs["input_ids"], inputs["attention_mask"]).logits
        swapped = ours(inputs["pixel_values"].flip(0), inputs["input_ids"], inputs["attention_mask"]).logits
    valid = inputs["attention_mask"].bool()
    assert (got - want)[valid].abs().max() <= 1e-4
    assert (swapped - got)[valid].abs().max() > 1e-3  # the check is sensitive to the image path
    # without skip_unused the stage-1 heads are ignored as transformers ignores them: same model
    plain = blip2_fast.Blip2ForConditionalGeneration.from_pretrained(folder)
    with torch.no_grad():
        again = plain(inputs["pixel_values"], inputs["input_ids"], inputs["attention_mask"]).logits
    assert torch.equal(again, got)


def test_assembled_text_path_equals_transformers_retrieval_and_stage1_loads(built):
    from safetensors.torch import load_file

    from blip2_fast.config import Blip2Config
    from blip2_fast.loading import load_pretrained
    from blip2_fast.miniature.pretrain_text_encoder import load_text_encoder
    from blip2_fast.training import Blip2Stage1
    out = built[0]
    folder = os.path.join(out, "initial")
    qtok = transformers.AutoTokenizer.from_pretrained(os.path.join(folder, "qformer_tokenizer"))
    enc = qtok(["a large blue star on the left and a small red circle on the right", "what shape is on the left?"],
               padding=True, return_tensors="pt")
    q = P.NUM_QUERY_TOKENS  # transformers drops the first num_query ids (the processor's image slots)
    ids = torch.cat([torch.full((2, q), qtok.pad_token_id), enc["input_ids"]], 1)
    mask = torch.cat([torch.ones(2, q, dtype=torch.long), enc["attention_mask"]], 1)
    ref = transformers.Blip2ForImageTextRetrieval.from_pretrained(folder).eval()
    px = _inputs(folder)["pixel_values"]
    state = load_file(os.path.join(folder, "model.safetensors"))
    qcfg = Blip2Config.from_json_file(os.path.join(folder, "config.json")).qformer
    te = load_text_encoder(os.path.join(out, "text_encoder"), qcfg.vocab_size, qcfg.extra["dec_token_id"])
    with torch.no_grad():
        want = ref(input_ids=ids, attention_mask=mask, pixel_values=px, use_image_text_matching_head=False).text_embeds
        h = te.hidden(enc["input_ids"], enc["attention_mask"])[:, 0]
        got = F.normalize(F.linear(h, state["text_projection.weight"], state["text_projection.bias"]), dim=-1)
    assert torch.allclose(got, want, atol=1e-5)

    stage1 = load_pretrained(Blip2Stage1, folder, skip_unused=True)
    for key, value in stage1.state_dict().items():
        assert torch.equal(value, state[key]), key
    with torch.no_grad():
        losses = stage1(px, enc["input_ids"], enc["attention_mask"], generator=torch.Generator().manual_seed(0))
    assert all(torch.isfinite(losses[k]) for k in ("loss_itc", "loss_itm", "loss_itg"))

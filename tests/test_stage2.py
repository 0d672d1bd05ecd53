"""Stage-2 training (frozen ViT + frozen LLM), its text batches, the question-conditioned
Q-Former and the ViT feature cache, on tiny random models.

References: transformers' Blip2ForConditionalGeneration on the same folder (LM loss, gradients);
transformers' Blip2TextEmbeddings + Blip2QFormerModel for the question-conditioned queries;
labels, losses and token layouts written out by hand from the tokenizer's vocabulary."""
import os
import pickle
import shutil

import pytest
import torch
import torch.nn.functional as F

from blip2_fast.models.blip2 import Blip2ForConditionalGeneration
from blip2_fast.testing import WORDS, make_tiny_folder, make_tokenizer, random_pixels
from blip2_fast.training.feature_cache import FeatureCacheError, VisionFeatureCache, build_vision_cache
from blip2_fast.training.stage2 import Blip2Stage2
from blip2_fast.training.text_batches import LMBatchBuilder

CAPTIONS = ["red circle", "a small blue square on the left", "dog"]
QUESTIONS = ["what color is the star ?", "how many shapes", "is there a cat on the left ?"]


@pytest.fixture(scope="module")
def opt(tmp_path_factory):
    folder = str(tmp_path_factory.mktemp("opt"))
    return make_tiny_folder(folder, with_processor=False), folder


@pytest.fixture(scope="module")
def t5(tmp_path_factory):
    folder = str(tmp_path_factory.mktemp("t5"))
    return make_tiny_folder(folder, text="t5", with_processor=False), folder


@pytest.fixture(scope="module")
def vqa_folder(opt, tmp_path_factory):
    """The OPT folder plus random Q-Former text embeddings (as a stage-1 checkpoint carries)."""
    from safetensors.torch import load_file, save_file
    folder = str(tmp_path_factory.mktemp("vqa"))
    for name in os.listdir(opt[1]):
        shutil.copy(os.path.join(opt[1], name), folder)
    path = os.path.join(folder, "model.safetensors")
    state, cfg, g = load_file(path), opt[0].config.qformer_config, torch.Generator().manual_seed(3)
    state["embeddings.word_embeddings.weight"] = 0.2 * torch.randn(cfg.vocab_size, cfg.hidden_size, generator=g)
    state["embeddings.position_embeddings.weight"] = 0.2 * torch.randn(cfg.max_position_embeddings, cfg.hidden_size,
                                                                       generator=g)
    save_file(state, path, metadata={"format": "pt"})
    return folder


def bert_tokenizer():
    """A BERT-style word-level tokenizer: [PAD]=0, [CLS] question [SEP]."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast
    vocab = {"[PAD]": 0, "[UNK]": 1, "[CLS]": 2, "[SEP]": 3}
    for w in WORDS:
        vocab.setdefault(w, len(vocab))
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(single="[CLS] $A [SEP]",
                                                       special_tokens=[("[CLS]", 2), ("[SEP]", 3)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="[PAD]", unk_token="[UNK]", cls_token="[CLS]",
                                   sep_token="[SEP]")


def ids_of(text):
    return make_tokenizer().convert_tokens_to_ids(text.split())


def model_inputs(batch):
    return {k: v for k, v in batch.items() if k != "n_truncated"}


def grads_match(ours: Blip2Stage2, hf, rtol=1e-5):
    ref = dict(hf.named_parameters())
    total = torch.cat([ref[n].grad.flatten() for n, _ in ours.trainable_parameters()]).norm()
    for name, p in ours.trainable_parameters():
        r = ref[name].grad
        if name.endswith("key.bias"):  # softmax is shift invariant: exactly 0, both sides are rounding noise
            assert p.grad.norm() <= 1e-6 * total and r.norm() <= 1e-6 * total, name
        else:
            assert (p.grad - r).norm() <= rtol * r.norm(), name


# ---------------------------------------------------------------------------- OPT
def test_opt_labels_by_hand_and_loss(opt):
    hf, folder = opt
    stage = Blip2Stage2.from_pretrained(folder).eval()
    cfg = stage.model.config
    batch = LMBatchBuilder(make_tokenizer(), cfg, "caption")(CAPTIONS[:2])
    Q, img, prompt = cfg.num_query_tokens, cfg.image_token_index, ids_of("a photo of")
    rows = [[img] * Q + [2] + prompt + ids_of(t) + [2] for t in CAPTIONS[:2]]
    width = max(map(len, rows))
    assert batch["input_ids"].tolist() == [r + [1] * (width - len(r)) for r in rows]  # pad id 1, on the right
    assert batch["attention_mask"].tolist() == [[1] * len(r) + [0] * (width - len(r)) for r in rows]
    head = Q + 1 + len(prompt)  # placeholders, BOS, prompt: never a target
    want = [[-100] * head + r[head:] + [-100] * (width - len(r)) for r in rows]
    assert batch["labels"].tolist() == want and batch["n_truncated"] == 0

    pixels = random_pixels(2, seed=1)
    out = stage(pixels, **model_inputs(batch))
    with torch.no_grad():
        ref = hf(pixel_values=pixels, input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                 labels=batch["labels"])
        logp = ref.logits.float().log_softmax(-1)
    terms = [-logp[b, t - 1, want[b][t]] for b in range(2) for t in range(width) if want[b][t] != -100]
    assert len(terms) == sum(len(ids_of(t)) + 1 for t in CAPTIONS[:2])  # the text and its EOS, nothing else
    assert abs(out["loss"].item() - ref.loss.item()) <= 1e-5
    assert abs(out["loss"].item() - torch.stack(terms).mean().item()) <= 1e-5


def test_opt_gradients_only_trainable_and_match_transformers(opt):
    hf, folder = opt
    stage = Blip2Stage2.from_pretrained(folder).eval()
    batch = model_inputs(LMBatchBuilder(make_tokenizer(), stage.model.config, "caption")(CAPTIONS))
    pixels = random_pixels(3, seed=2)
    hf.zero_grad()
    stage(pixels, **batch)["loss"].backward()
    hf(pixel_values=pixels, **batch).loss.backward()
    trained = {n for n, _ in stage.trainable_parameters()}
    for name, p in stage.model.named_parameters():
        if name.startswith(("vision_model.", "language_model.")):
            assert p.grad is None and not p.requires_grad, name
        elif name in trained and not name.endswith("key.bias"):  # key biases: exactly 0 in exact arithmetic
            assert p.grad is not None and p.grad.abs().sum() > 0, f"{name} is trained but got no gradient"
    assert stage.model.query_tokens.grad.abs().sum() > 0  # through the frozen LLM to the soft prompt
    assert not any(".intermediate." in n or ".output.dense" in n and "attention" not in n for n in trained)
    grads_match(stage, hf)


def test_training_path_reads_nothing_on_the_host(opt, monkeypatch):
    stage = Blip2Stage2.from_pretrained(opt[1]).train()
    batch = model_inputs(LMBatchBuilder(make_tokenizer(), stage.model.config, "caption")(CAPTIONS))
    grad_mode = []  # the frozen ViT must run without building a graph
    stage.model.vision_model.register_forward_hook(lambda *_: grad_mode.append(torch.is_grad_enabled()))

    def sync(*_a, **_k):
        raise AssertionError("host synchronisation on the training path")
    for name in ("item", "tolist", "__bool__", "nonzero"):
        monkeypatch.setattr(torch.Tensor, name, sync)
    stage(random_pixels(3, seed=3), **batch)["loss"].backward()
    monkeypatch.undo()
    assert grad_mode == [False]
    bad = dict(batch, input_ids=batch["input_ids"].roll(1, 1))  # placeholders no longer first
    with pytest.raises(RuntimeError):
        stage(random_pixels(3, seed=3), **bad)


def test_frozen_parts_stay_in_eval_and_unfrozen_vit_checkpoints(opt):
    stage = Blip2Stage2.from_pretrained(opt[1]).train()
    m = stage.model
    assert m.qformer.training and not m.vision_model.training and not m.language_model.training
    batch = model_inputs(LMBatchBuilder(make_tokenizer(), m.config, "caption")(CAPTIONS[:2]))
    pixels, grads = random_pixels(2, seed=4), []
    for checkpointing in (True, False):
        ft = Blip2Stage2.from_pretrained(opt[1], unfreeze_vision=True).train()
        assert ft.model.vision_model.training and not ft.model.language_model.training
        assert ft.model.vision_model.gradient_checkpointing
        ft.model.vision_model.gradient_checkpointing = checkpointing
        torch.manual_seed(0)  # the same Q-Former dropout masks in both runs
        ft(pixels, **batch)["loss"].backward()
        grads.append(torch.cat([p.grad.flatten() for n, p in ft.trainable_parameters() if n.startswith("vision_")]))
    assert grads[0].abs().sum() > 0 and torch.allclose(grads[0], grads[1], atol=1e-6)


def test_trainable_state_dict_round_trip(opt):
    a, b = Blip2Stage2.from_pretrained(opt[1]), Blip2Stage2.from_pretrained(opt[1])
    with torch.no_grad():
        a.model.query_tokens.add_(1.0)
    sd = a.trainable_state_dict()
    assert set(sd) <= set(a.model.state_dict()) and "query_tokens" in sd
    assert not any(k.startswith(("vision_model.", "language_model.")) for k in sd)
    b.load_trainable_state_dict(sd)
    assert torch.equal(b.model.query_tokens, a.model.query_tokens)
    with pytest.raises(KeyError, match="qformer.nope"):
        b.load_trainable_state_dict({**sd, "qformer.nope": torch.zeros(1)})
    with pytest.raises(ValueError, match="query_tokens"):
        b.load_trainable_state_dict({**sd, "query_tokens": torch.zeros(3)})


def test_int8_llm_loss_and_gradients(opt):
    float_stage = Blip2Stage2.from_pretrained(opt[1]).eval()
    q = Blip2Stage2.from_pretrained(opt[1], load_in_8bit=True).eval()
    from blip2_fast.quantization import Int8Linear
    assert isinstance(q.model.language_model.model.decoder.layers[0].fc1, Int8Linear)
    batch = model_inputs(LMBatchBuilder(make_tokenizer(), q.model.config, "caption")(CAPTIONS))
    pixels = random_pixels(3, seed=5)
    lf, lq = float_stage(pixels, **batch)["loss"], q(pixels, **batch)["loss"]
    lf.backward()
    lq.backward()
    assert abs(lq.item() - lf.item()) <= 0.03 * lf.item()
    gq, gf = q.model.query_tokens.grad.flatten(), float_stage.model.query_tokens.grad.flatten()
    assert gq.abs().sum() > 0 and F.cosine_similarity(gq, gf, 0) > 0.99


# ---------------------------------------------------------------------------- FlanT5
def test_t5_prefix_lm_split_and_loss(t5):
    hf, folder = t5
    stage = Blip2Stage2.from_pretrained(folder).eval()
    cfg = stage.model.config
    build = LMBatchBuilder(make_tokenizer(), cfg, "pretrain")
    batch = build(CAPTIONS, generator=torch.Generator().manual_seed(0))
    again = build(CAPTIONS, generator=torch.Generator().manual_seed(0))
    assert all(torch.equal(batch[k], again[k]) for k in ("input_ids", "labels"))  # reproducible
    Q = cfg.num_query_tokens
    for b, text in enumerate(CAPTIONS):
        enc = [t for t in batch["input_ids"][b, Q:].tolist() if t != 0]
        dec = [t for t in batch["labels"][b].tolist() if t != -100]
        assert batch["input_ids"][b, :Q].tolist() == [cfg.image_token_index] * Q
        assert enc[-1] == 1 and dec[-1] == 1  # T5 EOS closes both sides
        assert enc[:-1] + dec[:-1] == ids_of(text) and len(dec) >= 2  # prefix + suffix = the caption
    assert batch["input_ids"][2, Q:].tolist()[:2] == [1, 0]  # a one-token caption: empty prefix, EOS only
    many = build([CAPTIONS[1]] * 60, generator=torch.Generator().manual_seed(1))["labels"]
    suffix = {int((row != -100).sum()) - 1 for row in many}  # tokens after the cut, EOS not counted
    assert suffix == set(range(1, len(ids_of(CAPTIONS[1]))))  # cut anywhere in 1..n-1: both parts non-empty

    pixels = random_pixels(3, seed=6)
    out = stage(pixels, **model_inputs(batch))
    with torch.no_grad():
        ref = hf(pixel_values=pixels, **model_inputs(batch))
    assert abs(out["loss"].item() - ref.loss.item()) <= 1e-5


def test_t5_vqa_layout_by_hand(t5):
    cfg = Blip2Stage2.from_pretrained(t5[1]).model.config
    prompt = "question : {} answer :"  # in the tiny vocabulary (the default's capitals are not)
    batch = LMBatchBuilder(make_tokenizer(), cfg, "vqa", prompt=prompt)(["red", "two"], questions=QUESTIONS[:2])
    want = [[cfg.image_token_index] * cfg.num_query_tokens + ids_of(prompt.format(q)) + [1] for q in QUESTIONS[:2]]
    width = max(map(len, want))
    assert batch["input_ids"].tolist() == [r + [0] * (width - len(r)) for r in want]  # T5 pads with 0, right
    assert batch["attention_mask"].tolist() == [[1] * len(r) + [0] * (width - len(r)) for r in want]
    assert batch["labels"].tolist() == [ids_of("red") + [1], ids_of("two") + [1]]
    assert batch["decoder_attention_mask"].tolist() == [[1, 1], [1, 1]]
    assert LMBatchBuilder(make_tokenizer(), cfg, "vqa").prompt == "Question: {} Short answer:"


# ---------------------------------------------------------------------------- builder
def test_vqa_caption_rows_are_the_empty_prompt_caption_rows(opt):
    """A vqa+caption finetune batch: a row whose question is None is laid out as captioning with
    no prompt (BOS, caption, EOS), a question row as plain vqa; checked row by row by hand."""
    cfg = Blip2Stage2.from_pretrained(opt[1]).model.config
    prompt = "question : {} answer :"
    batch = LMBatchBuilder(make_tokenizer(), cfg, "vqa", prompt=prompt)([CAPTIONS[0], "yes"], [None, QUESTIONS[0]])
    Q, img = cfg.num_query_tokens, cfg.image_token_index
    heads = [[img] * Q + [2], [img] * Q + [2] + ids_of(prompt.format(QUESTIONS[0]))]
    rows = [heads[0] + ids_of(CAPTIONS[0]) + [2], heads[1] + ids_of("yes") + [2]]
    width = max(map(len, rows))
    assert batch["input_ids"].tolist() == [r + [1] * (width - len(r)) for r in rows]
    assert batch["labels"].tolist() == [[-100] * len(h) + r[len(h):] + [-100] * (width - len(r))
                                        for h, r in zip(heads, rows)]
    from blip2_fast.training.train_config import ConfigError, TrainConfig
    with pytest.raises(ConfigError, match="vqa_captions is for stage vqa"):
        TrainConfig(stage="2", model="m", data="d", vqa_captions=True).validate()


def test_builder_truncation_errors_and_pickle(opt):
    cfg = Blip2Stage2.from_pretrained(opt[1]).model.config
    build = LMBatchBuilder(make_tokenizer(), cfg, "caption", max_length=7)
    batch = build(CAPTIONS)  # BOS + 3 prompt tokens leave 3: the 7-word caption is cut, EOS with it
    assert batch["n_truncated"] == 1
    assert [t for t in batch["labels"][1].tolist() if t != -100] == ids_of(CAPTIONS[1])[:3]
    again = pickle.loads(pickle.dumps(build))(CAPTIONS)
    assert all(torch.equal(batch[k], again[k]) for k in ("input_ids", "labels"))
    with pytest.raises(ValueError, match="no target token"):
        LMBatchBuilder(make_tokenizer(), cfg, "vqa", max_length=9)(["yes"], questions=[QUESTIONS[2]])
    with pytest.raises(ValueError, match="one question per text"):
        LMBatchBuilder(make_tokenizer(), cfg, "vqa")(["yes", "no"], questions=["what ?"])
    with pytest.raises(ValueError, match="without a prompt"):
        LMBatchBuilder(make_tokenizer(), cfg, "pretrain", prompt="a photo of")
    with pytest.raises(ValueError, match="stage must be"):
        LMBatchBuilder(make_tokenizer(), cfg, "chat")


def test_builder_text_after_prompt_tokenises_as_the_joined_string(opt, tmp_path):
    """Byte-level BPE (OPT's kind): "dog" and " dog" differ, so the text must be encoded as LAVIS's
    joined string "a photo of dog" would be."""
    from transformers import PreTrainedTokenizerFast

    from blip2_fast.bpe import train_bpe_tokenizer
    train_bpe_tokenizer(CAPTIONS * 3 + ["a photo of"] * 3, 300, str(tmp_path))
    tok = PreTrainedTokenizerFast.from_pretrained(str(tmp_path))
    cfg = Blip2Stage2.from_pretrained(opt[1]).model.config
    cfg.text.vocab_size = len(tok)
    batch = LMBatchBuilder(tok, cfg, "caption")(CAPTIONS)
    start = cfg.num_query_tokens + 1  # after the placeholders and BOS
    for b, text in enumerate(CAPTIONS):
        row = batch["input_ids"][b, start:][batch["attention_mask"][b, start:] == 1].tolist()
        assert row == tok("a photo of " + text, add_special_tokens=False)["input_ids"] + [cfg.text.eos_token_id]
    cfg.text.vocab_size = 10
    with pytest.raises(ValueError, match="outside the LLM's vocabulary"):
        LMBatchBuilder(tok, cfg, "caption")(CAPTIONS)


# ---------------------------------------------------------------------------- VQA Q-Former
def test_folder_without_text_embeddings_loads(opt, vqa_folder, tmp_path):
    plain = Blip2ForConditionalGeneration.from_pretrained(opt[1])  # transformers wrote it: no embeddings.*
    assert plain.config.qformer.use_qformer_text_input and plain.embeddings is None
    with pytest.raises(ValueError, match="embeddings"):
        plain.get_image_features(random_pixels(1), qformer_input_ids=torch.tensor([[2, 5, 3]]))
    with pytest.raises(ValueError, match="embeddings"):
        Blip2Stage2(plain, qformer_text_input=True)
    ours = Blip2ForConditionalGeneration.from_pretrained(vqa_folder)
    ours.save_pretrained(str(tmp_path))
    back = Blip2ForConditionalGeneration.from_pretrained(str(tmp_path))
    assert torch.equal(back.embeddings.word_embeddings.weight, ours.embeddings.word_embeddings.weight)
    from transformers import Blip2ForConditionalGeneration as HF  # ignores embeddings.*: same model as before
    ids = torch.tensor([[ours.config.image_token_index] * ours.config.num_query_tokens + [2, 4, 5]])
    with torch.no_grad():
        a = HF.from_pretrained(str(tmp_path)).eval()(pixel_values=random_pixels(1), input_ids=ids).logits
        b = opt[0](pixel_values=random_pixels(1), input_ids=ids).logits
    assert (a - b).abs().max() <= 1e-5


def test_question_conditioned_queries_and_vqa_loss(opt, vqa_folder):
    from transformers.models.blip_2.modeling_blip_2 import Blip2TextEmbeddings
    hf = opt[0]
    stage = Blip2Stage2.from_pretrained(vqa_folder, qformer_text_input=True).eval()
    m = stage.model
    batch = LMBatchBuilder(make_tokenizer(), m.config, "vqa", qformer_tokenizer=bert_tokenizer())(
        ["blue", "two", "no"], questions=QUESTIONS)
    qids, qmask = batch["qformer_input_ids"], batch["qformer_attention_mask"]
    assert qids[:, 0].tolist() == [2, 2, 2] and qmask.sum(1).tolist() == [len(q.split()) + 2 for q in QUESTIONS]
    pixels, Q = random_pixels(3, seed=7), m.config.num_query_tokens
    out = stage(pixels, **model_inputs(batch))
    out["loss"].backward()
    with torch.no_grad():  # reference: transformers' text embeddings + Q-Former, bidirectional with padding
        emb = Blip2TextEmbeddings(hf.config.qformer_config)
        emb.load_state_dict({k[len("embeddings."):]: v for k, v in m.state_dict().items()
                             if k.startswith("embeddings.")})
        image = hf.vision_model(pixel_values=pixels).last_hidden_state
        h = hf.qformer(query_embeds=emb(input_ids=qids, query_embeds=hf.query_tokens.expand(3, -1, -1)), query_length=Q,
                       attention_mask=torch.cat([torch.ones(3, Q, dtype=torch.long), qmask], 1),
                       encoder_hidden_states=image).last_hidden_state[:, :Q]
        prompt = hf.language_projection(h)
        ours = m.get_image_features(pixels, qformer_input_ids=qids, qformer_attention_mask=qmask).pooler_output
        assert (ours - prompt).abs().max() <= 1e-5
        embeds = hf.get_input_embeddings()(batch["input_ids"])
        embeds = embeds.masked_scatter((batch["input_ids"] == m.config.image_token_index)[..., None], prompt)
        ref = hf.language_model(inputs_embeds=embeds, attention_mask=batch["attention_mask"], labels=batch["labels"])
    assert abs(out["loss"].item() - ref.loss.item()) <= 1e-5
    assert m.embeddings.word_embeddings.weight.grad.abs().sum() > 0  # the question shapes the queries
    dead = [n for n, p in stage.trainable_parameters() if not n.endswith("key.bias") and
            (p.grad is None or p.grad.abs().sum() == 0)]
    assert dead == []  # every trained tensor is reached (the last layer's text feed-forward is not trained)


def test_caption_rows_of_a_question_batch_run_the_queries_alone(vqa_folder, opt):
    """A vqa+caption batch with the question fed to the Q-Former: a caption row (question None)
    gets a mask of zeros, so its soft prompt is the one transformers' Blip2ForConditionalGeneration
    computes without any Q-Former text -- what captioning runs at inference."""
    m = Blip2ForConditionalGeneration.from_pretrained(vqa_folder).eval()
    batch = LMBatchBuilder(make_tokenizer(), m.config, "vqa", qformer_tokenizer=bert_tokenizer())(
        [CAPTIONS[0], "blue", CAPTIONS[1]], questions=[None, QUESTIONS[0], None])
    qmask = batch["qformer_attention_mask"]
    assert qmask[0].sum() == 0 and qmask[2].sum() == 0 and qmask[1].sum() == len(QUESTIONS[0].split()) + 2
    pixels = random_pixels(3, seed=11)
    with torch.no_grad():
        mixed = m.get_image_features(pixels, qformer_input_ids=batch["qformer_input_ids"],
                                     qformer_attention_mask=qmask).pooler_output
        hf = opt[0]  # transformers: vision -> queries alone through the Q-Former -> projection
        image = hf.vision_model(pixel_values=pixels).last_hidden_state
        queries = hf.qformer(query_embeds=hf.query_tokens.expand(3, -1, -1), encoder_hidden_states=image)
        ref = hf.language_projection(queries.last_hidden_state)
    assert (mixed[[0, 2]] - ref[[0, 2]]).abs().max() <= 1e-5
    assert (mixed[1] - ref[1]).abs().max() > 1e-3  # the question row does read its question


def test_generate_with_questions_batch_equals_single(vqa_folder):
    m = Blip2ForConditionalGeneration.from_pretrained(vqa_folder)
    build = LMBatchBuilder(make_tokenizer(), m.config, "vqa", qformer_tokenizer=bert_tokenizer())
    pixels = random_pixels(3, seed=8)
    full = build.generation_inputs(QUESTIONS)
    batch = m.generate(pixels, **full, max_new_tokens=4)[:, full["input_ids"].shape[1]:]
    for i, q in enumerate(QUESTIONS):
        one = build.generation_inputs([q])
        single = m.generate(pixels[i:i + 1], **one, max_new_tokens=4)[0, one["input_ids"].shape[1]:]
        assert batch[i, :len(single)].tolist() == single.tolist()
    with torch.no_grad():  # the question changes the soft prompt
        plain = m.get_image_features(pixels).pooler_output
        asked = m.get_image_features(pixels, qformer_input_ids=full["qformer_input_ids"],
                                     qformer_attention_mask=full["qformer_attention_mask"]).pooler_output
    assert (plain - asked).abs().max() > 1e-3


# ---------------------------------------------------------------------------- feature cache
class Pixels(torch.utils.data.Dataset):
    """Items as PairDataset makes them; `substitute`: that item serves the next record instead
    (under the next record's index), as PairDataset does for an unreadable image."""

    def __init__(self, n, fail_at=None, substitute=None):
        self.px, self.fail_at, self.substitute = random_pixels(n, seed=9), fail_at, substitute

    def __len__(self):
        return len(self.px)

    def __getitem__(self, i):
        if i == self.fail_at:
            raise OSError("unreadable image")
        skipped = [f"unreadable image: img{i}.png: broken"] if i == self.substitute else []
        j = i + 1 if skipped else i
        return {"pixel_values": self.px[j], "index": 100 + 3 * j, "text": "ignored", "skipped": skipped}


def test_feature_cache_substituted_records_counted_not_doubled(opt, tmp_path, caplog):
    vit = Blip2Stage2.from_pretrained(opt[1]).model.vision_model
    data = Pixels(5, substitute=2)  # item 2 serves record 3, so record 3 arrives twice
    with caplog.at_level("WARNING", logger="blip2_fast"):
        build_vision_cache(vit, data, str(tmp_path), batch_size=2, dtype=torch.float32)
    cache = VisionFeatureCache(str(tmp_path))
    assert cache.indices == [100, 103, 109, 112] and cache.skipped == ["unreadable image: img2.png: broken"]
    with torch.no_grad():
        assert (cache[109] - vit(data.px[3:4])[0]).abs().max() <= 1e-6
    assert "1 repeated record indices" in caplog.text and "1 unreadable" in caplog.text


def test_feature_cache_round_trip_fingerprint_and_atomic(opt, tmp_path, monkeypatch):
    stage = Blip2Stage2.from_pretrained(opt[1]).eval()
    vit, data, path = stage.model.vision_model, Pixels(7), str(tmp_path / "cache")
    build_vision_cache(vit, data, path, batch_size=3, dtype=torch.float32, records_per_shard=4)
    assert sorted(f for f in os.listdir(path) if f.startswith("shard-")) == ["shard-00000.safetensors",
                                                                               "shard-00001.safetensors"]
    cache = VisionFeatureCache(path, vision_model=vit)
    with torch.no_grad():
        want = vit(data.px)
    assert len(cache) == 7 and cache.indices == [100 + 3 * i for i in range(7)] and cache[103].shape == want[1].shape
    assert all((cache[100 + 3 * i] - want[i]).abs().max() <= 1e-6 for i in range(7))
    with pytest.raises(KeyError, match="101"):
        cache[101]
    batch = model_inputs(LMBatchBuilder(make_tokenizer(), stage.model.config, "caption")(CAPTIONS[:2]))
    from_cache = stage(image_embeds=pickle.loads(pickle.dumps(cache)).batch([103, 106]), **batch)["loss"]
    assert abs(from_cache.item() - stage(data.px[1:3], **batch)["loss"].item()) <= 1e-5

    other = Blip2Stage2.from_pretrained(opt[1]).model.vision_model
    with torch.no_grad():
        other.post_layernorm.bias.add_(1e-3)
    with pytest.raises(FeatureCacheError, match="other vision weights"):
        VisionFeatureCache(path, vision_model=other)

    half = str(tmp_path / "half")  # default dtype float16
    build_vision_cache(vit, data, half, batch_size=4)
    assert VisionFeatureCache(half)[106].dtype == torch.float16
    assert torch.equal(VisionFeatureCache(half)[106], want[2].half())

    import safetensors.torch

    def partial_write(tensors, file, metadata=None):
        with open(file, "wb") as f:
            f.write(b"partial")
        raise OSError("disk full")
    monkeypatch.setattr(safetensors.torch, "save_file", partial_write)
    with pytest.raises(OSError, match="disk full"):
        build_vision_cache(vit, data, path, batch_size=3, records_per_shard=4)  # rebuild over the good cache
    monkeypatch.undo()
    assert not [f for f in os.listdir(path) if ".tmp" in f]  # and no partial bytes under a final name:
    assert all(open(os.path.join(path, f), "rb").read(7) != b"partial" for f in os.listdir(path))
    with pytest.raises(FeatureCacheError, match="did not finish"):
        VisionFeatureCache(path)  # the old manifest went first: no stale cache is served
    with pytest.raises(OSError, match="unreadable"):
        build_vision_cache(vit, Pixels(7, fail_at=5), str(tmp_path / "c2"), batch_size=3, records_per_shard=2)
    assert not os.path.exists(str(tmp_path / "c2" / "manifest.json"))

"""Stage-1 training losses (ITC, ITM with hard negatives, ITG) against an independent eager
reference written here: hand-built dense boolean masks, plain softmax attention, per-sample
Python loops for the negative pairs. Only the module's weights are shared with the reference,
never its forward code (no qformer_attention, no image_kv/image_index, no losses.py)."""
import math

import pytest
import torch
import torch.nn.functional as F

from blip2_fast.config import Blip2Config
from blip2_fast.testing import hf_config, randomize_
from blip2_fast.training import Blip2Stage1, sample_negatives

DEC = 98
B, T = 4, 7


def tiny_model(seed=0):
    cfg = Blip2Config.from_hf_dict(hf_config(use_qformer_text_input=True).to_dict())
    cfg.qformer.hidden_dropout_prob = cfg.qformer.attention_probs_dropout_prob = 0.0  # deterministic parity
    torch.manual_seed(seed)
    model = Blip2Stage1(cfg, dec_token_id=DEC)
    randomize_(model, seed, std=0.2)
    with torch.no_grad():
        model.temp.fill_(0.07)
        model.vision_model.requires_grad_(False)
    return model.train()


def batch(seed=0):
    g = torch.Generator().manual_seed(seed)
    pixels = torch.randn(B, 3, 28, 28, generator=g)
    ids = torch.randint(1, DEC, (B, T), generator=g)
    lengths = [7, 4, 2, 6]  # right padding of different lengths
    mask = torch.tensor([[1] * n + [0] * (T - n) for n in lengths])
    ids = ids.masked_fill(mask == 0, 0)
    return pixels, ids, mask


# ---------------------------------------------------------------------------- reference
def lin(mod, x):
    return x @ mod.weight.t() + mod.bias


def ln(mod, x):
    mu = x.mean(-1, keepdim=True)
    var = ((x - mu) ** 2).mean(-1, keepdim=True)
    return (x - mu) / torch.sqrt(var + mod.eps) * mod.weight + mod.bias


def attend(q, k, v, heads, allowed=None):
    """q (L, E), k/v (S, E); allowed (L, S) bool or None. Plain softmax attention per head."""
    D = q.shape[-1] // heads
    outs = []
    for h in range(heads):
        s = q[:, h * D:(h + 1) * D] @ k[:, h * D:(h + 1) * D].t() / math.sqrt(D)
        if allowed is not None:
            s = s.masked_fill(~allowed, float("-inf"))
        outs.append(torch.softmax(s, -1) @ v[:, h * D:(h + 1) * D])
    return torch.cat(outs, -1)


def hand_mask(mode, nq, pad):
    """(L, L) bool for one sample, True = may attend; pad (L,) 1 = real token."""
    L = pad.shape[0]
    m = torch.zeros(L, L, dtype=torch.bool)
    for i in range(L):
        for j in range(L):
            qi, qj = i < nq, j < nq
            if mode == "unimodal":
                ok = qi == qj
            elif mode == "causal":
                ok = qj if qi else (qj or j <= i)
            else:
                ok = True
            m[i, j] = ok and bool(pad[j])
    return m


def ref_vision(vm, pixels):
    """Pre-LN ViT written out: patchify by reshaping, then plain attention and MLP."""
    cfg = vm.config
    p = cfg.patch_size
    outs = []
    for img in pixels:
        C, H, W = img.shape
        patches = img.reshape(C, H // p, p, W // p, p).permute(1, 3, 0, 2, 4).reshape(-1, C * p * p)
        x = patches @ vm.embeddings.patch_embedding.weight.reshape(cfg.hidden_size, -1).t() \
            + vm.embeddings.patch_embedding.bias
        x = torch.cat([vm.embeddings.class_embedding[0], x]) + vm.embeddings.position_embedding[0]
        for layer in vm.encoder.layers:
            a = layer.self_attn
            qkv = lin(a.qkv, ln(layer.layer_norm1, x))
            qq, kk, vv = qkv.chunk(3, -1)
            x = x + lin(a.projection, attend(qq, kk, vv, cfg.num_attention_heads))
            x = x + lin(layer.mlp.fc2, F.gelu(lin(layer.mlp.fc1, ln(layer.layer_norm2, x))))
        outs.append(ln(vm.post_layernorm, x))
    return torch.stack(outs)


def ref_qformer(model, hidden, nq, mode, pad, images):
    """One sample: hidden (L, E), pad (L,), images (S, E_v) or None -> (L, E)."""
    qf, heads = model.qformer, model.config.qformer.num_attention_heads
    allowed = hand_mask(mode, nq, pad)
    x = ln(qf.layernorm, hidden)
    for layer in qf.encoder.layer:
        a = layer.attention.attention
        att = attend(lin(a.query, x), lin(a.key, x), lin(a.value, x), heads, allowed)
        x = ln(layer.attention.output.LayerNorm, lin(layer.attention.output.dense, att) + x)
        qpart, tpart = x[:nq], x[nq:]
        if nq:
            if layer.has_cross_attention:
                c = layer.crossattention.attention
                catt = attend(lin(c.query, qpart), lin(c.key, images), lin(c.value, images), heads)
                qpart = ln(layer.crossattention.output.LayerNorm, lin(layer.crossattention.output.dense, catt) + qpart)
            ff = F.gelu(lin(layer.intermediate_query.dense, qpart))
            qpart = ln(layer.output_query.LayerNorm, lin(layer.output_query.dense, ff) + qpart)
        if tpart.shape[0]:
            ff = F.gelu(lin(layer.intermediate.dense, tpart))
            tpart = ln(layer.output.LayerNorm, lin(layer.output.dense, ff) + tpart)
        x = torch.cat([qpart, tpart])
    return x


def embed(model, ids):
    e = model.embeddings
    return e.word_embeddings.weight[ids] + e.position_embeddings.weight[:ids.shape[0]]


def smoothed_ce(logits, target, eps):
    """Cross-entropy with label smoothing for one row: (1-eps)*NLL + eps*mean(-log p)."""
    logp = torch.log_softmax(logits, -1)
    return -(1 - eps) * logp[target] - eps * logp.mean()


def reference(model, pixels, ids, mask, neg_text, neg_image, itc=True, itm=True, itg=True):
    nq = model.num_query
    temp = model.temp.clamp(0.001, 0.5)
    with torch.no_grad():
        images = ref_vision(model.vision_model, pixels)
    qtok = model.query_tokens[0]
    ones = torch.ones(nq, dtype=torch.long)
    losses = {}
    if itc:
        img_f = [F.normalize(lin(model.vision_projection, ref_qformer(model, qtok, nq, "unimodal", ones, images[b])), dim=-1)
                 for b in range(B)]
        txt_f = [F.normalize(lin(model.text_projection, ref_qformer(model, embed(model, ids[b]), 0, "unimodal",
                                                                     mask[b], None)[0]), dim=-1) for b in range(B)]
        sim = torch.stack([torch.stack([(img_f[i] @ txt_f[j]).max() for j in range(B)]) for i in range(B)]) / temp
        eps = model.itc_label_smoothing
        i2t = sum(smoothed_ce(sim[i], i, eps) for i in range(B)) / B
        t2i = sum(smoothed_ce(sim[:, j], j, eps) for j in range(B)) / B
        losses["loss_itc"] = (i2t + t2i) / 2
    if itm:
        pairs = []
        for b in range(B):  # LAVIS order: positives, (negative image, text), (image, negative text)
            pairs.append((b, b, 1))
        for b in range(B):
            pairs.append((int(neg_image[b]), b, 0))
        for b in range(B):
            pairs.append((b, int(neg_text[b]), 0))
        total = 0
        for img, txt, label in pairs:
            h = ref_qformer(model, torch.cat([qtok, embed(model, ids[txt])]), nq, "bidirectional",
                            torch.cat([ones, mask[txt]]), images[img])
            logit = lin(model.itm_head, h[:nq]).mean(0)
            total = total + smoothed_ce(logit, label, 0.0)
        losses["loss_itm"] = total / len(pairs)
    if itg:
        num, den = 0, 0
        for b in range(B):
            dec = ids[b].clone()
            dec[0] = DEC
            h = ref_qformer(model, torch.cat([qtok, embed(model, dec)]), nq, "causal",
                            torch.cat([ones, mask[b]]), images[b])
            head = model.qformer_lm_head
            for t in range(T - 1):
                if mask[b, t + 1]:
                    z = ln(head.LayerNorm, F.gelu(lin(head.dense, h[nq + t])))
                    logits = z @ model.embeddings.word_embeddings.weight.t() + head.bias
                    num = num + smoothed_ce(logits, int(ids[b, t + 1]), model.itg_label_smoothing)
                    den += 1
        losses["loss_itg"] = num / den
    losses["loss"] = sum(losses.values())
    return losses


def trainable(model):
    return [(n, p) for n, p in model.named_parameters() if p.requires_grad]


# ---------------------------------------------------------------------------- tests
def test_losses_and_gradients_match_reference():
    model = tiny_model()
    pixels, ids, mask = batch()
    out = model(pixels, ids, mask, generator=torch.Generator().manual_seed(1))
    names, params = zip(*trainable(model))
    grads = torch.autograd.grad(out["loss"], params, allow_unused=True)
    ref = reference(model, pixels, ids, mask, out["neg_text_index"], out["neg_image_index"])
    ref_grads = torch.autograd.grad(ref["loss"], params, allow_unused=True)
    for k in ("loss_itc", "loss_itm", "loss_itg", "loss"):
        assert abs(out[k].item() - ref[k].item()) <= 1e-5 * max(1.0, abs(ref[k].item())), (k, out[k], ref[k])
    total = torch.sqrt(sum(r.norm() ** 2 for r in ref_grads))
    bad = []
    for n, g, r in zip(names, grads, ref_grads):
        assert r is not None and g is not None, n
        if n.endswith("key.bias"):
            # softmax is shift-invariant per row: this gradient is zero in exact arithmetic,
            # both sides hold rounding noise only
            assert g.norm() <= 1e-6 * total and r.norm() <= 1e-6 * total, n
        elif (g - r).norm() > 1e-5 * r.norm():
            bad.append((n, (g - r).norm().item(), r.norm().item()))
    assert not bad, bad
    # negatives are never the positive
    assert not (out["neg_text_index"] == torch.arange(B)).any()
    assert not (out["neg_image_index"] == torch.arange(B)).any()


@pytest.mark.parametrize("switch", ["itc", "itm", "itg"])
def test_each_loss_can_be_switched_off(switch):
    model = tiny_model()
    pixels, ids, mask = batch()
    flags = {"use_itc": True, "use_itm": True, "use_itg": True}
    flags[f"use_{switch}"] = False
    out = model(pixels, ids, mask, generator=torch.Generator().manual_seed(1), **flags)
    assert f"loss_{switch}" not in out
    kept = [k for k in ("loss_itc", "loss_itm", "loss_itg") if k in out]
    assert len(kept) == 2
    ref = reference(model, pixels, ids, mask, out.get("neg_text_index"), out.get("neg_image_index"),
                    **{k[4:]: v for k, v in flags.items()})
    for k in kept + ["loss"]:
        assert abs(out[k].item() - ref[k].item()) <= 1e-5 * max(1.0, abs(ref[k].item())), k
    out["loss"].backward()
    unused = {"itc": ["vision_projection", "text_projection", "temp"], "itm": ["itm_head"],
              "itg": ["qformer_lm_head"]}[switch]
    for n, p in model.named_parameters():
        if any(n.startswith(u) for u in unused):
            assert p.grad is None, n
    if switch == "itm":
        assert "neg_text_index" not in out


def test_all_losses_off_is_an_error():
    model = tiny_model()
    pixels, ids, mask = batch()
    with pytest.raises(ValueError, match="nothing to train"):
        model(pixels, ids, mask, use_itc=False, use_itm=False, use_itg=False)


def test_vision_encoder_is_frozen():
    model = tiny_model()
    model.train()
    assert not model.vision_model.training and model.qformer.training
    pixels, ids, mask = batch()
    model(pixels, ids, mask)["loss"].backward()
    assert all(p.grad is None and not p.requires_grad for p in model.vision_model.parameters())
    assert model.query_tokens.grad is not None and model.query_tokens.grad.norm() > 0


@pytest.mark.parametrize("value,expected", [(1.0, 0.5), (1e-5, 0.001), (0.2, 0.2)])
def test_temperature_clamp(value, expected):
    model = tiny_model()
    with torch.no_grad():
        model.temp.fill_(value)
    pixels, ids, mask = batch()
    model(pixels, ids, mask, use_itm=False, use_itg=False)
    assert model.temp.item() == pytest.approx(expected)


def test_negative_sampling_follows_softmax_without_positives():
    g = torch.Generator().manual_seed(0)
    sim = torch.randn(5, 5, generator=g) * 2
    counts = torch.zeros(5, 5)
    n = 4000
    for _ in range(n // 8):
        rows = sample_negatives(sim.repeat(8, 1)[:5], sim.t().clone(), generator=g)[0]
        counts[torch.arange(5), rows] += 1
    expected = torch.softmax(sim.masked_fill(torch.eye(5, dtype=torch.bool), float("-inf")), 1)
    freq = counts / counts.sum(1, keepdim=True)
    assert counts.diagonal().sum() == 0
    assert (freq - expected).abs().max() < 0.08, (freq, expected)
    with pytest.raises(ValueError):
        sample_negatives(sim[:1, :1], sim[:1, :1])


def test_training_steps_lower_every_loss():
    model = tiny_model(seed=3)
    pixels, ids, mask = batch(seed=3)
    opt = torch.optim.AdamW([p for _, p in trainable(model)], lr=3e-3, weight_decay=0.0)
    history = []
    for step in range(15):
        out = model(pixels, ids, mask, generator=torch.Generator().manual_seed(step))
        history.append({k: out[k].item() for k in ("loss_itc", "loss_itm", "loss_itg")})
        opt.zero_grad()
        out["loss"].backward()
        opt.step()
    for k in history[0]:
        assert history[-1][k] < history[0][k], (k, [h[k] for h in history])


def _ddp_averaged_grads(model, world_size):
    """What DDP leaves in every rank's .grad: the mean over ranks."""
    import torch.distributed as dist
    grads = {}
    for name, p in trainable(model):
        if p.grad is not None:
            g = p.grad.clone()
            dist.all_reduce(g)
            grads[name] = g / world_size
    return grads


def _itc_rank(rank, world_size, init_file, out_file):
    """One data-parallel rank: half the batch, ITC only, gradients averaged as DDP does."""
    import torch.distributed as dist
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size)
    try:
        model = tiny_model()
        pixels, ids, mask = batch()
        n = B // world_size
        sl = slice(rank * n, (rank + 1) * n)
        out = model(pixels[sl], ids[sl], mask[sl], use_itm=False, use_itg=False)
        out["loss"].backward()
        grads = _ddp_averaged_grads(model, world_size)
        loss = out["loss"].detach().clone()
        dist.all_reduce(loss)
        if rank == 0:
            torch.save({"loss": loss / world_size, "grads": grads}, out_file)
    finally:
        dist.destroy_process_group()


def test_itc_across_two_ranks_equals_the_full_batch(tmp_path):
    """Mean over ranks of the per-rank ITC loss (features gathered, targets offset by rank)
    and the DDP-averaged gradients equal single-process ITC on the whole batch; a gather
    without gradient for the other ranks' terms would fail the gradient check."""
    import torch.distributed as dist
    import torch.multiprocessing as mp
    if not dist.is_available() or not dist.is_gloo_available():
        pytest.skip("torch.distributed with gloo is not available")
    out_file = tmp_path / "rank0.pt"
    mp.spawn(_itc_rank, args=(2, str(tmp_path / "init"), str(out_file)), nprocs=2, join=True)
    got = torch.load(out_file)
    model = tiny_model()
    pixels, ids, mask = batch()
    full = model(pixels, ids, mask, use_itm=False, use_itg=False)
    full["loss"].backward()
    assert abs(got["loss"].item() - full["loss"].item()) <= 1e-5 * max(1.0, full["loss"].item())
    for name, p in trainable(model):
        if p.grad is None:
            assert name not in got["grads"], name
        elif not name.endswith("key.bias"):  # zero in exact arithmetic (see above)
            assert (got["grads"][name] - p.grad).norm() <= 1e-5 * p.grad.norm(), name


def _all_losses_rank(rank, world_size, init_file, out_file):
    """One rank, half the batch, all three losses; negatives drawn from the global batch."""
    import torch.distributed as dist
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size)
    try:
        model = tiny_model()
        pixels, ids, mask = batch()
        n = B // world_size
        sl = slice(rank * n, (rank + 1) * n)
        out = model(pixels[sl], ids[sl], mask[sl], generator=torch.Generator().manual_seed(10 + rank))
        out["loss"].backward()
        grads = _ddp_averaged_grads(model, world_size)
        negs = torch.stack([out["neg_text_index"], out["neg_image_index"]])
        parts = [torch.empty_like(negs) for _ in range(world_size)]
        dist.all_gather(parts, negs)
        losses = torch.stack([out[k].detach() for k in ("loss_itc", "loss_itm", "loss_itg")])
        dist.all_reduce(losses)
        if rank == 0:
            torch.save({"losses": losses / world_size, "grads": grads, "negs": torch.cat(parts, 1)}, out_file)
    finally:
        dist.destroy_process_group()


def test_all_losses_across_two_ranks_equal_the_reference_on_the_full_batch(tmp_path):
    """With ITM negatives drawn across ranks (global indices), the mean over ranks of each loss and
    the DDP-averaged gradients equal the eager reference on the whole batch with those negatives;
    at least one negative comes from the other rank's half, which a local-only draw never gives."""
    import torch.distributed as dist
    import torch.multiprocessing as mp
    if not dist.is_available() or not dist.is_gloo_available():
        pytest.skip("torch.distributed with gloo is not available")
    out_file = tmp_path / "rank0.pt"
    mp.spawn(_all_losses_rank, args=(2, str(tmp_path / "init"), str(out_file)), nprocs=2, join=True)
    got = torch.load(out_file)
    neg_text, neg_image = got["negs"]
    half = torch.arange(B) // (B // 2)
    assert ((neg_text // (B // 2)) != half).any() or ((neg_image // (B // 2)) != half).any()
    assert not (neg_text == torch.arange(B)).any() and not (neg_image == torch.arange(B)).any()
    model = tiny_model()
    pixels, ids, mask = batch()
    ref = reference(model, pixels, ids, mask, neg_text, neg_image)
    for i, key in enumerate(("loss_itc", "loss_itm", "loss_itg")):
        assert abs(got["losses"][i].item() - ref[key].item()) <= 1e-5 * max(1.0, ref[key].item()), key
    names, params = zip(*trainable(model))
    grads = torch.autograd.grad(ref["loss"], params, allow_unused=True)
    for name, g in zip(names, grads):
        if g is None:
            continue
        assert name in got["grads"], name
        if not name.endswith("key.bias"):  # zero in exact arithmetic
            assert (got["grads"][name] - g).norm() <= 1e-5 * max(g.norm(), 1e-6), name

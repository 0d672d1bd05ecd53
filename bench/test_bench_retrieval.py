"""Retrieval throughput: our engine against the same procedure driven through transformers.

Both sides get the same random weights (one transformers folder, loaded by both) and the same
inputs (pixel tensors and token ids: file decoding is equal work and is left out). Procedure,
as LAVIS' `compute_sim_matrix`: encode the gallery once (vision tokens + normalised query
features), encode the texts, ITC for every pair, top k per query in both directions, ITM on
those pairs, score = ITM positive logit + ITC. The reference drives transformers'
`Blip2ForImageTextRetrieval` modules (vision_model, qformer, embeddings, projections, itm_head)
exactly that way: one Q-Former call per query on its k pairs, each pair recomputing the image's
cross-attention K/V from the cached vision tokens — what transformers' API allows without
re-running the ViT per pair. Ours shares each image's K/V across its pairs and scores a pair
wanted by both directions once.

Units: images encoded per second (gallery phase); queries ranked per second (texts + images,
i.e. both directions, after the gallery is encoded: text encoding, ITC, ITM, sorting).
Conventions of bench/harness.py: the first call of each side is untimed (it checks that both
rank alike); then rounds alternate (transformers untimed by pytest-benchmark in its `setup`
hook, ours timed), each phase clocked with the device synchronised; medians go to
`extra_info` and one row to bench/results/<device>.jsonl (see bench/conftest.py options).
    pytest bench/test_bench_retrieval.py --benchmark-only     (CPU: ~2 min at 3 rounds; GPU cases skip)
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

import pytest
import torch
import torch.nn.functional as F

import harness
from blip2_fast.config import Blip2Config
from blip2_fast.models.retrieval_heads import Blip2ForImageTextRetrieval
from blip2_fast.retrieval import Retriever
from blip2_fast.testing import randomize_

pytest.importorskip("pytest_benchmark")


@dataclass(frozen=True)
class Case:
    preset: str
    device: str
    dtype: str  # the weights' dtype; the Q-Former stays fp32 on both sides (transformers' rule)
    images: int
    texts: int
    k: int
    batch: int

    @property
    def id(self) -> str:
        return f"{self.preset}-{self.device}-{self.dtype}-i{self.images}-t{self.texts}-k{self.k}"


NEEDS_GPU = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (ViT-g sizes in bf16)")
CASES = [pytest.param(Case("blip2-small", "cpu", "float32", 64, 32, 4, 32), id="cpu-small"),
         pytest.param(Case("blip2-itm-vit-g", "cuda", "bfloat16", 1000, 1000, 16, 64), id="gpu-vitg", marks=NEEDS_GPU)]


def _inputs(case: Case, size: int, vocab: int, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    pixels = torch.randn(case.images, 3, size, size, generator=gen)
    lengths = torch.randint(6, 20, (case.texts,), generator=gen)
    ids = torch.randint(1000, vocab - 1, (case.texts, int(lengths.max())), generator=gen)
    ids[:, 0] = 101  # [CLS]
    mask = (torch.arange(ids.shape[1])[None] < lengths[:, None]).long()
    return pixels.to(case.device), (ids * mask).to(case.device), mask.to(case.device)


class Reference:
    """The LAVIS procedure on transformers' modules."""

    def __init__(self, hf, batch):
        self.m, self.batch = hf, batch

    @torch.no_grad()
    def encode_images(self, pixels):
        m, tokens, feats = self.m, [], []
        for chunk in pixels.split(self.batch):
            vit = m.vision_model(pixel_values=chunk.to(m.device, m.vision_model.dtype)).last_hidden_state
            q = m.query_tokens.expand(vit.shape[0], -1, -1)
            out = m.qformer(query_embeds=q, encoder_hidden_states=vit).last_hidden_state
            feats.append(F.normalize(m.vision_projection(out.to(m.vision_projection.weight.dtype)), dim=-1))
            tokens.append(vit)
        return torch.cat(tokens), torch.cat(feats)

    @torch.no_grad()
    def rank(self, tokens, feats, ids, mask, k):
        m, Q = self.m, self.m.config.num_query_tokens
        ids, mask = ids.to(m.device), mask.to(m.device)
        text = m.qformer(query_embeds=m.embeddings(input_ids=ids), query_length=0, attention_mask=mask).last_hidden_state
        text = F.normalize(m.text_projection(text[:, 0].to(m.text_projection.weight.dtype)), dim=-1)
        sim = torch.cat([(f.float() @ text.float().t()).amax(1) for f in feats.split(self.batch)])  # (Ni, Nt)

        def itm(img_idx, txt_idx):
            q = m.query_tokens.expand(len(img_idx), -1, -1)
            emb = m.embeddings(input_ids=ids[txt_idx], query_embeds=q)
            att = torch.cat([torch.ones(len(img_idx), Q, dtype=mask.dtype, device=m.device), mask[txt_idx]], 1)
            out = m.qformer(query_embeds=emb, query_length=Q, attention_mask=att,
                            encoder_hidden_states=tokens[img_idx]).last_hidden_state
            return m.itm_head(out[:, :Q].to(m.itm_head.weight.dtype)).mean(1)[:, 1].float()

        t2i = []
        for t in range(sim.shape[1]):
            itc, cand = sim[:, t].topk(min(k, sim.shape[0]))
            score = itm(cand, torch.full_like(cand, t)) + itc
            t2i.append(cand[score.argsort(descending=True)])
        i2t = []
        for i in range(sim.shape[0]):
            itc, cand = sim[i].topk(min(k, sim.shape[1]))
            score = itm(torch.full_like(cand, i), cand) + itc
            i2t.append(cand[score.argsort(descending=True)])
        return torch.stack(t2i), torch.stack(i2t)


def _load_pair(case: Case, folder: str):
    import transformers
    cfg = transformers.Blip2Config.from_dict(Blip2Config.from_name(case.preset).to_hf_dict())
    dtype = getattr(torch, case.dtype)
    with torch.device(case.device):  # built where it runs: ViT-g is slow to build on a CPU
        model = transformers.Blip2ForImageTextRetrieval(cfg).to(dtype)
    randomize_(model, seed=0, std=0.02)
    model.save_pretrained(folder)
    del model
    ref = transformers.Blip2ForImageTextRetrieval.from_pretrained(folder, dtype=dtype).to(case.device).eval()
    return Blip2ForImageTextRetrieval.from_pretrained(folder, dtype=dtype, device=case.device), ref


@pytest.mark.parametrize("case", CASES)
def test_retrieval_throughput(benchmark, bench_options, tmp_path, case: Case):
    ours, hf = _load_pair(case, str(tmp_path))
    pixels, ids, mask = _inputs(case, ours.config.vision.image_size, ours.config.qformer.vocab_size)
    eng, ref = Retriever(ours, batch_size=case.batch, progress=False), Reference(hf, case.batch)
    sw = {f"{side}_{phase}": None for side in ("ours", "ref") for phase in ("encode", "rank")}
    state = {}

    def phase(name, fn):
        if sw[name] is None:
            sw[name] = harness.Stopwatch(fn, case.device)
        return sw[name]

    def ours_round():
        gallery = phase("ours_encode", lambda: eng.encode_images(pixels))()
        state["ours"] = phase("ours_rank", lambda: eng.retrieve(gallery, eng.encode_texts((ids, mask)), case.k))()

    def ref_round():
        tokens, feats = phase("ref_encode", lambda: ref.encode_images(pixels))()
        state["ref"] = phase("ref_rank", lambda: ref.rank(tokens, feats, ids, mask, case.k))()

    # first calls, untimed (on CUDA this also runs cross_attention's one-off per-shape autotuning)
    ref_round()
    ours_round()
    t2i, i2t = state["ref"]
    res = state["ours"]
    agree_t2i = float((res.text_to_image.indices[:, 0].cpu() == t2i[:, 0].cpu()).float().mean())
    agree_i2t = float((res.image_to_text.indices[:, 0].cpu() == i2t[:, 0].cpu()).float().mean())
    assert min(agree_t2i, agree_i2t) >= 0.9, f"top-1 agreement {agree_t2i:.0%} / {agree_i2t:.0%}: not the same procedure"

    rounds = bench_options["rounds"]
    benchmark.pedantic(ours_round, setup=ref_round, rounds=rounds, warmup_rounds=bench_options["warmup_rounds"])
    telemetry = harness.gpu_telemetry(torch.device(case.device).index or 0) if case.device == "cuda" else None
    t = {name: harness.median(w.measured(rounds)) for name, w in sw.items()}
    queries = case.images + case.texts
    sides = {side: {"encode_s": t[f"{side}_encode"], "rank_s": t[f"{side}_rank"],
                    "images_per_s": case.images / t[f"{side}_encode"], "queries_per_s": queries / t[f"{side}_rank"]}
             for side in ("ours", "ref")}
    row = {"bench": "retrieval", "case": case.id, "config": asdict(case), "device": harness.device_info(case.device),
           "telemetry": telemetry, "ours": sides["ours"], "transformers": sides["ref"],
           "encode_ratio": sides["ours"]["images_per_s"] / sides["ref"]["images_per_s"],
           "rank_ratio": sides["ours"]["queries_per_s"] / sides["ref"]["queries_per_s"],
           "t2i_top1_agreement": agree_t2i, "i2t_top1_agreement": agree_i2t, "rounds": rounds,
           "quick": bench_options["quick"]}
    benchmark.extra_info.update({k: v for k, v in row.items() if k not in ("device", "config")})
    if bench_options["record"]:
        harness.append_result(row, bench_options["results_dir"])
    print(f"\n{case.id}: ours {sides['ours']['images_per_s']:.1f} img/s {sides['ours']['queries_per_s']:.1f} q/s, "
          f"transformers {sides['ref']['images_per_s']:.1f} img/s {sides['ref']['queries_per_s']:.1f} q/s, "
          f"ratios encode {row['encode_ratio']:.2f} rank {row['rank_ratio']:.2f}")

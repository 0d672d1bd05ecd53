"""The GPU suite's captioning and int8-decode cases (blip2-opt-2.7b, blip2-flan-t5-xl).

Random weights at the real architectures' sizes (no downloads): `bench/test_bench_caption.py:
write_checkpoint` builds transformers' Blip2ForConditionalGeneration from our preset's
`to_hf_dict()` (transformers' Blip2Config with blip2-opt-2.7b / blip2-flan-t5-xl sizes),
randomises it and saves it into a temporary folder; `load_pair` loads it with blip2_fast and
with transformers (bf16, SDPA). `Checkpoints` keeps one such folder and pair alive across the
cases that share it (captioning, then int8 decode, on the same OPT-2.7B folder).

- `run_caption_opt`: `test_bench_caption.test_caption` itself (PedanticBench for the
  pytest-benchmark fixture): images/s and tokens/s, ours vs transformers, greedy and beam 5,
  batch 8, 1, 32, 30 new tokens, bf16, same inputs; first-token agreement asserted there.
- `run_caption_t5`: the same measurement for blip2-flan-t5-xl (test_caption's prompt and output
  shape are decoder-only's): the prompt is the 32 image placeholders and T5's EOS, as
  tests/test_blip2_t5.py builds it; outputs are decoder ids on both sides.
- `run_int8_decode`: batch-1 (and 8) greedy decode tokens/s of the OPT-2.7B LLM with bf16 weights
  against int8 weights (`load_in_8bit=True`, our Triton kernels), and against bitsandbytes
  (`Int8WeightOnlyConfig(backend="bnb")`) when installed; same checkpoint, prefill outside the
  clock (bench/int8_decode.py's method, with the device synchronised before the clock is read).
"""
from __future__ import annotations

import gc
from dataclasses import asdict

import torch

import harness
from suite_support import Budget, PedanticBench, Suite, bench_module, missing, options

CAPTION_ORDER = [(8, 1), (8, 5), (1, 1), (32, 1), (32, 5), (1, 5)]  # (batch, beams), most telling first
NEW_TOKENS = 30
STD = 0.02  # random weights' scale (test_bench_caption's GPU cases)
DECODE_TOKENS = 64
PROMPT_LEN = 33  # 32 soft-prompt positions + BOS


def caption_case(preset: str, batch: int, beams: int):
    return bench_module("test_bench_caption").Case(preset, "cuda", "bfloat16", batch, beams, NEW_TOKENS, STD)


class Checkpoints:
    """test_bench_caption.ModelCache (one random checkpoint and its pair of models at a time)."""

    def __init__(self):
        self.cache = bench_module("test_bench_caption").ModelCache()

    def pair(self, preset: str):
        return self.cache.get(caption_case(preset, 1, 1))

    def folder(self, preset: str) -> str:
        self.pair(preset)
        return self.cache.folder

    def holds(self, preset: str) -> bool:
        return self.cache.key is not None and self.cache.key[0] == preset

    def close(self):
        self.cache.close()
        gc.collect()


CHECKPOINTS: Checkpoints | None = None


def checkpoints() -> Checkpoints:
    global CHECKPOINTS
    if CHECKPOINTS is None:
        CHECKPOINTS = Checkpoints()
    return CHECKPOINTS


def release_checkpoints() -> None:
    global CHECKPOINTS
    if CHECKPOINTS is not None:
        CHECKPOINTS.close()
        CHECKPOINTS = None


# ----------------------------------------------------------------------------- captioning
def run_caption_opt(suite: Suite, budget: Budget) -> None:
    tbc = bench_module("test_bench_caption")
    if budget.step("write and load blip2-opt-2.7b", 60.0, lambda: checkpoints().pair("blip2-opt-2.7b")) is None:
        return
    for batch, beams in CAPTION_ORDER:
        case = caption_case("blip2-opt-2.7b", batch, beams)

        def run(case=case):
            bench = PedanticBench()
            tbc.test_caption(bench, checkpoints().cache, options(suite.out_dir, rounds=2), case)
            return bench.extra_info
        row = budget.step(case.id, budget.estimate_like(f"b{batch}", 8.0 * (1 + beams / 5) * (1 + batch / 16)), run,
                          kind=f"b{batch}")
        if row:
            _caption_lines(suite, case.id, row)


def _caption_lines(suite: Suite, case_id: str, row: dict) -> None:
    o, r = row["ours"], row["transformers"]
    suite.add(f"captioning {case_id}: images/s ours vs transformers", "faster than the reference (ratio > 1)",
              f"{o['images_per_s']:.2f} vs {r['images_per_s']:.2f} images/s ({o['tokens_per_s']:.0f} vs "
              f"{r['tokens_per_s']:.0f} tokens/s): x{row['ratio']:.2f}", row["ratio"] > 1)


def t5_inputs(case, config) -> dict:
    """Random pixels; the prompt: the image placeholders, then T5's EOS (tests/test_blip2_t5.py)."""
    gen = torch.Generator().manual_seed(0)
    size = config.vision.image_size
    pixels = torch.randn(case.batch, 3, size, size, generator=gen).to(case.device, getattr(torch, case.dtype))
    ids = torch.tensor([[config.image_token_index] * config.num_query_tokens + [config.text.eos_token_id]]
                       * case.batch, device=case.device)
    return dict(pixel_values=pixels, input_ids=ids, attention_mask=torch.ones_like(ids))


def caption_t5_row(case, ours, ref, rounds: int = 2) -> dict:
    """test_caption's measurement for an encoder-decoder LLM: untimed first calls (outputs,
    memory), one warm-up round, then `rounds` rounds alternating transformers then ours."""
    tbc = bench_module("test_bench_caption")
    x = t5_inputs(case, ours.config)
    gen = dict(num_beams=case.beams, max_new_tokens=case.new_tokens, min_new_tokens=case.new_tokens,
               do_sample=False, length_penalty=1.0)
    run_ours = harness.Stopwatch(lambda: ours.generate(**x, **gen), case.device)

    def reference():
        with torch.no_grad():
            return ref.generate(**x, **gen)
    run_ref = harness.Stopwatch(reference, case.device)
    with harness.PeakMemory(case.device) as mem_ref:
        out_ref = reference()
    with harness.PeakMemory(case.device) as mem_ours:
        out_ours = ours.generate(**x, **gen)
    new_ours, new_ref = out_ours[:, -case.new_tokens:].cpu(), out_ref[:, -case.new_tokens:].cpu()
    for _ in range(rounds + 1):
        run_ref()
        run_ours()
    r_ours = tbc.side(run_ours.measured(rounds), case, mem_ours, ours)
    r_ref = tbc.side(run_ref.measured(rounds), case, mem_ref, ref)
    return {"bench": "caption", "case": case.id, "config": asdict(case), "device": harness.device_info(case.device),
            "telemetry": harness.gpu_telemetry(0), "memory_kind": mem_ours.kind, "ours": r_ours, "transformers": r_ref,
            "ratio": r_ours["images_per_s"] / r_ref["images_per_s"],
            "ids_identical": torch.equal(new_ours, new_ref),
            "first_token_match": (new_ours[:, 0] == new_ref[:, 0]).float().mean().item(), "rounds": rounds,
            "quick": False}


def run_caption_t5(suite: Suite, budget: Budget) -> None:
    if budget.step("write and load blip2-flan-t5-xl", 60.0, lambda: checkpoints().pair("blip2-flan-t5-xl")) is None:
        return
    for batch, beams in CAPTION_ORDER:
        case = caption_case("blip2-flan-t5-xl", batch, beams)

        def run(case=case):
            row = caption_t5_row(case, *checkpoints().pair("blip2-flan-t5-xl"))
            suite.record(row)
            return row
        row = budget.step(case.id, budget.estimate_like(f"b{batch}", 8.0 * (1 + beams / 5) * (1 + batch / 16)), run,
                          kind=f"b{batch}")
        if row:
            _caption_lines(suite, case.id, row)
    release_checkpoints()


# ----------------------------------------------------------------------------- int8 decode
def decode_tokens_per_s(model, batch: int, tokens: int, rounds: int) -> list[float]:
    """Greedy decode rate of `model`'s OPT LLM after an untimed prefill of PROMPT_LEN random
    embeddings: batch x tokens / seconds, per round (min_new_tokens = tokens: no early stop)."""
    from blip2_fast.generation import GenerationConfig, generate_tokens
    from blip2_fast.models.opt import OPTDecoderState

    lm = model.language_model
    device = next(lm.parameters()).device
    dtype = lm.get_input_embeddings().weight.dtype
    gen = GenerationConfig.from_kwargs(max_new_tokens=tokens, min_new_tokens=tokens, eos_token_id=2, pad_token_id=1)
    rates = []
    with torch.no_grad():
        for _ in range(rounds):
            embeds = 0.02 * torch.randn(batch, PROMPT_LEN, lm.config.hidden_size, device=device, dtype=dtype)
            mask = torch.ones(batch, PROMPT_LEN, dtype=torch.long, device=device)
            state = OPTDecoderState(lm, embeds, mask, tokens)  # prefill: outside the clock
            clock = harness.Stopwatch(lambda: generate_tokens(state, state.first_logits, gen), device)
            clock()
            rates.append(batch * tokens / clock.times[-1])
    return rates


def run_int8_decode(suite: Suite, budget: Budget) -> None:
    from blip2_fast.models.blip2 import Blip2ForConditionalGeneration as Ours
    from blip2_fast.quantization import Int8WeightOnlyConfig

    ready = checkpoints().holds("blip2-opt-2.7b")  # written by caption_opt unless that case was skipped
    folder = budget.step("write blip2-opt-2.7b", 0.0 if ready else 60.0, lambda: checkpoints().folder("blip2-opt-2.7b"))
    if folder is None:
        return
    models = {"bf16": lambda: checkpoints().pair("blip2-opt-2.7b")[0],
              "int8": lambda: Ours.from_pretrained(folder, dtype=torch.bfloat16, device="cuda", load_in_8bit=True)}
    bnb_missing = missing("bitsandbytes")
    if bnb_missing:
        suite.record_status("int8_decode", "bitsandbytes 8-bit", "skipped", bnb_missing)
    else:
        models["bnb"] = lambda: Ours.from_pretrained(folder, dtype=torch.float16, device="cuda",
                                                     quantization_config=Int8WeightOnlyConfig(backend="bnb"))
    loaded = {}
    for name, load in models.items():
        model = budget.step(f"load {name}", 25.0, load)
        if model is not None:
            loaded[name] = model
    for batch in (1, 8):
        rates = {}
        for name, model in loaded.items():
            got = budget.step(f"decode {name} b{batch}", budget.estimate_like("decode", 10.0),
                              lambda model=model: decode_tokens_per_s(model, batch, DECODE_TOKENS, rounds=3),
                              kind="decode")
            if got:
                rates[name] = harness.median(got)
        if rates:
            suite.record({"bench": "int8_decode", "case": f"blip2-opt-2.7b-cuda-b{batch}-t{DECODE_TOKENS}",
                          "tokens_per_s": rates, "rounds": 3, "prompt_len": PROMPT_LEN,
                          "ratio_int8_vs_bf16": rates["int8"] / rates["bf16"] if {"int8", "bf16"} <= set(rates) else None})
        for other in ("bf16", "bnb"):
            if "int8" in rates and other in rates:
                r = rates["int8"] / rates[other]
                suite.add(f"int8 decode OPT-2.7B b{batch}: ours int8 vs {other}", f"faster than {other} (ratio > 1)",
                          f"{rates['int8']:.0f} vs {rates[other]:.0f} tokens/s: x{r:.2f}", r > 1)
    loaded.clear()
    release_checkpoints()  # the 2.7B pair is not needed after this case
    torch.cuda.empty_cache()


# ----------------------------------------------------------------------------- dry run
def check_captioning(preset: str) -> list[str]:
    """transformers' Blip2Config from our preset, both models on the meta device, the inputs."""
    import transformers

    from blip2_fast.config import Blip2Config
    from blip2_fast.models.blip2 import Blip2ForConditionalGeneration as Ours

    bench_module("test_bench_caption")
    cfg = Blip2Config.from_name(preset)
    hf_cfg = transformers.Blip2Config.from_dict(cfg.to_hf_dict())
    with torch.device("meta"):
        ours = Ours(cfg)
        ref = transformers.Blip2ForConditionalGeneration(hf_cfg)
    # what loading needs: every transformers tensor has a place of the same shape in ours (ours
    # folds the ViT's q_bias / v_bias into qkv.bias; lm_head may be tied to the embedding)
    own = {k: tuple(v.shape) for k, v in ours.state_dict().items()}
    theirs = {k: tuple(v.shape) for k, v in ref.state_dict().items()
              if not k.endswith(("q_bias", "v_bias", "lm_head.weight"))}
    wrong = sorted(k for k, shape in theirs.items() if own.get(k) != shape)
    if wrong:
        raise ValueError(f"{preset}: {len(wrong)} transformers tensors without a same-shaped place in ours: {wrong[:4]}")
    ours.tie_weights()  # as the loader leaves it
    n_ours, n_ref = (sum(p.numel() for p in m.parameters()) for m in (ours, ref))
    prompt = cfg.num_query_tokens + 1
    if not cfg.is_encoder_decoder and prompt + NEW_TOKENS > cfg.text.max_position_embeddings:
        raise ValueError(f"{preset}: prompt + {NEW_TOKENS} tokens exceed the context")
    return [f"{preset}: {n_ours / 1e9:.2f}B parameters (transformers {n_ref / 1e9:.2f}B), "
            f"{cfg.vision.image_size} px, {cfg.num_query_tokens} queries; cases {CAPTION_ORDER} (batch, beams), "
            f"{NEW_TOKENS} tokens"]


def check_int8_decode() -> list[str]:
    from blip2_fast.config import Blip2Config
    from blip2_fast.models.blip2 import Blip2ForConditionalGeneration as Ours
    from blip2_fast.quantization import Int8WeightOnlyConfig, quantize_

    with torch.device("meta"):
        model = Ours(Blip2Config.from_name("blip2-opt-2.7b"))
    quantize_(model.language_model, Int8WeightOnlyConfig())
    n = sum(1 for m in model.language_model.modules() if type(m).__name__ == "Int8Linear")
    return [f"blip2-opt-2.7b: {n} int8 linears on meta; decode b1, b8 x {DECODE_TOKENS} tokens; "
            f"bitsandbytes: {missing('bitsandbytes') or 'importable'}"]

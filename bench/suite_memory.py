"""The GPU suite's memory case: peak GPU memory of blip2-opt-6.7b with its LLM in int8.

The model is built on the meta device and quantised there (`quantize_`), then streamed tensor by
tensor: each weight is drawn on the GPU in bf16 and quantised with the loader's
`quantize_tensor_for_loading` before the next, which is what `from_pretrained(load_in_8bit=True)`
does per checkpoint tensor, without writing and reading a 15 GB checkpoint (the file reading is
all that is left out). Then a batch-1 caption of 30 tokens. The same model with bf16 weights,
built the same way in the same process, is the reference; the figure is the ratio of the peaks
(load, and resident weights plus the caption's extra).
"""
from __future__ import annotations

import gc

import torch

import harness
from suite_support import Budget, Suite, bench_module

NEW_TOKENS = 30
STD = 0.02  # random weights' scale


def streamed_model(preset: str, int8: bool, device: str = "cuda", dtype=torch.bfloat16, seed: int = 0):
    """Our Blip2ForConditionalGeneration for `preset` with random weights, built on the meta
    device and filled one tensor at a time (module docstring); Q-Former and query tokens in fp32
    (the loader's default), the rest in `dtype`, LLM linears in int8 when `int8`."""
    from blip2_fast.config import Blip2Config
    from blip2_fast.models.blip2 import Blip2ForConditionalGeneration as Ours
    from blip2_fast.quantization import Int8WeightOnlyConfig, quantize_, quantize_tensor_for_loading

    with torch.device("meta"):
        model = Ours(Blip2Config.from_name(preset))
    quant = Int8WeightOnlyConfig() if int8 else None
    if quant is not None:
        quantize_(model.language_model, quant)
    gen = torch.Generator(device).manual_seed(seed)
    tied = {"language_model.lm_head.weight"} if model.config.text.tie_word_embeddings else set()
    loaded = {}
    for key, target in model.state_dict(keep_vars=True).items():
        if key in tied or key.endswith(".weight_scale"):  # tied to the embedding; scales come with weights
            continue
        if target.dtype == torch.int8:
            w = STD * torch.randn(target.shape, generator=gen, device=device, dtype=dtype)
            for k, t in quantize_tensor_for_loading(key[len("language_model."):], w, quant,
                                                    model.language_model).items():
                loaded["language_model." + k] = t
            del w
        elif target.is_floating_point():
            want = torch.float32 if key.startswith(("qformer.", "query_tokens")) else dtype
            loaded[key] = (STD * torch.randn(target.shape, generator=gen, device=device)).to(want)
        else:
            loaded[key] = torch.zeros(target.shape, dtype=target.dtype, device=device)
    model.load_state_dict(loaded, strict=False, assign=True)
    model.tie_weights()
    leftover = [n for n, t in list(model.named_parameters()) + list(model.named_buffers()) if t.is_meta]
    if leftover:
        raise RuntimeError(f"{preset}: no tensor for {leftover[:5]}")
    return model.eval().requires_grad_(False)


def memory_row(preset: str, int8: bool) -> dict:
    """Peak GPU memory while building (streaming) the model and while captioning one image."""
    tbc = bench_module("test_bench_caption")
    gc.collect()
    torch.cuda.empty_cache()
    base = torch.cuda.memory_allocated()
    with harness.PeakMemory("cuda") as build:
        model = streamed_model(preset, int8)
    resident = torch.cuda.memory_allocated() - base
    case = tbc.Case(preset, "cuda", "bfloat16", 1, 1, NEW_TOKENS, STD)
    x = tbc.inputs(case, model.config)
    with harness.PeakMemory("cuda") as run:
        model.generate(**x, max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS)
    row = {"weights_bytes": harness.weights_bytes(model), "build_peak_bytes": build.peak_extra_bytes,
           "resident_bytes": resident, "caption_peak_extra_bytes": run.peak_extra_bytes,
           "peak_bytes": max(build.peak_extra_bytes, resident + run.peak_extra_bytes)}
    del model, x
    gc.collect()
    torch.cuda.empty_cache()
    return row


def run_memory_opt67b(suite: Suite, budget: Budget) -> None:
    preset = "blip2-opt-6.7b"
    rows = {}
    for name, int8 in (("int8", True), ("bf16", False)):
        rows[name] = budget.step(f"{preset} {name}: stream, caption b1", 15.0, lambda int8=int8: memory_row(preset, int8))
    if rows["int8"] is None:
        return
    suite.record({"bench": "memory", "case": f"{preset}-cuda-int8", "memory_kind": "torch.cuda.max_memory_allocated",
                  "ours_int8": rows["int8"], "ours_bf16": rows["bf16"],
                  "ratio": rows["int8"]["peak_bytes"] / rows["bf16"]["peak_bytes"] if rows["bf16"] else None})
    gib = 2 ** 30
    if rows["bf16"]:
        r = rows["int8"]["peak_bytes"] / rows["bf16"]["peak_bytes"]
        suite.add(f"{preset} peak memory, LLM in int8 vs bf16 (load + batch-1 caption)",
                  "below the bf16 model's peak (ratio < 1)",
                  f"{rows['int8']['peak_bytes'] / gib:.2f} vs {rows['bf16']['peak_bytes'] / gib:.2f} GiB: {r:.2f}", r < 1)
    else:
        suite.add(f"{preset} peak memory, LLM in int8 (load + batch-1 caption)", "-",
                  f"{rows['int8']['peak_bytes'] / gib:.2f} GiB", None)


# ----------------------------------------------------------------------------- dry run
def check_memory_opt67b() -> list[str]:
    from blip2_fast.config import Blip2Config
    from blip2_fast.models.blip2 import Blip2ForConditionalGeneration as Ours
    from blip2_fast.quantization import Int8WeightOnlyConfig, quantize_

    sizes = {}
    for name, int8 in (("bf16", False), ("int8", True)):
        with torch.device("meta"):
            model = Ours(Blip2Config.from_name("blip2-opt-6.7b"))
        if int8:
            quantize_(model.language_model, Int8WeightOnlyConfig())
        total = 0
        for key, t in model.state_dict().items():  # the loader's dtypes: Q-Former fp32, the rest bf16
            if key == "language_model.lm_head.weight":
                continue  # tied to the embedding
            size = 4 if key.startswith(("qformer.", "query_tokens")) or key.endswith(".weight_scale") else (
                1 if t.dtype == torch.int8 else 2)
            total += t.numel() * size
        sizes[name] = total
    return [f"blip2-opt-6.7b weights: bf16 {sizes['bf16'] / 2**30:.2f} GiB, LLM in int8 {sizes['int8'] / 2**30:.2f} GiB "
            f"(expected ratio {sizes['int8'] / sizes['bf16']:.2f})"]

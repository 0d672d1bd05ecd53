"""Loading and saving transformers-format BLIP-2 folders.

Load: resolve a folder (or a hub id through huggingface_hub), read `config.json`, build the
model on the meta device (no memory), then read the weights tensor by tensor — single or
sharded safetensors (with `model.safetensors.index.json`), or `pytorch_model.bin` (sharded too,
read with mmap) — converting each to its target dtype/device as it arrives and assigning it
(`load_state_dict(assign=True)`), so at no point do two copies of the weights exist. Every key
is checked before anything is assigned: missing, unexpected and wrongly shaped keys, unreadable
or truncated files each raise `CheckpointError` naming the key or file. The model is returned
only when complete: a failed load leaves nothing half-built behind.

Save: `config.json` and safetensors (sharded above `max_shard_size`) written, with the other
files the folder already held (tokenizer, processor config), into a temporary folder beside the
target, which then replaces it by renames (`atomic.replace_folder`): a reader or an interrupted
save sees the old folder or the new one, never a mix.
"""
from __future__ import annotations

import json
import logging
import os
import re
import shutil

import torch
from torch import nn

from .atomic import replace_folder
from .config import Blip2Config, ConfigError

log = logging.getLogger("blip2_fast")

SAFE_INDEX, BIN_INDEX = "model.safetensors.index.json", "pytorch_model.bin.index.json"
HUB_PATTERNS = ["*.json", "*.safetensors", "*.bin", "*.model", "*.txt", "*.jinja"]


class CheckpointError(ValueError):
    """A checkpoint folder or file that cannot be loaded; the message names the key or file."""


# ---------------------------------------------------------------------------- resolving
def resolve_folder(path_or_hub_id: str, revision: str | None = None, token: str | None = None) -> str:
    if os.path.isdir(path_or_hub_id):
        return path_or_hub_id
    if os.path.exists(path_or_hub_id):
        raise CheckpointError(f"{path_or_hub_id} is a file; from_pretrained expects a model folder or hub id")
    if not re.fullmatch(r"[\w.-]+(/[\w.-]+)?", path_or_hub_id):
        raise CheckpointError(f"{path_or_hub_id!r} is neither an existing folder nor a valid hub id")
    try:
        from huggingface_hub import snapshot_download
        return snapshot_download(path_or_hub_id, revision=revision, token=token, allow_patterns=HUB_PATTERNS)
    except Exception as err:  # network, auth, missing repo: one clear message with the cause
        raise CheckpointError(f"{path_or_hub_id!r} is not a local folder and could not be fetched from the "
                              f"Hugging Face hub ({type(err).__name__}: {err})") from err


# ---------------------------------------------------------------------------- reading
def weight_files(folder: str) -> list[str]:
    for index in (SAFE_INDEX, BIN_INDEX):
        path = os.path.join(folder, index)
        if os.path.exists(path):
            try:
                with open(path, encoding="utf-8") as f:
                    weight_map = json.load(f)["weight_map"]
            except (json.JSONDecodeError, KeyError) as err:
                raise CheckpointError(f"{path}: not a valid shard index ({err})") from None
            files = sorted(set(weight_map.values()))
            for name in files:
                if not os.path.exists(os.path.join(folder, name)):
                    raise CheckpointError(f"{path} names shard {name}, which is missing from {folder}")
            return [os.path.join(folder, n) for n in files]
    for name in ("model.safetensors", "pytorch_model.bin"):
        if os.path.exists(os.path.join(folder, name)):
            return [os.path.join(folder, name)]
    raise CheckpointError(f"{folder}: no model.safetensors, pytorch_model.bin or shard index found")


def checkpoint_keys(folder: str) -> set[str]:
    """Tensor names of a folder's checkpoint, no tensor read: a shard index's weight map, a
    safetensors header, or a torch pickle opened with mmap. `CheckpointError` when unreadable."""
    for index in (SAFE_INDEX, BIN_INDEX):
        path = os.path.join(folder, index)
        if os.path.exists(path):
            try:
                with open(path, encoding="utf-8") as f:
                    return set(json.load(f)["weight_map"])
            except (OSError, ValueError, KeyError, TypeError) as err:
                raise CheckpointError(f"{path}: not a valid shard index ({err})") from None
    keys: set[str] = set()
    for path in weight_files(folder):
        if path.endswith(".safetensors"):
            from safetensors import safe_open
            try:
                with safe_open(path, framework="pt") as handle:
                    keys.update(handle.keys())
            except Exception as err:  # safetensors raises its own error type for any bad header
                raise CheckpointError(f"{path}: cannot read safetensors header ({err})") from None
        else:
            keys.update(k for k, _ in iter_checkpoint([path]))
    return keys


# the parts that tell a captioning/VQA folder from a retrieval one (both may be in one folder)
LLM_PREFIX, ITM_HEAD = "language_model.", "itm_head.weight"


def iter_checkpoint(files: list[str], want=None):
    """Yield (key, tensor) one at a time from safetensors or torch pickle files; with `want`,
    only keys for which want(key) is true (safetensors skips the others unread)."""
    for path in files:
        if path.endswith(".safetensors"):
            from safetensors import safe_open
            try:
                handle = safe_open(path, framework="pt")
                keys = list(handle.keys())
            except Exception as err:
                raise CheckpointError(f"{path}: cannot read safetensors header ({err}); "
                                      f"the file may be truncated or corrupt") from None
            for key in keys:
                if want is not None and not want(key):
                    continue
                try:
                    yield key, handle.get_tensor(key)
                except Exception as err:
                    raise CheckpointError(f"{path}: cannot read tensor {key!r} ({err}); "
                                          f"the file may be truncated") from None
        else:
            try:
                state = torch.load(path, map_location="cpu", mmap=True, weights_only=True)
            except Exception as err:
                raise CheckpointError(f"{path}: cannot read ({err}); the file may be truncated or corrupt") from None
            yield from ((k, t) for k, t in state.items() if want is None or want(k))


def fold_vision_biases(pending: dict, out: dict) -> None:
    """Older checkpoints store `self_attn.q_bias` and `self_attn.v_bias`; we hold one fused
    `qkv.bias` = [q_bias, 0, v_bias] (what transformers 5 holds too)."""
    for key in [k for k in pending if k.endswith("self_attn.q_bias")]:
        prefix = key[: -len("q_bias")]
        q = pending.pop(key)
        v = pending.pop(prefix + "v_bias", None)
        if v is None:
            raise CheckpointError(f"checkpoint has {key} but no {prefix}v_bias")
        out[prefix + "qkv.bias"] = torch.cat([q, torch.zeros_like(q), v])
    for key in [k for k in pending if k.endswith("self_attn.v_bias")]:
        raise CheckpointError(f"checkpoint has {key} but no matching q_bias")


def load_pretrained(cls, path_or_hub_id: str, dtype: torch.dtype | str | None = None, device=None,
                    load_in_8bit: bool = False, quantization_config=None, revision: str | None = None,
                    token: str | None = None, qformer_dtype: torch.dtype | None = torch.float32,
                    skip_unused: bool = False, ignore: tuple[str, ...] = ()):
    """Build `cls` from a transformers BLIP-2 folder or hub id.

    dtype: weights' dtype (default float32; "auto" keeps the checkpoint's). The Q-Former and
    the query tokens stay in `qformer_dtype` (float32 by default, as transformers keeps them).
    load_in_8bit / quantization_config: int8 weight-only LLM linears (see `quantize_`).
    skip_unused: checkpoint tensors `cls` has no place for are not read instead of being an
    error (a projection model loaded from a full retrieval folder, as transformers allows);
    missing keys are still an error.
    ignore: checkpoint keys left unread on purpose, as prefixes ("itm_head.") or whole names
    ("temp"): parts of a folder another class uses, which `cls` has no place for.
    """
    folder = resolve_folder(path_or_hub_id, revision, token)
    config_path = os.path.join(folder, "config.json")
    if not os.path.exists(config_path):
        raise CheckpointError(f"{folder}: no config.json")
    config = Blip2Config.from_json_file(config_path)
    if isinstance(dtype, str) and dtype != "auto":
        dtype = getattr(torch, dtype, None)
        if not isinstance(dtype, torch.dtype):
            raise ValueError(f"unknown dtype {dtype!r}")
    device = torch.device(device) if device is not None else torch.device("cpu")
    with torch.device("meta"):
        model = cls(config)
    expected = {k: v for k, v in model.state_dict(keep_vars=True).items()}
    tied = _tied_keys(model)
    aliases = _alias_groups(expected)

    quant = _quant_config(config, load_in_8bit, quantization_config)
    if quant is not None and quant.backend != "bnb":
        # replace the LLM's linears by int8 modules while still on meta: each float weight is
        # then quantised the moment it is read, so the 16-bit LLM never exists in memory
        from .quantization import quantize_
        quantize_(model.language_model, quant)
        expected = {k: v for k, v in model.state_dict(keep_vars=True).items()}
        aliases = _alias_groups(expected)

    files = weight_files(folder)
    loaded, pending = {}, {}

    def put(key, tensor):
        for k, t in _maybe_quantize(model, key, tensor, quant).items():
            loaded[k] = _convert(k, t, expected, dtype, device, qformer_dtype, quant)

    def used(key: str) -> bool:
        if any(key == i or (i.endswith(".") and key.startswith(i)) for i in ignore):
            return False
        if not skip_unused:
            return True
        if key.endswith(("self_attn.q_bias", "self_attn.v_bias")):
            return key[: -len("q_bias")] + "qkv.bias" in expected
        return key in expected

    for key, tensor in iter_checkpoint(files, want=used if skip_unused or ignore else None):
        if key.endswith(("self_attn.q_bias", "self_attn.v_bias")):
            pending[key] = tensor
            continue
        put(key, tensor)
    folded = {}
    fold_vision_biases(pending, folded)
    for key, tensor in folded.items():
        put(key, tensor)
    head_int8 = LM_HEAD in expected and expected[LM_HEAD].dtype == torch.int8
    if head_int8 and LM_HEAD not in loaded and LM_HEAD in tied:
        # a tied head quantised on request: its own int8 copy of the (float) embedding
        lm = model.language_model
        name = next(n for n, m in lm.named_modules() if m is lm.get_input_embeddings())
        put(LM_HEAD, loaded[f"language_model.{name}.weight"])

    unexpected = sorted(k for k in loaded if k not in expected)
    missing = sorted(k for k in expected if k not in loaded and k not in tied
                     and not any(a in loaded for a in aliases.get(k, ())))
    if unexpected or missing:
        parts = []
        if missing:
            parts.append(f"missing keys: {', '.join(missing[:8])}{' ...' if len(missing) > 8 else ''} ({len(missing)})")
        if unexpected:
            parts.append(f"unexpected keys: {', '.join(unexpected[:8])}{' ...' if len(unexpected) > 8 else ''} "
                         f"({len(unexpected)})")
        raise CheckpointError(f"{folder}: checkpoint does not match the config: " + "; ".join(parts))
    model.load_state_dict(loaded, strict=False, assign=True)
    if LM_HEAD in tied and not head_int8 and (LM_HEAD not in loaded or model.config.text.model_type == "opt"):
        model.tie_weights()
    leftover = [n for n, t in list(model.named_parameters()) + list(model.named_buffers()) if t.is_meta]
    if leftover:
        raise CheckpointError(f"{folder}: no weights for {', '.join(leftover[:8])}")
    if quant is not None and quant.backend == "bnb":
        from .quantization import quantize_
        quantize_(model.language_model, quant)  # bitsandbytes quantises when moved to the GPU
        model.to(device)
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


QUANT_METHOD = "blip2_fast_int8"


def _quant_config(config, load_in_8bit: bool, quantization_config):
    """The int8 config to apply: the caller's, or the one a saved int8 checkpoint records."""
    saved = config.extra.get("quantization_config")
    if saved is not None and saved.get("quant_method") == QUANT_METHOD:
        from .quantization import Int8WeightOnlyConfig
        recorded = Int8WeightOnlyConfig(**{k: v for k, v in saved.items() if k != "quant_method"})
        if quantization_config is not None and quantization_config != recorded:
            raise CheckpointError(f"checkpoint is already quantised with {recorded}; it cannot be loaded as "
                                  f"{quantization_config}")
        return recorded
    if load_in_8bit or quantization_config is not None:
        if config.text is None:
            raise ValueError("load_in_8bit quantises the LLM, and this model has none")
        from .quantization import Int8WeightOnlyConfig
        return quantization_config or Int8WeightOnlyConfig()
    return None


def _maybe_quantize(model, key: str, tensor, quant) -> dict:
    prefix = "language_model."
    if quant is None or quant.backend == "bnb" or not key.startswith(prefix):
        return {key: tensor}
    from .quantization import quantize_tensor_for_loading
    out = quantize_tensor_for_loading(key[len(prefix):], tensor, quant, model.language_model)
    return {prefix + k: t for k, t in out.items()}


LM_HEAD = "language_model.lm_head.weight"


def _tied_keys(model: nn.Module) -> set[str]:
    """Keys a checkpoint may omit because they are tied to the input embedding: OPT's lm_head
    when tie_word_embeddings, and T5's lm_head when the checkpoint has none (transformers 5
    writes T5 models that way)."""
    lm = getattr(model, "language_model", None)
    if lm is not None and (lm.config.model_type == "t5" or getattr(lm.config, "tie_word_embeddings", False)):
        return {LM_HEAD}
    return set()


def _alias_groups(state: dict) -> dict[str, tuple[str, ...]]:
    """key -> the other keys naming the same tensor (a module registered twice, as T5's
    encoder.embed_tokens is `shared`): loading one of them loads all."""
    by_id: dict[int, list[str]] = {}
    for key, tensor in state.items():
        by_id.setdefault(id(tensor), []).append(key)
    return {k: tuple(o for o in keys if o != k) for keys in by_id.values() if len(keys) > 1 for k in keys}


def _unique_tensors(state: dict) -> dict:
    """Drop keys whose tensor another key already holds (tied or aliased weights), keeping the
    first name, as transformers writes checkpoints."""
    seen, out = set(), {}
    for key, tensor in state.items():
        ident = (tensor.data_ptr(), tensor.shape, tensor.stride()) if not tensor.is_meta else id(tensor)
        if ident in seen:
            continue
        seen.add(ident)
        out[key] = tensor
    return out


def _convert(key, tensor, expected, dtype, device, qformer_dtype, quant):
    target = expected.get(key)
    if target is None:
        return tensor  # reported as unexpected once every key is known
    if tuple(tensor.shape) != tuple(target.shape):
        raise CheckpointError(f"key {key}: checkpoint shape {tuple(tensor.shape)} does not match the "
                              f"model's {tuple(target.shape)}")
    if not tensor.is_floating_point():
        return tensor.to(device)  # int8 weights and integer buffers keep their dtype
    if key.endswith(".weight_scale"):
        return tensor.to(device=device, dtype=torch.float32)  # scales stay fp32 (kernels' contract)
    want = dtype if isinstance(dtype, torch.dtype) else (tensor.dtype if dtype == "auto" else torch.float32)
    if qformer_dtype is not None and (key.startswith(("qformer.", "query_tokens")) or key == "query_tokens"):
        want = qformer_dtype
    return tensor.to(device=device, dtype=want)


# ---------------------------------------------------------------------------- saving
def _int8_config_of(model: nn.Module) -> dict | None:
    """The int8 settings of a quantised model (read back on load), or None."""
    from .quantization import Int8Embedding, Int8Linear
    int8 = {n: m for n, m in model.named_modules() if isinstance(m, (Int8Linear, Int8Embedding))}
    if not int8:
        return None
    groups = {m.group_size for m in int8.values()}
    if len(groups) > 1:
        raise ValueError(f"cannot record mixed group sizes {sorted(groups, key=str)} in one checkpoint")
    return {"group_size": groups.pop(),
            "include_lm_head": any(n.endswith("lm_head") for n in int8),
            "include_embeddings": any(isinstance(m, Int8Embedding) for m in int8.values())}


def _parse_size(size) -> int:
    if isinstance(size, int):
        return size
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMG]?B)\s*", str(size).upper())
    if not m:
        raise ValueError(f"max_shard_size {size!r}: expected bytes or a string like '5GB'")
    return int(float(m.group(1)) * {"B": 1, "KB": 1 << 10, "MB": 1 << 20, "GB": 1 << 30}[m.group(2)])


def save_pretrained(model: nn.Module, folder: str, max_shard_size="5GB") -> None:
    from safetensors.torch import save_file

    limit = _parse_size(max_shard_size)
    state = {k: v.detach().contiguous() for k, v in _unique_tensors(model.state_dict()).items()}
    if any(t.is_meta for t in state.values()):
        raise ValueError("cannot save a model that still has meta tensors")
    shards, current, size = [], {}, 0
    for key in sorted(state):
        nbytes = state[key].numel() * state[key].element_size()
        if current and size + nbytes > limit:
            shards.append(current)
            current, size = {}, 0
        current[key] = state[key]
        size += nbytes
    shards.append(current)

    names = ["model.safetensors"] if len(shards) == 1 else \
        [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    cfg = model.config.to_hf_dict()
    quant = _int8_config_of(model)
    if quant is not None:
        cfg["quantization_config"] = {"quant_method": QUANT_METHOD, **quant}
    cfg.setdefault("architectures", [type(model).__name__])

    def fill(tmp: str) -> None:
        _carry_other_files(folder, tmp)
        for name, shard in zip(names, shards):
            # safetensors refuses tensors that share storage (tied weights): clone those
            save_file({k: v.clone() if v.storage_offset() or not v.is_contiguous() else v for k, v in shard.items()},
                      os.path.join(tmp, name), metadata={"format": "pt"})
        if len(shards) > 1:
            index = {"metadata": {"total_size": sum(t.numel() * t.element_size() for t in state.values())},
                     "weight_map": {k: n for n, s in zip(names, shards) for k in s}}
            with open(os.path.join(tmp, SAFE_INDEX), "w", encoding="utf-8") as f:
                json.dump(index, f, indent=2)
        with open(os.path.join(tmp, "config.json"), "w", encoding="utf-8") as f:
            json.dump(cfg, f, indent=2, sort_keys=True)

    replace_folder(folder, fill)


WEIGHT_SUFFIXES = (".safetensors", ".bin")


def _carry_other_files(folder: str, new: str) -> None:
    """Bring what else an existing `folder` holds (tokenizer, processor config, sub-folders) into
    the new one, hard-linked where the file system allows; old weights and config are left behind."""
    if not os.path.isdir(folder):
        return

    def link_or_copy(src: str, dst: str) -> None:
        try:
            os.link(src, dst)
        except OSError:
            shutil.copy2(src, dst)

    for name in os.listdir(folder):
        src = os.path.join(folder, name)
        if name.startswith(".") or name.endswith(WEIGHT_SUFFIXES) or name.endswith(".index.json") \
                or name == "config.json":
            continue
        if os.path.isdir(src):
            shutil.copytree(src, os.path.join(new, name), copy_function=link_or_copy)
        else:
            link_or_copy(src, os.path.join(new, name))


__all__ = ["CheckpointError", "ConfigError", "load_pretrained", "save_pretrained", "resolve_folder", "weight_files",
           "checkpoint_keys", "LLM_PREFIX", "ITM_HEAD", "iter_checkpoint", "fold_vision_biases", "SAFE_INDEX",
           "WEIGHT_SUFFIXES"]

"""Starting a run from a BLIP-2 folder and exporting its result as one.

`load_matching(module, folder)` fills a freshly built training module with the folder's tensors
of the same names (vision, Q-Former, heads, LLM), checking every shape, and reports which of the
module's tensors the folder did not have; the caller decides which of those may start from their
initialisation (stage 1: the ITG head and the temperature, which transformers' checkpoints lack).

`export_folder(start_folder, trained, out)` writes a transformers-format folder: the start
folder's tensors with the trained ones put in their place (so parts a stage does not touch, such
as the LLM in stage 1, are carried over unchanged), its config and every non-weight file
(tokenizers, processor config, the Q-Former tokenizer subfolder). Written beside the target and
swapped in with renames, so an interrupted export leaves the previous one.
"""
from __future__ import annotations

import json
import os
import shutil

import torch
from torch import nn

from ..atomic import replace_folder
from ..loading import SAFE_INDEX, WEIGHT_SUFFIXES, CheckpointError, fold_vision_biases, iter_checkpoint, weight_files


def load_matching(module: nn.Module, folder: str) -> list[str]:
    """Copy the folder's tensors into `module` by name; return the names the folder lacked."""
    expected = module.state_dict()
    found, pending = {}, {}
    for key, tensor in iter_checkpoint(weight_files(folder)):
        if key.endswith(("self_attn.q_bias", "self_attn.v_bias")):
            pending[key] = tensor
        elif key in expected:
            found[key] = tensor
    fold_vision_biases(pending, found)
    for key, tensor in found.items():
        if tuple(tensor.shape) != tuple(expected[key].shape):
            raise CheckpointError(f"{folder}: tensor {key!r} has shape {tuple(tensor.shape)}, the model built "
                                  f"from its config expects {tuple(expected[key].shape)}")
    with torch.no_grad():
        for key, tensor in found.items():
            expected[key].copy_(tensor)
    return sorted(k for k in expected if k not in found)


def _start_tensors(folder: str) -> dict[str, torch.Tensor]:
    state, pending = {}, {}
    for key, tensor in iter_checkpoint(weight_files(folder)):
        (pending if key.endswith(("self_attn.q_bias", "self_attn.v_bias")) else state)[key] = tensor
    fold_vision_biases(pending, state)
    return state


def export_folder(start_folder: str, trained: dict[str, torch.Tensor], out: str,
                  config_dict: dict | None = None) -> str:
    """Write `out` = start_folder with `trained` tensors replacing (or adding to) its own."""
    from safetensors.torch import save_file

    state = _start_tensors(start_folder)
    for key, tensor in trained.items():
        state[key] = tensor.detach().to("cpu", copy=True).contiguous()
    # safetensors refuses shared storage (tied weights read from one file share none, but be safe)
    state = {k: v.clone() for k, v in state.items()}

    def fill(tmp: str) -> None:
        for name in os.listdir(start_folder):
            src = os.path.join(start_folder, name)
            if name.endswith(WEIGHT_SUFFIXES) or name in (SAFE_INDEX, "pytorch_model.bin.index.json") \
                    or name.startswith("."):
                continue
            if os.path.isdir(src):
                shutil.copytree(src, os.path.join(tmp, name))
            else:
                shutil.copy2(src, os.path.join(tmp, name))
        save_file(state, os.path.join(tmp, "model.safetensors"), metadata={"format": "pt"})
        if config_dict is not None:
            with open(os.path.join(tmp, "config.json"), "w", encoding="utf-8") as f:
                json.dump(config_dict, f, indent=2, sort_keys=True)

    replace_folder(out, fill)
    return out


__all__ = ["load_matching", "export_folder"]

"""Training checkpoints: written atomically, resumed exactly, refused when from another model.

A checkpoint is one torch file holding everything a resumed run needs to continue as if it had
never stopped: the trainable weights, the optimiser, the step, the fp16 loss scaler, the data
position (sampler state) and every random number generator (Python, numpy, torch CPU and CUDA,
and the generator that draws ITM negatives), plus the run's training signature (architecture and trained tensors' shapes).

Atomicity: the file is written under a temporary name in the same folder, flushed to disk
(fsync), then renamed over the target with `os.replace` (atomic on POSIX). A kill at any point
leaves either the previous checkpoint or the new one, never a truncated file.

Fingerprint: the architecture (the model's config as a dict) and the names and shapes of the
trainable tensors. Resuming with a checkpoint whose signature differs is a `CheckpointError`
naming the first difference, instead of a shape error deep in `load_state_dict` (or worse, a
silent partial load).
"""
from __future__ import annotations

import hashlib
import json
import os
import random

import numpy as np
import torch

from ..atomic import write_file
from ..loading import CheckpointError

FORMAT = "blip2_fast.train.v1"


def training_signature(config_dict: dict, trainable: dict[str, torch.Tensor]) -> dict:
    """What a checkpoint must match to resume this run: the architecture and the trained tensors' shapes."""
    arch = hashlib.sha256(json.dumps(config_dict, sort_keys=True, default=str).encode()).hexdigest()[:16]
    return {"architecture": arch, "tensors": {k: list(v.shape) for k, v in sorted(trainable.items())}}


def check_training_signature(saved: dict, current: dict, path: str) -> None:
    if saved.get("architecture") != current["architecture"]:
        raise CheckpointError(f"{path}: checkpoint is from another model (architecture "
                              f"{saved.get('architecture')} here, {current['architecture']} in this run)")
    a, b = saved.get("tensors", {}), current["tensors"]
    for key in sorted(set(a) | set(b)):
        if key not in a:
            raise CheckpointError(f"{path}: checkpoint has no tensor {key!r}, which this run trains")
        if key not in b:
            raise CheckpointError(f"{path}: checkpoint trains {key!r}, which this run does not")
        if list(a[key]) != list(b[key]):
            raise CheckpointError(f"{path}: {key!r} has shape {a[key]} in the checkpoint, {b[key]} in this run")


def rng_state(generators: dict[str, torch.Generator] | None = None) -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state(),
             "generators": {k: g.get_state() for k, g in (generators or {}).items()}}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict, generators: dict[str, torch.Generator] | None = None) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    for name, g in (generators or {}).items():
        if name in state["generators"]:
            g.set_state(state["generators"][name])


def save_atomic(obj, path: str) -> None:
    """torch.save to `path` so that the file under that name is always complete."""
    write_file(path, lambda tmp: torch.save(obj, tmp))


def load_checkpoint(path: str) -> dict:
    if os.path.isdir(path):
        path = os.path.join(path, "last.pt")
    if not os.path.exists(path):
        raise CheckpointError(f"{path}: no such checkpoint")
    try:
        # weights_only=False: the file also holds RNG states (numpy tuples); it is our own file
        state = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as err:
        raise CheckpointError(f"{path}: cannot read the checkpoint ({type(err).__name__}: {err})") from None
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise CheckpointError(f"{path}: not a blip2_fast training checkpoint (format {FORMAT} expected)")
    return state


__all__ = ["FORMAT", "training_signature", "check_training_signature", "rng_state", "set_rng_state", "save_atomic",
           "load_checkpoint"]

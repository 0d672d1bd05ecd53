"""Training checkpoints: written atomically, resumed exactly, refused when from another model.

A checkpoint is one torch file holding everything a resumed run needs to continue as if it had
never stopped: the trainable weights, the optimiser, the step, the fp16 loss scaler, the data
position (sampler state) and every random number generator (Python, numpy, torch CPU and CUDA,
and the generator that draws ITM negatives), plus a fingerprint of the model.

Atomicity: the file is written under a temporary name in the same folder, flushed to disk
(fsync), then renamed over the target with `os.replace` (atomic on POSIX). A kill at any point
leaves either the previous checkpoint or the new one, never a truncated file.

Fingerprint: the architecture (the model's config as a dict) and the names and shapes of the
trainable tensors. Resuming with a checkpoint whose fingerprint differs is a `CheckpointError`
naming the first difference, instead of a shape error deep in `load_state_dict` (or worse, a
silent partial load).
"""
from __future__ import annotations

import hashlib
import json
import os
import random
import tempfile

import numpy as np
import torch

from ..loading import CheckpointError

FORMAT = "blip2_fast.train.v1"


def model_fingerprint(config_dict: dict, trainable: dict[str, torch.Tensor]) -> dict:
    arch = hashlib.sha256(json.dumps(config_dict, sort_keys=True, default=str).encode()).hexdigest()[:16]
    return {"architecture": arch, "tensors": {k: list(v.shape) for k, v in sorted(trainable.items())}}


def check_fingerprint(saved: dict, current: dict, path: str) -> None:
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
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=".pt", dir=folder)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    try:  # make the rename itself durable
        dir_fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    except OSError:
        pass  # some file systems cannot fsync a directory; the rename is still atomic


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


__all__ = ["FORMAT", "model_fingerprint", "check_fingerprint", "rng_state", "set_rng_state", "save_atomic",
           "load_checkpoint"]

"""Training checkpoints: plain data read without running pickled code, written atomically,
resumed exactly, refused when from another model.

A checkpoint is one torch file holding everything a resumed run needs to continue as if it had
never stopped: the trainable weights, the optimiser, the step, the fp16 loss scaler, the data
position (sampler state) and every random number generator (Python, numpy, torch CPU and CUDA,
and the generator that draws ITM negatives), plus the run's training signature (architecture and
trained tensors' shapes) and the size of the data set it was trained on.

Safety: everything in it is plain data (tensors, numbers, strings, lists, tuples and dicts of
those; the Python and numpy RNG states are stored as lists and numbers), so it is read with
`torch.load(weights_only=True)`, which rebuilds no other object and calls no function. A file
whose pickle would (a tampered file, a foreign one, a format-v1 file of an older blip2_fast with
numpy objects inside) is refused with a `CheckpointError` naming what it would have called.

Atomicity and the previous checkpoint: the new file is written under a temporary name in the
same folder and flushed to disk; only then does the current `last.pt` become `previous.pt` (a
hard link, replaced atomically) and the new file take the name `last.pt` (`os.replace`). A kill
at any point leaves a complete `last.pt` (and `previous.pt` once there has been a second save).
A checkpoint that cannot be read (a disk fault, a copy cut short) is a `DamagedCheckpointError`,
on which resuming falls back to `previous.pt` (`training.resume`).

Fingerprint: the architecture (the model's config as a dict) and the names and shapes of the
trainable tensors. Resuming with a checkpoint whose signature differs is a `CheckpointError`
naming the first difference, instead of a shape error deep in `load_state_dict` (or worse, a
silent partial load).
"""
from __future__ import annotations

import hashlib
import json
import os
import pickle
import pickletools
import random
import shutil
import warnings
import zipfile

import numpy as np
import torch

from ..atomic import write_file
from ..loading import CheckpointError

FORMAT = "blip2_fast.train.v2"
LAST, PREVIOUS = "last.pt", "previous.pt"


class DamagedCheckpointError(CheckpointError):
    """A checkpoint file that cannot be read at all (truncated, corrupt): an older one may serve."""


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
    """Every random generator's state as plain data (weights_only can read it back)."""
    version, mt_state, gauss_next = random.getstate()
    kind, keys, pos, has_gauss, cached_gaussian = np.random.get_state(legacy=True)
    state = {"python": {"version": version, "state": list(mt_state), "gauss_next": gauss_next},
             "numpy": {"kind": kind, "keys": keys.tolist(), "pos": int(pos), "has_gauss": int(has_gauss),
                       "cached_gaussian": float(cached_gaussian)},
             "torch": torch.get_rng_state(),
             "generators": {k: g.get_state() for k, g in (generators or {}).items()}}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict, generators: dict[str, torch.Generator] | None = None) -> None:
    py, npy = state["python"], state["numpy"]
    random.setstate((py["version"], tuple(py["state"]), py["gauss_next"]))
    np.random.set_state((npy["kind"], np.asarray(npy["keys"], dtype=np.uint32), npy["pos"], npy["has_gauss"],
                         npy["cached_gaussian"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    for name, g in (generators or {}).items():
        if name in state["generators"]:
            g.set_state(state["generators"][name])


def _torch_save(obj, path: str) -> None:
    # through a Python file object: a full disk then raises OSError(ENOSPC), which names the
    # cause, instead of torch's "unexpected pos" RuntimeError
    with open(path, "wb") as f:
        torch.save(obj, f)


def save_atomic(obj, path: str) -> None:
    """torch.save to `path` so that the file under that name is always complete."""
    write_file(path, lambda tmp: _torch_save(obj, tmp))


def _keep_as_previous(last: str, previous: str) -> None:
    """`previous` becomes the current `last` (a hard link, or a copy where links are refused)."""
    if not os.path.exists(last):
        return

    def link(tmp: str) -> None:
        os.remove(tmp)  # write_file made it; a link needs the name free
        try:
            os.link(last, tmp)
        except OSError:
            shutil.copy2(last, tmp)

    write_file(previous, link, durable=False)


def save_checkpoint(state: dict, folder: str) -> str:
    """Write `state` as `folder/last.pt`, the one it replaces kept as `folder/previous.pt`."""
    last, previous = os.path.join(folder, LAST), os.path.join(folder, PREVIOUS)

    def write(tmp: str) -> None:
        _torch_save(state, tmp)
        _keep_as_previous(last, previous)  # only once the new file is complete

    write_file(last, write)
    return last


def _raw_pickle_globals(path: str) -> list[str]:
    """The module.name of every global a plain pickle file refers to, read opcode by opcode with
    pickletools (which decodes, never executes)."""
    found, strings = [], []
    with open(path, "rb") as f:
        for opcode, arg, _ in pickletools.genops(f):
            if opcode.name == "GLOBAL":
                found.append(str(arg).replace(" ", "."))
            elif opcode.name == "STACK_GLOBAL" and len(strings) >= 2:
                found.append(f"{strings[-2]}.{strings[-1]}")
            elif isinstance(arg, str):
                strings.append(arg)
    return sorted(set(found))


def _unsafe_globals(path: str) -> list[str]:
    """What a refused pickle would have called or built, found without running it: torch's own
    scan for its zip checkpoints, an opcode scan for a plain pickle."""
    try:
        if zipfile.is_zipfile(path):
            found = torch.serialization.get_unsafe_globals_in_checkpoint(path)
        else:
            found = [g for g in _raw_pickle_globals(path) if not g.startswith(("torch.", "collections.OrderedDict"))]
    except Exception:  # a file too broken to scan: the refusal stands, without names
        found = []
    return found or ["objects other than tensors and plain data"]


def load_checkpoint(path: str) -> dict:
    """A checkpoint's contents, read with weights_only=True. CheckpointError when it would run
    code or is not ours; DamagedCheckpointError when it cannot be read."""
    if os.path.isdir(path):
        path = os.path.join(path, LAST)
    if not os.path.exists(path):
        raise CheckpointError(f"{path}: no such checkpoint")
    try:
        with warnings.catch_warnings():  # torch warns about the pickle protocol of foreign files
            warnings.simplefilter("ignore")
            state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        if "Weights only load failed" not in str(err):
            raise DamagedCheckpointError(f"{path}: cannot read the checkpoint ({str(err).splitlines()[0]})") from None
        found = _unsafe_globals(path)
        if all(name.startswith("numpy") for name in found):
            raise CheckpointError(f"{path}: a checkpoint of an older blip2_fast (format v1, numpy objects inside), "
                                  f"which this version reads only as plain data: not loaded; start a new run "
                                  f"(another --out, or no --resume)") from None
        raise CheckpointError(f"{path}: refused: loading it would call or build {', '.join(found)}, which a "
                              f"training checkpoint never holds; it was not loaded (is it a tampered or "
                              f"foreign file?)") from None
    except Exception as err:  # torch raises RuntimeError, EOFError, ... for a cut or corrupt file
        first = str(err).splitlines()[0] if str(err) else ""
        raise DamagedCheckpointError(f"{path}: cannot read the checkpoint ({type(err).__name__}: {first})") \
            from None
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        found = state.get("format") if isinstance(state, dict) else type(state).__name__
        raise CheckpointError(f"{path}: not a blip2_fast training checkpoint (format {found!r}, "
                              f"{FORMAT} expected)")
    return state


__all__ = ["FORMAT", "LAST", "PREVIOUS", "DamagedCheckpointError", "training_signature", "check_training_signature",
           "rng_state", "set_rng_state", "save_atomic", "save_checkpoint", "load_checkpoint"]

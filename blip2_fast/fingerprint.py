"""One identity for a model's weights, cheap enough to compute on every load.

`weights_fingerprint(header, state_dict)`: sha256 over the header bytes (a config, the image
preprocessing: whatever else decides the outputs), then every tensor's name, shape, dtype and
64 values sampled evenly through it. No pass over the weights, yet any other checkpoint (or a
changed tensor of it, short of edits between the sampled positions) gives another value. Caches
keyed by it (the retrieval gallery, the stage-2 feature cache) refuse files of another model.
"""
from __future__ import annotations

import hashlib
import json

import torch

SAMPLES = 64


def config_bytes(fields: dict) -> bytes:
    """A config's fields as canonical JSON bytes (sorted keys; non-JSON values by str)."""
    return json.dumps(fields, sort_keys=True, default=str).encode()


def weights_fingerprint(header: list[bytes], state_dict: dict[str, torch.Tensor]) -> str:
    h = hashlib.sha256()
    for part in header:
        h.update(part)
    for name, t in sorted(state_dict.items()):
        flat = t.detach().reshape(-1)
        idx = torch.linspace(0, max(flat.numel() - 1, 0), min(SAMPLES, flat.numel())).long().to(flat.device)
        h.update(f"{name}{tuple(t.shape)}{t.dtype}".encode())
        h.update(flat[idx].float().cpu().numpy().tobytes())
    return h.hexdigest()


__all__ = ["weights_fingerprint", "config_bytes"]

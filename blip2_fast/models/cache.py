"""Key/value cache shared by the decoders (OPT, T5) and the generation engine.

Storage is preallocated once per `generate` call: per layer K and V of shape
(B, H, max_len, D), so decoding never reallocates or concatenates. `length` is a host int:
the engine knows how many tokens it appended, so reading it never synchronises the device.

Usage inside a decoder layer `i` for a step of L new tokens:
    k_all, v_all = cache.update(i, k_new, v_new)   # (B, H, length + L, D) views
and once all layers ran, the model calls `cache.advance(L)`.

`reorder(index)` gathers the batch dimension (beam search, and expanding B to B*beams);
`cross` holds per-layer cross-attention K/V for encoder-decoder models, computed once from the
encoder output: beams of one sample share the encoder output, so `reorder` leaves it alone
unless the batch size changes (expansion), in which case it is gathered too.
"""
from __future__ import annotations

import torch


class KVCache:
    def __init__(self, num_layers: int, batch: int, heads: int, max_len: int, head_dim: int,
                 dtype: torch.dtype, device: torch.device | str):
        shape = (batch, heads, max_len, head_dim)
        self.k = [torch.empty(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.v = [torch.empty(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.length = 0
        self.max_len = max_len
        self.cross: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    @property
    def batch_size(self) -> int:
        return self.k[0].shape[0]

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Write k, v (B, H, L, D) at positions [length, length+L); return the filled prefix."""
        end = self.length + k.shape[2]
        if end > self.max_len:
            raise ValueError(f"KV cache overflow: {end} positions needed, {self.max_len} allocated")
        self.k[layer][:, :, self.length:end] = k
        self.v[layer][:, :, self.length:end] = v
        return self.k[layer][:, :, :end], self.v[layer][:, :, :end]

    def advance(self, n: int) -> None:
        self.length += n

    def reorder(self, index: torch.Tensor) -> None:
        """Gather the batch dimension: new row i is old row index[i] (index may change B)."""
        resize = index.shape[0] != self.batch_size
        self.k = [t.index_select(0, index) for t in self.k]
        self.v = [t.index_select(0, index) for t in self.v]
        if resize:
            self.cross = {i: (k.index_select(0, index), v.index_select(0, index)) for i, (k, v) in self.cross.items()}

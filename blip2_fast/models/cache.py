"""Key/value cache shared by the decoders (OPT, T5) and the generation engine.

Storage is preallocated once per `generate` call: per layer K and V of shape
(B, H, max_len, D), so decoding never reallocates or concatenates. `length` is a host int:
the engine knows how many tokens it appended, so reading it never synchronises the device.

Usage inside a decoder layer `i` for a step of L new tokens:
    k_all, v_all = cache.update(i, k_new, v_new)   # (B, H, length + L, D) views
and once all layers ran, the model calls `cache.advance(L)`.

Static-shape decoding (`models/static_decode.py`) writes one step at a device position instead:
    k_all, v_all = cache.write(i, k_new, v_new, input_pos)   # the whole (B, H, max_len, D) buffers
with `input_pos` a (1,) long tensor, so every step has the same shapes and no host integer
changes between steps (what lets a step be compiled and captured as a CUDA graph).

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

    def write(self, layer: int, k: torch.Tensor, v: torch.Tensor,
              input_pos: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Write k, v (B, H, 1, D) at the device position `input_pos` (1,); return the whole buffers."""
        self.k[layer].index_copy_(2, input_pos, k)
        self.v[layer].index_copy_(2, input_pos, v)
        return self.k[layer], self.v[layer]

    def advance(self, n: int) -> None:
        self.length += n

    def reorder(self, index: torch.Tensor, in_place: bool = False) -> None:
        """Gather the batch dimension: new row i is old row index[i] (index may change B).

        in_place (same B only): copy into the existing buffers, which keep their addresses (what a
        captured CUDA graph reads); it costs one more copy than swapping in the gathered tensors."""
        resize = index.shape[0] != self.batch_size
        if in_place and not resize:
            for t in self.k + self.v:
                t.copy_(t.index_select(0, index))
            return
        self.k = [t.index_select(0, index) for t in self.k]
        self.v = [t.index_select(0, index) for t in self.v]
        if resize:
            self.cross = {i: (k.index_select(0, index), v.index_select(0, index)) for i, (k, v) in self.cross.items()}

"""Frozen image encoder: EVA-CLIP / CLIP-style ViT (pre-LN, fused qkv with q and v biases).

Attribute names follow transformers' `Blip2VisionModel`, so checkpoint keys map one to one
(`vision_model.encoder.layers.{i}.self_attn.qkv.weight`, ...). Older checkpoints store the
q and v biases separately (`self_attn.q_bias`, `self_attn.v_bias`); the loader folds them into
`qkv.bias` (k's third is zero) — see `loading.py`.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..config import VisionConfig


def activation(name: str):
    fns = {"gelu": F.gelu, "relu": F.relu, "quick_gelu": lambda x: x * torch.sigmoid(1.702 * x),
           "gelu_new": lambda x: F.gelu(x, approximate="tanh"), "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh")}
    if name not in fns:
        raise ValueError(f"unsupported activation {name!r}; supported: {sorted(fns)}")
    return fns[name]


class VisionEmbeddings(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.patch_size = cfg.patch_size
        self.class_embedding = nn.Parameter(torch.zeros(1, 1, cfg.hidden_size))
        self.patch_embedding = nn.Conv2d(3, cfg.hidden_size, cfg.patch_size, cfg.patch_size)
        self.position_embedding = nn.Parameter(torch.zeros(1, cfg.num_positions, cfg.hidden_size))

    def forward(self, pixel_values: torch.Tensor, interpolate_pos_encoding: bool = False) -> torch.Tensor:
        dtype = self.patch_embedding.weight.dtype
        x = self.patch_embedding(pixel_values.to(dtype)).flatten(2).transpose(1, 2)  # (B, P, E)
        cls = self.class_embedding.expand(x.shape[0], 1, -1).to(dtype)
        x = torch.cat([cls, x], dim=1)  # (B, P+1, E)
        pos = self.position_embedding
        if interpolate_pos_encoding and x.shape[1] != pos.shape[1]:
            pos = self._interpolate(pos, pixel_values.shape[-2], pixel_values.shape[-1])
        return x + pos[:, : x.shape[1]].to(dtype)

    def _interpolate(self, pos: torch.Tensor, height: int, width: int) -> torch.Tensor:
        # bicubic resampling of the patch grid, class position kept (as transformers does)
        grid = int((pos.shape[1] - 1) ** 0.5)
        patch = pos[:, 1:].reshape(1, grid, grid, -1).permute(0, 3, 1, 2)
        patch = F.interpolate(patch, size=(height // self.patch_size, width // self.patch_size),
                              mode="bicubic", align_corners=False)
        return torch.cat([pos[:, :1], patch.permute(0, 2, 3, 1).reshape(1, -1, pos.shape[-1])], dim=1)


class VisionAttention(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.num_heads = cfg.num_attention_heads
        self.qkv = nn.Linear(cfg.hidden_size, 3 * cfg.hidden_size, bias=cfg.qkv_bias)
        self.projection = nn.Linear(cfg.hidden_size, cfg.hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, L, E = x.shape
        qkv = self.qkv(x).reshape(B, L, 3, self.num_heads, E // self.num_heads).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(qkv[0], qkv[1], qkv[2])  # (B, H, L, D), unmasked
        return self.projection(out.transpose(1, 2).reshape(B, L, E))


class VisionMLP(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.act = activation(cfg.hidden_act)
        self.fc1 = nn.Linear(cfg.hidden_size, cfg.intermediate_size)
        self.fc2 = nn.Linear(cfg.intermediate_size, cfg.hidden_size)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


class VisionLayer(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.self_attn = VisionAttention(cfg)
        self.layer_norm1 = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.mlp = VisionMLP(cfg)
        self.layer_norm2 = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)

    def forward(self, x):
        x = x + self.self_attn(self.layer_norm1(x))
        return x + self.mlp(self.layer_norm2(x))


class VisionEncoder(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.layers = nn.ModuleList(VisionLayer(cfg) for _ in range(cfg.num_hidden_layers))
        self.gradient_checkpointing = False

    def forward(self, x):
        for layer in self.layers:
            if self.gradient_checkpointing and self.training and torch.is_grad_enabled():
                x = torch.utils.checkpoint.checkpoint(layer, x, use_reentrant=False)
            else:
                x = layer(x)
        return x


class VisionModel(nn.Module):
    """pixel_values (B, 3, H, W) -> image tokens (B, 1 + (H/p)(W/p), E), ln_vision applied."""

    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.config = cfg
        self.embeddings = VisionEmbeddings(cfg)
        self.encoder = VisionEncoder(cfg)
        self.post_layernorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)

    @property
    def gradient_checkpointing(self) -> bool:
        """Recompute each layer in the backward pass (training the ViT: caption finetuning at
        364 px has 677 tokens per image). Active only in train mode with grad enabled, as in
        `QFormerModel`; the flag lives on the encoder, which runs the layers."""
        return self.encoder.gradient_checkpointing

    @gradient_checkpointing.setter
    def gradient_checkpointing(self, value: bool) -> None:
        self.encoder.gradient_checkpointing = bool(value)

    def check_pixels(self, pixel_values: torch.Tensor, interpolate_pos_encoding: bool = False) -> None:
        """Clear errors for the inputs users most often get wrong."""
        if not isinstance(pixel_values, torch.Tensor):
            raise TypeError(f"pixel_values must be a torch.Tensor, got {type(pixel_values).__name__}")
        if pixel_values.dim() != 4 or pixel_values.shape[1] != 3:
            raise ValueError(f"pixel_values must have shape (batch, 3, height, width), got {tuple(pixel_values.shape)}")
        if pixel_values.shape[0] == 0:
            raise ValueError("pixel_values is an empty batch (batch size 0)")
        if not pixel_values.is_floating_point():
            raise TypeError(f"pixel_values must be floating point, got {pixel_values.dtype}")
        size = self.config.image_size
        h, w = pixel_values.shape[-2:]
        if not interpolate_pos_encoding and (h, w) != (size, size):
            raise ValueError(f"pixel_values are {h}x{w} but the vision encoder expects {size}x{size} "
                             f"(resize the image, or pass interpolate_pos_encoding=True)")
        if h % self.config.patch_size or w % self.config.patch_size:
            raise ValueError(f"image size {h}x{w} is not a multiple of the patch size {self.config.patch_size}")
        if not torch.isfinite(pixel_values).all():
            raise ValueError("pixel_values contain NaN or infinite values")

    def forward(self, pixel_values: torch.Tensor, interpolate_pos_encoding: bool = False) -> torch.Tensor:
        x = self.embeddings(pixel_values, interpolate_pos_encoding)
        return self.post_layernorm(self.encoder(x))

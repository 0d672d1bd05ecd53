"""The miniature BLIP-2's architecture, its initialisation, and helpers the pretrainings share.

Sizes (for step 1 of the recipe in `recipe.py`, the unimodal pretrainings), chosen so the whole
model is ~2.6M parameters (~10 MB in fp32, under the 20 MB the shipped folder may take) and the
unimodal pretrainings fit in about a quarter of an hour on a 2-core CPU (the ViT 12.5 min, the LM
and text encoder 2 min):
- ViT: 64 px images, patch 8 -> 8x8 patches + CLS = 65 tokens; width 96, 4 layers, 4 heads,
  MLP 384. An object is at least 13 px (small = 20-30% of the side), so it covers two patches
  or more, and the left/right halves are whole patch columns (0-3 and 4-7).
- Q-Former: width 128, 4 layers (cross-attention in layers 0 and 2), 4 heads, FFN 512, text
  input on (stage 1 needs it), 64 text positions, 16 query tokens, ITC width 64. 16, not
  fewer: the LM copies and answers from a caption in its context (`pretrain_lm`), and a
  two-object caption is 15 tokens; measured with the same stage 1 (queries duplicated) and LM,
  stage 2's loss fell to 0.29 with 16 queries against 0.375 with 8.
- OPT: width 128, 3 layers, 4 heads, FFN 512, 64 positions (16 queries + the longest world
  prompt and answer stay under 40), tied embeddings, the BPE tokenizer's ids: <pad>=0,
  </s>=1 (BOS and EOS, as OPT), <image>=3.
"""
from __future__ import annotations

import os

import torch
from torch import nn

from ..atomic import write_file
from ..config import Blip2Config, OPTConfig, QFormerConfig, VisionConfig
from ..images import ImageSpec

IMAGE_SIZE = 64
NUM_QUERY_TOKENS = 16
IMAGE_TOKEN_INDEX = 3  # "<image>" in blip2_fast.bpe.SPECIAL_TOKENS
PAD_ID, EOS_ID = 0, 1  # blip2_fast.bpe: <pad>, </s> (BOS = EOS)


def miniature_vision_config() -> VisionConfig:
    return VisionConfig(hidden_size=96, intermediate_size=384, num_hidden_layers=4, num_attention_heads=4,
                        image_size=IMAGE_SIZE, patch_size=8)


def miniature_qformer_config(vocab_size: int, dec_token_id: int) -> QFormerConfig:
    if not 0 <= dec_token_id < vocab_size:
        raise ValueError(f"dec_token_id {dec_token_id} is not an id of a {vocab_size}-token vocabulary")
    cfg = QFormerConfig(vocab_size=vocab_size, hidden_size=128, num_hidden_layers=4, num_attention_heads=4,
                        intermediate_size=512, max_position_embeddings=64, cross_attention_frequency=2,
                        use_qformer_text_input=True, pad_token_id=PAD_ID,
                        encoder_hidden_size=miniature_vision_config().hidden_size)
    cfg.extra["dec_token_id"] = int(dec_token_id)  # where blip2_fast.training.Blip2Stage1 looks
    return cfg


def miniature_opt_config(vocab_size: int) -> OPTConfig:
    return OPTConfig(vocab_size=vocab_size, hidden_size=128, num_hidden_layers=3, num_attention_heads=4,
                     ffn_dim=512, max_position_embeddings=64, pad_token_id=PAD_ID, bos_token_id=EOS_ID,
                     eos_token_id=EOS_ID, tie_word_embeddings=True)


def miniature_config(opt_vocab_size: int, qformer_vocab_size: int, dec_token_id: int) -> Blip2Config:
    """The whole miniature BLIP-2 (vocabulary sizes come from the trained tokenizers)."""
    cfg = Blip2Config(vision=miniature_vision_config(),
                      qformer=miniature_qformer_config(qformer_vocab_size, dec_token_id),
                      text=miniature_opt_config(opt_vocab_size), num_query_tokens=NUM_QUERY_TOKENS,
                      image_text_hidden_size=64, image_token_index=IMAGE_TOKEN_INDEX)
    cfg.validate()
    return cfg


def image_spec() -> ImageSpec:
    """Inference preprocessing at the miniature's size (CLIP mean/std, bicubic resize)."""
    return ImageSpec(height=IMAGE_SIZE, width=IMAGE_SIZE)


# ------------------------------------------------------------------------ shared helpers
def init_weights_(module: nn.Module, std: float = 0.02) -> nn.Module:
    """BERT/ViT initialisation: linear and embedding weights N(0, std), biases 0, LayerNorm 1/0,
    ViT class/position embeddings N(0, std). PyTorch's default (Kaiming-uniform) is larger and
    slows the first hundreds of steps of these post-LN/pre-LN stacks."""
    with torch.no_grad():
        for m in module.modules():
            if isinstance(m, (nn.Linear, nn.Conv2d, nn.Embedding)):
                m.weight.normal_(0.0, std)
                if getattr(m, "bias", None) is not None:
                    m.bias.zero_()
                if isinstance(m, nn.Embedding) and m.padding_idx is not None:
                    m.weight[m.padding_idx].zero_()
            elif isinstance(m, nn.LayerNorm) and m.elementwise_affine:
                m.weight.fill_(1.0)
                m.bias.zero_()
        for name, p in module.named_parameters():
            if name.endswith(("class_embedding", "position_embedding")):
                p.normal_(0.0, std)
    return module


def sincos_position_embedding(grid: int, dim: int) -> torch.Tensor:
    """2-D sine-cosine positions (MAE's), (grid*grid, dim): half the channels encode the row,
    half the column, each with sines and cosines at geometrically spaced frequencies."""
    if dim % 4:
        raise ValueError(f"sin-cos positions need a width divisible by 4, got {dim}")
    freq = 1.0 / 10000 ** (torch.arange(dim // 4, dtype=torch.float64) / (dim // 4))  # (dim/4,)
    rows, cols = torch.meshgrid(torch.arange(grid, dtype=torch.float64), torch.arange(grid, dtype=torch.float64),
                                indexing="ij")
    parts = []
    for coord in (rows.reshape(-1), cols.reshape(-1)):
        angle = coord[:, None] * freq[None]  # (g*g, dim/4)
        parts += [angle.sin(), angle.cos()]
    return torch.cat(parts, 1).float()


def init_vision_positions_(model: nn.Module) -> nn.Module:
    """Start a ViT's (trainable) position embeddings at 2-D sin-cos, CLS at 0. Shape is the one
    attribute that needs the patches' arrangement; with N(0, 0.02) positions, far smaller than
    the patch content, our measurements showed shape stuck at chance for 50k images."""
    pe = model.embeddings.position_embedding  # (1, 1 + g*g, E)
    grid = int(round((pe.shape[1] - 1) ** 0.5))
    with torch.no_grad():
        pe.zero_()
        pe[0, 1:] = sincos_position_embedding(grid, pe.shape[2])
    return model


def mimetic_attention_init_(model: nn.Module, seed: int = 0) -> nn.Module:
    """Mimetic initialisation of a ViT's self-attention (Trockman & Kolter, 2023): W_q^T W_k ~
    0.7 (Z + I) and W_proj W_v ~ 0.4 (Z - I), Z ~ N(0, 1/E), each product split by an SVD. With
    sin-cos positions a token then attends most to itself and its neighbours, a convolution-like
    start; measured here it roughly halved the steps the ViT needed before shape took off."""
    gen = torch.Generator().manual_seed(seed)

    def split(target):  # target = left @ right
        u, s, vh = torch.linalg.svd(target)
        return u * s.sqrt(), s.sqrt()[:, None] * vh

    with torch.no_grad():
        for layer in model.encoder.layers:
            attn = layer.self_attn
            E = attn.projection.weight.shape[0]
            w = attn.qkv.weight  # rows: W_q, W_k, W_v (each E x E); logits = x^T W_q^T W_k x'
            left, right = split(0.7 * (torch.randn(E, E, generator=gen) / E ** 0.5 + torch.eye(E)))
            w[:E], w[E:2 * E] = left.T, right
            left, right = split(0.4 * (torch.randn(E, E, generator=gen) / E ** 0.5 - torch.eye(E)))
            w[2 * E:] = right
            attn.projection.weight.copy_(left)
    return model


def save_weights(state: dict, path: str) -> None:
    """safetensors, written beside the target then renamed (an interrupted save leaves no
    truncated file); tensors sharing storage (tied weights) are saved once per name, cloned."""
    from safetensors.torch import save_file
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tensors = {k: v.detach().contiguous().clone() for k, v in state.items()}
    write_file(path, lambda tmp: save_file(tensors, tmp, metadata={"format": "pt"}))


def load_weights(path: str) -> dict:
    from safetensors.torch import load_file
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path}: no such weights file (run the pretraining that writes it first)")
    return load_file(path)


def set_threads(max_threads: int = 2) -> None:
    """Colleagues share the CPU: never use more than `max_threads` intra-op threads."""
    torch.set_num_threads(max(1, min(max_threads, torch.get_num_threads())))

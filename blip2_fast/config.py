"""Flat dataclass configs, read from and written to Hugging Face `config.json`.

`Blip2Config.from_hf_dict(d)` accepts what transformers' `Blip2Config.to_dict()` writes;
`to_hf_dict()` writes a dict transformers can load. Fields we do not model are kept in
`extra` and written back unchanged, so a load/save round trip loses nothing.
Named presets: `Blip2Config.from_name("blip2-opt-2.7b")`.
"""
from __future__ import annotations

import copy
import dataclasses
import json
import math
import os
import typing
from dataclasses import dataclass, field


class ConfigError(ValueError):
    """A config.json that blip2_fast cannot use; the message names the field."""


# sizes a model cannot be built with when they are 0 (a division or an empty matrix follows)
POSITIVE_FIELDS = {"hidden_size", "intermediate_size", "num_attention_heads", "image_size", "patch_size",
                   "vocab_size", "max_position_embeddings", "cross_attention_frequency", "encoder_hidden_size",
                   "ffn_dim", "word_embed_proj_dim", "d_model", "d_kv", "d_ff", "num_heads",
                   "relative_attention_num_buckets", "relative_attention_max_distance"}
_PYTHON_TYPES = {int: (int,), float: (int, float), bool: (bool,), str: (str,), type(None): (type(None),)}


def _check_field(where: str, name: str, value, annotation) -> None:
    """`value` must have the field's declared type (bool is not an int here, an int is a float)."""
    allowed = typing.get_args(annotation) or (annotation,)
    ok = any(isinstance(value, _PYTHON_TYPES.get(t, (t,))) and not (t in (int, float) and isinstance(value, bool))
             for t in allowed)
    if not ok:
        names = " or ".join("null" if t is type(None) else t.__name__ for t in allowed)
        raise ConfigError(f"{where}.{name} must be {names}, got {value!r}")
    if isinstance(value, float) and not math.isfinite(value):
        raise ConfigError(f"{where}.{name} must be a finite number, got {value!r}")
    if isinstance(value, int) and not isinstance(value, bool) and value < (1 if name in POSITIVE_FIELDS else 0):
        raise ConfigError(f"{where}.{name} must be >= {1 if name in POSITIVE_FIELDS else 0}, got {value}")


def _take(cls, d: dict, where: str):
    """Build dataclass `cls` from the keys of `d` it knows, each checked against its declared
    type; the rest go to `extra`."""
    if not isinstance(d, dict):
        raise ConfigError(f"{where} must be a JSON object, got {type(d).__name__}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)} - {"extra"}
    kwargs = {k: d[k] for k in names if k in d}
    for name, value in kwargs.items():
        _check_field(where, name, value, hints[name])
    extra = {k: v for k, v in d.items() if k not in names}
    try:
        obj = cls(**kwargs)
    except TypeError as err:
        raise ConfigError(f"{where}: {err}") from None
    obj.extra = extra
    return obj


def _dump(obj) -> dict:
    d = copy.deepcopy(obj.extra)
    for f in dataclasses.fields(obj):
        if f.name != "extra":
            d[f.name] = copy.deepcopy(getattr(obj, f.name))
    return d


@dataclass
class VisionConfig:
    """EVA/CLIP-style ViT: pre-LN, fused qkv with q and v biases, `post_layernorm` = ln_vision."""
    hidden_size: int = 1408
    intermediate_size: int = 6144
    num_hidden_layers: int = 39
    num_attention_heads: int = 16
    image_size: int = 224
    patch_size: int = 14
    hidden_act: str = "gelu"
    layer_norm_eps: float = 1e-6
    qkv_bias: bool = True
    model_type: str = "blip_2_vision_model"
    extra: dict = field(default_factory=dict, repr=False, compare=False)

    @property
    def num_positions(self) -> int:
        return (self.image_size // self.patch_size) ** 2 + 1


@dataclass
class QFormerConfig:
    """BERT-base-shaped Q-Former; cross-attention in layers where idx % frequency == 0."""
    vocab_size: int = 30522
    hidden_size: int = 768
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    intermediate_size: int = 3072
    hidden_act: str = "gelu"
    max_position_embeddings: int = 512
    layer_norm_eps: float = 1e-12
    pad_token_id: int = 0
    cross_attention_frequency: int = 2
    encoder_hidden_size: int = 1408
    use_qformer_text_input: bool = False
    hidden_dropout_prob: float = 0.1
    attention_probs_dropout_prob: float = 0.1
    model_type: str = "blip_2_qformer"
    extra: dict = field(default_factory=dict, repr=False, compare=False)


@dataclass
class OPTConfig:
    """Decoder-only OPT (the LLM of blip2-opt-*)."""
    vocab_size: int = 50272
    hidden_size: int = 2560
    num_hidden_layers: int = 32
    ffn_dim: int = 10240
    num_attention_heads: int = 32
    max_position_embeddings: int = 2048
    do_layer_norm_before: bool = True
    word_embed_proj_dim: int | None = None
    activation_function: str = "relu"
    enable_bias: bool = True
    layer_norm_elementwise_affine: bool = True
    tie_word_embeddings: bool = True
    pad_token_id: int = 1
    bos_token_id: int = 2
    eos_token_id: int = 2
    model_type: str = "opt"
    extra: dict = field(default_factory=dict, repr=False, compare=False)

    def __post_init__(self):
        if self.word_embed_proj_dim is None:
            self.word_embed_proj_dim = self.hidden_size

    is_encoder_decoder = False


@dataclass
class T5Config:
    """Encoder-decoder T5 / FlanT5 (the LLM of blip2-flan-t5-*)."""
    vocab_size: int = 32128
    d_model: int = 2048
    d_kv: int = 64
    d_ff: int = 5120
    num_layers: int = 24
    num_decoder_layers: int | None = None
    num_heads: int = 32
    relative_attention_num_buckets: int = 32
    relative_attention_max_distance: int = 128
    layer_norm_epsilon: float = 1e-6
    feed_forward_proj: str = "gated-gelu"
    tie_word_embeddings: bool = False
    # Original T5 scales the decoder output by d_model**-0.5 before the LM head, T5 v1.1 and
    # FlanT5 do not. Older configs signal it with tie_word_embeddings; transformers 5 stores it
    # as scale_decoder_outputs (and always ties lm_head to the shared embedding when a
    # checkpoint has no lm_head of its own).
    scale_decoder_outputs: bool | None = None
    pad_token_id: int = 0
    eos_token_id: int = 1
    decoder_start_token_id: int = 0
    model_type: str = "t5"
    extra: dict = field(default_factory=dict, repr=False, compare=False)

    def __post_init__(self):
        if self.num_decoder_layers is None:
            self.num_decoder_layers = self.num_layers
        if self.scale_decoder_outputs is None:
            self.scale_decoder_outputs = self.tie_word_embeddings

    is_encoder_decoder = True

    @property
    def hidden_size(self) -> int:
        return self.d_model


_TEXT_CONFIGS = {"opt": OPTConfig, "t5": T5Config}


@dataclass
class Blip2Config:
    vision: VisionConfig = field(default_factory=VisionConfig)
    qformer: QFormerConfig = field(default_factory=QFormerConfig)
    text: OPTConfig | T5Config | None = field(default_factory=OPTConfig)
    num_query_tokens: int = 32
    image_text_hidden_size: int = 256
    image_token_index: int | None = None
    extra: dict = field(default_factory=dict, repr=False, compare=False)

    def __post_init__(self):
        # transformers ties these together the same way (Blip2Config.__post_init__)
        self.qformer.encoder_hidden_size = self.vision.hidden_size

    # ---------------------------------------------------------------- HF format
    @classmethod
    def from_hf_dict(cls, d: dict) -> "Blip2Config":
        if not isinstance(d, dict):
            raise ConfigError(f"config must be a JSON object, got {type(d).__name__}")
        model_type = d.get("model_type")
        if model_type not in ("blip-2", None):
            raise ConfigError(f"config.json: model_type is {model_type!r}, expected 'blip-2'")
        vision = _take(VisionConfig, d.get("vision_config") or {}, "vision_config")
        qformer = _take(QFormerConfig, d.get("qformer_config") or {}, "qformer_config")
        text = None
        text_d = d.get("text_config")
        if text_d is not None:
            if not isinstance(text_d, dict):
                raise ConfigError(f"text_config must be a JSON object, got {type(text_d).__name__}")
            text_type = text_d.get("model_type", "opt")
            if not isinstance(text_type, str) or text_type not in _TEXT_CONFIGS:
                raise ConfigError(f"text_config.model_type {text_type!r} is not supported (supported: opt, t5)")
            text = _take(_TEXT_CONFIGS[text_type], text_d, "text_config")
        known = {"vision_config", "qformer_config", "text_config", "num_query_tokens",
                 "image_text_hidden_size", "image_token_index", "image_token_id"}
        top = {"num_query_tokens": d.get("num_query_tokens", 32),
               "image_text_hidden_size": d.get("image_text_hidden_size", 256),
               "image_token_index": d.get("image_token_index", d.get("image_token_id"))}
        hints = typing.get_type_hints(cls)
        for name, value in top.items():
            _check_field("config", name, value, hints[name])
        cfg = cls(vision=vision, qformer=qformer, text=text, **top,
                  extra={k: v for k, v in d.items() if k not in known})
        cfg.validate()
        return cfg

    def to_hf_dict(self) -> dict:
        d = copy.deepcopy(self.extra)
        d["model_type"] = "blip-2"
        d["vision_config"] = _dump(self.vision)
        d["qformer_config"] = _dump(self.qformer)
        if self.text is not None:
            d["text_config"] = _dump(self.text)
            if self.text.model_type == "t5":  # the flag every transformers version reads
                d["text_config"]["tie_word_embeddings"] = self.text.scale_decoder_outputs
                d["text_config"].pop("scale_decoder_outputs")
        d["num_query_tokens"] = self.num_query_tokens
        d["image_text_hidden_size"] = self.image_text_hidden_size
        d["image_token_index"] = self.image_token_index
        d.setdefault("architectures", ["Blip2ForConditionalGeneration"])
        return d

    @classmethod
    def from_json_file(cls, path: str) -> "Blip2Config":
        """A model folder's config.json; unlike `from_hf_dict`, which fills in the ViT-g and
        BERT-base defaults, a file must describe the image encoder and the Q-Former itself: a
        default in their place would only surface later as a misleading weight-shape error."""
        try:
            with open(path, encoding="utf-8") as f:
                d = json.load(f)
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise ConfigError(f"{path}: not valid JSON ({err})") from None
        missing = [k for k in ("vision_config", "qformer_config") if isinstance(d, dict) and k not in d]
        if missing:
            raise ConfigError(f"{path}: no {' and no '.join(missing)}; a BLIP-2 config.json describes its image "
                              f"encoder (vision_config) and Q-Former (qformer_config), and its LLM (text_config) "
                              f"unless it is a retrieval model")
        try:
            return cls.from_hf_dict(d)
        except ConfigError as err:
            raise ConfigError(f"{path}: {err}") from None

    def to_json_file(self, path: str) -> None:
        with open(path, "w", encoding="utf-8") as f:
            json.dump(self.to_hf_dict(), f, indent=2, sort_keys=True)

    def validate(self) -> None:
        v, q = self.vision, self.qformer
        if v.hidden_size % v.num_attention_heads:
            raise ConfigError(f"vision_config: hidden_size {v.hidden_size} is not a multiple of "
                              f"num_attention_heads {v.num_attention_heads}")
        if q.hidden_size % q.num_attention_heads:
            raise ConfigError(f"qformer_config: hidden_size {q.hidden_size} is not a multiple of "
                              f"num_attention_heads {q.num_attention_heads}")
        if v.image_size % v.patch_size:
            raise ConfigError(f"vision_config: image_size {v.image_size} is not a multiple of patch_size {v.patch_size}")
        if self.num_query_tokens < 1:
            raise ConfigError(f"num_query_tokens must be >= 1, got {self.num_query_tokens}")
        if q.cross_attention_frequency < 1:
            raise ConfigError("qformer_config.cross_attention_frequency must be >= 1")

    @property
    def is_encoder_decoder(self) -> bool:
        return self.text is not None and self.text.is_encoder_decoder

    # ---------------------------------------------------------------- presets
    @classmethod
    def from_name(cls, name: str) -> "Blip2Config":
        if name not in PRESETS:
            raise KeyError(f"unknown preset {name!r}; known: {', '.join(sorted(PRESETS))}")
        return PRESETS[name]()


def _opt(hidden, layers, heads, ffn):
    return OPTConfig(hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads, ffn_dim=ffn)


def _t5(d_model, d_ff, layers, heads):
    return T5Config(d_model=d_model, d_ff=d_ff, num_layers=layers, num_heads=heads)


PRESETS = {
    "blip2-opt-2.7b": lambda: Blip2Config(text=_opt(2560, 32, 32, 10240), image_token_index=50265),
    "blip2-opt-6.7b": lambda: Blip2Config(text=_opt(4096, 32, 32, 16384), image_token_index=50265),
    "blip2-flan-t5-xl": lambda: Blip2Config(text=_t5(2048, 5120, 24, 32), image_token_index=32100),
    "blip2-flan-t5-xxl": lambda: Blip2Config(text=_t5(4096, 10240, 24, 64), image_token_index=32100),
    # stage-1 / retrieval model: Q-Former with text input, [DEC] added to BERT's vocabulary, no LLM
    "blip2-itm-vit-g": lambda: Blip2Config(
        qformer=QFormerConfig(vocab_size=30523, use_qformer_text_input=True), text=None,
        extra={"architectures": ["Blip2ForImageTextRetrieval"]}),
    # about 70M parameters: the CPU benchmark preset
    "blip2-small": lambda: Blip2Config(
        vision=VisionConfig(hidden_size=384, intermediate_size=1536, num_hidden_layers=6,
                            num_attention_heads=6, image_size=224, patch_size=16),
        qformer=QFormerConfig(hidden_size=384, num_hidden_layers=4, num_attention_heads=6,
                              intermediate_size=1536, use_qformer_text_input=True),
        text=OPTConfig(vocab_size=50272, hidden_size=512, num_hidden_layers=6, ffn_dim=2048,
                       num_attention_heads=8, max_position_embeddings=512),
        image_token_index=50265),
}


def hf_config_dict_from_file(folder: str) -> dict:
    path = os.path.join(folder, "config.json")
    with open(path, encoding="utf-8") as f:
        return json.load(f)

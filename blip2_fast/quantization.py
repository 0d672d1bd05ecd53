"""8-bit weights for the frozen LLM: one `quantize_(model, config)` (torchao's shape).

    from blip2_fast.quantization import Int8WeightOnlyConfig, quantize_
    quantize_(model.language_model, Int8WeightOnlyConfig())          # every nn.Linear but lm_head

Backends:
  native  `Int8Linear`: int8 weights (out, in) + float32 scales, y = int8_linear(x, q, s, b)
          (blip2_fast.kernels.int8_matmul: Triton on CUDA, the C library or torch on the CPU).
          Weight-only: activations stay in their 16/32-bit dtype (W8A16), so the per-layer output
          SQNR is 41-42 dB per channel, 43-45 dB with groups of 64-128 (measured on 2560 x 2560
          Gaussian weights; tests/test_quantization.py checks >= 35 dB).
  bnb     bitsandbytes' Linear8bitLt (LLM.int8(), threshold 6.0) where `blip2_fast[int8]` is
          installed; it quantises when the module moves to CUDA.

Checkpoint format (what `state_dict()` of a quantised model holds, and what a loader assigns):
  <module>.weight        int8 (out_features, in_features)
  <module>.weight_scale  float32 (out_features,), or (out_features, in_features // group_size)
  <module>.bias          unchanged
A streaming loader builds the model on the meta device, calls `quantize_(model, config)` (shapes
only, nothing is computed on meta), then for each checkpoint tensor calls
`quantize_tensor_for_loading(name, tensor, config, model)` and assigns what it returns;
`check_int8_state_dict(state_dict, model)` names the first missing or wrong-shaped key.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

from blip2_fast.kernels.int8_matmul import int8_linear, quantize_weight

BNB_HINT = "install it with `pip install 'blip2_fast[int8]'` (bitsandbytes)"


class QuantizationError(ValueError):
    """A model or config that cannot be quantised as asked (e.g. quantised twice)."""


class Int8StateDictError(ValueError):
    """A state dict that does not fit the int8 checkpoint format; `key` names the culprit."""

    def __init__(self, key: str, message: str):
        super().__init__(f"{key!r}: {message}")
        self.key = key


@dataclass(frozen=True)
class Int8WeightOnlyConfig:
    """group_size: None = one scale per output channel, else G consecutive inputs share a scale
    (G must divide in_features; the fast kernels want G % 16 == 0). include_lm_head /
    include_embeddings: also quantise modules named lm_head / embedding tables (nn.Embedding
    becomes Int8Embedding, native backend only)."""
    group_size: int | None = None
    backend: str = "native"
    include_lm_head: bool = False
    include_embeddings: bool = False

    def __post_init__(self):
        if self.backend not in ("native", "bnb"):
            raise QuantizationError(f"Int8WeightOnlyConfig.backend must be 'native' or 'bnb', got {self.backend!r}")
        if self.group_size is not None and (not isinstance(self.group_size, int) or self.group_size <= 0):
            raise QuantizationError(f"Int8WeightOnlyConfig.group_size must be None or a positive int, got {self.group_size!r}")
        if self.backend == "bnb" and self.group_size is not None:
            raise QuantizationError("backend='bnb' quantises per output channel: group_size must be None")
        if self.backend == "bnb" and self.include_embeddings:
            raise QuantizationError("backend='bnb' has no int8 embedding: include_embeddings must be False")


def _scale_shape(out_features: int, in_features: int, group_size: int | None) -> tuple[int, ...]:
    if group_size:
        if in_features % group_size:
            raise QuantizationError(f"group_size {group_size} does not divide in_features {in_features}")
        return (out_features, in_features // group_size)
    return (out_features,)


class _Int8Base(nn.Module):
    """Shared by Int8Linear and Int8Embedding: int8 `weight` (rows, cols) + `weight_scale`."""

    def _init_buffers(self, rows, cols, group_size, device):
        self.group_size = group_size or None
        self.register_buffer("weight", torch.empty((rows, cols), dtype=torch.int8, device=device))
        self.register_buffer("weight_scale", torch.empty(_scale_shape(rows, cols, group_size),
                                                         dtype=torch.float32, device=device))

    def _apply(self, fn, recurse=True):
        # model.half() / .to(bf16) must not round the scales (N floats; rounding them to 16 bits
        # would add up to 0.4 % error per channel for no memory gain): when `fn` changed their
        # dtype, they are re-made from the originals, following only the device.
        scale = self.weight_scale
        super()._apply(fn, recurse)
        if self.weight_scale.dtype != scale.dtype:
            self.weight_scale = scale.to(device=self.weight_scale.device)
        return self

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                              unexpected_keys, error_msgs):
        _check_entry(state_dict, prefix, tuple(self.weight.shape), self.group_size, require=False)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys,
                                      unexpected_keys, error_msgs)


class Int8Linear(_Int8Base):
    """nn.Linear with int8 weights. Buffers: weight int8 (out, in), weight_scale float32 (out,)
    or (out, in // group_size); bias a Parameter in the model dtype (or None).
    Constructible on the meta device (device="meta") for a loader to assign tensors into."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True, group_size: int | None = None,
                 device=None, dtype=None):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self._init_buffers(out_features, in_features, group_size, device)
        if bias:
            self.bias = nn.Parameter(torch.zeros(out_features, device=device, dtype=dtype), requires_grad=False)
        else:
            self.register_parameter("bias", None)

    @classmethod
    def from_linear(cls, linear: nn.Linear, config: Int8WeightOnlyConfig | None = None) -> "Int8Linear":
        config = config or Int8WeightOnlyConfig()
        w = linear.weight.detach()
        mod = cls(linear.in_features, linear.out_features, bias=linear.bias is not None,
                  group_size=config.group_size, device=w.device, dtype=w.dtype)
        if w.device.type != "meta":
            q, s = quantize_weight(w, config.group_size)
            mod.weight.copy_(q)
            mod.weight_scale.copy_(s)
        if linear.bias is not None:
            mod.bias = nn.Parameter(linear.bias.detach().clone(), requires_grad=linear.bias.requires_grad)
        return mod

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return int8_linear(x, self.weight, self.weight_scale, self.bias)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"group_size={self.group_size}")


class Int8Embedding(_Int8Base):
    """nn.Embedding with int8 rows and one scale per row (or per group of columns): the same
    format as Int8Linear, so a tied lm_head can share the tensors. Looks up int8 rows, then
    dequantises only those rows to `output_dtype` (the dtype the embedding had; follows .to())."""

    def __init__(self, num_embeddings: int, embedding_dim: int, padding_idx: int | None = None,
                 group_size: int | None = None, device=None, dtype=None):
        super().__init__()
        self.num_embeddings, self.embedding_dim, self.padding_idx = num_embeddings, embedding_dim, padding_idx
        self._init_buffers(num_embeddings, embedding_dim, group_size, device)
        self.output_dtype = dtype or torch.get_default_dtype()

    @classmethod
    def from_embedding(cls, emb: nn.Embedding, config: Int8WeightOnlyConfig | None = None) -> "Int8Embedding":
        config = config or Int8WeightOnlyConfig()
        w = emb.weight.detach()
        mod = cls(emb.num_embeddings, emb.embedding_dim, emb.padding_idx, config.group_size, w.device, w.dtype)
        if w.device.type != "meta":
            q, s = quantize_weight(w, config.group_size)
            mod.weight.copy_(q)
            mod.weight_scale.copy_(s)
        return mod

    def _apply(self, fn, recurse=True):
        self.output_dtype = fn(torch.empty(0, dtype=self.output_dtype)).dtype
        return super()._apply(fn, recurse)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        rows = F.embedding(ids, self.weight).to(torch.float32)  # (..., dim), only the rows used
        s = F.embedding(ids, self.weight_scale.reshape(self.num_embeddings, -1).to(torch.float32))  # (..., G)
        rows = (rows.unflatten(-1, (s.shape[-1], -1)) * s[..., None]).flatten(-2)
        return rows.to(self.output_dtype)

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, group_size={self.group_size}"


# ----------------------------------------------------------------------------------- quantize_

def _is_quantized(module: nn.Module) -> bool:
    return isinstance(module, _Int8Base) or type(module).__module__.startswith("bitsandbytes")


def _is_lm_head(fqn: str) -> bool:
    return fqn.rsplit(".", 1)[-1] == "lm_head"


def _is_embedding_path(fqn: str) -> bool:
    # embed_tokens, embed_positions, embeddings, word_embeddings, ... (HF naming)
    return any("embed" in part for part in fqn.split("."))


def default_filter(module: nn.Module, fqn: str, config: Int8WeightOnlyConfig) -> bool:
    """Which modules `quantize_` replaces when no filter_fn is given: every nn.Linear except
    one named lm_head (unless include_lm_head) or under an embedding path (unless
    include_embeddings), and nn.Embedding tables only with include_embeddings."""
    if isinstance(module, nn.Embedding):
        return config.include_embeddings
    if not isinstance(module, nn.Linear):
        return False
    if _is_lm_head(fqn) and not config.include_lm_head:
        return False
    return config.include_embeddings or not _is_embedding_path(fqn)


def _bnb_linear(linear: nn.Linear) -> nn.Module:
    import bitsandbytes as bnb  # checked importable by quantize_ before any module changes

    mod = bnb.nn.Linear8bitLt(linear.in_features, linear.out_features, bias=linear.bias is not None,
                              has_fp16_weights=False, threshold=6.0)
    device = linear.weight.device
    # Int8Params quantise on the move to CUDA: hand them the weights on the CPU first.
    mod.weight = bnb.nn.Int8Params(linear.weight.detach().to("cpu"), requires_grad=False, has_fp16_weights=False)
    if linear.bias is not None:
        mod.bias = nn.Parameter(linear.bias.detach().to("cpu"), requires_grad=linear.bias.requires_grad)
    return mod.to(device) if device.type == "cuda" else mod


def _require_bnb() -> None:
    try:
        import bitsandbytes  # noqa: F401
    except ImportError as err:
        raise ImportError(f"Int8WeightOnlyConfig(backend='bnb') needs bitsandbytes, which is not importable "
                          f"({err}); {BNB_HINT}, or use backend='native'") from err


def _validate_targets(targets, config: Int8WeightOnlyConfig) -> None:
    for parent, name, child in targets:
        if config.backend == "bnb":
            if isinstance(child, nn.Embedding):
                raise QuantizationError(f"backend='bnb' cannot quantise embedding {name!r} (no int8 embedding)")
            if child.weight.device.type == "meta":
                raise QuantizationError("backend='bnb' needs the real weights (bitsandbytes quantises them when a "
                                        "module moves to CUDA): load the checkpoint first, or use backend='native'")
        elif config.group_size:
            cols = child.embedding_dim if isinstance(child, nn.Embedding) else child.in_features
            if cols % config.group_size:
                raise QuantizationError(f"group_size {config.group_size} does not divide the {cols} input features "
                                        f"of {name!r} ({type(child).__name__}); pass a filter_fn to skip it")


def quantize_(model: nn.Module, config: Int8WeightOnlyConfig | None = None,
              filter_fn: Callable[[nn.Module, str], bool] | None = None) -> nn.Module:
    """Replace the model's nn.Linear (and, if asked, nn.Embedding) modules in place; returns model.

    filter_fn(module, fqn) -> bool overrides `default_filter` for nn.Linear / nn.Embedding
    modules. Raises QuantizationError if the model already holds int8 modules (quantising twice
    would quantise the int8 values again), ImportError for backend='bnb' without bitsandbytes.
    Linears owned by nn.MultiheadAttention are skipped: it reads out_proj.weight directly.
    A module object reachable under several names is replaced by one shared int8 module, and
    tied weights (lm_head / embed_tokens sharing a Parameter) stay shared when both are included.
    """
    config = config or Int8WeightOnlyConfig()
    done = [name or "<root>" for name, m in model.named_modules() if _is_quantized(m)]
    if done:
        raise QuantizationError(f"model is already quantised ({len(done)} int8 modules, e.g. {done[0]!r}); "
                                "quantize_ must be applied to the unquantised model")
    if config.backend == "bnb":
        _require_bnb()
    targets = []
    for parent_name, parent in model.named_modules():
        if isinstance(parent, nn.MultiheadAttention):
            continue
        for name, child in parent._modules.items():  # every name, even of a module registered twice
            fqn = f"{parent_name}.{name}" if parent_name else name
            if not isinstance(child, (nn.Linear, nn.Embedding)):
                continue
            wanted = filter_fn(child, fqn) if filter_fn is not None else default_filter(child, fqn, config)
            if wanted:
                targets.append((parent, name, child))
    _validate_targets(targets, config)  # everything that can fail, before any module is replaced
    replaced: dict[int, nn.Module] = {}
    by_weight: dict[int, _Int8Base] = {}
    for parent, name, child in targets:
        new = replaced.get(id(child))
        if new is None:
            if config.backend == "bnb":
                new = _bnb_linear(child)
            else:
                new = (Int8Embedding.from_embedding(child, config) if isinstance(child, nn.Embedding)
                       else Int8Linear.from_linear(child, config))
                twin = by_weight.get(id(child.weight))
                if twin is not None and twin.weight.shape == new.weight.shape:  # tied weights stay tied
                    new.weight, new.weight_scale = twin.weight, twin.weight_scale
                else:
                    by_weight[id(child.weight)] = new
            replaced[id(child)] = new
        setattr(parent, name, new)
    return model


# ----------------------------------------------------------------------------- loading support

def quantize_tensor_for_loading(name: str, tensor: torch.Tensor, config: Int8WeightOnlyConfig,
                                model: nn.Module | None = None) -> dict[str, torch.Tensor]:
    """One checkpoint tensor in, the tensors to assign out ({name: tensor} when untouched).

    With `model` (already passed through quantize_, typically on meta), exactly the `.weight`
    of Int8Linear / Int8Embedding modules is quantised, with that module's group size. Without
    it, the default rule is applied to the name: 2-D float `.weight` tensors, except lm_head and
    embedding paths unless the config includes them. An int8 tensor (an already quantised
    checkpoint) passes through. backend='bnb' passes everything through (bnb quantises on .cuda()).
    """
    if config.backend == "bnb" or not name.endswith(".weight") or tensor.dtype == torch.int8:
        return {name: tensor}
    prefix = name[: -len(".weight")]
    group_size = config.group_size
    if model is not None:
        try:
            module = model.get_submodule(prefix)
        except AttributeError:
            return {name: tensor}
        if not isinstance(module, _Int8Base):
            return {name: tensor}
        group_size = module.group_size
        if tuple(tensor.shape) != tuple(module.weight.shape):
            raise Int8StateDictError(name, f"shape {tuple(tensor.shape)} but the module expects {tuple(module.weight.shape)}")
    else:
        if tensor.dim() != 2 or not tensor.is_floating_point():
            return {name: tensor}
        if _is_lm_head(prefix) and not config.include_lm_head:
            return {name: tensor}
        if _is_embedding_path(prefix) and not config.include_embeddings:
            return {name: tensor}
    q, s = quantize_weight(tensor, group_size)
    return {name: q, f"{prefix}.weight_scale": s}


def _check_entry(sd: dict, prefix: str, weight_shape: tuple | None, group_size: int | None, require: bool) -> None:
    """Check `<prefix>weight` / `<prefix>weight_scale` of one int8 module in `sd`.
    weight_shape None: infer from the stored weight. require: a missing weight is an error."""
    wkey, skey = f"{prefix}weight", f"{prefix}weight_scale"
    if wkey not in sd:
        if require:
            raise Int8StateDictError(wkey, "missing int8 weight")
        if skey in sd and weight_shape is None:
            raise Int8StateDictError(skey, f"scale without its int8 weight {wkey!r}")
        return
    w = sd[wkey]
    if w.dtype != torch.int8:
        raise Int8StateDictError(wkey, f"dtype {w.dtype}, expected torch.int8: this is an unquantised weight "
                                       "(pass it through quantize_tensor_for_loading first)")
    if weight_shape is not None and tuple(w.shape) != tuple(weight_shape):
        raise Int8StateDictError(wkey, f"shape {tuple(w.shape)}, expected {tuple(weight_shape)}")
    if w.dim() != 2:
        raise Int8StateDictError(wkey, f"int8 weight must be 2-D, got shape {tuple(w.shape)}")
    if skey not in sd:
        raise Int8StateDictError(skey, f"missing scale for int8 weight {wkey!r} of shape {tuple(w.shape)}")
    s = sd[skey]
    rows, cols = w.shape
    if not s.is_floating_point():
        raise Int8StateDictError(skey, f"dtype {s.dtype}, expected a float dtype")
    if weight_shape is not None:  # a module: its group size fixes the shape
        want = _scale_shape(rows, cols, group_size)
        if tuple(s.shape) != want:
            raise Int8StateDictError(skey, f"shape {tuple(s.shape)}, expected {want} for weight "
                                           f"{tuple(w.shape)} with group_size={group_size}")
    elif not ((s.dim() == 1 and s.shape[0] == rows) or
              (s.dim() == 2 and s.shape[0] == rows and s.shape[1] > 0 and cols % s.shape[1] == 0)):
        raise Int8StateDictError(skey, f"shape {tuple(s.shape)} does not fit weight {tuple(w.shape)}: expected "
                                       f"({rows},) or ({rows}, in_features // group_size)")


def check_int8_state_dict(state_dict: dict, model: nn.Module | None = None) -> None:
    """Raise Int8StateDictError naming the first missing / wrong-dtype / wrong-shaped key.

    With `model`: every Int8Linear / Int8Embedding must find its int8 weight and a scale of the
    shape its group size implies. Without: every int8 `.weight` needs a fitting `.weight_scale`,
    and no `.weight_scale` may lack its int8 weight.
    """
    if model is not None:
        for fqn, module in model.named_modules():
            if isinstance(module, _Int8Base):
                prefix = f"{fqn}." if fqn else ""
                _check_entry(state_dict, prefix, tuple(module.weight.shape), module.group_size, require=True)
        return
    for key in sorted(state_dict):
        if key.endswith(".weight_scale") or key == "weight_scale":
            wkey = key[: -len("weight_scale")] + "weight"
            if wkey not in state_dict or state_dict[wkey].dtype != torch.int8:
                found = "missing" if wkey not in state_dict else f"of dtype {state_dict[wkey].dtype}"
                raise Int8StateDictError(key, f"scale without its int8 weight ({wkey!r} is {found})")
        elif (key.endswith(".weight") or key == "weight") and state_dict[key].dtype == torch.int8:
            _check_entry(state_dict, key[: -len("weight")], None, None, require=True)

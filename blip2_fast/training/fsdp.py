"""FSDP for the trainable part (`distributed: fsdp`), with PyTorch's per-parameter sharding
(`torch.distributed.fsdp.fully_shard`, "FSDP2").

Units: the (frozen) image encoder, and the root: the Q-Former, query tokens, projections, heads
and the LLM (whose input embeddings are looked up outside its forward, where a unit of its own
would not be gathered). Each rank keeps 1/world of each unit's parameters, gradients and
AdamW moments between steps; a unit's full weights exist only while it runs. The Q-Former is one
unit, not one per layer, because its image K/V are computed by a method (`qformer.image_kv`,
shared by the query pass, ITM and ITG) outside any layer's forward, where FSDP would not have
gathered a per-layer unit's weights. The Q-Former is ~100M parameters: gathering it whole costs
little next to the sharded optimiser state, which is what FSDP saves here.

Checkpoints stay in the single-process layout (`full_state`): full, unsharded tensors gathered
with `torch.distributed.checkpoint.state_dict`, so a run saved with FSDP resumes with FSDP at the
same world size and exports exactly like a DDP run. Gathering is collective: every rank calls it.
"""
from __future__ import annotations

import torch
from torch import nn


def _units(model: nn.Module) -> list[nn.Module]:
    inner = getattr(model, "model", model)  # Blip2Stage2 wraps the model; Blip2Stage1 is it
    return [inner.vision_model]


def _average_grad(p: torch.Tensor) -> None:
    import torch.distributed as dist
    dist.all_reduce(p.grad)  # SUM: gloo has no AVG
    p.grad.div_(dist.get_world_size())


def wrap_fsdp(model: nn.Module, device: torch.device) -> nn.Module:
    from torch.distributed.fsdp import fully_shard

    for unit in _units(model):
        fully_shard(unit)
    # FSDP cannot shard 0-d parameters (stage 1's temperature): keep them whole and average their
    # gradients by hand, as DDP would (linear, so also right under gradient accumulation)
    scalars = {p for p in model.parameters() if p.dim() == 0}
    for p in scalars:
        if p.requires_grad:
            p.register_post_accumulate_grad_hook(_average_grad)
    fully_shard(model, ignored_params=scalars or None)
    return model


def is_fsdp(model: nn.Module) -> bool:
    from torch.distributed.fsdp import FSDPModule
    return isinstance(model, FSDPModule)


def _prefix(model: nn.Module) -> str:
    return "model." if isinstance(getattr(model, "model", None), nn.Module) else ""


def full_state(model: nn.Module, optimizer: torch.optim.Optimizer | None, names: set[str]) -> tuple[dict, dict | None]:
    """(trainable tensors by checkpoint key, full optimiser state or None), on every rank, on the CPU."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict, get_state_dict

    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    if optimizer is None:
        model_state, optim_state = get_model_state_dict(model, options=options), None
    else:
        model_state, optim_state = get_state_dict(model, optimizer, options=options)
    prefix = _prefix(model)
    trainable = {k[len(prefix):]: v for k, v in model_state.items() if k[len(prefix):] in names}
    return trainable, optim_state


def load_full_state(model: nn.Module, optimizer: torch.optim.Optimizer, trainable: dict, optim_state: dict) -> None:
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_state_dict

    prefix = _prefix(model)
    set_state_dict(model, optimizer, model_state_dict={prefix + k: v for k, v in trainable.items()},
                   optim_state_dict=optim_state, options=StateDictOptions(full_state_dict=True, strict=False))


__all__ = ["wrap_fsdp", "is_fsdp", "full_state", "load_full_state"]

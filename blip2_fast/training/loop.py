"""The training loop: explicit and short, the same for every stage (the stage lives in `tasks`).

One optimiser step = `grad_accum` micro-batches of `batch_size` per process:
  lr from the warm-up + cosine schedule -> forward under autocast (bf16, or fp16 with loss
  scaling) -> backward (DDP synchronises gradients on the last micro-batch only) -> non-finite
  guard -> optional clipping -> AdamW step.
The guard costs one host synchronisation per optimiser step (the same one GradScaler makes):
a step whose gradients are not finite is skipped and counted, and a warning names it. Losses are
accumulated on the device and read only every `log_every` steps.

Exact resume: the checkpoint holds the step, weights, optimiser, scaler, sampler position and all
random generators; augmentation depends only on (seed, epoch, sample index); the DataLoader draws
its worker seeds from its own generator (not the global one), so a resumed run consumes random
numbers exactly as the uninterrupted one did.

Distributed: launched by torchrun (WORLD_SIZE set) or inside an initialised process group, the
model is wrapped in DDP (NCCL on GPUs, gloo on CPUs); each rank reads its shard of every global
batch. `distributed: fsdp` shards the trainable part with FSDP instead.

The output folder: rank 0 holds a lock on <out>/.lock for the whole run (a second run there is
refused), removes what killed saves left in <out>/checkpoints, and on resume cuts metrics.jsonl
back to the resumed step. SIGINT / SIGTERM end the run after the current step, with a checkpoint
(`run_guard.StopSignals`; every rank agrees on the step to stop at).
"""
from __future__ import annotations

import contextlib
import logging
import math
import os
import time

import torch
import torch.distributed as dist

from .checkpoint import FORMAT, check_training_signature, rng_state, save_checkpoint, set_rng_state, training_signature
from .data_sources import DataError
from .metrics import MetricsLogger, peak_memory_mb
from .optim import WarmupCosine, build_optimizer
from .resume import check_data_size, checkpoint_folder, cut_metrics, remove_orphans, resume_point
from .run_guard import OutputLock, StopSignals
from .train_config import TrainConfig

log = logging.getLogger("blip2_fast.train")
LOSS_KEYS = ("loss", "loss_itc", "loss_itm", "loss_itg")


class Run:
    """Process-group facts: rank, world size, device."""

    def __init__(self, cfg: TrainConfig):
        env_world = int(os.environ.get("WORLD_SIZE", "1"))
        want = cfg.distributed != "none" and (env_world > 1 or (dist.is_available() and dist.is_initialized()))
        cuda = torch.cuda.is_available() and (cfg.device is None or cfg.device.startswith("cuda"))
        if want and not dist.is_initialized():
            dist.init_process_group("nccl" if cuda else "gloo")
        self.distributed = want
        self.rank = dist.get_rank() if want else 0
        self.world = dist.get_world_size() if want else 1
        local = int(os.environ.get("LOCAL_RANK", self.rank if want else 0))
        if cfg.device:
            self.device = torch.device(cfg.device)
        else:
            self.device = torch.device(f"cuda:{local}" if cuda else "cpu")
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)

    @property
    def main(self) -> bool:
        return self.rank == 0


def _autocast(cfg: TrainConfig, device: torch.device):
    if cfg.precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=torch.bfloat16 if cfg.precision == "bf16" else torch.float16)


def _wrap(model: torch.nn.Module, cfg: TrainConfig, run: Run) -> torch.nn.Module:
    if not run.distributed:
        return model
    if cfg.distributed == "fsdp":
        from .fsdp import wrap_fsdp
        return wrap_fsdp(model, run.device)
    from torch.nn.parallel import DistributedDataParallel as DDP
    all_used = cfg.stage != "1" or (cfg.use_itc and cfg.use_itm and cfg.use_itg)
    return DDP(model, device_ids=[run.device.index] if run.device.type == "cuda" else None,
               find_unused_parameters=not all_used)


def _build_data(cfg: TrainConfig, task, run: Run):
    from ..images import ImageSpec
    from .data import ImageTransform, PairDataset, ResumableSampler, TextCollator, make_loader, read_records

    kind = "caption" if cfg.stage != "vqa" else "vqa+caption" if cfg.vqa_captions else "vqa"
    records, skips = read_records(cfg.data, task=kind)
    if skips.total:
        skips.log(log)
    if len(records) < cfg.batch_size * run.world:
        per = f" on each of {run.world} processes" if run.world > 1 else ""
        raise DataError(f"--batch-size {cfg.batch_size}{per} is larger than the data set ({len(records)} usable "
                        f"records): lower --batch-size or add data")
    spec = ImageSpec.from_folder(task.folder, task.image_size)
    size = cfg.image_size or task.image_size
    transform = ImageTransform(size, train=cfg.augment, hflip=cfg.hflip, mean=spec.image_mean, std=spec.image_std)
    dataset = PairDataset(records, transform, seed=cfg.seed)
    sampler = ResumableSampler(len(dataset), seed=cfg.seed, shuffle=True, rank=run.rank, world_size=run.world,
                               drop_last=True, batch_size=cfg.batch_size)
    loader = make_loader(dataset, sampler, cfg.batch_size, num_workers=cfg.num_workers, collate_fn=TextCollator(),
                         pin_memory=run.device.type == "cuda")
    return dataset, sampler, loader, skips.total


class Batches:
    """Endless micro-batches across epochs; the sampler position is advanced only for batches
    actually trained on (a DataLoader prefetches ahead)."""

    def __init__(self, dataset, sampler, loader):
        self.dataset, self.sampler, self.loader = dataset, sampler, loader
        self.it = None

    def next(self) -> dict:
        for _ in range(2):
            if self.it is None:
                self.dataset.set_epoch(self.sampler.state_dict()["epoch"])
                self.it = iter(self.loader)
            try:
                batch = next(self.it)
            except StopIteration:
                self.it = None
                self.sampler.set_epoch(self.sampler.state_dict()["epoch"] + 1)
                continue
            self.sampler.advance(len(batch["texts"]))
            return batch
        raise RuntimeError("the data set yields no full batch: fewer samples per process than batch_size")


def _to_device(kwargs: dict, device: torch.device) -> dict:
    return {k: v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v for k, v in kwargs.items()}


def _grads_finite(params, sharded: bool = False) -> bool:
    """All gradients finite, on every rank (with FSDP each rank checks its own shards)."""
    grads = [g.to_local() if hasattr(g, "to_local") else g for g in (p.grad for p in params) if g is not None]
    ok = torch.isfinite(torch.stack(torch._foreach_norm(grads))).all() if grads else torch.tensor(True)
    if sharded:
        ok = ok.to(torch.int32)
        dist.all_reduce(ok, op=dist.ReduceOp.MIN)
    return bool(ok)  # the one host sync per step


def train(cfg: TrainConfig, stop_after_step: int | None = None, on_start=None) -> dict:
    """Run (or resume) training as `cfg` says; returns a summary. `stop_after_step` ends the run
    early after that step's checkpoint (what a preempted job looks like, for tests). `on_start`
    is called on rank 0 with a dict describing the run (model, data, steps, batch, precision,
    output folder, resume point) before the first step."""
    run = Run(cfg)
    lock = OutputLock(cfg.out).acquire() if run.main else None
    try:
        return _train(cfg, run, stop_after_step, on_start)
    finally:
        if lock is not None:
            lock.release()


def _train(cfg: TrainConfig, run: Run, stop_after_step: int | None, on_start) -> dict:
    from tqdm import tqdm

    from .tasks import build_task

    ckpt_dir = checkpoint_folder(cfg.out)
    if run.main and os.path.isdir(ckpt_dir):
        remove_orphans(ckpt_dir)  # safe now: the lock says no other run is writing here
    if cfg.deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True, warn_only=True)
    torch.manual_seed(cfg.seed)  # identical initialisation on every rank (DDP also broadcasts it)
    task = build_task(cfg, run.device)
    dataset, sampler, loader, skipped_records = _build_data(cfg, task, run)
    schedule = WarmupCosine(cfg.lr, cfg.steps, cfg.warmup_steps, cfg.warmup_lr, cfg.min_lr)
    scaler = torch.amp.GradScaler(run.device.type, enabled=cfg.precision == "fp16")
    generators = {"negatives": torch.Generator(run.device).manual_seed(cfg.seed * 1000 + run.rank),
                  **getattr(task, "generators", {})}
    signature = training_signature({"stage": cfg.stage, **task.config.to_hf_dict()}, task.trainable_state_dict())
    # read and checked before the feature cache is built: a refused resume fails in seconds
    resume, state = resume_point(cfg)
    if state is not None:
        check_training_signature(state["fingerprint"], signature, resume)
        check_data_size(state, len(dataset), resume)
    if hasattr(task, "prepare"):
        task.prepare(dataset, run)
    torch.manual_seed(cfg.seed + run.rank)  # dropout differs per rank from here on
    counters = {"skipped_steps": 0, "skipped_records": skipped_records, "truncated_texts": 0}

    start = 0
    if state is not None:
        task.load_trainable_state_dict(state["trainable"])  # before wrapping: plain tensors

    model = _wrap(task.model, cfg, run)
    sharded = cfg.distributed == "fsdp" and run.distributed
    # built after wrapping: FSDP replaces the parameters by sharded ones
    named = task.trainable_parameters()
    params = [p for _, p in named]
    optimizer = build_optimizer(named, cfg.lr, cfg.weight_decay, cfg.betas)
    if state is not None:
        if sharded:
            from .fsdp import load_full_state
            load_full_state(model, optimizer, state["trainable"], state["optimizer"])
        else:
            optimizer.load_state_dict(state["optimizer"])
        scaler.load_state_dict(state["scaler"])
        sampler.load_state_dict(state["sampler"])
        rngs = state["rng"]
        if len(rngs) != run.world:
            raise ValueError(f"{resume}: saved by {len(rngs)} processes, resumed with {run.world}; "
                             f"exact resume needs the same number")
        set_rng_state(rngs[run.rank], generators)
        start, counters = state["step"], state["counters"]
        if run.main:
            log.info("resuming from %s: continuing after step %d of %d", resume, start, cfg.steps)
            cut_metrics(cfg.out, start)

    samples_per_step = cfg.batch_size * cfg.grad_accum * run.world
    if run.main and on_start is not None:
        on_start({"stage": cfg.stage, "model": task.folder, "data": list(cfg.data), "records": len(dataset),
                  "skipped_records": skipped_records, "steps": cfg.steps, "start": start,
                  "batch_size": cfg.batch_size, "grad_accum": cfg.grad_accum, "world": run.world,
                  "global_batch": samples_per_step, "precision": cfg.precision, "device": str(run.device),
                  "lr": cfg.lr, "out": cfg.out, "save_every": cfg.save_every, "resume": resume,
                  "cache_features": cfg.cache_features})
    model.train()
    metrics = MetricsLogger(cfg.out, run.main, cfg.tensorboard, append=start > 0)
    batches = Batches(dataset, sampler, loader)
    bar = tqdm(total=cfg.steps, initial=start, desc=f"stage {cfg.stage}", unit="step",
               disable=not (cfg.progress and run.main), dynamic_ncols=True)
    sums = {}
    window_start, window_steps, last = time.perf_counter(), 0, {}
    done, stopped, exit_code = start, None, 0

    with StopSignals() as signals:
        for step in range(start, cfg.steps):
            lr = schedule.apply(optimizer, step)
            for micro in range(cfg.grad_accum):
                batch = batches.next()
                kwargs, truncated = task.inputs(batch, generators["negatives"])
                counters["truncated_texts"] += truncated
                counters["skipped_records"] += int(batch.get("skipped", 0))
                sync = micro == cfg.grad_accum - 1 or not hasattr(model, "no_sync")
                with contextlib.nullcontext() if sync else model.no_sync():
                    with _autocast(cfg, run.device):
                        out = model(**_to_device(kwargs, run.device))
                    scaler.scale(out["loss"] / cfg.grad_accum).backward()
                for k in LOSS_KEYS:
                    if k in out:
                        sums[k] = sums.get(k, 0) + out[k].detach().float() / cfg.grad_accum
            scaler.unscale_(optimizer)
            finite = _grads_finite(params, sharded)
            if finite and cfg.max_grad_norm:
                torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
            if cfg.precision == "fp16":
                scale = scaler.get_scale()
                scaler.step(optimizer)  # skips the step itself when gradients overflowed
                scaler.update()
            elif finite:
                optimizer.step()
            if not finite:
                counters["skipped_steps"] += 1
                log.warning("step %d skipped: non-finite gradients%s", step + 1,
                            f" (fp16 loss scale {scale:g} lowered)" if cfg.precision == "fp16" else "")
            optimizer.zero_grad(set_to_none=True)
            window_steps += 1
            done = step + 1
            bar.update(1)

            if done % cfg.log_every == 0 or done == cfg.steps:
                elapsed = time.perf_counter() - window_start
                if run.distributed:  # report the mean over ranks, not rank 0's share
                    for v in sums.values():
                        dist.all_reduce(v)
                    sums = {k: v / run.world for k, v in sums.items()}
                values = {k: v.item() / window_steps for k, v in sums.items()}  # log-time sync only
                last = {"step": done, "lr": lr, **values,
                        "samples_per_s": samples_per_step * window_steps / max(elapsed, 1e-9),
                        "peak_mem_mb": peak_memory_mb(run.device), **counters}
                metrics.write(last)
                bar.set_postfix(loss=f"{values.get('loss', math.nan):.4f}", lr=f"{lr:.2e}",
                                sps=f"{last['samples_per_s']:.1f}", mem=f"{last['peak_mem_mb']:.0f}MB")
                sums, window_start, window_steps = {}, time.perf_counter(), 0
            signalled = signals.requested(run.distributed, run.device) and done < cfg.steps
            stopping = signalled or (stop_after_step is not None and done >= stop_after_step)
            if done % cfg.save_every == 0 or done == cfg.steps or stopping:
                _save(cfg, run, task, model, optimizer, scaler, sampler, generators, done, counters, signature,
                      len(dataset))
            if signalled:
                stopped = signals.name or "a signal on another rank"
                exit_code = signals.exit_code or 128 + 15
            if stopping:
                break

    bar.close()
    metrics.close()
    exported = None
    complete = stopped is None and (stop_after_step is None or stop_after_step >= cfg.steps)
    if cfg.export and complete:
        trainable, _ = _trained_state(cfg, run, task, model, None)
        if run.main:
            from .export import export_folder
            exported = export_folder(task.folder, trainable, os.path.join(cfg.out, "model"), task.export_config())
    if run.distributed:
        dist.barrier()
    return {"last": last, "counters": counters, "exported": exported, "task": task, "step": done,
            "stopped": stopped, "exit_code": exit_code if stopped else 0,
            "checkpoint": os.path.join(ckpt_dir, "last.pt") if stopped else None}


def _trained_state(cfg, run, task, model, optimizer) -> tuple[dict, dict | None]:
    """Full trainable tensors (and the optimiser state) in the single-process layout."""
    if cfg.distributed == "fsdp" and run.distributed:
        from .fsdp import full_state
        return full_state(model, optimizer, set(task.trainable_state_dict()))  # collective
    return {k: v.detach().cpu() for k, v in task.trainable_state_dict().items()}, \
        optimizer.state_dict() if optimizer is not None else None


def _save(cfg, run, task, model, optimizer, scaler, sampler, generators, step, counters, signature,
          data_size: int) -> None:
    rng = rng_state(generators)
    rngs = [None] * run.world if run.distributed else [rng]
    if run.distributed:
        dist.all_gather_object(rngs, rng)
    trainable, optim_state = _trained_state(cfg, run, task, model, optimizer)
    if not run.main:
        return
    state = {"format": FORMAT, "fingerprint": signature, "step": step, "config": cfg.to_dict(),
             "trainable": trainable,
             "optimizer": optim_state, "scaler": scaler.state_dict(), "sampler": sampler.state_dict(),
             "rng": rngs, "counters": dict(counters), "data_size": data_size}
    save_checkpoint(state, checkpoint_folder(cfg.out))


__all__ = ["train", "Run"]

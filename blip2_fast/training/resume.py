"""Where a run resumes from, and the tidying a resumed or restarted run does first.

- `resume_point(cfg)`: the checkpoint `--resume` names (a file; a folder of checkpoints or a run
  folder; "auto": <out>/checkpoints when it holds one), read. In a folder, `last.pt` is tried
  first and `previous.pt` when `last.pt` cannot be read (a disk fault, a copy cut short), with a
  warning saying so; a file named explicitly has no fallback. A checkpoint that is refused
  (unsafe, another model's) is never skipped over: that is an error, not damage.
- `remove_orphans(folder)`: temporary files of saves that were killed (`.NAME.tmp-*`).
- `cut_metrics(out, step)`: metrics.jsonl back to the resumed step, so that the rows of steps
  trained after the last checkpoint (and trained again now) do not appear twice.
- `check_data_size`: the sampler's saved position means something only over the same records.
"""
from __future__ import annotations

import glob
import json
import logging
import os

from ..atomic import write_file
from ..loading import CheckpointError
from .checkpoint import LAST, PREVIOUS, DamagedCheckpointError, load_checkpoint
from .data_sources import DataError
from .train_config import TrainConfig

log = logging.getLogger("blip2_fast.train")


def checkpoint_folder(out: str) -> str:
    return os.path.join(out, "checkpoints")


def _candidates(cfg: TrainConfig) -> tuple[list[str], bool]:
    """(checkpoint paths to try in order, whether finding none means a fresh start)."""
    if cfg.resume == "auto":
        folder = checkpoint_folder(cfg.out)
        return [os.path.join(folder, LAST), os.path.join(folder, PREVIOUS)], True
    if os.path.isdir(cfg.resume):
        run_checkpoints = checkpoint_folder(cfg.resume)
        folder = run_checkpoints if os.path.isdir(run_checkpoints) else cfg.resume
        return [os.path.join(folder, LAST), os.path.join(folder, PREVIOUS)], False
    return [cfg.resume], False


def resume_point(cfg: TrainConfig) -> tuple[str | None, dict | None]:
    """(path, checkpoint) to resume from, or (None, None) for a fresh start."""
    if not cfg.resume:
        return None, None
    paths, optional = _candidates(cfg)
    existing = [p for p in paths if os.path.exists(p)]
    if not existing:
        if optional:
            return None, None
        raise CheckpointError(f"--resume {cfg.resume}: no checkpoint there ({' or '.join(paths)})")
    for i, path in enumerate(existing):
        try:
            return path, load_checkpoint(path)
        except DamagedCheckpointError as err:
            if i + 1 == len(existing):
                raise
            log.warning("%s; resuming from the previous checkpoint %s instead", err, existing[i + 1])
    raise AssertionError("unreachable: the loop returns or raises")


def check_data_size(state: dict, size: int, path: str) -> None:
    saved = state.get("data_size")
    if saved is not None and saved != size:
        raise DataError(f"{path}: saved while training on {saved} records, but --data now gives {size}: an exact "
                        f"resume needs the same data (restore it, or start a new run: another --out, or no --resume)")


def remove_orphans(folder: str) -> list[str]:
    """Delete temporary files that killed saves left in `folder`; returns their paths."""
    orphans = sorted(glob.glob(os.path.join(folder, ".*.tmp-*")))
    for path in orphans:
        os.remove(path)
        log.info("removed %s, left by a save that did not finish", path)
    return orphans


def cut_metrics(out: str, step: int) -> int:
    """Keep only metrics.jsonl rows up to `step` (and drop a row cut short by a kill); returns
    how many rows were dropped."""
    path = os.path.join(out, "metrics.jsonl")
    if not os.path.exists(path):
        return 0
    kept, dropped = [], 0
    with open(path, encoding="utf-8") as f:
        for line in f:
            try:
                row = json.loads(line)
                keep = int(row["step"]) <= step
            except (ValueError, KeyError, TypeError):  # a line a kill cut short
                keep = False
            if keep:
                kept.append(line if line.endswith("\n") else line + "\n")
            elif line.strip():
                dropped += 1
    if dropped:
        def write(tmp: str) -> None:
            with open(tmp, "w", encoding="utf-8") as f:
                f.writelines(kept)

        write_file(path, write)
        log.info("metrics.jsonl: %d rows after step %d dropped (those steps are trained again)", dropped, step)
    return dropped


__all__ = ["checkpoint_folder", "resume_point", "check_data_size", "remove_orphans", "cut_metrics"]

"""Training metrics: one JSON object per line in <out>/metrics.jsonl, TensorBoard when asked and
installed, and the numbers shown on the progress bar. Only rank 0 writes."""
from __future__ import annotations

import json
import logging
import os
import resource
import sys

import torch

from ..atomic import raise_if_disk_full

log = logging.getLogger("blip2_fast.train")


def peak_memory_mb(device: torch.device) -> float:
    """Peak memory of this process: CUDA allocator peak on a GPU, peak resident set on the CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    return rss / (2**20 if sys.platform == "darwin" else 2**10)


class MetricsLogger:
    def __init__(self, out_dir: str, enabled: bool, tensorboard: bool = False, append: bool = False):
        self.enabled = enabled
        self.path = os.path.join(out_dir, "metrics.jsonl")
        self.file = None
        self.writer = None
        if not enabled:
            return
        os.makedirs(out_dir, exist_ok=True)
        self.file = open(self.path, "a" if append else "w", encoding="utf-8")
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError as err:  # an optional extra: say so once and go on without it
                log.warning("tensorboard requested but not usable (%s); metrics go to %s only", err, self.path)
            else:
                self.writer = SummaryWriter(os.path.join(out_dir, "tensorboard"))

    def write(self, record: dict) -> None:
        if not self.enabled:
            return
        try:
            self.file.write(json.dumps(record) + "\n")
            self.file.flush()
        except OSError as err:
            raise_if_disk_full(err, self.path)
            raise
        if self.writer is not None:
            for key, value in record.items():
                if key != "step" and isinstance(value, (int, float)):
                    self.writer.add_scalar(key, value, record["step"])

    def close(self) -> None:
        if self.file is not None:
            self.file.close()
        if self.writer is not None:
            self.writer.close()


def read_metrics(out_dir: str) -> list[dict]:
    with open(os.path.join(out_dir, "metrics.jsonl"), encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


__all__ = ["MetricsLogger", "peak_memory_mb", "read_metrics"]

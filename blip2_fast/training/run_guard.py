"""What keeps a run's output folder consistent: one run per folder, and a clean stop on signals.

- `OutputLock`: an exclusive `fcntl.flock` on <out>/.lock, held for the whole run by the process
  that writes (rank 0). A second run on the same --out is refused at once with a `ConfigError`
  naming the holder's pid, instead of two runs overwriting each other's checkpoints. The lock
  goes with the process (the kernel drops it at exit, even after kill -9), so a stale lock file
  never blocks anything; the file itself stays.
- `StopSignals`: while installed, SIGINT and SIGTERM only ask the loop to stop; it finishes the
  step it is in, saves a checkpoint and returns, and the command exits with 128 + the signal
  number (130, 143). A second signal stops at once, without a checkpoint.
"""
from __future__ import annotations

import logging
import os
import signal
import threading

from ..config import ConfigError

log = logging.getLogger("blip2_fast.train")
LOCK_NAME = ".lock"


class OutputLock:
    def __init__(self, out: str):
        self.path = os.path.join(out, LOCK_NAME)
        self.fd: int | None = None

    def acquire(self) -> "OutputLock":
        try:
            import fcntl
        except ImportError:  # not POSIX: no advisory locks to take
            log.warning("cannot lock %s on this platform: make sure no other run uses this folder", self.path)
            return self
        os.makedirs(os.path.dirname(self.path), exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 64).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise ConfigError(f"--out {os.path.dirname(self.path)}: another training run (pid {holder}) is using this "
                              f"folder; wait for it to end or choose another --out (lock file {self.path})") from None
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        self.fd = fd
        return self

    def release(self) -> None:
        if self.fd is not None:
            os.close(self.fd)  # closing the descriptor drops the lock
            self.fd = None

    def __enter__(self) -> "OutputLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


class StopSignals:
    """Context manager: SIGINT / SIGTERM set `signum` instead of ending the process."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self):
        self.signum: int | None = None
        self._previous: dict[int, object] = {}

    def _handle(self, signum, frame) -> None:
        if self.signum is not None:  # asked twice: stop now
            self._restore()
            raise KeyboardInterrupt(f"second {signal.Signals(signum).name}: stopped without a checkpoint")
        self.signum = signum
        log.warning("%s received: finishing this step, then saving a checkpoint and stopping (send it again to "
                    "stop at once)", signal.Signals(signum).name)

    def _restore(self) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous = {}

    def __enter__(self) -> "StopSignals":
        # handlers can only be set from the main thread; elsewhere (a run inside a worker thread)
        # the signals keep their usual effect
        if threading.current_thread() is threading.main_thread():
            for signum in self.SIGNALS:
                self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        self._restore()

    def requested(self, distributed: bool = False, device=None) -> bool:
        """Whether a stop was asked for; across a process group, whether any rank was asked (all
        ranks must save and stop at the same step): one small all-reduce per call."""
        if not distributed:
            return self.signum is not None
        import torch
        import torch.distributed as dist

        flag = torch.tensor([int(self.signum is not None)], device=device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())

    @property
    def exit_code(self) -> int | None:
        return None if self.signum is None else 128 + self.signum

    @property
    def name(self) -> str | None:
        return None if self.signum is None else signal.Signals(self.signum).name


__all__ = ["OutputLock", "StopSignals", "LOCK_NAME"]

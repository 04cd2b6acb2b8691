"""One writer per run directory: an exclusive lock that the operating system releases when the
process ends, however it ends (`fcntl.flock` on RUN_DIR/.lock).

The lock file also says who holds it ("pid on host"), so that a second trainer can name the
holder. Readers (sampling, forecasting) never take it: orbax makes each step visible only once
it is complete, so reading the newest step while a run writes the next one is safe.
"""

from __future__ import annotations

import fcntl
import os
import socket
from pathlib import Path

from transformer_jax.errors import UserError

LOCK_NAME = ".lock"


class RunLock:
    """The exclusive lock on `run_dir`, held from `acquire()` until `release()` or the end of
    the process."""

    def __init__(self, run_dir: str | Path):
        self.run_dir = Path(run_dir)
        self._fd: int | None = None

    def acquire(self) -> RunLock:
        """Take the lock, or raise UserError naming the directory and the process holding it."""
        path = self.run_dir / LOCK_NAME
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)  # no O_TRUNC: the holder's name stays
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 200, 0).decode("utf-8", "replace").strip() or "another process"
            os.close(fd)
            raise UserError(f"run directory {self.run_dir} is in use by a training run "
                            f"(process {holder}); wait for it to end, or choose another "
                            "--run-dir") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()} on {socket.gethostname()}\n".encode(), 0)
        self._fd = fd
        return self

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing the descriptor releases the lock
            self._fd = None

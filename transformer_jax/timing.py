"""Where a program's seconds go: each phase of start-up logged as it ends (`--verbose`).

    [  2.41 s] imports: JAX, the model and the trainer (+2.41 s)

A line gives the seconds since the process started (Linux: from the kernel's record of its
start, so the interpreter's own start-up is counted; elsewhere since this module was
imported) and the phase's own seconds. The lines go to the `transformer_jax.timing` logger
at INFO level; `show()` prints them on standard error.
"""

from __future__ import annotations

import logging
import os
import sys
import time

log = logging.getLogger(__name__)


def _process_age() -> float:
    """Seconds since this process started: its start in clock ticks after boot (/proc) against
    the boot-time clock; 0 where either is missing."""
    try:
        with open("/proc/self/stat", "rb") as f:
            fields = f.read().rsplit(b")", 1)[1].split()  # the name may hold spaces
        started = int(fields[19]) / os.sysconf("SC_CLK_TCK")  # field 22, after pid and name
        return max(time.clock_gettime(time.CLOCK_BOOTTIME) - started, 0.0)
    except (OSError, ValueError, IndexError, AttributeError):
        return 0.0


_START = time.perf_counter() - _process_age()
_last = [_START]  # when the previous phase ended


def mark(phase: str) -> float:
    """Log that `phase` ended now; returns the seconds since the process started."""
    now = time.perf_counter()
    if log.isEnabledFor(logging.INFO):
        log.info("[%7.2f s] %s (+%.2f s)", now - _START, phase, now - _last[0])
    _last[0] = now
    return now - _START


def show() -> None:
    """Print the phases on standard error from now on (what --verbose does)."""
    if not log.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(message)s"))
        log.addHandler(handler)
    log.setLevel(logging.INFO)
    log.propagate = False

"""The start-up clock of --verbose: seconds since the process started, each phase's own."""

from __future__ import annotations

import logging
import re
import subprocess
import sys

from transformer_jax import timing


def test_mark_logs_the_seconds_since_the_start_and_the_phase_own(caplog):
    caplog.set_level(logging.INFO, logger="transformer_jax.timing")
    first = timing.mark("one")
    second = timing.mark("two")
    assert 0 < first <= second
    lines = [r.getMessage() for r in caplog.records]
    assert re.fullmatch(r"\[ *[\d.]+ s\] one \(\+[\d.]+ s\)", lines[0]), lines
    seconds, own = map(float, re.findall(r"[\d.]+", lines[1]))
    assert abs(seconds - second) < 0.006 and 0 <= own <= second - first + 0.006


def test_the_clock_starts_with_the_process_not_the_import():
    """A process that sleeps before importing the module: its first mark counts the sleep."""
    code = ("import time; time.sleep(0.6)\n"
            "from transformer_jax import timing\n"
            "print(timing.mark('x'))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True, timeout=60).stdout
    assert 0.6 <= float(out) < 10


def test_nothing_is_printed_unless_shown(capsys):
    timing.mark("quiet")
    assert capsys.readouterr().err == ""

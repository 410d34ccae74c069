"""Long-RL's answer grader, `mathruler.grader.grade_answer`, with a time limit.

sympy can run forever on short inputs ("9**9**9", "999999999!" against "B" hang Long-RL's reward),
and a model's reply must never stall a training step. So grade_answer runs in one persistent
helper process per process (`python -c`, started on first use, replaced after a timeout or a
crash): a call past `GRADE_TIMEOUT_S` is graded False. Short (given, truth) pairs are cached. If
no helper can start, or with `GRADE_TIMEOUT_S = None`, grade_answer runs in this process (same
verdicts, no time limit).
"""

from __future__ import annotations

import atexit
import functools
import json
import os
import select
import subprocess
import sys
import threading
import time
import warnings

# Seconds one grade_answer call may take before it counts as False (None: in-process, no limit).
GRADE_TIMEOUT_S: float | None = 5.0
_HELPER_START_TIMEOUT_S = 120.0
_CACHE_MAX_CHARS = 512           # (given, truth) pairs up to this many characters are cached


class _GradeTimeout(Exception):
    """grade_answer did not answer within `GRADE_TIMEOUT_S` (or its helper died); never cached."""


_HELPER = r"""
import json, sys
from mathruler.grader import grade_answer
out = sys.stdout.buffer
out.write(b"ready\n"); out.flush()
for line in sys.stdin.buffer:
    try:
        ok = bool(grade_answer(*json.loads(line)))
    except Exception:
        ok = False
    out.write(b"1\n" if ok else b"0\n"); out.flush()
"""


class _Grader:
    """A persistent `python -c` helper running grade_answer, killed and replaced when a call runs
    past its time; one call at a time, a fresh helper in a forked child. It exits with its stdin."""

    def __init__(self):
        self.lock, self.proc, self.pid, self.broken = threading.Lock(), None, -1, False
        atexit.register(self.close)

    def close(self) -> None:
        proc, self.proc = self.proc, None
        if proc is not None and self.pid == os.getpid():
            proc.kill()
            proc.wait()

    def _line(self, timeout: float) -> bytes:
        fd, deadline, buf = self.proc.stdout.fileno(), time.monotonic() + timeout, b""
        while not buf.endswith(b"\n"):
            remaining = deadline - time.monotonic()
            if remaining <= 0 or not select.select([fd], [], [], remaining)[0]:
                raise _GradeTimeout
            chunk = os.read(fd, 64)
            if not chunk:
                raise _GradeTimeout                    # the helper died
            buf += chunk
        return buf

    def grade(self, given: str, truth: str, timeout: float) -> bool | None:
        """grade_answer's verdict, or None when no helper can be started (grade in-process)."""
        with self.lock:
            if self.broken:
                return None
            if self.proc is not None and self.pid != os.getpid():
                self.proc = None                       # the parent's helper is the parent's
            if self.proc is None:
                try:
                    self.proc = subprocess.Popen([sys.executable, "-c", _HELPER], stdin=subprocess.PIPE,
                                                 stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                                                 bufsize=0)
                    self.pid = os.getpid()
                    if self._line(_HELPER_START_TIMEOUT_S) != b"ready\n":
                        raise OSError("unexpected greeting")
                except Exception as e:  # noqa: BLE001
                    self.close()
                    self.broken = True
                    warnings.warn(f"lvr_jax.rl.rewards: no grading helper ({e!r}); grading in-process "
                                  "without a time limit", RuntimeWarning, stacklevel=2)
                    return None
            try:
                self.proc.stdin.write(json.dumps([given, truth]).encode() + b"\n")
                return self._line(timeout) == b"1\n"
            except Exception:
                self.close()                           # too slow or dead: a fresh helper next time
                raise _GradeTimeout from None


_GRADER = _Grader()


def _grade_now(given: str, truth: str) -> bool:
    """grade_answer(given, truth), False on any exception (as r1v); _GradeTimeout when too slow."""
    if GRADE_TIMEOUT_S is not None:
        verdict = _GRADER.grade(given, truth, GRADE_TIMEOUT_S)
        if verdict is not None:
            return verdict
    from mathruler.grader import grade_answer
    try:
        return bool(grade_answer(given, truth))
    except Exception:  # noqa: BLE001
        return False


_grade_cached = functools.lru_cache(maxsize=1 << 16)(_grade_now)


def mathruler_grade(given: str, truth: str) -> bool:
    """`mathruler.grader.grade_answer(given, truth)`; False on any exception or after
    `GRADE_TIMEOUT_S`. Deterministic, so short pairs are cached."""
    try:
        if len(given) + len(truth) <= _CACHE_MAX_CHARS:
            return _grade_cached(given, truth)
        return _grade_now(given, truth)
    except _GradeTimeout:
        return False

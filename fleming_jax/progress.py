"""Progress lines for long work: how far, how fast, and when it ends."""

from __future__ import annotations

import time
from typing import Callable


def duration(seconds: float) -> str:
    """'45s', '12m05s', '3h02m'."""
    seconds = int(round(seconds))
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"


def eta(done: int, total: int, seconds: float) -> str:
    """'ETA 12m05s' at the pace of the `done` units that took `seconds`; '' when nothing is
    done yet or everything is."""
    if done <= 0 or done >= total:
        return ""
    return "ETA " + duration(seconds / done * (total - done))


class Progress:
    """`log('<done>/<total> <what> (<rate>/s, ETA ...)')` at most every `every` seconds, and at
    the end; the pace counts from the first `update`'s starting point."""

    def __init__(self, total: int, what: str, log: Callable[[str], None], every: float = 10.0, start: int = 0):
        self.total, self.what, self.log, self.every, self.start = total, what, log, every, start
        self.t0 = self.last = time.perf_counter()

    def update(self, done: int) -> None:
        now = time.perf_counter()
        if now - self.last < self.every and done < self.total:
            return
        self.last = now
        rate = (done - self.start) / max(now - self.t0, 1e-9)
        left = eta(done - self.start, self.total - self.start, now - self.t0)
        self.log(f"{done}/{self.total} {self.what} ({rate:.1f}/s" + (f", {left})" if left else ")"))

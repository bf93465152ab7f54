"""Preemption that every host agrees on.

A Cloud TPU VM (or a spot GPU node) gets SIGTERM about 30 s before it is taken away, and on a
multi-host slice the hosts need not get it at the same moment, or at all. A host that saved and
left on its own while the others kept rolling out would leave them waiting in the next
collective. So SIGTERM only sets this host's flag, and the flags are read at points every host
passes in the same order (`check`): between training steps, between the rollout engine's decode
chunks, between the chunks of a pool's scoring pass and of distillation. There the hosts OR
their flags in one tiny all-gather, so all of them see the same answer at the same point, stop
together, save the same step and exit 0 (`tpu/run.sh` then reruns the job, which resumes).
"""

from __future__ import annotations

import contextlib
import signal
import threading

import numpy as np


class Preempted(BaseException):
    """Raised at an agreed check point once any host got SIGTERM. A BaseException (as
    KeyboardInterrupt) so that no `except Exception` on the way swallows it."""


_flag: list[bool] | None = None  # this host's SIGTERM flag while a job listens for it
_deferring = threading.local()  # threads whose checks wait for the main thread's (see `deferred`)


@contextlib.contextmanager
def listening():
    """SIGTERM sets this host's flag instead of killing the process, for the duration
    (re-entrant: an inner `listening` leaves the outer one in charge)."""
    global _flag
    if _flag is not None:
        yield
        return
    _flag = []
    previous = signal.signal(signal.SIGTERM, lambda *_: _flag.append(True))
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)
        _flag = None


def requested() -> bool:
    """Whether any host got SIGTERM. With several processes this is a collective: every host
    must call it at the same point of the program (the caller's loops run in lockstep)."""
    if _flag is None:
        return False
    import jax

    mine = bool(_flag)
    if jax.process_count() == 1:
        return mine
    from fleming_jax import parallel

    return bool(np.any(parallel.gather_hosts(np.int32(mine))))


@contextlib.contextmanager
def deferred():
    """`check` does nothing in this thread for the duration: RL's rollouts sampled ahead of
    the update finish, and the main thread's checks stop the run."""
    _deferring.on = True
    try:
        yield
    finally:
        _deferring.on = False


def check(where: str) -> None:
    """Raises `Preempted` on every host at once when any host got SIGTERM."""
    if getattr(_deferring, "on", False):
        return
    if requested():
        raise Preempted(f"SIGTERM during {where}")

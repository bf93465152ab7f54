"""The one save/restore of train state and the one training-loop skeleton, shared by SFT and RL.

`Checkpoints` writes `<workdir>/checkpoints/<step>/` with items `params` (a pure dict, what
`checkpoint.restore_model` and `--config.model.init_from` read), `opt_state`, `meta` (JSON:
the step plus what the trainer adds) and any extra items a trainer names (SFT: `data`, the
grain iterator). `restore` places every leaf, the step included, in the train state's
shardings, and walks back from the newest step to the newest one that restores: a damaged
step (a file missing, truncated or undecodable, no or another step's meta), as any host
finds it, is moved by process 0 to `<workdir>/checkpoints_skipped/<step>-<time>/` (gs://
too) with one line saying why, never deleted, so a good step is never overwritten and the
run continues as the uninterrupted one would. Any other failure (a storage outage, memory,
a config for another model) stops every host in one line and moves nothing.

`train_loop` is the skeleton around a trainer's `one_step`: periodic saves, metrics rows
(`metrics.jsonl` without the rows a resumed run repeats), `on_step`, an early stop, and
preemption: when any host got SIGTERM (`fleming_jax.preemption`), every host saves the last
finished step and `Preempted` goes up to `main.py`, which exits 0.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import sys
import time
from typing import Callable

import jax
import numpy as np
import orbax.checkpoint as ocp
from flax import nnx

from fleming_jax import parallel, paths, preemption
from fleming_jax.train import checkpoint
from fleming_jax.train import state as statelib
from fleming_jax.train.metrics import MetricsWriter


class Checkpoints:
    """Save and restore a TrainState plus a JSON `meta` and extra items."""

    def __init__(self, workdir: str, keep: int, shardings: statelib.TrainState, log: Callable[[str], None],
                 use_async: bool = True, **extra_handlers):
        self.workdir, self.shardings, self.log = workdir, shardings, log
        self.manager = checkpoint.manager(workdir, keep, use_async, **extra_handlers)
        self.reader = ocp.CompositeCheckpointHandler(**checkpoint.item_handlers(**extra_handlers))
        self.directory = self.manager.directory

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def save(self, step: int, state: statelib.TrainState, meta: dict, **extra_args) -> None:
        self.manager.save(step, args=ocp.args.Composite(
            params=ocp.args.StandardSave(nnx.to_pure_dict(state.params)),
            opt_state=ocp.args.StandardSave(state.opt_state),
            meta=ocp.args.JsonSave(dict(meta, step=step)), **extra_args), force=True)

    def restore(self, state: statelib.TrainState, extra_args: Callable[[], dict] = dict):
        """(step, state, meta) of the newest step that restores, or (0, state, None).

        Every host tries the step and they agree (`parallel.gather_hosts`): a step damaged on any host is
        moved aside on all (`_skip`); any other failure (storage, memory, a config for
        another model, a bug) stops every host and moves nothing."""
        abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), state)
        for step in sorted(self.manager.all_steps(), reverse=True):
            got = self._read(step, abstract, extra_args())
            if isinstance(got, str):
                self._skip(step, got)
                continue
            nnx.replace_by_pure_dict(state.params, got["params"])
            restored = statelib.TrainState(step=jax.device_put(np.int32(step), self.shardings.step),
                                           params=state.params, opt_state=got["opt_state"], frozen=state.frozen)
            self.log(f"resumed from {self.directory}/{step}")
            return step, restored, got
        return 0, state, None

    def _read(self, step: int, abstract: statelib.TrainState, extra: dict):
        """The restored items of `step`, or why its files are damaged (a str) on some host.

        Read through the item handlers, not the manager: orbax's restore ends in a barrier
        that a host whose read failed never reaches."""
        directory = self.directory / str(step)
        got = why = error = None
        try:
            with _quiet():
                got = self.reader.restore(directory, args=ocp.args.Composite(
                    params=ocp.args.StandardRestore(nnx.to_pure_dict(abstract.params)),
                    opt_state=ocp.args.StandardRestore(abstract.opt_state),
                    meta=ocp.args.JsonRestore(), **extra))
            if got["meta"] is None or got["meta"].get("step") != step:
                why = f"its meta item says step {(got['meta'] or {}).get('step')}"
        except Exception as e:  # noqa: BLE001 -- sorted here; every host must reach the verdicts' gather
            error = self._config_mismatch(directory, abstract)
            if error is None:
                why = damaged(e)
                error = None if why else unreadable(directory, e)
        verdicts = list(parallel.gather_hosts(np.int32(2 if error is not None else 1 if why else 0)))
        if why and not parallel.is_main_process():  # process 0 logs the step; this host's reason goes here
            print(f"[process {jax.process_index()}] checkpoint {directory} is damaged: {why}", file=sys.stderr,
                  flush=True)
        if error is not None:
            raise error
        if 2 in verdicts:
            raise RestoreFailed(f"process {verdicts.index(2)} could not read checkpoint {directory} "
                                f"(its log says why); nothing was moved aside")
        if 1 in verdicts:
            return why or f"damaged as process {verdicts.index(1)} read it; its log says why"
        return got

    def _config_mismatch(self, directory, abstract) -> ValueError | None:
        """A ValueError when the step's params have other names or shapes than this config's."""
        try:
            with _quiet():
                saved = self.reader.metadata(directory).item_metadata["params"].tree
        except Exception:  # noqa: BLE001 -- unreadable metadata: the restore's own error decides
            return None
        diff = checkpoint.shape_mismatch(saved, nnx.to_pure_dict(abstract.params))
        return diff and ValueError(
            f"checkpoint {directory} holds a different model than this config ({diff}): run with the config "
            f"(preset and model sizes) that wrote it, or give this config its own --workdir")

    def _skip(self, step: int, why: str) -> None:
        target = paths.join(self.workdir, "checkpoints_skipped", f"{step}-{int(time.time())}")
        moved = None
        if parallel.is_main_process():
            try:
                paths.move(str(self.directory / str(step)), target)
            except OSError as e:
                moved = e
        if 1 in parallel.gather_hosts(np.int32(moved is not None)):
            raise moved or RestoreFailed(f"process 0 could not move damaged checkpoint step {step} aside "
                                         f"(its log says why)")
        paths.forget_listings(str(self.directory / str(step)))  # process 0 moved it: no host may still list it
        self.manager.reload()
        self.log(f"checkpoint step {step} in {self.directory} does not restore ({why}); moved it to {target}, "
                 f"trying the previous step")

    def wait(self) -> None:
        self.manager.wait_until_finished()


def train_loop(*, start: int, total: int, one_step: Callable[[int], dict | None], save: Callable[[int], None],
               every: int, ckpt: Checkpoints, workdir: str, log: Callable[[str], None],
               on_step: Callable[[int], None] | None = None,
               config, stop_early: Callable[[int], str | None] = lambda step: None) -> list[dict]:
    """Runs `one_step(step)` from `start` to `total`; returns the rows it logged.

    `one_step` returns a metrics row (written with its `step`) or None (not a logging
    step); it may raise `Preempted` from its checks only before it changes the checkpointed
    state (RL: during the rollout), so the state is still the last finished step's. A
    checkpoint is saved every `every` steps, at `total`, at an early stop (`stop_early(step)`
    returns the reason) and on preemption, which then raises `Preempted` on every host;
    `on_step(step)` runs after each step (tests use it to interrupt a run). `config`: the job's
    (its `metrics.wandb` names a W&B project the rows are mirrored to).
    """
    wandb = (config.get("metrics") or {}).get("wandb", "")
    writer = MetricsWriter(workdir, parallel.is_main_process(), resume_step=start, wandb=wandb,
                           config=config.to_dict() if wandb else None)
    rows, step = [], start
    with preemption.listening():
        try:
            while step < total:
                try:
                    preemption.check(f"step {step + 1}")
                    row = one_step(step)
                except preemption.Preempted as e:
                    if ckpt.latest_step() != step:
                        save(step)
                    ckpt.wait()
                    log(f"{e}: saved step {step}, exiting; rerun the same command to resume")
                    raise
                step += 1
                if row is not None:
                    row = {"step": step, **row}
                    rows.append(row)
                    writer.write(row)
                reason = stop_early(step)
                if step % every == 0 or step == total or reason:
                    save(step)
                if on_step:
                    on_step(step)
                if reason:
                    log(f"{reason}: stopping at step {step}")
                    break
        finally:
            ckpt.wait()
            writer.close()
    return rows


class RestoreFailed(OSError):
    """A step that may be good could not be read (storage, memory, another host): it stays."""


# tensorstore's status codes for a file that is missing, shorter than its index says, or
# undecodable: the step's files are damaged. Every other code (UNAVAILABLE, DEADLINE_EXCEEDED,
# PERMISSION_DENIED, RESOURCE_EXHAUSTED, ...) is the store or the machine, not the step.
DAMAGE_CODES = ("NOT_FOUND", "DATA_LOSS", "OUT_OF_RANGE", "FAILED_PRECONDITION")
_STATUS = re.compile(r"(CANCELLED|UNKNOWN|INVALID_ARGUMENT|DEADLINE_EXCEEDED|NOT_FOUND|ALREADY_EXISTS|"
                     r"PERMISSION_DENIED|RESOURCE_EXHAUSTED|FAILED_PRECONDITION|ABORTED|OUT_OF_RANGE|"
                     r"UNIMPLEMENTED|INTERNAL|UNAVAILABLE|DATA_LOSS|UNAUTHENTICATED): ")


def damaged(error: BaseException) -> str | None:
    """Why `error`, raised reading a step, shows the step's files are damaged (short), else None."""
    for e in _chain(error):
        status = _STATUS.match(str(e))
        missing_item = isinstance(e, KeyError) and "was not found in the checkpoint" in str(e)  # an empty step
        if isinstance(e, (FileNotFoundError, json.JSONDecodeError)) or missing_item or (
                status and status[1] in DAMAGE_CODES):
            return _short(e)
    return None


def unreadable(directory, error: BaseException) -> BaseException:
    """What a failed read that is not damage raises: storage and memory failures as a one-line
    RestoreFailed, anything else (a bug) unchanged."""
    chain = list(_chain(error))
    if any(isinstance(e, MemoryError) or str(e).startswith("RESOURCE_EXHAUSTED") and any(
            word in str(e).lower() for word in ("memory", "allocat")) for e in chain):
        fix = "it does not fit in memory here: use more devices (mesh.fsdp) or hosts"
    elif any(isinstance(e, OSError) or _STATUS.match(str(e)) or type(e).__module__.split(".")[0] in
             ("aiohttp", "gcsfs", "google") for e in chain):
        fix = "the storage failed: check it " + (
            f"(`gcloud storage ls {directory}`) " if paths.is_remote(directory) else "") + "and rerun to resume"
    else:
        return error
    return RestoreFailed(f"could not read checkpoint {directory} ({_short(chain[-1])}); nothing was moved "
                         f"aside: {fix}")


def _chain(error: BaseException):
    while error is not None:
        yield error
        error = error.__cause__ or error.__context__


def _short(e: BaseException) -> str:
    text = " ".join(str(e).split())
    for noise in (r"\s*\[tensorstore_spec.*", r" in OCDBT database at (local file )?\S+?(?=: |$)",
                  r'Error opening "\w+" driver: '):
        text = re.sub(noise, "", text)
    return f"{type(e).__name__}: {text[:200]}"


@contextlib.contextmanager
def _quiet():
    """When a step fails to read, orbax logs whole TensorStore specs, and the reads it abandoned
    report their own errors later, as 'Exception ignored' pages (orbax's coroutines, finalised
    unawaited) and 'Event loop is closed' tracebacks (tensorstore's callbacks, landing after
    orbax's loop is gone): pages that say nothing the one line of `_skip` or `RestoreFailed`
    does not. The loggers are muted around the read; those late reports are dropped for good."""
    loggers = [logging.getLogger(name) for name in ("absl", "asyncio", "fsspec")]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.CRITICAL)
    if not getattr(sys.unraisablehook, "drops_abandoned_reads", False):
        sys.unraisablehook = _drop_abandoned_reads(sys.unraisablehook)
    try:
        yield
    finally:
        for logger, level in zip(loggers, levels):
            logger.setLevel(level)


def _drop_abandoned_reads(hook):
    def unraisablehook(unraisable):
        code = getattr(unraisable.object, "cr_code", None)
        abandoned = code is not None and f"{os.sep}orbax{os.sep}" in code.co_filename
        closed = unraisable.exc_type is RuntimeError and str(unraisable.exc_value) == "Event loop is closed"
        if not (abandoned or closed):
            hook(unraisable)
    unraisablehook.drops_abandoned_reads = True
    return unraisablehook

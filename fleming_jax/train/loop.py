"""The one save/restore of train state and the one training-loop skeleton, shared by SFT and RL.

`Checkpoints` writes `<workdir>/checkpoints/<step>/` with items `params` (a pure dict, what
`checkpoint.restore_model` and `--config.model.init_from` read), `opt_state`, `meta` (JSON:
the step plus what the trainer adds) and any extra items a trainer names (SFT: `data`, the
grain iterator). `restore` places every leaf, the step included, in the train state's
shardings, and walks back from the newest step to the newest one that restores: a step
that does not (truncated array file, missing metadata, empty directory) is moved to
`<workdir>/checkpoints_skipped/` with one line saying why, never deleted, so a good step is
never overwritten and the run continues as the uninterrupted one would.

`train_loop` is the skeleton around a trainer's `one_step`: periodic saves, metrics rows
(`metrics.jsonl` without the rows a resumed run repeats), `on_step`, an early stop, and
preemption: when any host got SIGTERM (`fleming_jax.preemption`), every host saves the last
finished step and `Preempted` goes up to `main.py`, which exits 0.
"""

from __future__ import annotations

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
        self.directory = self.manager.directory

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def save(self, step: int, state: statelib.TrainState, meta: dict, **extra_args) -> None:
        self.manager.save(step, args=ocp.args.Composite(
            params=ocp.args.StandardSave(nnx.to_pure_dict(state.params)),
            opt_state=ocp.args.StandardSave(state.opt_state),
            meta=ocp.args.JsonSave(dict(meta, step=step)), **extra_args), force=True)

    def restore(self, state: statelib.TrainState, extra_args: Callable[[], dict] = dict):
        """(step, state, meta) of the newest step that restores, or (0, state, None)."""
        abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), state)
        for step in sorted(self.manager.all_steps(), reverse=True):
            try:
                got = self.manager.restore(step, args=ocp.args.Composite(
                    params=ocp.args.StandardRestore(nnx.to_pure_dict(abstract.params)),
                    opt_state=ocp.args.StandardRestore(abstract.opt_state),
                    meta=ocp.args.JsonRestore(), **extra_args()))
                if got["meta"] is None or got["meta"].get("step") != step:
                    raise ValueError(f"its meta item says step {(got['meta'] or {}).get('step')}")
            except Exception as e:  # noqa: BLE001 -- any unreadable step is skipped the same way
                self._skip(step, e)
                continue
            nnx.replace_by_pure_dict(state.params, got["params"])
            restored = statelib.TrainState(step=jax.device_put(np.int32(step), self.shardings.step),
                                           params=state.params, opt_state=got["opt_state"])
            self.log(f"resumed from {self.directory}/{step}")
            return step, restored, got
        return 0, state, None

    def _skip(self, step: int, error: Exception) -> None:
        reason = " ".join(str(error).split())[:300] or type(error).__name__
        target = paths.path(self.workdir) / "checkpoints_skipped" / f"{step}-{int(time.time())}"
        if parallel.is_main_process():
            with paths.storage_errors(str(target)):
                target.parent.mkdir(parents=True, exist_ok=True)
                (paths.path(str(self.directory)) / str(step)).rename(target)
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils
            multihost_utils.sync_global_devices(f"skip checkpoint {step}")
        self.manager.reload()
        self.log(f"checkpoint step {step} in {self.directory} does not restore ({type(error).__name__}: "
                 f"{reason}); moved it to {target} and trying the previous step")

    def wait(self) -> None:
        self.manager.wait_until_finished()


def train_loop(*, start: int, total: int, one_step: Callable[[int], dict | None], save: Callable[[int], None],
               every: int, ckpt: Checkpoints, workdir: str, log: Callable[[str], None],
               on_step: Callable[[int], None] | None = None,
               stop_early: Callable[[int], str | None] = lambda step: None) -> list[dict]:
    """Runs `one_step(step)` from `start` to `total`; returns the rows it logged.

    `one_step` returns a metrics row (written with its `step`) or None (not a logging
    step); it may raise `Preempted` from its checks only before it changes the checkpointed
    state (RL: during the rollout), so the state is still the last finished step's. A
    checkpoint is saved every `every` steps, at `total`, at an early stop (`stop_early(step)`
    returns the reason) and on preemption, which then raises `Preempted` on every host;
    `on_step(step)` runs after each step (tests use it to interrupt a run).
    """
    writer = MetricsWriter(workdir, parallel.is_main_process(), resume_step=start)
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
                    writer.write({k: v for k, v in row.items() if not isinstance(v, list)})
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

"""Training metrics: metrics.jsonl (the source of truth), TensorBoard event files beside it and,
when asked, the same rows mirrored to Weights & Biases."""

from __future__ import annotations

import hashlib
import json
import os
import tempfile

import numpy as np
import tensorboardX

from fleming_jax import paths


class MetricsWriter:
    """Appends one JSON row per logged step and writes the same values to `<workdir>/tensorboard`
    (numbers as scalars, lists of numbers as histograms, e.g. a step's reply lengths); only
    process 0 writes. A run resumed from `resume_step` first drops the rows past that step
    (written after the checkpoint it resumes from), so the file holds each step once.
    On gs:// the event file is written locally and uploaded at each `close` (the end of a
    stage, a preemption).

    `wandb`: a W&B project name ("" = off) the rows are mirrored to (`metrics.wandb`; needs
    `pip install wandb`, WANDB_MODE=offline writes the run under <workdir>/wandb without an
    account). The run's id comes from the workdir, so a resumed stage continues its W&B run;
    `config` (the job's config as a dict) is the run's config."""

    def __init__(self, workdir: str, main: bool, resume_step: int = 0, wandb: str = "", config: dict | None = None):
        path = paths.join(workdir, "metrics.jsonl")
        if main and paths.exists(path):
            lines = paths.read_text(path).splitlines(keepends=True)
            kept = [line for line in lines if _step(line) <= resume_step]
            if len(kept) != len(lines):
                paths.write_text(path, "".join(kept))
        self.file = paths.Appender(path) if main else None
        self.tb, self.wandb, self.uploads = None, None, []
        if main:
            self.tb = tensorboardX.SummaryWriter(self._local(workdir, "tensorboard"))
            if wandb:
                # wandb.init(dir=D) writes D/wandb: the run lands in <workdir>/wandb
                self.wandb = _wandb_run(wandb, workdir, os.path.dirname(self._local(workdir, "wandb")), config or {})

    def _local(self, workdir: str, name: str) -> str:
        """`<workdir>/<name>`, or on gs:// a local directory uploaded there at `close`."""
        target = paths.join(workdir, name)
        if not paths.is_remote(workdir):
            paths.makedirs(target)
            return target
        local = os.path.join(tempfile.mkdtemp(prefix="metrics-"), name)
        os.makedirs(local)
        self.uploads.append((local, target))
        return local

    def write(self, row: dict):
        if self.file:
            self.file.write(json.dumps(row) + "\n")
            self.file.flush()
        if not self.tb:
            return
        step, mirrored = row["step"], {}
        for k, v in row.items():
            if k == "step":
                continue
            if isinstance(v, (int, float)):
                self.tb.add_scalar(k, v, step)
                mirrored[k] = v
            elif isinstance(v, list) and v:
                self.tb.add_histogram(k, np.asarray(v, dtype=np.float64), step)
                if self.wandb:
                    import wandb

                    mirrored[k] = wandb.Histogram(v)
        if self.wandb:
            self.wandb.log(mirrored, step=step)

    def close(self):
        if self.file:
            self.file.close()
        if self.tb:
            self.tb.close()
        if self.wandb:
            self.wandb.finish()
        for local, target in self.uploads:
            paths.upload_dir(local, target)


def _wandb_run(project: str, workdir: str, directory: str, config: dict):
    try:
        import wandb
    except ImportError:
        raise ValueError(f"metrics.wandb={project!r} needs the wandb package: pip install wandb==0.31.0 "
                         "(or --config.metrics.wandb='' to log to metrics.jsonl and TensorBoard only)") from None
    where = paths.absolute(workdir).rstrip("/")
    run_id = hashlib.sha256(where.encode()).hexdigest()[:16]
    name = "/".join(where.split("/")[-2:])
    return wandb.init(project=project, id=run_id, name=name, resume="allow", dir=directory, config=config)


def _step(line: str) -> float:
    """A row's step; a line cut short by a kill counts as past every step (dropped)."""
    try:
        return json.loads(line).get("step", 0)
    except ValueError:
        return float("inf")

"""Training metrics: metrics.jsonl (the source of truth) and TensorBoard event files beside it."""

from __future__ import annotations

import json
import tempfile

import tensorboardX

from fleming_jax import paths


class MetricsWriter:
    """Appends one JSON row per logged step and the same scalars to `<workdir>/tensorboard`;
    only process 0 writes. A run resumed from `resume_step` first drops the rows past that
    step (written after the checkpoint it resumes from), so the file holds each step once.
    On gs:// the event file is written locally and uploaded at each `close` (the end of a
    stage, a preemption)."""

    def __init__(self, workdir: str, main: bool, resume_step: int = 0):
        path = paths.join(workdir, "metrics.jsonl")
        if main and paths.exists(path):
            lines = paths.read_text(path).splitlines(keepends=True)
            kept = [line for line in lines if _step(line) <= resume_step]
            if len(kept) != len(lines):
                paths.write_text(path, "".join(kept))
        self.file = paths.Appender(path) if main else None
        self.tb, self.upload = None, None
        if main:
            events = paths.join(workdir, "tensorboard")
            if paths.is_remote(workdir):
                self.upload, events = (events, tempfile.mkdtemp(prefix="tensorboard-"))
            self.tb = tensorboardX.SummaryWriter(events)

    def write(self, row: dict):
        if self.file:
            self.file.write(json.dumps(row) + "\n")
            self.file.flush()
        if self.tb:
            for k, v in row.items():
                if k != "step" and isinstance(v, (int, float)):
                    self.tb.add_scalar(k, v, row["step"])

    def close(self):
        if self.file:
            self.file.close()
        if self.tb:
            self.tb.close()
            if self.upload:
                paths.upload_dir(self.tb.logdir, self.upload)


def _step(line: str) -> float:
    """A row's step; a line cut short by a kill counts as past every step (dropped)."""
    try:
        return json.loads(line).get("step", 0)
    except ValueError:
        return float("inf")

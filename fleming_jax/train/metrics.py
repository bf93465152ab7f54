"""Training metrics: metrics.jsonl, and TensorBoard event files when tensorboardX is there."""

from __future__ import annotations

import json

from fleming_jax import paths


class MetricsWriter:
    """Appends one JSON row per logged step; only process 0 writes. A run resumed from
    `resume_step` first drops the rows past that step (written after the checkpoint it
    resumes from), so the file holds each step once."""

    def __init__(self, workdir: str, main: bool, resume_step: int = 0):
        path = paths.join(workdir, "metrics.jsonl")
        if main and paths.exists(path):
            lines = paths.read_text(path).splitlines(keepends=True)
            kept = [line for line in lines if _step(line) <= resume_step]
            if len(kept) != len(lines):
                paths.write_text(path, "".join(kept))
        self.file = paths.Appender(path) if main else None
        self.tb = None
        if main:
            try:
                import tensorboardX
                self.tb = tensorboardX.SummaryWriter(paths.join(workdir, "tensorboard"))
            except ImportError:
                pass

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


def _step(line: str) -> float:
    """A row's step; a line cut short by a kill counts as past every step (dropped)."""
    try:
        return json.loads(line).get("step", 0)
    except ValueError:
        return float("inf")

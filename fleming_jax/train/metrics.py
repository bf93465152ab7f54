"""Training metrics: metrics.jsonl, and TensorBoard event files when tensorboardX is there."""

from __future__ import annotations

import json
import os


class MetricsWriter:
    """Appends one JSON row per logged step; only process 0 writes. A run resumed from
    `resume_step` first drops the rows past that step (written after the checkpoint it
    resumes from), so the file holds each step once."""

    def __init__(self, workdir: str, main: bool, resume_step: int = 0):
        path = os.path.join(workdir, "metrics.jsonl")
        if main and os.path.exists(path):
            with open(path) as f:
                lines = f.readlines()
            kept = [line for line in lines if _step(line) <= resume_step]
            if len(kept) != len(lines):
                with open(path, "w") as f:
                    f.writelines(kept)
        self.file = open(path, "a") if main else None
        self.tb = None
        if main:
            try:
                import tensorboardX
                self.tb = tensorboardX.SummaryWriter(os.path.join(workdir, "tensorboard"))
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

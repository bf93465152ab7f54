"""Training metrics: metrics.jsonl, and TensorBoard event files when tensorboardX is there."""

from __future__ import annotations

import json

from fleming_jax import paths


class MetricsWriter:
    """Appends one JSON row per logged step; only process 0 writes."""

    def __init__(self, workdir: str, main: bool):
        self.file = paths.Appender(paths.join(workdir, "metrics.jsonl")) if main else None
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

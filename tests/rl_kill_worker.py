"""One RL run of the kill -9 test: `python -m tests.rl_kill_worker ROOT WORKDIR STAGE OUT`.

Trains the toy RL task (tests/test_rl.py) in WORKDIR, saving every step, resuming from what
is there, and writes the final params to OUT."""

import os
import sys

os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"
os.environ["JAX_PLATFORMS"] = "cpu"

import numpy as np  # noqa: E402

from fleming_jax.train import rl  # noqa: E402
from tests.test_hf import params_of  # noqa: E402
from tests.test_rl import toy_config  # noqa: E402


def main(root, workdir, stage, out):
    config = toy_config(root, int(stage), steps=5)
    config.checkpoint.every = 1
    trainer = rl.RLTrainer(config, workdir)
    trainer.train()
    np.savez(out, **params_of(trainer.model()))


if __name__ == "__main__":
    main(*sys.argv[1:])

"""Our params checkpoints: exact round trip, manager layout, clear mismatch errors."""

import os

import numpy as np
import pytest

from configs import models
from fleming_jax import models as fm
from fleming_jax.train import checkpoint
from tests.test_hf import params_of


def tiny(**changes):
    cfg = models.get("tiny")
    cfg.update(dict(num_layers=2, hidden_size=64, intermediate_size=128, vocab_size=256) | changes)
    return cfg


def small_state(**arch):
    """A TrainState (params + Adam state) of a small model sharded over 8 devices (fsdp), and
    its shardings."""
    import ml_collections

    from fleming_jax import parallel
    from fleming_jax.train import state as statelib

    mesh = parallel.make_mesh(ml_collections.ConfigDict(dict(data=1, fsdp=8, tensor=1)))
    cfg = tiny(**dict(dict(num_heads=4, num_kv_heads=2, head_dim=16), **arch))
    tx = statelib.make_optimizer(ml_collections.ConfigDict(dict(
        learning_rate=1e-3, warmup_steps=1, total_steps=10, final_lr_fraction=0.1, max_grad_norm=1.0, b1=0.9,
        b2=0.95, eps=1e-8, weight_decay=0.1)))
    _, state = statelib.init_state(fm.build(cfg, mesh)[0], tx, mesh)
    return state, statelib.state_shardings(state, mesh)


def test_params_round_trip_and_init_from(tmp_path):
    model, config = fm.build(tiny(seed=3))
    # A training run's manager layout: <root>/<step>/params; the newest step wins.
    checkpoint.save_params(str(tmp_path / "run" / "5" / "params"), fm.build(tiny(seed=4))[0])
    checkpoint.save_params(str(tmp_path / "run" / "12" / "params"), model)
    restored, _ = fm.build(tiny(init_from=str(tmp_path / "run")))
    for name, value in params_of(model).items():
        np.testing.assert_array_equal(value, params_of(restored)[name], err_msg=name)


def test_restore_refuses_other_architectures_and_missing_paths(tmp_path):
    model, _ = fm.build(tiny())
    checkpoint.save_params(str(tmp_path / "p"), model)
    with pytest.raises(ValueError, match="does not match the model config"):
        fm.build(tiny(hidden_size=32, init_from=str(tmp_path / "p")))
    with pytest.raises(FileNotFoundError, match="does not exist"):
        fm.build(tiny(init_from=os.path.join(str(tmp_path), "nowhere")))

"""The train step compiles once per batch shape, whatever made the starting params."""

import pytest

from fleming_jax import models as fm
from fleming_jax import parallel
from fleming_jax.models import hf
from fleming_jax.train import sft
from fleming_jax.train import state as train_state
from tests.test_parallel import OPTIMIZER, global_batch_for_test, small_model_cfg


@pytest.mark.parametrize("mesh_shape", [pytest.param(None, marks=pytest.mark.slow), dict(data=2, fsdp=2, tensor=2)])
def test_train_step_compiles_once_from_an_imported_model(tmp_path, mesh_shape):
    import ml_collections

    model, config = fm.build(small_model_cfg())
    hf.save(model, config, str(tmp_path))
    mesh = None if mesh_shape is None else parallel.make_mesh(ml_collections.ConfigDict(mesh_shape))
    loaded, _ = hf.load(str(tmp_path), mesh=mesh)  # committed arrays, unlike a fresh init
    tx = train_state.make_optimizer(OPTIMIZER)
    graphdef, state = train_state.init_state(loaded, tx, mesh)
    shardings = None if mesh is None else train_state.state_shardings(state, mesh)
    step = train_state.make_train_step(graphdef, tx, sft.sft_loss, 1, mesh, shardings)
    jitted = step.jitted  # the jitted program under the step's wrapper
    batch = global_batch_for_test()
    for _ in range(3):
        state, _ = step(state, batch if mesh is None else parallel.global_batch(mesh, batch))
    assert jitted._cache_size() == 1

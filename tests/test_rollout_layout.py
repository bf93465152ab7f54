"""The decode layout: the policy cast and resharded once per RL step, so the engine's decode
loop moves no weights per token (checked in the TPU compiler's HLO, libtpu AOT on this CPU)."""

import importlib.util
import os

import jax
import ml_collections
import numpy as np
import pytest
from flax import nnx

from configs import models as presets
from configs import rl_stage1
from fleming_jax import engine, models, parallel, plan, sampler
from fleming_jax.sampler import SamplingParams

PROMPTS = [[5, 17, 3], [9, 2, 44, 8, 1, 60, 7], [12]]
MIB = 1024**2


@pytest.fixture(scope="module")
def fsdp_policy():
    mesh = parallel.make_mesh(ml_collections.ConfigDict(dict(data=1, fsdp=8, tensor=1)))
    cfg = presets.get("tiny")
    cfg.update(num_layers=2, num_kv_heads=4, num_heads=8)
    model, _ = models.build(cfg, mesh)
    return model, mesh


def test_rollout_mesh_keeps_tensor_parallelism_inside_a_host():
    if importlib.util.find_spec("libtpu") is None:
        pytest.skip("libtpu not installed")
    os.environ.setdefault("TPU_WORKER_HOSTNAMES", "localhost")
    from jax.experimental import topologies

    devices = topologies.get_topology_desc(platform="tpu", topology_name="v5p:2x2x4").devices
    train = parallel.make_mesh(ml_collections.ConfigDict(dict(data=1, fsdp=-1, tensor=1)), devices)
    mesh = parallel.rollout_mesh(-1, 4, train)  # Qwen2.5-7B: 4 KV heads; a v5p host: 4 chips
    assert dict(mesh.shape) == {"data": 4, "fsdp": 1, "tensor": 4}
    # the training mesh's device order (the torus's, not by id), so one program spans both
    assert list(mesh.devices.flat) == list(train.devices.flat) != sorted(devices, key=lambda d: d.id)
    for data in range(4):
        group = mesh.devices[tuple(data if a == "data" else slice(None) for a in mesh.axis_names)].flat
        assert len({d.process_index for d in group}) == 1
    assert dict(parallel.rollout_mesh(-1, 2, train).shape) == {"data": 8, "fsdp": 1, "tensor": 2}
    with pytest.raises(ValueError, match="rollout.tensor=8 must divide the 4 devices of a host"):
        parallel.rollout_mesh(8, 8, train)


def test_rollout_layout_samples_what_the_training_layout_samples(fsdp_policy):
    model, train_mesh = fsdp_policy
    rollout_mesh = parallel.rollout_mesh(-1, model.config.num_kv_heads, train_mesh)
    assert dict(rollout_mesh.shape) == {"data": 2, "fsdp": 1, "tensor": 4}
    params = SamplingParams(temperature=1.0, num_samples=2, max_new_tokens=12)
    key = jax.random.key(3)
    want = engine.generate(model, PROMPTS, key, params, mesh=train_mesh)
    got = engine.generate(sampler.rollout_model(model, rollout_mesh, "float32"), PROMPTS, key, params,
                          mesh=rollout_mesh)
    np.testing.assert_array_equal(got.tokens, want.tokens)
    np.testing.assert_allclose(got.model_logprobs, want.model_logprobs, atol=2e-5)


def test_bf16_rollout_copy_is_sharded_for_decoding_and_built_by_one_program(fsdp_policy):
    model, train_mesh = fsdp_policy
    rollout_mesh = parallel.rollout_mesh(-1, model.config.num_kv_heads, train_mesh)
    before = len(sampler._LAYOUTS)
    copy = sampler.rollout_model(model, rollout_mesh, "bfloat16")
    again = sampler.rollout_model(model, rollout_mesh, "bfloat16")
    assert len(sampler._LAYOUTS) == before + 1  # one jitted cast + reshard, reused every step
    q = nnx.state(again)["layers"]["q_proj"][...]
    assert q.dtype == jax.numpy.bfloat16
    assert q.sharding.spec == parallel.logical_to_spec(("layers", "embed", "heads", "head_dim"))
    assert q.sharding.mesh.shape["fsdp"] == 1
    source = nnx.state(model)["layers"]["q_proj"][...]
    np.testing.assert_array_equal(np.asarray(q, np.float32),
                                  np.asarray(source.astype(jax.numpy.bfloat16), np.float32))
    assert source.dtype == jax.numpy.float32  # the master weights are untouched
    del copy


@pytest.mark.skipif(importlib.util.find_spec("libtpu") is None, reason="libtpu not installed")
def test_decode_loop_moves_no_weights_in_the_rollout_layout_on_a_v5p_slice():
    """Qwen2.5-7B's shapes (2 of its 28 layers, to keep the compile short; each layer's
    pattern is the same) on v5p:2x2x4, the engine's decode program. The training layout (FSDP
    over 16 chips) gathers every weight every token; the rollout layout gathers only the
    sampler's few KiB, and (a real rollout's slots: 64 prompts x G 8, 512 + 4,096 tokens) holds
    no copy of the KV cache (a per-row cache write that the TPU compiler lowered into a loop in
    another layout made it copy every cache buffer twice per token: temporaries 2.4x the cache)
    and no second copy of the weights (splitting the stacked layers before the decode loop,
    which XLA:CPU needs, held one: temporaries half the cache at 2 layers)."""
    config = rl_stage1.get_config("qwen2.5-7b")
    config.model.num_layers = 2
    config.plan.topology = "v5p:2x2x4"
    config.mesh.update(data=1, fsdp=16, tensor=1)
    rollout = plan.decode_plan(config, "rollout", prompts=64, samples=8, prompt_len=512, budget=4096)
    train = plan.decode_plan(config, "train")
    assert rollout["mesh"] == {"data": 4, "fsdp": 1, "tensor": 4} and rollout["dtype"] == "bfloat16"
    assert rollout["per_token"]["all_gather_bytes"] < 1 * MIB, rollout
    assert rollout["cache_bytes"] == 2 * 2 * 128 * 4608 * 1 * 128 * 2  # K, V x 2 layers, 128 slots a chip
    # no copy of the cache (was 2.4x it) nor of the weights (the layers split once per call)
    assert rollout["temp_bytes"] < rollout["cache_bytes"] / 4, rollout
    assert train["per_token"]["all_gather_bytes"] > 1000 * MIB, train


def _compiled_sync(topology: str, preset: str, layers: int):
    """The sync program RL builds for `preset` (`layers` layers) on a TPU slice, compiled."""
    os.environ.setdefault("TPU_WORKER_HOSTNAMES", "localhost")
    from jax.experimental import topologies

    devices = topologies.get_topology_desc(platform="tpu", topology_name=topology).devices
    config = rl_stage1.get_config(preset)
    config.model.num_layers = layers
    train = parallel.make_mesh(config.mesh, devices)
    model_config = models.config_from(config.model)
    graphdef, abstract = nnx.split(nnx.eval_shape(lambda: models.qwen.create(model_config)))
    state = jax.tree.map(lambda v, s: v.replace(jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=s)),
                         abstract, parallel.tree_shardings(abstract, train), is_leaf=lambda x: isinstance(x, nnx.Variable))
    rollout = parallel.rollout_mesh(-1, model_config.num_kv_heads, train)
    return sampler.sync_program(graphdef, state, rollout, "bfloat16").lower(state).compile(), model_config


@pytest.mark.skipif(importlib.util.find_spec("libtpu") is None, reason="libtpu not installed")
@pytest.mark.parametrize("topology", ["v5p:2x2x1", "v5p:2x2x4", "v5p:4x4x4"])
def test_sync_to_the_rollout_layout_compiles_on_a_tpu_slice(topology):
    """The sync spans the training mesh (the torus's device order) and the rollout mesh: on a
    TPU it compiles only when both order the chips alike (it raised "incompatible devices for
    jitted computation" with the rollout mesh ordered by id)."""
    compiled, _ = _compiled_sync(topology, "qwen2.5-7b", 1)
    assert compiled.memory_analysis().output_size_in_bytes > 0


@pytest.mark.skipif(importlib.util.find_spec("libtpu") is None, reason="libtpu not installed")
def test_the_sync_never_holds_a_stacked_weight_whole():
    """Qwen3-32B on v5p:4x4x4: forcing every weight whole on its way held 62.5 GiB a chip at 64
    layers (7.8 at 8); the partitioner moving the shards holds less than one stacked weight."""
    compiled, c = _compiled_sync("v5p:4x4x4", "qwen3-32b", 8)
    stacked_mlp = 8 * c.hidden_size * c.intermediate_size * 2  # one bf16 [8, embed, mlp] weight
    assert compiled.memory_analysis().temp_size_in_bytes < stacked_mlp

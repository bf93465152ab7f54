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
    assert dict(mesh.shape) == {"data": 4, "fsdp": 1, "expert": 1, "tensor": 4}
    # the training mesh's device order (the torus's, not by id), so one program spans both
    assert list(mesh.devices.flat) == list(train.devices.flat) != sorted(devices, key=lambda d: d.id)
    for data in range(4):
        group = mesh.devices[tuple(data if a == "data" else slice(None) for a in mesh.axis_names)].flat
        assert len({d.process_index for d in group}) == 1
    assert dict(parallel.rollout_mesh(-1, 2, train).shape) == {"data": 8, "fsdp": 1, "expert": 1, "tensor": 2}
    with pytest.raises(ValueError, match="rollout.tensor=8 must divide the 4 devices of a host"):
        parallel.rollout_mesh(8, 8, train)


@pytest.mark.slow
def test_rollout_layout_samples_what_the_training_layout_samples(fsdp_policy):
    model, train_mesh = fsdp_policy
    rollout_mesh = parallel.rollout_mesh(-1, model.config.num_kv_heads, train_mesh)
    assert dict(rollout_mesh.shape) == {"data": 2, "fsdp": 1, "expert": 1, "tensor": 4}
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


@pytest.mark.parametrize("layout", ["runs"] + [pytest.param(n, marks=pytest.mark.slow) for n in ("strided", "tensor-trained")])
def test_sync_moves_shards_into_the_decode_layout_and_reuses_the_last_copy(layout):
    """Every weight of the decode copy equals the training weight cast to bf16, in the decode
    sharding, for decode groups that are runs of the training order, every 4th device, and a
    policy trained with tensor parallelism (a layout the shard path leaves to the
    partitioner). A second sync writes into the first copy's buffers (donated)."""
    trained = dict(data=1, fsdp=8, tensor=1) if layout != "tensor-trained" else dict(data=1, fsdp=4, tensor=2)
    train_mesh = parallel.make_mesh(ml_collections.ConfigDict(trained))
    cfg = presets.get("tiny")
    cfg.update(num_layers=2, num_kv_heads=4, num_heads=8)
    model, _ = models.build(cfg, train_mesh)
    mesh = parallel.rollout_mesh(4, 4, train_mesh)
    if layout == "strided":
        devices = np.array(list(train_mesh.devices.flat), dtype=object)
        mesh = jax.sharding.Mesh(devices.reshape(4, 1, 1, 2), parallel.MESH_AXES[::-1])
    graphdef, state = nnx.split(model)
    program = sampler.sync_program(graphdef, state, mesh, "bfloat16")
    assert program.shards_move == (layout != "tensor-trained")
    first = sampler.rollout_model(model, mesh, "bfloat16")
    for name, step in (("first", 0), ("second", 1)):
        if step:  # new weights (an update), synced into the first copy's buffers
            state = jax.tree.map(lambda x: x * 1.5, state)
            model = nnx.merge(graphdef, state)
            old = jax.tree.leaves(nnx.state(first))
            first = sampler.rollout_model(model, mesh, "bfloat16", previous=first)
            assert all(x.is_deleted() for x in old) == program.shards_move
        targets = jax.tree.leaves(parallel.tree_shardings(state, mesh))
        for source, got, target in zip(jax.tree.leaves(state), jax.tree.leaves(nnx.state(first)), targets):
            assert got.dtype == jax.numpy.bfloat16 and got.sharding.is_equivalent_to(target, got.ndim), name
            np.testing.assert_array_equal(np.asarray(got, np.float32),
                                          np.asarray(source.astype(jax.numpy.bfloat16), np.float32), err_msg=name)


@pytest.mark.skipif(importlib.util.find_spec("libtpu") is None, reason="libtpu not installed")
@pytest.mark.slow
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
    assert rollout["mesh"] == {"data": 4, "fsdp": 1, "expert": 1, "tensor": 4} and rollout["dtype"] == "bfloat16"
    assert rollout["per_token"]["all_gather_bytes"] < 1 * MIB, rollout
    # K, V x 2 layers, 128 slots a chip with pages for half of them at full length (engine.OVERCOMMIT)
    assert rollout["cache_bytes"] == 2 * 2 * 64 * 4608 * 1 * 128 * 2
    # no copy of the cache (was 2.4x it) nor of the weights (the layers split once per call)
    assert rollout["temp_bytes"] < rollout["cache_bytes"] / 4, rollout
    assert train["per_token"]["all_gather_bytes"] > 1000 * MIB, train


@pytest.mark.skipif(importlib.util.find_spec("libtpu") is None, reason="libtpu not installed")
@pytest.mark.slow
def test_decode_loop_holds_the_attention_kernel_and_no_vocabulary_gather_for_qwen3_32b_on_v5p_4x4x4():
    """Qwen3-32B's rollout layout (data 16 x tensor 4, 2 of its 64 layers) on v5p:4x4x4: the
    attention is the Pallas kernel over each row's pages; the vocabulary is split over the
    tensor chips and the sampler reduces over it in place (its one running sum over the whole
    vocabulary all-gathered each chip's 32 rows of fp32 logits, 18.6 MiB a token)."""
    config = rl_stage1.get_config("qwen3-32b")
    config.model.num_layers = 2
    config.plan.topology = "v5p:4x4x4"
    rollout = plan.decode_plan(config, "rollout", prompts=64, samples=8, prompt_len=512, budget=4096)
    assert rollout["mesh"]["tensor"] == 4 and rollout["rows"] == 512
    assert rollout["per_token"]["all_gather_bytes"] < 1 * MIB, rollout
    assert rollout["attention_kernels"] == 2, rollout  # the Pallas paged attention, one call a layer
    # the KV write keeps the kernel's layout (a scatter of single tokens made the compiler copy
    # each layer's pools, 2 x 75 MB, every token: 359 MB of temporaries with a pool for every
    # slot at full length; 76.7 MB now, with that pool or with this one of half its size)
    # (K, V x 2 layers, pages for 16 of a chip's 32 rows at full length, 2 of the 8 KV heads)
    assert rollout["temp_bytes"] < 128 * MIB and rollout["cache_bytes"] == 2 * 2 * 16 * 4608 * 2 * 128 * 2, rollout


def _compiled_sync(topology: str, preset: str, layers: int):
    """The sync program RL builds for `preset` (`layers` layers) on a TPU slice, compiled."""
    os.environ.setdefault("TPU_WORKER_HOSTNAMES", "localhost")
    from jax.experimental import topologies

    devices = topologies.get_topology_desc(platform="tpu", topology_name=topology).devices
    config = rl_stage1.get_config(preset)
    config.model.num_layers = layers
    train = parallel.make_mesh(config.mesh, devices)
    model_config = models.config_from(config.model)
    graphdef, abstract = nnx.split(nnx.eval_shape(lambda: models.decoder.create(model_config)))
    state = jax.tree.map(lambda v, s: v.replace(jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=s)),
                         abstract, parallel.tree_shardings(abstract, train), is_leaf=lambda x: isinstance(x, nnx.Variable))
    rollout = parallel.rollout_mesh(-1, model_config.num_kv_heads, train)
    program = sampler.sync_program(graphdef, state, rollout, "bfloat16")
    return program.lower(state).compile(), program, model_config


@pytest.mark.skipif(importlib.util.find_spec("libtpu") is None, reason="libtpu not installed")
@pytest.mark.parametrize("topology", ["v5p:2x2x1", "v5p:2x2x4", "v5p:4x4x4"])
def test_sync_to_the_rollout_layout_compiles_on_a_tpu_slice(topology):
    """The sync spans the training mesh (the torus's device order) and the rollout mesh: on a
    TPU it compiles only when both order the chips alike (it raised "incompatible devices for
    jitted computation" with the rollout mesh ordered by id)."""
    compiled, _, _ = _compiled_sync(topology, "qwen2.5-7b", 1)
    assert compiled.memory_analysis().output_size_in_bytes > 0


@pytest.mark.skipif(importlib.util.find_spec("libtpu") is None, reason="libtpu not installed")
def test_the_sync_moves_only_shards_for_qwen3_32b_on_v5p_4x4x4():
    """All 64 layers of Qwen3-32B, FSDP over 64 chips -> data 16 x tensor 4: the sync holds
    under 1 GiB of temporaries a chip (the partitioner's own move held 9.45 GiB; forcing each
    weight whole first, 62.5) and all-gathers about the chip's decode shard, a layer at a
    time (the partitioner's replicated every layer through all-reduces: 57 GiB a chip)."""
    compiled, program, c = _compiled_sync("v5p:4x4x4", "qwen3-32b", 64)
    memory = compiled.memory_analysis()
    decode_shard = memory.output_size_in_bytes  # 15.3 GiB a chip
    assert program.shards_move and memory.temp_size_in_bytes < 1024 * MIB, memory
    per_layer = plan.loop_collectives(compiled.as_text())["all_gather_bytes"]
    assert 0 < per_layer * c.num_layers <= 2 * decode_shard
    assert memory.alias_size_in_bytes > 0.9 * decode_shard  # written into the last copy's buffers
    assert program.received_bytes <= decode_shard

"""One code path from 1 device to a mesh: sharded steps equal the single-device run."""

import contextlib
import json
import os
import socket
import subprocess
import sys

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

from configs import models
from fleming_jax import models as fm
from fleming_jax import parallel
from fleming_jax.train import sft
from fleming_jax.train import state as train_state
from fleming_jax.train.logprobs import token_logprobs

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def small_model_cfg(**changes):
    cfg = models.get("tiny")
    cfg.update(dict(num_layers=2, hidden_size=64, intermediate_size=128, vocab_size=256,
                    head_dim=16) | changes)
    return cfg


OPTIMIZER = ml_collections.ConfigDict(dict(
    learning_rate=1e-2, warmup_steps=0, total_steps=10, final_lr_fraction=0.1,
    max_grad_norm=1.0, b1=0.9, b2=0.95, eps=1e-8, weight_decay=0.1))


def global_batch_for_test(batch=8, length=16, seed=0):
    rng = np.random.default_rng(seed)
    segments = np.ones((batch, length), np.int32)
    segments[1, :5] = 0  # some left padding
    segments[2, 8:] = 2  # a packed second example
    weights = (segments > 0).astype(np.float32)
    weights[:, :3] = 0  # "prompt" tokens carry no loss
    return dict(tokens=rng.integers(0, 256, (batch, length)).astype(np.int32),
                segments=segments, loss_weights=weights)


def run_steps(mesh, local_batch=None, steps=3, grad_accum=1, **model_changes):
    """Losses of `steps` SFT train steps and the final state, on `mesh` (None: one device)."""
    tx = train_state.make_optimizer(OPTIMIZER)
    model, _ = fm.build(small_model_cfg(**model_changes), mesh)
    graphdef, state = train_state.init_state(model, tx, mesh)
    shardings = None if mesh is None else train_state.state_shardings(state, mesh)
    step = train_state.make_train_step(graphdef, tx, sft.sft_loss, grad_accum, mesh, shardings)
    batch = global_batch_for_test() if local_batch is None else local_batch
    losses = []
    for _ in range(steps):
        b = batch if mesh is None else parallel.global_batch(mesh, batch)
        state, metrics = step(state, b)
        losses.append([float(metrics["loss"]), float(metrics["grad_norm"])])
    return losses, state


def gradients(params, mesh=None):
    """d(loss)/d(params) of the test batch at `params`, computed on `mesh`."""
    graphdef = nnx.graphdef(fm.build(small_model_cfg())[0])
    batch = global_batch_for_test()
    if mesh is not None:
        batch = parallel.global_batch(mesh, batch)

    def loss(p):
        num, den, _ = sft.sft_loss(nnx.merge(graphdef, p), batch)
        return num / den
    with jax.set_mesh(mesh) if mesh is not None else contextlib.nullcontext():
        grads = jax.jit(jax.grad(loss))(params)
    return {jax.tree_util.keystr(k): parallel.to_host(v)
            for k, v in jax.tree_util.tree_flatten_with_path(grads)[0]}


@pytest.fixture(scope="module")
def single_device_run():
    return run_steps(None)


def flat_params(state):
    return {jax.tree_util.keystr(k): np.asarray(parallel.to_host(v))
            for k, v in jax.tree_util.tree_flatten_with_path(state.params)[0]}


@pytest.mark.parametrize("shape", [pytest.param(s, marks=pytest.mark.slow)
                                   for s in ((8, 1, 1, 1), (1, 8, 1, 1), (1, 4, 1, 2), (1, 2, 2, 2))] + [(2, 2, 1, 2)])
def test_sharded_steps_equal_single_device(single_device_run, shape):
    """(data, fsdp, expert, tensor): on a dense model the expert axis splits weights and batch like FSDP."""
    mesh = parallel.make_mesh(ml_collections.ConfigDict(dict(zip(parallel.MESH_AXES, shape))))
    ref_losses, ref_state = single_device_run
    losses, state = run_steps(mesh)
    # fp32; only the order of reductions differs between meshes. Losses and gradient norms
    # of all 3 steps agree to 5e-5 relative, and the full gradient at the same params to
    # 1e-5 absolute. The params themselves are compared to 1e-3: AdamW divides by sqrt(v),
    # which magnifies reduction-order noise on near-zero gradients (rarely seen embedding
    # rows) to a few percent of one lr-sized (1e-2) step.
    np.testing.assert_allclose(losses, ref_losses, rtol=5e-5)
    assert ref_losses[2][0] < ref_losses[0][0]  # the steps really moved the params
    ref, got = flat_params(ref_state), flat_params(state)
    for name in ref:
        np.testing.assert_allclose(got[name], ref[name], atol=1e-3, err_msg=name)
    on_mesh = jax.device_put(ref_state.params, train_state.state_shardings(ref_state.params, mesh))
    ref_grads, mesh_grads = gradients(ref_state.params), gradients(on_mesh, mesh)
    for name in ref_grads:
        np.testing.assert_allclose(mesh_grads[name], ref_grads[name], atol=1e-5, err_msg=name)
    expected = {  # what the rules table says, written out by hand
        "['layers']['q_proj']": P(None, ("fsdp", "expert"), "tensor", None),
        "['layers']['o_proj']": P(None, "tensor", None, ("fsdp", "expert")),
        "['layers']['down_proj']": P(None, "tensor", ("fsdp", "expert")),
        "['layers']['k_bias']": P(None, "tensor", None),
        "['layers']['input_norm']": P(None, None),
        "['embed_tokens']": P("tensor", ("fsdp", "expert")),
    }
    for path, var in jax.tree_util.tree_flatten_with_path(
            state.params, is_leaf=lambda x: hasattr(x, "get_metadata"))[0]:
        key = jax.tree_util.keystr(path)
        spec = var[...].sharding.spec
        assert spec == parallel.logical_to_spec(var.get_metadata()["axes"]), key
        if key in expected:
            assert spec == expected[key], key
    # Adam moments are sharded like their parameters.
    mu = state.opt_state[1][0].mu["layers"]["q_proj"][...]
    assert mu.sharding.spec == P(None, ("fsdp", "expert"), "tensor", None)


def test_gradient_accumulation_equals_one_big_batch(single_device_run):
    losses, state = run_steps(None, grad_accum=4)
    np.testing.assert_allclose(losses, single_device_run[0], rtol=5e-5)
    ref = flat_params(single_device_run[1])
    for name, value in flat_params(state).items():  # tolerance: see the sharded test above
        np.testing.assert_allclose(value, ref[name], atol=1e-3, err_msg=name)


@pytest.mark.slow
@pytest.mark.parametrize("remat", ["full", "dots"])
def test_remat_policies_do_not_change_the_math(single_device_run, remat):
    losses, _ = run_steps(None, steps=2, remat=remat)
    np.testing.assert_allclose(losses, single_device_run[0][:2], rtol=1e-5)


def test_chunked_logprobs_equal_unchunked():
    model, _ = fm.build(small_model_cfg())
    batch = global_batch_for_test()
    tokens, segments = jnp.asarray(batch["tokens"]), jnp.asarray(batch["segments"])
    logits = model(tokens, attention_mask=segments)
    full = jnp.take_along_axis(jax.nn.log_softmax(logits[:, :-1]), tokens[:, 1:, None], -1)[..., 0]
    for chunk in (1, 4, 5, 64):
        lp, entropy = token_logprobs(model, tokens, segments, chunk_size=chunk, with_entropy=True)
        np.testing.assert_allclose(lp[:, 1:], full, atol=1e-5)
        assert (lp[:, 0] == 0).all()
        p = jax.nn.softmax(logits[:, :-1])
        np.testing.assert_allclose(entropy[:, 1:], -(p * jnp.log(p)).sum(-1), atol=1e-4)


def test_sharded_init_is_created_in_shards_and_equals_unsharded():
    mesh = parallel.make_mesh(ml_collections.ConfigDict(dict(data=1, fsdp=4, tensor=2)))
    sharded, _ = fm.build(small_model_cfg(seed=7), mesh)
    plain, _ = fm.build(small_model_cfg(seed=7))
    q = sharded.layers.q_proj[...]
    assert q.sharding.spec == P(None, ("fsdp", "expert"), "tensor", None)
    assert q.addressable_shards[0].data.shape == (2, 16, 2, 16)
    np.testing.assert_array_equal(np.asarray(q), np.asarray(plain.layers.q_proj[...]))


def test_hf_import_places_tensors_into_their_shards(hf_dir):
    from fleming_jax.models import hf

    mesh = parallel.make_mesh(ml_collections.ConfigDict(dict(data=1, fsdp=-1, tensor=2)))
    sharded, _ = hf.load(hf_dir("qwen3"), mesh=mesh)
    plain, _ = hf.load(hf_dir("qwen3"))
    k = sharded.layers.k_proj[...]
    assert k.sharding.spec == P(None, ("fsdp", "expert"), "tensor", None)
    assert k.addressable_shards[0].data.shape == (3, 16, 1, 24)
    np.testing.assert_array_equal(np.asarray(k), np.asarray(plain.layers.k_proj[...]))


@pytest.mark.parametrize("mesh,message", [
    (dict(data=3, fsdp=1, tensor=1), "needs 3 devices but 8 are available"),
    (dict(data=-1, fsdp=3, tensor=1), "not a multiple of 3"),
    (dict(data=-1, fsdp=-1, tensor=1), "at most one -1"),
])
def test_bad_mesh_shapes_say_what_is_wrong(mesh, message):
    with pytest.raises(ValueError, match=message):
        parallel.make_mesh(ml_collections.ConfigDict(mesh))


def test_minus_one_fills_the_rest():
    assert parallel.mesh_shape(dict(data=2, fsdp=-1, tensor=2), 8) == (2, 2, 1, 2)  # no expert key: 1
    assert parallel.mesh_shape(dict(data=1, fsdp=2, expert=-1, tensor=1), 8) == (1, 2, 4, 1)


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_two_processes_match_one_process_with_eight_devices(tmp_path):
    port = free_port()
    env = dict(os.environ, PYTHONPATH=ROOT)
    procs = [subprocess.Popen([sys.executable, "-m", "tests.multihost_worker", str(port), str(i), "2",
                               str(tmp_path / f"losses{i}.json")], cwd=ROOT, env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for i in range(2)]
    for p in procs:
        out, _ = p.communicate(timeout=300)
        assert p.returncode == 0, out[-3000:]
    mesh = parallel.make_mesh(ml_collections.ConfigDict(dict(data=2, fsdp=4, tensor=1)))
    expected, _ = run_steps(mesh)
    for i in range(2):
        with open(tmp_path / f"losses{i}.json") as f:
            np.testing.assert_allclose(json.load(f), expected, rtol=1e-5)


# ---------------------------------------------------------------- multi-host start-up
@pytest.fixture
def init_calls(monkeypatch):
    """Records jax.distributed.initialize calls instead of making them (no TPU slice here)."""
    calls = []
    monkeypatch.setattr(jax.distributed, "initialize", lambda **kw: calls.append(kw))
    monkeypatch.setattr(jax.distributed, "is_initialized", lambda: False)
    monkeypatch.setattr(parallel, "_google_pci_device", lambda: False)
    return calls


TPU_SLICE_ENV = {"TPU_WORKER_HOSTNAMES": "t1v-n-0-w-0,t1v-n-0-w-1,t1v-n-0-w-2,t1v-n-0-w-3",
                 "TPU_WORKER_ID": "2"}


def _dist(enabled=None):
    cfg = models.distributed()
    if enabled is not None:
        cfg.enabled = enabled
    return cfg


@pytest.mark.parametrize("cfg", [None, _dist()], ids=["no-config", "default-config"])
def test_multi_worker_tpu_slice_initialises_with_no_arguments(init_calls, cfg, capsys):
    parallel.initialize_distributed(cfg, environ=TPU_SLICE_ENV)
    assert init_calls == [{}]
    assert "Cloud TPU slice of 4 workers, detected" in capsys.readouterr().out


@pytest.mark.parametrize("environ", [
    {"TPU_WORKER_HOSTNAMES": "t1v-n-0-w-0", "TPU_WORKER_ID": "0"},  # a single-worker slice
    {},  # a CPU or a single GPU node: no TPU runtime environment
], ids=["one-worker", "cpu"])
def test_single_worker_and_cpu_stay_one_process(init_calls, environ):
    parallel.initialize_distributed(_dist(), environ=environ)
    assert init_calls == []


def test_enabled_false_turns_detection_off(init_calls):
    parallel.initialize_distributed(_dist(False), environ=TPU_SLICE_ENV)
    parallel.initialize_distributed(_dist(False), environ={"FLEMING_COORDINATOR_ADDRESS": "h:1",
                                                           "FLEMING_NUM_PROCESSES": "2", "FLEMING_PROCESS_ID": "0"})
    assert init_calls == []


def test_enabled_true_forces_initialise_without_detection(init_calls):
    parallel.initialize_distributed(_dist(True), environ={})
    assert init_calls == [{}]


def test_gpu_cluster_keeps_the_fleming_contract(init_calls):
    env = {"FLEMING_COORDINATOR_ADDRESS": "10.0.0.1:1234", "FLEMING_NUM_PROCESSES": "4",
           "FLEMING_PROCESS_ID": "3", **TPU_SLICE_ENV}
    parallel.initialize_distributed(_dist(), environ=env)
    assert init_calls == [dict(coordinator_address="10.0.0.1:1234", num_processes=4, process_id=3)]


def test_tpu_vm_without_env_asks_the_metadata_server(monkeypatch):
    asked = []

    def metadata(key):
        asked.append(key)
        return "10.130.0.2,10.130.0.3"
    monkeypatch.setattr(parallel, "_google_pci_device", lambda: False)  # a laptop, a GPU node
    assert parallel.tpu_worker_count({}, metadata) == 1 and asked == []
    monkeypatch.setattr(parallel, "_google_pci_device", lambda: True)
    assert parallel.tpu_worker_count({}, metadata) == 2 and asked == ["worker-network-endpoints"]
    assert parallel.tpu_worker_count({}, lambda key: "") == 1  # a GCE VM that is no TPU worker

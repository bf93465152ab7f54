"""Rollouts sampled ahead of the update (`rl.max_staleness`) on a device group of their own
(`rollout.devices`): what each update trains on, a resumed run, the toy task learned."""

import json
import signal

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fleming_jax import parallel, preemption
from fleming_jax.train import rl
from tests.test_hf import params_of
from tests.test_packing import logprobs_at
from tests.test_rl import Killed, kill_at, toy_config, toy_run  # noqa: F401 (toy_run: a fixture)


def async_config(root, **changes):
    config = toy_config(root, **{"max_staleness": 1, **changes})
    config.rollout.update(devices=4, dtype="float32")  # 8 CPU devices: 4 train, 4 sample
    return config


def assert_same_run(full, resumed):
    """The resumed run ends with the uninterrupted one's params (bit for bit) and pool."""
    a, b = params_of(full.model()), params_of(resumed.model())
    for name in a:
        np.testing.assert_array_equal(a[name], b[name], err_msg=name)
    assert full.pool.state_dict() == resumed.pool.state_dict()


def test_move_copies_each_shard_to_the_device_that_holds_the_same_piece():
    devices = jax.devices()
    mesh = lambda ds: jax.sharding.Mesh(np.array(ds).reshape(2, 2), ("a", "b"))
    source = jax.device_put(jnp.arange(32.0).reshape(4, 8), jax.NamedSharding(mesh(devices[:4]), jax.P("a", "b")))
    target = jax.NamedSharding(mesh(devices[4:]), jax.P("a", "b"))
    moved = parallel.move({"w": source}, {"w": target})["w"]
    assert moved.sharding == target and set(moved.devices()) == set(devices[4:])
    np.testing.assert_array_equal(moved, np.arange(32.0).reshape(4, 8))
    swapped = jax.NamedSharding(mesh(devices[4:]), jax.P("b", "a"))  # the same pieces, on other devices
    np.testing.assert_array_equal(parallel.move({"w": source}, {"w": swapped})["w"], np.arange(32.0).reshape(4, 8))
    with pytest.raises(ValueError, match="holds the piece"):  # pieces of another shape
        parallel.move({"w": source}, {"w": jax.NamedSharding(mesh(devices[4:]), jax.P("a", None))})


def test_bad_splits_say_what_to_set(toy_run, tmp_path):
    config = async_config(toy_run)
    config.rollout.devices = 8
    with pytest.raises(ValueError, match="at least one of each host's 8 devices"):
        rl.RLTrainer(config, str(tmp_path))
    config = async_config(toy_run)
    config.rollout.engine = "openai"
    with pytest.raises(ValueError, match="in-tree engine"):
        rl.RLTrainer(config, str(tmp_path))


@pytest.mark.slow
def test_each_update_trains_on_the_rollout_of_the_weights_one_update_old(toy_run, tmp_path):
    """Staleness 1 on 4 + 4 devices, fp32 rollouts, TIS capped at 2: step t's replies were
    sampled by the weights at the start of step t - 1 (their behaviour log-probs are that
    model's, not the current one's), pi_old is the current weights' own forward, and the
    update's first loss is the TIS-weighted surrogate computed here by hand."""
    config = async_config(toy_run, steps=4, tis_cap=2.0, drop_zero_advantage_groups=False)
    trainer = rl.RLTrainer(config, str(tmp_path))
    starts, trained = [], []  # the weights at each step's start; what each update got
    consume, update = trainer.consume, trainer.update
    trainer.consume = lambda step, r, w: starts.append(jax.tree.map(jnp.copy, trainer.state)) or consume(step, r, w)
    trainer.update = lambda seqs: trained.append(seqs) or update(seqs)
    rows = trainer.train()
    assert [r["staleness"] for r in rows] == [0, 1, 1, 1] and [r["policy_version"] for r in rows] == [0, 0, 1, 2]
    engine_devices = {d for x in jax.tree.leaves(jax.tree.map(lambda a: a, trainer.engine.model)) for d in x.devices()}
    train_devices = {d for x in jax.tree.leaves(trainer.state.params) for d in x.devices()}
    assert engine_devices == set(jax.devices()[4:]) and train_devices == set(jax.devices()[:4])

    seqs, row = trained[2], rows[2]  # step 3: sampled by the weights at the start of step 2
    mask = np.arange(seqs.completions.shape[1])[None] < seqs.lengths[:, None]
    behaviour, old = seqs.per_token["rollout_logprobs"], seqs.per_token["old_logprobs"]
    under = lambda state: logprobs_at(state.model(trainer.graphdef), seqs, 0)
    np.testing.assert_allclose(behaviour[mask], under(starts[1])[mask], atol=1e-4)
    np.testing.assert_allclose(old[mask], under(starts[2])[mask], atol=1e-4)
    assert np.abs(behaviour - old)[mask].mean() > 0.05  # one update apart: measured 0.3-1.3 at lr 2e-2
    weights = np.minimum(np.exp(old - behaviour), 2.0)
    assert (weights[mask] == 2.0).any() and (weights[mask] < 0.9).any()
    # the first optimizer step: pi = pi_old (ratio 1), loss = -mean over tokens of A * weight
    by_hand = -(seqs.advantages[:, None] * weights)[mask].sum() / mask.sum()
    np.testing.assert_allclose(row["loss"], by_hand, rtol=1e-4, atol=1e-6)
    assert abs(by_hand) > 1e-3


@pytest.mark.slow
def test_killed_async_run_resumes_exactly(toy_run, tmp_path):
    """Stage 2 (the miner observes each rollout as the worker finishes it) with dynamic
    sampling (refills in the worker): killed after step 4, with a checkpoint holding step 5's
    rollout sampled ahead, the resumed run ends with the uninterrupted run's params and pool."""
    config = lambda: async_config(toy_run, stage=2, dynamic_sampling=True, max_refills=2)
    full = rl.RLTrainer(config(), str(tmp_path / "full"))
    rows = full.train()
    assert sum(r["refills"] for r in rows) > 0
    with pytest.raises(Killed):
        rl.RLTrainer(config(), str(tmp_path / "split")).train(on_step=kill_at(4))
    resumed = rl.RLTrainer(config(), str(tmp_path / "split"))
    resumed.train()
    assert_same_run(full, resumed)


@pytest.mark.slow
def test_sigterm_mid_update_saves_the_rollout_sampled_ahead_and_resumes_exactly(toy_run, tmp_path):
    """SIGTERM in step 3's update (2 minibatches): the checkpoint holds the partly updated
    state, the rest of the update and step 4's rollout, sampled ahead from the weights at the
    start of step 3 (the worker finishes it: its checks defer to the main thread's). The rerun
    samples nothing for step 4 and ends with the uninterrupted run's params and pool."""
    config = lambda: async_config(toy_run, steps=5, minibatches=2, drop_zero_advantage_groups=False)
    full = rl.RLTrainer(config(), str(tmp_path / "full"))
    full.train()
    cut = rl.RLTrainer(config(), str(tmp_path / "cut"))
    step_fn, calls = cut.step_fn, []

    def signalled(state, batch):
        calls.append(1)
        if len(calls) == 5:  # step 3's first optimizer step
            signal.raise_signal(signal.SIGTERM)
        return step_fn(state, batch)
    cut.step_fn = signalled
    with pytest.raises(preemption.Preempted, match="before optimizer step 2 of 2"):
        cut.train()
    meta = json.loads((tmp_path / "cut" / "checkpoints" / "2" / "meta" / "metadata").read_text())
    assert meta["pending"]["step"] == 2 and [r["step"] for r in meta["inflight"]] == [3]
    assert meta["inflight"][0]["version"] == 2 and meta["next_launch"] == 4
    resumed = rl.RLTrainer(config(), str(tmp_path / "cut"))
    sampled, produce = [], resumed.produce
    resumed.produce = lambda step, version, weights: sampled.append(step) or produce(step, version, weights)
    resumed.train()
    assert sampled == [4]  # step 4's rollout came from the checkpoint
    assert_same_run(full, resumed)


@pytest.mark.slow
def test_toy_task_is_learned_one_update_stale(toy_run, tmp_path):
    rows = rl.RLTrainer(async_config(toy_run, steps=30, tis_cap=2.0), str(tmp_path)).train()
    first = np.mean([r["reward_mean"] for r in rows[:3]])
    last = np.mean([r["reward_mean"] for r in rows[-3:]])
    assert first < 0.5 and last > 0.9, [round(r["reward_mean"], 2) for r in rows]
    assert {r["staleness"] for r in rows[1:]} == {1}

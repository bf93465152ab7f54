"""RL on real updates: the KL reference over 5 steps, stage 1's graded 1:1 blend surviving a
kill, the walk back over corrupt checkpoints, and 2 processes x 4 devices = 1 x 8."""

import json
import os
import signal
import subprocess
import sys

import jax
import ml_collections
import numpy as np
import pytest
from flax import nnx

from fleming_jax import models, parallel
from fleming_jax.train import rl
from tests.test_hf import params_of
from tests.test_parallel import ROOT, free_port
from tests.test_rl import Killed, kill_at, model_cfg, toy_config, toy_run  # noqa: F401 (toy_run is a fixture)


@pytest.mark.slow
def test_kl_to_the_reference_grows_from_zero_over_real_updates(toy_run, tmp_path):
    config = toy_config(toy_run, steps=5, dynamic_sampling=True, max_refills=4, grpo=dict(beta=0.04))
    config.optimizer.learning_rate = 5e-3
    trainer = rl.RLTrainer(config, str(tmp_path))
    start = params_of(models.build(model_cfg(str(toy_run)))[0])
    rows = trainer.train()
    print("kl_ref per step", [(r.get("kl_ref"), r["reward_mean"], r["trained_groups"]) for r in rows])
    kl = [r["kl_ref"] for r in rows]
    assert len(kl) == 5 and np.all(np.isfinite(kl)) and min(kl) >= 0
    assert kl == sorted(kl)  # measured: 6.9e-08, 0.016, 0.020, 0.029, 0.039
    assert kl[0] < 1e-3 and kl[-1] > 10 * max(kl[0], 1e-6) and kl[-1] > 1e-3  # grows from ~0 (bf16 copy)
    # the reference is still the starting policy, in bf16, after 5 donated updates (its weights: one state)
    (reference,) = trainer.reference
    reference = jax.tree.map(np.asarray, nnx.to_pure_dict(reference))
    assert reference["layers"]["q_proj"].dtype == jax.numpy.bfloat16
    np.testing.assert_allclose(np.asarray(reference["layers"]["q_proj"], np.float32), start["layers/q_proj"],
                               rtol=1e-2, atol=1e-3)
    assert not np.allclose(params_of(trainer.model())["layers/q_proj"], start["layers/q_proj"])


PLANTED = {range(0, 6): [True] * 4, range(6, 12): [True, False] * 2, range(12, 16): [False] * 4}


def planted(indices, k):
    """Pass rates planted per record: 0-5 always (Easy), 6-11 half (Moderate), 12-15 never."""
    return [next(v for r, v in PLANTED.items() if i in r)[:k] for i in indices]


@pytest.mark.slow
def test_stage1_grades_then_draws_easy_and_moderate_1_to_1_and_resumes_the_same(toy_run, tmp_path):
    config = lambda: toy_config(toy_run, 1, steps=4, grade_k=4)
    picks = {}

    def trainer(name, score=planted):
        t = rl.RLTrainer(config(), str(tmp_path / name))
        t.score_pool = score
        pick = t.pick
        t.pick = lambda n: picks.setdefault(name, []).append(pick(n)) or picks[name][-1]
        return t
    full = trainer("full")
    rows = full.train()
    levels = full.pool.levels()
    assert levels == ["Easy"] * 6 + ["Moderate"] * 6 + ["Difficult"] * 4  # the grades were kept
    drawn = {k: sum(r[f"drawn_{k}"] for r in rows) for k in ("easy", "moderate", "difficult")}
    assert drawn == dict(easy=8, moderate=8, difficult=0), drawn
    for step in picks["full"]:
        assert sorted(levels[i] for i in step) == ["Easy", "Easy", "Moderate", "Moderate"]

    with pytest.raises(Killed):
        trainer("split").train(on_step=kill_at(2))

    def must_not_grade(indices, k):
        raise AssertionError("a resumed run must take its grades from the checkpoint")
    resumed = trainer("split", must_not_grade)
    resumed.train()
    assert picks["split"] == picks["full"]
    assert resumed.pool.state_dict() == full.pool.state_dict()
    with open(tmp_path / "split" / "metrics.jsonl") as f:
        assert [json.loads(line)["step"] for line in f] == [1, 2, 3, 4]  # none repeated


def corrupt(step_dir, how: str):
    """Damage a saved step the way a killed or failing write leaves it."""
    if how == "empty":
        for root, dirs, files in os.walk(step_dir, topdown=False):
            for name in files:
                os.remove(os.path.join(root, name))
            for name in dirs:
                os.rmdir(os.path.join(root, name))
    elif how == "truncated":
        files = [os.path.join(r, f) for r, _, fs in os.walk(os.path.join(step_dir, "params")) for f in fs]
        biggest = max(files, key=os.path.getsize)
        with open(biggest, "r+b") as f:
            f.truncate(os.path.getsize(biggest) // 2)
    elif how == "no_metadata":
        for name in ("_CHECKPOINT_METADATA", os.path.join("meta", "metadata")):
            if os.path.exists(os.path.join(step_dir, name)):
                os.remove(os.path.join(step_dir, name))
        for root, _, files in os.walk(os.path.join(step_dir, "opt_state")):
            for name in files:
                if "manifest" in name or name == "_METADATA":
                    os.remove(os.path.join(root, name))
    else:
        raise ValueError(how)


@pytest.mark.slow
def test_resume_walks_back_over_corrupt_checkpoints(toy_run, tmp_path, capsys):
    config = toy_config(toy_run, 2, steps=4, group_size=8)
    config.checkpoint.every = 1
    full = rl.RLTrainer(config, str(tmp_path / "full"))
    full.train()

    with pytest.raises(Killed):
        rl.RLTrainer(config, str(tmp_path / "cut")).train(on_step=kill_at(4))
    ckpts = tmp_path / "cut" / "checkpoints"
    assert sorted(os.listdir(ckpts)) == ["2", "3", "4"]
    corrupt(ckpts / "4", "empty")
    corrupt(ckpts / "3", "truncated")
    os.makedirs(ckpts / "5.orbax-checkpoint-tmp-1234" / "params")  # an unfinished save
    capsys.readouterr()
    resumed = rl.RLTrainer(config, str(tmp_path / "cut"))
    rows = resumed.train()
    out = capsys.readouterr().out
    assert "checkpoint step 4" in out and "checkpoint step 3" in out and "resumed from" in out, out
    assert [r["step"] for r in rows] == [3, 4]
    a, b = params_of(full.model()), params_of(resumed.model())
    for name in a:
        np.testing.assert_array_equal(a[name], b[name], err_msg=name)
    assert sorted(os.listdir(ckpts)) == ["2", "3", "4"]  # rewritten; the bad ones moved aside, tmp removed
    assert sorted(d.split("-")[0] for d in os.listdir(tmp_path / "cut" / "checkpoints_skipped")) == ["3", "4"]
    with open(tmp_path / "cut" / "metrics.jsonl") as f:
        assert [json.loads(line)["step"] for line in f] == [1, 2, 3, 4]
    # restore places every leaf, the step included, in the train state's shardings (as SFT's)
    again = rl.RLTrainer(config, str(tmp_path / "cut"))
    fresh = jax.tree.map(lambda x: x.sharding, again.state)
    assert again.restore() == 4
    placed = jax.tree.map(lambda x: x.sharding, again.state)
    assert placed.step == fresh.step and jax.tree.leaves(placed) == jax.tree.leaves(fresh)


# ------------------------------------------------------------------ 2 processes x 4 devices
def multihost_config(root):
    config = toy_config(root, 1, steps=3, dynamic_sampling=True, max_refills=4, grade_k=0,
                        grpo=dict(beta=0.04))
    config.optimizer.learning_rate = 5e-3
    config.mesh = ml_collections.ConfigDict(dict(data=2, fsdp=4, tensor=1))
    config.checkpoint.every = 1000
    return config


def multihost_run(root, workdir, signal_step=None, lora=False, ahead=False):
    """3 real RL steps with beta > 0 and dynamic sampling; (rows, params, rows seen per step).
    `signal_step=n`: this process gets SIGTERM as step n's first rollout starts; `lora`: rank-4
    adapters are what trains (`params` holds them); `ahead`: rollouts sampled one update ahead
    on half of each host's devices (`rl.max_staleness=1`, `rollout.devices`), fp32."""
    config = multihost_config(root)
    if lora:
        config.model.update(lora_rank=4, lora_alpha=8.0)
        config.optimizer.learning_rate = 2e-2
    if ahead:
        config.rl.max_staleness = 1
        config.rollout.update(devices=4, dtype="float32")
        config.mesh.update(data=2, fsdp=-1)
    trainer = rl.RLTrainer(config, workdir)
    if signal_step:
        from tests.test_preemption import signal_in_step

        signal_in_step(trainer, signal_step)
    seen = []
    step_fn, logprobs_of = trainer.step_fn, trainer.logprobs_of

    def counting_step(state, batch):
        seen.append(("update", batch["tokens"].shape[0], batch["advantages"].shape[0]))
        return step_fn(state, batch)

    def counting_logprobs(params, batch):
        if params is trainer.reference:
            seen.append(("reference", batch["tokens"].shape[0], batch["completion_mask"].shape[0]))
        return logprobs_of(params, batch)
    trainer.step_fn, trainer.logprobs_of = counting_step, counting_logprobs
    rows = trainer.train()
    params = {k: parallel.to_host(v) for k, v in _flat(nnx.to_pure_dict(trainer.state.params)).items()}
    return [{k: v for k, v in r.items() if not k.startswith("time_")} for r in rows], params, seen


def _flat(tree, prefix=""):
    out = {}
    for k, v in tree.items():
        out.update(_flat(v, f"{prefix}{k}/") if isinstance(v, dict) else {f"{prefix}{k}": v})
    return out


def launch(root, tmp_path, workdir, mode="run"):
    """2 worker processes x 4 devices in `workdir`; returns their logs (both must exit 0)."""
    port = free_port()
    env = dict(os.environ, PYTHONPATH=ROOT)
    procs = [subprocess.Popen([sys.executable, "-m", "tests.multihost_rl_worker", str(port), str(i), "2",
                               str(root), str(tmp_path / workdir), str(tmp_path / f"{workdir}{i}.npz"), mode],
                              cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for i in range(2)]
    return procs


def assert_like_one_process(tmp_path, name, rows, params, seen=None):
    """Both processes of the 2-process run `name` logged the 1-process run's rows (and `seen`)
    and ended with its params, up to reduction order."""
    for i in range(2):
        got = np.load(tmp_path / f"{name}{i}.npz", allow_pickle=True)
        if seen is not None:
            assert [tuple(s) for s in got["seen"].tolist()] == [tuple(s) for s in seen]
        for a, b in zip(got["rows"].tolist(), rows, strict=True):
            assert a.keys() == b.keys()
            for k in a:
                # fp32 rollouts: the mismatch metrics are rounding noise (~1e-7 a token), and the
                # 2-process run sums in another order
                atol = 1e-5 if k.startswith("mismatch_") else 1e-7
                np.testing.assert_allclose(a[k], b[k], rtol=1e-5, atol=atol, err_msg=k)
        # Adam's m / sqrt(v) magnifies reduction-order noise where a gradient is ~0 (the decode
        # layout's tensor-parallel sums run across processes in one run, inside one in the
        # other): measured 4e-6 at most, against 1.5e-2 that 3 steps at lr 5e-3 can move a weight
        for key, value in params.items():
            np.testing.assert_allclose(got[key], value, rtol=1e-5, atol=1e-5, err_msg=key)


def assert_resumed_like(tmp_path, resumed, uninterrupted, params, first_row=None):
    """Both processes of the resumed 2-process run logged the uninterrupted run's last rows
    (from `first_row`; None: as many as it logged) and ended with its params, bit for bit."""
    full = np.load(tmp_path / f"{uninterrupted}0.npz", allow_pickle=True)
    for i in range(2):
        got = np.load(tmp_path / f"{resumed}{i}.npz", allow_pickle=True)
        start = -len(got["rows"]) if first_row is None else first_row
        assert got["rows"].tolist() == full["rows"].tolist()[start:]
        for name in params:
            np.testing.assert_array_equal(got[name], full[name], err_msg=name)


def finish(procs):
    logs = []
    for p in procs:
        out, _ = p.communicate(timeout=600)
        assert p.returncode == 0, out[-3000:]
        logs.append(out)
    return logs


@pytest.mark.slow
def test_lora_on_two_processes_equals_one_process(toy_run, tmp_path):
    """RL with adapters, 2 processes x 4 devices against 1 x 8: the same rows and adapters."""
    procs = launch(toy_run, tmp_path, "mh_lora", "lora")
    rows, params, _ = multihost_run(str(toy_run), str(tmp_path / "single"), lora=True)
    finish(procs)
    assert params and all("_lora_" in name for name in params)
    assert any(np.abs(v).max() > 0 for name, v in params.items() if name.endswith("_b"))
    assert_like_one_process(tmp_path, "mh_lora", rows, params)


@pytest.mark.slow
def test_two_processes_equal_one_process_and_stop_together_on_one_sigterm(toy_run, tmp_path):
    """2 processes x 4 devices = 1 x 8 with the configured rows; then SIGTERM to process 1
    alone as step 2's rollout starts: both stop at the same decode chunk, save step 1 and exit
    0, and rerunning resumes to the uninterrupted 2-process run's params and metrics."""
    procs = launch(toy_run, tmp_path, "mh")
    rows, params, seen = multihost_run(str(toy_run), str(tmp_path / "single"))
    finish(procs)
    config = multihost_config(str(toy_run))
    assert seen and all(kind in ("update", "reference") for kind, *_ in seen)
    c = config.rl
    assert [kind for kind, *_ in seen] == ["reference", "update"] * 3  # 3 steps, each with a real update
    for (_, ref_rows, _), (_, tokens, other), row in zip(seen[::2], seen[1::2], rows):
        # the kept sequences packed into rows (a multiple of the 8 devices; the reference pass
        # and the update pack them the same way here: one minibatch, no accumulation), never
        # that x the number of processes
        assert ref_rows == tokens == other and tokens % 8 == 0, (seen, rows)
        assert tokens <= max(8, row["trained_groups"] * c.group_size), (seen, rows)
    assert_like_one_process(tmp_path, "mh", rows, params, seen)

    logs = finish(launch(toy_run, tmp_path, "mh_cut", "sigterm"))
    assert "preempted at" in logs[0] and "preempted at" in logs[1], logs  # process 0 was never signalled
    assert "SIGTERM during a rollout: saved step 1" in logs[0], logs[0][-3000:]
    assert [p.name for p in (tmp_path / "mh_cut" / "checkpoints").iterdir()] == ["1"]
    assert not (tmp_path / "mh_cut0.npz").exists()
    logs = finish(launch(toy_run, tmp_path, "mh_cut"))
    assert "resumed from" in logs[0], logs[0][-3000:]
    assert_resumed_like(tmp_path, "mh_cut", "mh", params, 1)


@pytest.mark.slow
def test_rollouts_sampled_ahead_on_two_processes_equal_one_process_and_stop_together(toy_run, tmp_path):
    """`rl.max_staleness=1` with `rollout.devices` on 2 processes x 4 devices (each host gives
    2 to rollouts; on CPU processes the rollouts sampled ahead run in the main thread, see
    `RLTrainer.overlap`) against 1 x 8 (4 + 4, on the worker thread): the same rows, staleness
    and params. Then SIGTERM to process 1 alone while a rollout is sampled ahead: both hosts
    stop at the same check (the trainer's agreements run on its own devices, the rollout's on
    theirs), save, exit 0, and the rerun ends with the uninterrupted 2-process run's params."""
    procs = launch(toy_run, tmp_path, "mh_ahead", "ahead")
    rows, params, _ = multihost_run(str(toy_run), str(tmp_path / "single"), ahead=True)
    finish(procs)
    assert [r["staleness"] for r in rows] == [0, 1, 1] and [r["policy_version"] for r in rows] == [0, 0, 1]
    assert_like_one_process(tmp_path, "mh_ahead", rows, params)

    logs = finish(launch(toy_run, tmp_path, "mh_ahead_cut", "ahead+sigterm"))
    assert all("preempted at" in log for log in logs), logs
    assert not (tmp_path / "mh_ahead_cut0.npz").exists()
    logs = finish(launch(toy_run, tmp_path, "mh_ahead_cut", "ahead"))
    assert "resumed from" in logs[0], logs[0][-3000:]
    assert_resumed_like(tmp_path, "mh_ahead_cut", "mh_ahead", params)


@pytest.mark.slow
@pytest.mark.parametrize("stage", [1, 2])
def test_sigkill_mid_run_resumes_bit_exact(toy_run, tmp_path, stage):
    """A real kill -9 of a running RL process (async checkpoint saves may be in flight), then
    the same command again: the params equal an uninterrupted run's bit for bit."""
    def worker(name):
        command = [sys.executable, "-m", "tests.rl_kill_worker", str(toy_run), str(tmp_path / name), str(stage),
                   str(tmp_path / f"{name}.npz")]
        return subprocess.Popen(command, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)

    killed = worker("cut")
    for line in killed.stdout:
        if "step 3/5" in line:  # step 3's save has just been started
            killed.send_signal(signal.SIGKILL)
            break
    assert killed.wait(timeout=300) == -signal.SIGKILL
    assert not (tmp_path / "cut.npz").exists()
    for name in ("cut", "full"):
        run = worker(name)
        log = run.communicate(timeout=600)[0]
        assert run.returncode == 0, log[-3000:]
        if name == "cut":
            assert "resumed from" in log, log[-3000:]
    cut, full = np.load(tmp_path / "cut.npz"), np.load(tmp_path / "full.npz")
    for name in full.files:
        np.testing.assert_array_equal(cut[name], full[name], err_msg=name)

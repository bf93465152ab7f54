"""Preemption: SIGTERM in the middle of long work (an RL rollout, the stage-start pass, a
distillation, an SFT eval, task `eval`) stops at the next agreed check, saves what is
finished, raises `Preempted` (main.py exits 0 on it), and the rerun continues exactly as the
uninterrupted run.
The 2-process versions (one host signalled, both stop together) are in test_rl_stages.py and
test_sft.py."""

import json
import os
import signal

import numpy as np
import pytest

import main
from fleming_jax import evaluate, preemption, progress, rewards
from fleming_jax.distill import collect, teachers
from fleming_jax.train import rl, sft
from fleming_jax.data.records import format_reply
from tests.test_distill import REASONING, record
from tests.test_hf import params_of
from tests.test_rl import toy_config, toy_run  # noqa: F401 (toy_run is a fixture)
from tests import test_evaluate
from tests.test_evaluate import tiny_run  # noqa: F401 (a fixture)
from tests.test_sft import multihost_config, multihost_run, uneven_data


def test_eta_and_progress_lines():
    assert progress.duration(45) == "45s" and progress.duration(725) == "12m05s"
    assert progress.duration(3 * 3600 + 125) == "3h02m"
    assert progress.eta(2, 10, 30.0) == "ETA 2m00s"  # 15 s a unit, 8 left
    assert progress.eta(0, 10, 5.0) == "" and progress.eta(10, 10, 5.0) == ""
    lines = []
    shown = progress.Progress(100, "records", lines.append, every=3600, start=20)
    shown.update(30)  # within `every` of the start: quiet
    shown.update(100)  # the end is always shown
    assert len(lines) == 1 and lines[0].startswith("100/100 records (") and "ETA" not in lines[0]


def test_check_is_false_outside_a_job_and_raises_after_sigterm_inside_one():
    preemption.check("nothing")  # no job listening: SIGTERM would simply end the process
    with preemption.listening():
        preemption.check("before")
        signal.raise_signal(signal.SIGTERM)
        with pytest.raises(preemption.Preempted, match="SIGTERM during a rollout"):
            preemption.check("a rollout")
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL


def signal_on_rollout(trainer, calls: set[int], log: list):
    """SIGTERM arrives just as the trainer's n-th rollout starts (n in `calls`): the engine
    stops at its first chunk boundary."""
    original, count = trainer.rollout, [0]

    def rollout(indices, key, samples):
        count[0] += 1
        log.append(count[0])
        if count[0] in calls:
            signal.raise_signal(signal.SIGTERM)
        return original(indices, key, samples)
    trainer.rollout = rollout
    return trainer


def signal_in_step(trainer, step: int):
    """SIGTERM arrives as the first rollout of `step` (1-based) starts."""
    one_step, rollout, current = trainer.one_step, trainer.rollout, [0]

    def counted_step(index):
        current[0] = index + 1
        return one_step(index)

    def signalled_rollout(indices, key, samples):
        if current[0] == step:
            current[0] = 0
            signal.raise_signal(signal.SIGTERM)
        return rollout(indices, key, samples)
    trainer.one_step, trainer.rollout = counted_step, signalled_rollout
    return trainer


@pytest.mark.slow
def test_sigterm_mid_rollout_saves_the_last_step_and_resumes_exactly(toy_run, tmp_path):
    """Stage 2 with dynamic sampling: the signal lands in a refill rollout, after the step's
    first rollout has fed the miner and drawn prompts; the host state goes back to the step's
    start, so the saved step resumes as the uninterrupted run."""
    config = lambda: toy_config(toy_run, 2, steps=3, dynamic_sampling=True, max_refills=4)
    full_calls = []
    full = signal_on_rollout(rl.RLTrainer(config(), str(tmp_path / "full")), set(), full_calls)
    full.train()
    pass_calls = 1  # the miner's scoring pass is one rollout here (16 questions x 2 in a call)
    rows = [json.loads(line) for line in open(tmp_path / "full" / "metrics.jsonl")]
    assert rows[1]["refills"] > 0, rows  # step 2 refilled: its second rollout is the target
    target = pass_calls + 1 + rows[0]["refills"] + 2
    cut = signal_on_rollout(rl.RLTrainer(config(), str(tmp_path / "cut")), {target}, [])
    with pytest.raises(preemption.Preempted, match="rollout"):
        cut.train()
    assert sorted((tmp_path / "cut" / "checkpoints").iterdir())[-1].name == "1"  # step 1 saved, not 2
    resumed = rl.RLTrainer(config(), str(tmp_path / "cut"))
    resumed.train()
    a, b = params_of(full.model()), params_of(resumed.model())
    for name in a:
        np.testing.assert_array_equal(a[name], b[name], err_msg=name)
    assert resumed.pool.state_dict() == full.pool.state_dict()
    keep = lambda r: {k: v for k, v in r.items() if not k.startswith("time")}
    got = [keep(json.loads(line)) for line in open(tmp_path / "cut" / "metrics.jsonl")]
    assert got == [keep(r) for r in rows]


@pytest.mark.slow
def test_preempted_pool_pass_keeps_its_chunks_and_step_zero_keeps_the_pass(toy_run, tmp_path):
    """Stage 2's scoring pass in two chunks, preempted in the second: the first chunk's
    outcomes are kept and not asked again. Then preempted in step 1's rollout: a step-0
    checkpoint holds the pass, so the next rerun does not score again."""
    config = lambda: toy_config(toy_run, 2, steps=1, group_size=4)  # 16 questions, 8 per pass call
    full_calls = []
    full = signal_on_rollout(rl.RLTrainer(config(), str(tmp_path / "full")), set(), full_calls)
    full.train()
    assert len(full_calls) == 3  # pass chunk 1, pass chunk 2, step 1
    calls = []
    with pytest.raises(preemption.Preempted):
        signal_on_rollout(rl.RLTrainer(config(), str(tmp_path / "cut")), {2}, calls).train()
    kept = json.loads((tmp_path / "cut" / "pool_pass.json").read_text())
    assert len(kept["outcomes"]) == 8 and kept["k"] == 2
    assert not (tmp_path / "cut" / "checkpoints").exists() or not list((tmp_path / "cut" / "checkpoints").iterdir())
    calls = []
    with pytest.raises(preemption.Preempted):
        signal_on_rollout(rl.RLTrainer(config(), str(tmp_path / "cut")), {2}, calls).train()
    assert calls == [1, 2]  # the pass's second chunk only, then step 1's rollout (signalled)
    assert [p.name for p in (tmp_path / "cut" / "checkpoints").iterdir()] == ["0"]
    calls = []
    resumed = signal_on_rollout(rl.RLTrainer(config(), str(tmp_path / "cut")), set(), calls)
    resumed.train()
    assert calls == [1]  # step 1 only: the pass came from the step-0 checkpoint
    a, b = params_of(full.model()), params_of(resumed.model())
    for name in a:
        np.testing.assert_array_equal(a[name], b[name], err_msg=name)
    assert resumed.pool.state_dict() == full.pool.state_dict()


def signal_in_update(trainer, step: int, after: int, log: list):
    """SIGTERM arrives during optimizer step `after` of `step`'s update (1-based); `log`
    gets each rollout's step."""
    one_step, rollout, step_fn, current = trainer.one_step, trainer.rollout, trainer.step_fn, [0, 0]

    def counted_step(index):
        current[:] = [index + 1, 0]
        return one_step(index)

    def logged_rollout(indices, key, samples):
        log.append(current[0])
        return rollout(indices, key, samples)

    def signalled_step(state, batch):
        current[1] += 1
        if current == [step, after]:
            signal.raise_signal(signal.SIGTERM)
        return step_fn(state, batch)
    trainer.one_step, trainer.rollout, trainer.step_fn = counted_step, logged_rollout, signalled_step
    return trainer


@pytest.mark.slow
def test_sigterm_between_optimizer_steps_saves_the_partial_update_and_resumes_exactly(toy_run, tmp_path):
    """mu=2 x 2 minibatches: 4 optimizer steps an update, checkpoints every 2 steps. SIGTERM
    in step 3's second optimizer step: the update stops before its third, and the checkpoint
    of step 2 is replaced by one of the partly updated state with the rest of the update.
    The rerun finishes step 3 without a new rollout; SIGTERM again in step 4's first optimizer
    step (no checkpoint of step 3 to replace); the last rerun gives the uninterrupted run's
    params, pool and metrics."""
    config = lambda: toy_config(toy_run, steps=5, mu=2, minibatches=2, drop_zero_advantage_groups=False)
    full = rl.RLTrainer(config(), str(tmp_path / "full"))
    full.train()
    rows = [json.loads(line) for line in open(tmp_path / "full" / "metrics.jsonl")]
    checkpoints = tmp_path / "cut" / "checkpoints"
    rollouts = []
    with pytest.raises(preemption.Preempted, match="before optimizer step 3 of 4"):
        signal_in_update(rl.RLTrainer(config(), str(tmp_path / "cut")), 3, 2, rollouts).train()
    assert sorted(int(p.name) for p in checkpoints.iterdir()) == [2] and rollouts == [1, 2, 3]
    pending = json.loads((checkpoints / "2" / "meta" / "metadata").read_text())["pending"]
    assert pending["step"] == 2 and pending["done"] == 2 and len(pending["laid"]) == 4
    rollouts = []
    with pytest.raises(preemption.Preempted, match="before optimizer step 2 of 4"):
        signal_in_update(rl.RLTrainer(config(), str(tmp_path / "cut")), 4, 1, rollouts).train()
    assert sorted(int(p.name) for p in checkpoints.iterdir()) == [2, 3] and rollouts == [4]  # step 3: no rollout
    rollouts = []
    resumed = signal_in_update(rl.RLTrainer(config(), str(tmp_path / "cut")), 0, 0, rollouts)
    resumed.train()
    assert rollouts == [5]
    a, b = params_of(full.model()), params_of(resumed.model())
    for name in a:
        np.testing.assert_array_equal(a[name], b[name], err_msg=name)
    assert resumed.pool.state_dict() == full.pool.state_dict()
    keep = lambda r: {k: v for k, v in r.items() if not k.startswith("time")}
    got = [keep(json.loads(line)) for line in open(tmp_path / "cut" / "metrics.jsonl")]
    assert got == [keep(r) for r in rows]


class Signalling(teachers.Teacher):
    """Answers right; SIGTERM arrives during its `at`-th call."""

    def __init__(self, at):
        self.at, self.asked = at, []

    def complete(self, messages, n=1, temperature=1.0, max_tokens=4096):
        self.asked.append(messages[0]["content"])
        if len(self.asked) == self.at:
            signal.raise_signal(signal.SIGTERM)
        return [format_reply(REASONING, "B")] * n


def test_distillation_stops_at_a_chunk_boundary_and_the_rerun_asks_the_rest(tmp_path):
    records = [record(i) for i in range(6)]
    cfg = collect.CollectConfig(k=1, chunk=2, refine_rounds=0)
    log = str(tmp_path / "train.jsonl")
    first = Signalling(at=3)  # during chunk 2: chunk 2 still finishes, chunk 3 is not asked
    with preemption.listening(), pytest.raises(preemption.Preempted, match="distillation"):
        collect.collect(records, first, cfg, log, progress=lambda m: None)
    assert len(first.asked) == 4 and len(collect.read_log(log)) == 4
    second = Signalling(at=0)
    outcomes = collect.collect(records, second, cfg, log, progress=lambda m: None)
    assert len(second.asked) == 2 and [o["id"] for o in outcomes] == [r.id for r in records]
    assert all(o["sft"] for o in outcomes)


@pytest.mark.slow
def test_sigterm_during_sft_eval_skips_the_rest_saves_the_step_and_the_rerun_continues(tmp_path):
    """SIGTERM in the first of step 1's 2 eval batches: the eval stops there (not after all
    batches), step 1 is saved with its row (no eval_loss), `Preempted` goes up at step 2's
    check, and the rerun resumes from step 1. (That a resumed run equals the uninterrupted
    one is test_sft.py's test_resume_after_sigterm_equals_the_uninterrupted_run.)"""
    root = uneven_data(str(tmp_path))
    cut = multihost_run(root, str(tmp_path / "cut"), sigterm="here")
    assert cut["eval_batches"] == 2 and cut["eval_calls"] == 1, cut
    assert cut["preempted"] == "SIGTERM during step 2"
    assert os.listdir(tmp_path / "cut" / "checkpoints") == ["1"]
    with open(tmp_path / "cut" / "metrics.jsonl") as f:
        (row,) = [json.loads(line) for line in f]
    assert row["step"] == 1 and "eval_loss" not in row
    rows = sft.Trainer(multihost_config(root), str(tmp_path / "cut")).train()
    assert [r["step"] for r in rows] == [2] and "eval_loss" in rows[0]


def test_sigterm_during_the_eval_task_stops_in_the_batch_it_arrived_in(tiny_run, tmp_path, monkeypatch):
    """Task `eval` (2 benchmarks x 2 one-question batches): SIGTERM as the first batch starts
    is seen at the engine's first chunk boundary in that batch; no other batch is sampled."""
    monkeypatch.setattr(rewards, "score", test_evaluate.toy_score)
    monkeypatch.setattr(rewards, "extract_answer", test_evaluate.toy_extract)
    original, calls = evaluate.sample_texts, []

    def sample_texts(*args, **kwargs):
        calls.append(len(calls) + 1)
        if len(calls) == 1:
            signal.raise_signal(signal.SIGTERM)
        return original(*args, **kwargs)
    monkeypatch.setattr(evaluate, "sample_texts", sample_texts)
    with preemption.listening(), pytest.raises(preemption.Preempted, match="SIGTERM during a rollout"):
        main.run_task(test_evaluate.task_config(tiny_run), str(tmp_path))
    assert calls == [1]

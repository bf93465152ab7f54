"""The RL loop: a toy verifiable task is learned, and a killed run resumes exactly."""

import os

import numpy as np
import pytest

from configs import rl_stage1, rl_stage2
from fleming_jax import models, rewards
from fleming_jax import tokenizer as toklib
from fleming_jax.data.records import QARecord, write_jsonl
from fleming_jax.train import checkpoint, rl
from tests.test_hf import params_of

DIGITS = set("0123456789")


def toy_score(completion, record, config=None):
    """A verifiable toy task any random model can start on: reply starting with a digit."""
    r = float(completion[:1] in DIGITS)
    return dict(reward=r, accuracy=r, format=r)


@pytest.fixture(scope="module")
def toy_run(tmp_path_factory):
    """Tokenizer, QA records and a random tiny model checkpoint on disk."""
    root = tmp_path_factory.mktemp("toy")
    texts = [f"question {i}: which option? A {i} B {i * 7} C D 0123456789" for i in range(200)]
    toklib.build(texts, str(root / "tokenizer"), vocab_size=320)
    records = [QARecord(id=str(i), source="toy", question=f"question {i}: which option?",
                        options={"A": "a", "B": "b"}, answer="A") for i in range(16)]
    write_jsonl(str(root / "train.jsonl"), records)
    cfg = model_cfg(str(root))
    checkpoint.save_params(str(root / "init"), models.build(cfg)[0])
    return root


def model_cfg(root):
    cfg = rl_stage1.get_config("tiny").model
    cfg.update(num_layers=2, hidden_size=64, intermediate_size=128, num_heads=4, num_kv_heads=2, head_dim=16,
               vocab_size=320, seed=1, init_from="")
    return cfg


def toy_config(root, stage=1, **rl_changes):
    config = (rl_stage1 if stage == 1 else rl_stage2).get_config("tiny")
    config.model = model_cfg(root)
    config.model.init_from = os.path.join(root, "init")
    config.tokenizer = os.path.join(root, "tokenizer")
    config.data.update(train=os.path.join(root, "train.jsonl"), eval="")
    config.rl.update(dict(steps=6, prompts_per_step=4, group_size=8, max_new_tokens=8, grade_k=0, score_k=2,
                          sparsity_patience=1000) | rl_changes)
    config.optimizer.learning_rate = 2e-2
    config.checkpoint.every = 2
    return config


def test_toy_task_is_learned(toy_run, tmp_path, monkeypatch):
    monkeypatch.setattr(rewards, "score", toy_score)
    rows = rl.RLTrainer(toy_config(toy_run, steps=30), str(tmp_path)).train()
    first = np.mean([r["reward_mean"] for r in rows[:3]])
    last = np.mean([r["reward_mean"] for r in rows[-3:]])
    assert first < 0.5 and last > 0.9, [round(r["reward_mean"], 2) for r in rows]
    with open(tmp_path / "metrics.jsonl") as f:
        assert len(f.readlines()) == 30


class Killed(Exception):
    """Stands for a kill between steps (the run gets no chance to save)."""


def kill_at(n: int):
    """An `on_step` that kills the run after step n."""
    def on_step(step):
        if step == n:
            raise Killed
    return on_step


@pytest.mark.parametrize("stage", [1, pytest.param(2, marks=pytest.mark.slow)])
def test_killed_run_resumes_exactly(toy_run, tmp_path, monkeypatch, stage):
    monkeypatch.setattr(rewards, "score", toy_score)
    picked = {}

    def record_picks(trainer, workdir):
        original = trainer.pick
        trainer.pick = lambda n: picked.setdefault(workdir, []).append(original(n)) or picked[workdir][-1]
        return trainer

    full = record_picks(rl.RLTrainer(toy_config(toy_run, stage), str(tmp_path / "full")), "full")
    full.train()

    first = record_picks(rl.RLTrainer(toy_config(toy_run, stage), str(tmp_path / "split")), "split")
    with pytest.raises(Killed):
        first.train(on_step=kill_at(4))
    resumed = record_picks(rl.RLTrainer(toy_config(toy_run, stage), str(tmp_path / "split")), "split")
    resumed.train()
    assert picked["split"] == picked["full"]  # the same prompts, in the same order, after resuming
    a, b = params_of(full.model()), params_of(resumed.model())
    for name in a:
        np.testing.assert_array_equal(a[name], b[name], err_msg=name)
    assert a["layers/q_proj"].sum() != params_of(models.build(model_cfg(str(toy_run)))[0])["layers/q_proj"].sum()
    assert full.pool.state_dict() == resumed.pool.state_dict()


def test_missing_inputs_name_the_command_that_makes_them(toy_run, tmp_path):
    config = toy_config(toy_run, stage=2)
    config.data.train = str(tmp_path / "none.jsonl")
    with pytest.raises(FileNotFoundError, match="configs/synthesize.py"):
        rl.RLTrainer(config, str(tmp_path))
    config = rl_stage2.get_config("tiny")
    config.model.init_from = str(tmp_path / "no_checkpoints")
    with pytest.raises(FileNotFoundError, match="configs/rl_stage1.py"):
        rl.RLTrainer(config, str(tmp_path))


def test_rollout_batch_keeps_groups_and_narrows_to_the_longest_kept_completion():
    from fleming_jax import sampler
    g, budget = 2, 64
    tokens = np.arange(3 * g * budget, dtype=np.int32).reshape(3, g, budget) + 100
    lengths = np.array([[3, 40], [5, 2], [1, 4]])
    out = sampler.SampleOutput(tokens=tokens, logprobs=-np.ones((3, g, budget), np.float32),
                               model_logprobs=-np.full((3, g, budget), 0.5, np.float32),
                               lengths=lengths, done=np.ones((3, g), bool))
    prompts = [[1, 2, 3], [4, 5], [6]]
    keep = np.array([False, True, True])
    batch = rl.rollout_batch(prompts, out, np.array([[9, 9], [1, -1], [2, -2]], np.float32), keep, rows=6)
    p, window = sampler.bucket(3), sampler.bucket(5)  # longest kept completion: 5 (group 0's 40 is dropped)
    assert batch["tokens"].shape == batch["segments"].shape == (6, p + window)
    assert batch["completion_mask"].shape == batch["old_logprobs"].shape == (6, window)
    # row 0: prompt [4, 5] right-aligned in the prompt bucket, then group 1 sample 0's 5 tokens
    np.testing.assert_array_equal(batch["tokens"][0, p - 2:p + 5], [4, 5, *tokens[1, 0, :5]])
    assert batch["tokens"][0, :p - 2].sum() == 0 and batch["tokens"][0, p + 5:].sum() == 0
    np.testing.assert_array_equal(batch["completion_mask"][0], [1] * 5 + [0] * (window - 5))
    assert batch["segments"][0].sum() == 7 and batch["old_logprobs"][0].sum() == -2.5
    np.testing.assert_array_equal(batch["advantages"], [1, -1, 2, -2, 0, 0])
    assert batch["completion_mask"][4:].sum() == 0 and batch["segments"][4:].sum() == 0  # padding rows
    np.testing.assert_array_equal(batch["tokens"][3, p - 1:p + 4], [6, *tokens[2, 1, :4]])


@pytest.mark.parametrize("kept,total,multiple,rows", [
    (1, 16, 1, 8), (3, 16, 1, 32), (5, 16, 1, 64), (16, 16, 1, 128), (0, 16, 1, 8),
    (1, 16, 16, 16),  # rounded up to what minibatches x accumulation x devices divide
    (3, 3, 8, 24),    # never more than all the groups' rows
])
def test_batch_rows(kept, total, multiple, rows):
    assert rl.batch_rows(kept, 8, total, multiple) == rows


def test_reference_logprobs_cover_the_completion_window(toy_run, tmp_path, monkeypatch):
    """With beta > 0 the frozen reference is scored on the update batch's completion window;
    at the first step it is the rollout policy, so it matches the sampler's own log-probs."""
    monkeypatch.setattr(rewards, "score", lambda c, r, cfg=None: dict(reward=float(len(c) % 2), accuracy=0.0,
                                                                      format=0.0))
    trainer = rl.RLTrainer(toy_config(toy_run, grpo=dict(beta=0.1), reference_dtype="float32"), str(tmp_path))
    seen = []
    trainer.update = lambda batch: seen.append(batch) or {}
    trainer.one_step(0)
    batch = seen[0]
    assert batch["ref_logprobs"].shape == batch["completion_mask"].shape
    mask = batch["completion_mask"] > 0
    assert mask.sum() > 0
    np.testing.assert_allclose(batch["ref_logprobs"][mask], batch["old_logprobs"][mask], atol=2e-5)


@pytest.mark.parametrize("dynamic", [False, True])
def test_dynamic_sampling_refills_the_batch_with_groups_that_have_signal(toy_run, tmp_path, monkeypatch, dynamic):
    """Even record ids give mixed rewards within a group, odd ones all zero. The first draw
    has one useful group; each refill asks for the missing count: 3 (1 useful), 2 (1), 1 (1)."""
    calls = iter(range(10_000))
    monkeypatch.setattr(rewards, "score", lambda c, r, cfg=None: (
        lambda x: dict(reward=x, accuracy=x, format=1.0))(float(int(r.id) % 2 == 0 and next(calls) % 2 == 0)))
    trainer = rl.RLTrainer(toy_config(toy_run, 2, prompts_per_step=4, group_size=8, dynamic_sampling=dynamic,
                                      max_refills=3), str(tmp_path))
    draws = iter([[1, 3, 5, 0], [2, 7, 9], [11, 4, 13], [6, 8]])
    asked = []
    trainer.pick = lambda n: asked.append(n) or next(draws)[:n] if dynamic else [1, 3, 5, 0]
    seen = []
    trainer.update = lambda batch: seen.append(batch) or {}
    row = trainer.one_step(0)
    if not dynamic:
        assert row["refills"] == 0 and row["trained_groups"] == 1
        assert (seen[0]["advantages"] != 0).sum() == 8
        return
    assert asked == [4, 3, 2, 1] and row["refills"] == 3 and row["trained_groups"] == 4
    batch = seen[0]
    assert len(batch["advantages"]) == 32 and (batch["advantages"] != 0).sum() == 32
    assert row["zero_advantage_groups"] == pytest.approx(6 / 10)  # over all 10 groups sampled
    sampled = [1, 3, 5, 0, 2, 7, 9, 11, 4, 6]  # every rollout reached the stage-2 pool, G=8 tries each
    np.testing.assert_array_equal(np.flatnonzero(trainer.pool.total), sorted(sampled))
    assert set(trainer.pool.total[sampled]) == {8} and trainer.pool.correct[[1, 3, 5]].sum() == 0


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_rollout_trainer_mismatch_is_measured_and_recomputed(toy_run, tmp_path, monkeypatch, dtype):
    """One real step with the rollout decoding in `dtype`: the mismatch metrics are ~0 for an
    fp32 rollout and clearly not for bf16; with recompute_old_logprobs the update's pi_old is
    the trainer's own forward and the rollout's log-probs ride along."""
    monkeypatch.setattr(rewards, "score", toy_score)
    config = toy_config(toy_run, steps=1, recompute_old_logprobs=True)
    config.rollout.dtype = dtype
    trainer = rl.RLTrainer(config, str(tmp_path))
    seen, update = [], trainer.update
    trainer.update = lambda batch: seen.append(batch) or update(batch)
    row = trainer.one_step(0)
    batch = seen[0]
    mask = batch["completion_mask"] > 0
    gap = np.abs(batch["old_logprobs"] - batch["rollout_logprobs"])[mask]
    print(dtype, "mismatch", {k: v for k, v in row.items() if k.startswith("mismatch")})
    np.testing.assert_allclose(row["mismatch_abs"], gap.mean(), rtol=1e-4, atol=1e-7)
    np.testing.assert_allclose(row["mismatch_max"], gap.max(), rtol=1e-4, atol=1e-7)
    if dtype == "float32":
        assert row["mismatch_max"] < 1e-4 and row["mismatch_far"] == 0
    else:
        assert row["mismatch_abs"] > 1e-4  # measured 3.3e-4 (max 1.1e-3) on this toy model

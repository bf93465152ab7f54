"""The RL loop: a toy verifiable task is learned, and a killed run resumes exactly."""

import contextlib
import json
import os
import pathlib
import sys
import time

import numpy as np
import pytest
from jax import monitoring

from configs import rl_stage1, rl_stage2
from fleming_jax import models
from fleming_jax import tokenizer as toklib
from fleming_jax.data.records import QARecord, write_jsonl
from fleming_jax.train import checkpoint, rl
from tests.fake_openai import FakeServer
from tests.test_hf import params_of

DIGITS = set("0123456789")


def digit_first(completions, records):
    """A verifiable toy task any random model can start on: reply starting with a digit (the
    toy runs' `correctness` reward, named in their config)."""
    return [float(c[:1] in DIGITS) for c in completions]


def odd_length(completions, records):
    return [float(len(c) % 2) for c in completions]


PLANTED = iter(())  # the next call numbers of `planted_even_ids` (a test sets it)


def planted_even_ids(completions, records):
    """Even record ids right on every other call, odd ones never."""
    return [float(int(r.id) % 2 == 0 and next(PLANTED) % 2 == 0) for r in records]


def toy_rewards(fn="tests.test_rl:digit_first"):
    return dict(correctness=dict(fn=fn, weight=1.0))


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
    config.rl.rewards = rl_changes.get("rewards", toy_rewards())
    config.optimizer.learning_rate = 2e-2
    config.checkpoint.every = 2
    return config


@pytest.mark.parametrize("engine", ["local", "openai"])
@pytest.mark.slow
def test_toy_task_is_learned(toy_run, tmp_path, engine):
    """Through the in-tree engine, and through an OpenAI-compatible server that reloads the
    policy from disk after every update (`remote_engine`, a vLLM-like fake on 127.0.0.1)."""
    config = toy_config(toy_run, steps=30)
    with contextlib.ExitStack() as stack:
        if engine == "openai":
            server = stack.enter_context(FakeServer())
            config.rollout.engine = "openai"
            config.rollout.server.update(base_url=server.url + "/v1", model="policy")
        rows = rl.RLTrainer(config, str(tmp_path)).train()
    first = np.mean([r["reward_mean"] for r in rows[:3]])
    last = np.mean([r["reward_mean"] for r in rows[-3:]])
    assert first < 0.5 and last > 0.9, [round(r["reward_mean"], 2) for r in rows]
    with open(tmp_path / "metrics.jsonl") as f:
        assert len(f.readlines()) == 30
    if engine == "openai":  # every rollout sampled from the policy saved after the last update
        updates = sum("loss" in r for r in rows[:-1])
        assert server.reloads == [str(tmp_path / "rollout_weights")] * (1 + updates) and updates > 10
        assert server.requests >= 30 * 4


def wandb_history(workdir, wait_s: float = 60.0) -> list[dict]:
    """The history rows ({key: value}, "_step"; a histogram's parts as `<key>/values` ...) of
    the offline W&B run under `workdir`, read from its .wandb file: LevelDB-log records (32 KiB
    blocks, 7-byte record headers, after a 7-byte file header) of wandb's own protobuf `Record`.
    wandb's service finishes writing the file after `finish()` returns: read until it holds
    the run's `exit` record."""
    from wandb.proto import wandb_internal_pb2

    (file,) = (pathlib.Path(workdir) / "wandb").glob("offline-run-*/run-*.wandb")
    deadline = time.monotonic() + wait_s
    while True:
        rows, ended = _wandb_records(file.read_bytes(), wandb_internal_pb2.Record)
        if ended or time.monotonic() > deadline:
            return rows
        time.sleep(0.2)


def _wandb_records(data: bytes, record_type) -> tuple[list[dict], bool]:
    pos, chunks, rows, ended = 7, b"", [], False
    assert data[:4] == b":W&B"
    while pos + 7 <= len(data):
        if 32768 - pos % 32768 < 7:  # a block's tail too short for a header is padding
            pos += 32768 - pos % 32768
            continue
        length, kind = int.from_bytes(data[pos + 4:pos + 6], "little"), data[pos + 6]
        chunks += data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):  # a FULL record, or the LAST chunk of one
            record = record_type.FromString(chunks)
            chunks = b""
            ended |= record.WhichOneof("record_type") == "exit"
            if record.WhichOneof("record_type") == "history":
                rows.append({item.key or "/".join(item.nested_key): json.loads(item.value_json)
                             for item in record.history.item})
    return rows, ended


@pytest.mark.slow
def test_a_reward_module_of_the_users_own_changes_what_rl_optimises(toy_run, tmp_path, monkeypatch):
    """A reward written in a temp dir, named in `rl.rewards` with its own keyword, and the
    built-in `correctness` at weight 0: over 10 real steps the replies fill with the letter it
    pays for; its component is logged in metrics.jsonl, TensorBoard's event files and an
    offline W&B run (`metrics.wandb`), with each step's reply lengths as a histogram."""
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "my_reward.py").write_text(
        "def letter_share(completions, records, letter):\n"
        "    return [c.count(letter) / max(len(c), 1) for c in completions]\n")
    monkeypatch.syspath_prepend(str(tmp_path / "mine"))
    config = toy_config(toy_run, steps=10, rewards=dict(
        correctness=dict(fn="tests.test_rl:digit_first", weight=0.0),
        prefer_b=dict(fn="my_reward:letter_share", weight=1.0, letter="B")))
    config.metrics.wandb = "fleming-tests"
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    rows = rl.RLTrainer(config, str(tmp_path / "run")).train()
    share = [r["reward_prefer_b"] for r in rows]
    print("share of B per step", np.round(share, 3))
    assert np.mean(share[-3:]) > 0.3 > 3 * np.mean(share[:3]), share
    assert [r["reward_mean"] for r in rows] == share  # the weight-0 correctness adds nothing
    with open(tmp_path / "run" / "metrics.jsonl") as f:
        logged = [json.loads(line) for line in f]
    assert [r["reward_prefer_b"] for r in logged] == share and "reward_prefer_b_positive" in logged[0]
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    events = EventAccumulator(str(tmp_path / "run" / "tensorboard"), size_guidance={"histograms": 0})  # 0: keep all
    events.Reload()
    got = [(e.step, e.value) for e in events.Scalars("reward_prefer_b")]
    assert [step for step, _ in got] == list(range(1, 11))
    np.testing.assert_allclose([v for _, v in got], share, rtol=1e-6)
    lengths = [r["histogram/completion_length"] for r in logged]
    assert len(lengths[0]) == 4 * 8 and all(1 <= n <= 8 for n in lengths[0])  # prompts x group, max_new_tokens
    histograms = events.Histograms("histogram/completion_length")
    assert [h.step for h in histograms] == list(range(1, 11))
    assert [(h.histogram_value.num, h.histogram_value.sum) for h in histograms] == [(len(n), sum(n)) for n in lengths]
    history = wandb_history(tmp_path / "run")
    assert [h["_step"] for h in history] == list(range(1, 11))
    np.testing.assert_allclose([h["reward_prefer_b"] for h in history], share, rtol=1e-6)
    assert history[-1]["histogram/reward/_type"] == "histogram"
    assert sum(history[-1]["histogram/completion_length/values"]) == len(lengths[-1])


class Killed(Exception):
    """Stands for a kill between steps (the run gets no chance to save)."""


def kill_at(n: int):
    """An `on_step` that kills the run after step n."""
    def on_step(step):
        if step == n:
            raise Killed
    return on_step


@pytest.mark.parametrize("stage", [1, 2])
@pytest.mark.slow
def test_killed_run_resumes_exactly(toy_run, tmp_path, stage):
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


def test_rollout_batch_keeps_groups_one_sequence_per_row_or_packed():
    from fleming_jax import sampler
    g, budget = 2, 64
    tokens = np.arange(3 * g * budget, dtype=np.int32).reshape(3, g, budget) + 100
    lengths = np.array([[3, 40], [5, 2], [1, 4]])
    out = sampler.SampleOutput(tokens=tokens, logprobs=-np.ones((3, g, budget), np.float32),
                               model_logprobs=-np.full((3, g, budget), 0.5, np.float32),
                               lengths=lengths, done=np.ones((3, g), bool))
    prompts = [[1, 2, 3], [4, 5], [6]]
    keep = np.array([False, True, True])
    advantages = np.array([[9, 9], [1, -1], [2, -2]], np.float32)
    batch = rl.rollout_batch(prompts, out, advantages, keep, rows=6)
    p, window = sampler.bucket(2), sampler.bucket(5)  # longest kept completion: 5 (group 0's 40 is dropped)
    assert batch["tokens"].shape == batch["segments"].shape == (6, p + window)  # one sequence per row
    assert batch["completion_mask"].shape == batch["old_logprobs"].shape == batch["targets"].shape == (6, window)
    # row 0: group 1 sample 0, prompt [4, 5] then its 5 tokens; its loss at positions 2..6
    np.testing.assert_array_equal(batch["tokens"][0, :7], [4, 5, *tokens[1, 0, :5]])
    assert batch["tokens"][0, 7:].sum() == 0
    np.testing.assert_array_equal(batch["targets"][0, :5], np.arange(2, 7))
    np.testing.assert_array_equal(batch["completion_mask"][0], [1] * 5 + [0] * (window - 5))
    np.testing.assert_array_equal(batch["segments"][0, :8], [1, 1, 2, 2, 2, 2, 2, 0])  # prompt, reply
    assert batch["old_logprobs"][0].sum() == -2.5
    np.testing.assert_array_equal(batch["advantages"][:, 0], [1, -1, 2, -2, 0, 0])
    np.testing.assert_array_equal(batch["advantages"][0], [1] * 5 + [0] * (window - 5))
    assert batch["completion_mask"][4:].sum() == 0 and batch["segments"][4:].sum() == 0  # padding rows
    np.testing.assert_array_equal(batch["tokens"][3, :5], [6, *tokens[2, 1, :4]])
    packed = rl.rollout_batch(prompts, out, advantages, keep, rows=2, pack_length=-1)
    assert packed["tokens"].shape == (2, 16)  # 7 + 4 + 2 + 5 tokens in two rows of 16
    assert packed["completion_mask"].sum() == 12 and sorted(packed["segments"].max(1)) == [4, 4]
    shared = rl.rollout_batch(prompts, out, advantages, keep, rows=2, pack_length=-1, share_prompts=True)
    assert (shared["segments"] > 0).sum() == 18 - 2 - 1  # each kept group's prompt once
    assert shared["completion_mask"].sum() == 12


@pytest.mark.parametrize("pack_length", [pytest.param(512, marks=pytest.mark.slow), 128])
def test_reference_logprobs_cover_the_completion_window(toy_run, tmp_path, pack_length):
    """With beta > 0 the frozen reference scores each sequence's completion (in packed rows);
    at the first step it is the rollout policy, so it matches the sampler's own log-probs.
    Rows of 144 (the prompt bucket 128 + the reply bucket 16) hold a prompt of 116 and three
    replies of 8: the 32 sequences need 12 rows, more than the budget's 8 (half of the worst
    case's 16), so they take 16, and the forward runs them 8 rows at a time (one shape)."""
    config = toy_config(toy_run, grpo=dict(beta=0.1), reference_dtype="float32", pack_length=pack_length,
                        drop_zero_advantage_groups=False, rewards=toy_rewards("tests.test_rl:odd_length"))
    trainer = rl.RLTrainer(config, str(tmp_path))
    seen, shapes, logprobs_of = [], set(), trainer.logprobs_of
    trainer.update = lambda seqs: seen.append(seqs) or {}
    trainer.logprobs_of = lambda params, b: shapes.add(b["tokens"].shape) or logprobs_of(params, b)
    trainer.one_step(0)
    seqs = seen[0]
    assert shapes == {(trainer.budget.rows, trainer.budget.length)}
    if pack_length == 128:
        assert trainer.budget.length == 144 and trainer.budget.rows == 8
        assert len(trainer.budget.fit(seqs, np.arange(len(seqs)))) == 16
    ref, old = seqs.per_token["ref_logprobs"], seqs.per_token["old_logprobs"]
    assert ref.shape == old.shape == seqs.completions.shape
    mask = completion_mask(seqs)
    assert mask.sum() > 0 and np.all(ref[~mask] == 0) and np.all(ref[mask] < 0)
    np.testing.assert_allclose(ref[mask], old[mask], atol=2e-5)


def completion_mask(seqs):
    return np.arange(seqs.completions.shape[1])[None] < seqs.lengths[:, None]


@pytest.mark.parametrize("dynamic", [False, True])
def test_dynamic_sampling_refills_the_batch_with_groups_that_have_signal(toy_run, tmp_path, monkeypatch, dynamic):
    """Even record ids give mixed rewards within a group, odd ones all zero. The first draw
    has one useful group; each refill asks for the missing count: 3 (1 useful), 2 (1), 1 (1)."""
    monkeypatch.setattr(sys.modules[__name__], "PLANTED", iter(range(10_000)))
    trainer = rl.RLTrainer(toy_config(toy_run, 2, prompts_per_step=4, group_size=8, dynamic_sampling=dynamic,
                                      max_refills=3, rewards=toy_rewards("tests.test_rl:planted_even_ids")),
                           str(tmp_path))
    draws = iter([[1, 3, 5, 0], [2, 7, 9], [11, 4, 13], [6, 8]])
    asked = []
    trainer.pick = lambda n: asked.append(n) or next(draws)[:n] if dynamic else [1, 3, 5, 0]
    seen = []
    trainer.update = lambda seqs: seen.append(seqs) or {}
    row = trainer.one_step(0)
    if not dynamic:
        assert row["refills"] == 0 and row["trained_groups"] == 1
        assert len(seen[0]) == 8 and (seen[0].advantages != 0).sum() == 8
        return
    assert asked == [4, 3, 2, 1] and row["refills"] == 3 and row["trained_groups"] == 4
    assert len(seen[0]) == 32 and (seen[0].advantages != 0).sum() == 32
    assert row["zero_advantage_groups"] == pytest.approx(6 / 10)  # over all 10 groups sampled
    sampled = [1, 3, 5, 0, 2, 7, 9, 11, 4, 6]  # every rollout reached the stage-2 pool, G=8 tries each
    np.testing.assert_array_equal(np.flatnonzero(trainer.pool.total), sorted(sampled))
    assert set(trainer.pool.total[sampled]) == {8} and trainer.pool.correct[[1, 3, 5]].sum() == 0


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.slow
def test_rollout_trainer_mismatch_is_measured_and_recomputed(toy_run, tmp_path, dtype):
    """One real step with the rollout decoding in `dtype`: the mismatch metrics are ~0 for an
    fp32 rollout and clearly not for bf16; with recompute_old_logprobs the update's pi_old is
    the trainer's own forward and the rollout's log-probs ride along."""
    config = toy_config(toy_run, steps=1, recompute_old_logprobs=True)
    config.rollout.dtype = dtype
    trainer = rl.RLTrainer(config, str(tmp_path))
    seen, update = [], trainer.update
    trainer.update = lambda seqs: seen.append(seqs) or update(seqs)
    row = trainer.one_step(0)
    seqs = seen[0]
    mask = completion_mask(seqs)
    gap = np.abs(seqs.per_token["old_logprobs"] - seqs.per_token["rollout_logprobs"])[mask]
    print(dtype, "mismatch", {k: v for k, v in row.items() if k.startswith("mismatch")})
    np.testing.assert_allclose(row["mismatch_abs"], gap.mean(), rtol=1e-4, atol=1e-7)
    np.testing.assert_allclose(row["mismatch_max"], gap.max(), rtol=1e-4, atol=1e-7)
    if dtype == "float32":
        assert row["mismatch_max"] < 1e-4 and row["mismatch_far"] == 0
    else:
        assert row["mismatch_abs"] > 1e-4  # measured 3.3e-4 (max 1.1e-3) on this toy model


@pytest.mark.parametrize("changes", [
    dict(minibatches=2),  # 2 optimizer steps over 16 of the 32 sequences each (8 devices: 8 rows at least)
    pytest.param(dict(grpo=dict(beta=0.04, aggregation="sequence_mean"), reference_dtype="float32",
                      recompute_old_logprobs=True, grad_accum_steps=2), marks=pytest.mark.slow),
])
def test_packed_update_equals_one_sequence_per_row(toy_run, tmp_path, changes):
    """One real RL step (rollout, reference and recomputed log-probs, optimizer steps) with
    rows of 256 tokens (several sequences each, replies after their group's one prompt) and
    with one sequence per row: the same loss, gradient norm and params, from fewer tokens."""
    got = {}
    for pack_length in (0, 256):
        config = toy_config(toy_run, steps=1, pack_length=pack_length, drop_zero_advantage_groups=False, **changes)
        # Adam's first step is lr * g / (|g| + eps): where a gradient is ~0 (|g| ~ eps) it turns
        # reduction-order noise into visible steps (measured 2e-4 with eps 1e-8, 1.5e-6 with
        # 1e-4, against steps of up to lr = 2e-2)
        config.optimizer.eps = 1e-4
        trainer = rl.RLTrainer(config, str(tmp_path / str(pack_length)))
        shapes, step_fn = [], trainer.step_fn
        trainer.step_fn = lambda state, batch: shapes.append(batch["tokens"].shape) or step_fn(state, batch)
        row = trainer.one_step(0)
        got[pack_length] = row, params_of(trainer.model()), shapes
    (padded, padded_params, padded_shapes), (packed, packed_params, packed_shapes) = got[0], got[256]
    print("update batches: one sequence per row", padded_shapes, "packed", packed_shapes)
    assert padded["trained_groups"] == packed["trained_groups"] > 0
    assert len(set(packed_shapes)) == 1 and packed_shapes[0][1] == 256
    assert packed_shapes[0][0] < padded_shapes[0][0] and np.prod(packed_shapes[0]) < np.prod(padded_shapes[0])
    for k in ("loss", "grad_norm") + (("kl_ref",) if "grpo" in changes else ()):
        np.testing.assert_allclose(packed[k], padded[k], rtol=1e-5, atol=1e-7, err_msg=k)
    for name in padded_params:
        np.testing.assert_allclose(packed_params[name], padded_params[name], rtol=1e-5, atol=1e-5, err_msg=name)
    start = params_of(models.build(model_cfg(str(toy_run)))[0])
    assert not np.allclose(packed_params["layers/q_proj"], start["layers/q_proj"])


@pytest.mark.slow
def test_update_compiles_once_over_a_long_tailed_run(toy_run, tmp_path):
    """20 steps with long-tailed replies (16 more stop tokens: ~5% a token, so a mean of ~20
    of up to 64) and 1 to 32 groups kept a step: every program a step runs (rollout, update)
    compiles in the first steps and none after step 3; the update compiles once, in the
    budget's shape (before the budget, row counts and scored widths followed each rollout:
    4 update programs, at steps 1, 5, 6 and 13)."""
    config = toy_config(toy_run, steps=20, prompts_per_step=32, max_new_tokens=64, pack_length=128)
    config.optimizer.learning_rate = 2e-3  # slow enough that the replies stay long-tailed
    config.checkpoint.every = 1000
    trainer = rl.RLTrainer(config, str(tmp_path))
    trainer.stop_ids = sorted(set(trainer.stop_ids) | set(range(3, 19)))
    compiled, current = [], [0]

    def listener(event, seconds, **info):
        if current[0] and event == "/jax/core/compile/backend_compile_duration":
            compiled.append((current[0], info.get("fun_name")))

    one_step, shapes = trainer.one_step, set()

    def counted(step):
        current[0] = step + 1
        try:
            return one_step(step)
        finally:
            current[0] = 0
    step_fn = trainer.step_fn
    trainer.one_step = counted
    trainer.step_fn = lambda state, batch: shapes.add(batch["tokens"].shape + batch["targets"].shape[1:]) or step_fn(
        state, batch)
    monitoring.register_event_duration_secs_listener(listener)
    try:
        rows = trainer.train()
    finally:
        monitoring.unregister_event_duration_listener(listener)
    print("compiled (step, program):", compiled)
    print("update s:", [round(r["time_update"], 2) for r in rows], "kept:", [r["trained_groups"] for r in rows])
    means = [r["completion_length"] for r in rows]
    assert np.mean(means) < 0.4 * 64 and max(r["completion_length_max"] for r in rows) == 64  # long-tailed
    assert len({r["trained_groups"] for r in rows}) >= 4
    # RL's default engine refills: 256 sequences a step through 128 slots on a CPU, and decodes
    # the drain's last sequences on fewer rows
    assert {r["rollout_slots"] for r in rows} == {128} and min(r["rollout_admitted_late"] for r in rows) >= 128
    assert min(r["rollout_drain_chunks"] for r in rows) > 0
    assert [c for c in compiled if c[0] > 3] == []
    assert [name for _, name in compiled].count("jit(step)") == 1
    assert shapes == {(trainer.budget.rows, trainer.budget.length, trainer.budget.scored)}


@pytest.mark.parametrize("quant", ["", pytest.param("nf4", marks=pytest.mark.slow)])
def test_lora_rl_trains_only_adapters_against_the_base_and_syncs_only_them(toy_run, tmp_path, quant):
    """RL with adapters on an 8-device FSDP mesh: real updates move only the adapters; the KL
    reference is the frozen base itself under zero adapters (no copy); after the first sync
    the engine keeps its copy of the base and receives only the adapters. With a quantized
    base (QLoRA) the decode copy holds it quantized too."""
    import jax
    from flax import nnx

    config = toy_config(toy_run, steps=3, grpo=dict(beta=0.05), drop_zero_advantage_groups=False)
    config.model.update(lora_rank=4, lora_alpha=8.0, lora_base_quant=quant)
    config.mesh.update(data=1, fsdp=-1)  # weights split in training: a sync moves shards
    trainer = rl.RLTrainer(config, str(tmp_path))
    assert len(jax.tree.leaves(trainer.state.params)) == 14  # 7 projections x (A, B)
    base = jax.tree.leaves(trainer.state.frozen)
    adapters_off, reference_base = trainer.reference
    assert reference_base is trainer.state.frozen and all(not np.any(np.asarray(x)) for x in jax.tree.leaves(adapters_off))
    before = [np.asarray(x) for x in base]
    rows = trainer.train()
    assert all(a is b for a, b in zip(jax.tree.leaves(trainer.state.frozen), base))  # never copied, never moved
    jax.tree.map(np.testing.assert_array_equal, [np.asarray(x) for x in base], before)
    b = nnx.to_pure_dict(trainer.state.params)["layers"]["q_proj_lora_b"]
    assert np.abs(np.asarray(b)).max() > 0  # the updates reached the adapters
    assert abs(rows[0]["kl_ref"]) < 1e-6 and rows[2]["kl_ref"] > 1e-6  # the policy leaves the base, measured against it
    received = [r["rollout_sync_received_gib"] for r in rows]
    decode = trainer.engine.model
    adapter_bytes = sum(x.nbytes for x in jax.tree.leaves(nnx.state(decode, nnx.LoRAParam)))
    weight_bytes = sum(x.nbytes for x in jax.tree.leaves(nnx.state(decode)))
    assert received[1] == received[2] and 0 < received[1] * 2**30 <= adapter_bytes  # a device's adapter shards
    assert received[0] > 5 * received[1] and received[0] * 2**30 <= weight_bytes
    saved = checkpoint.lora_meta(str(tmp_path / "checkpoints"))
    assert saved["rank"] == 4 and saved["base"]["init_from"] == os.path.join(toy_run, "init")
    assert saved["base_quant"] == quant
    codes = {str(x.dtype) for x in jax.tree.leaves(nnx.state(decode)) if not jax.numpy.issubdtype(x.dtype, jax.numpy.floating)}
    assert codes == ({"uint4"} if quant else set())  # the NF4 codes, not a decoded copy

"""Stage-1 balance and the stage-2 miner: pools follow planted pass rates, shares hold."""

import dataclasses
import json
import sys
from collections import Counter

import numpy as np
import pytest

from fleming_jax.data.records import QARecord
from fleming_jax.train import mining
from tests.test_rl import toy_config, toy_rewards, toy_run  # noqa: F401 (toy_run is a fixture)

CALLS = Counter()  # how often `planted` scored each record (a test sets it)


def planted(completions, records):
    """Questions 0-7 always right (Easy), 8-15 right every other try (Moderate)."""
    out = []
    for r in records:
        CALLS[r.id] += 1
        out.append(float(int(r.id) < 8 or CALLS[r.id] % 2 == 0))
    return out


def records(n=20, difficult=()):
    return [QARecord(id=str(i), source="t", question=f"q{i}", answer="A", options={"A": "a", "B": "b"},
                     meta={"difficulty": "Difficult" if i in difficult else "Moderate"}) for i in range(n)]


def planted_miner(**config):
    miner = mining.Miner(records(20, difficult=range(10, 12)), mining.MinerConfig(**config))
    outcomes = {range(0, 5): [1] * 8, range(5, 10): [0] * 16, range(10, 15): [1, 0, 0, 0] * 2,
                range(15, 20): [1, 1, 1, 0] * 2}
    for indices, result in outcomes.items():
        miner.update(list(indices), [result] * len(indices))
    return miner


def test_pools_follow_planted_pass_rates():
    pools = {k: v.tolist() for k, v in planted_miner().pools().items()}
    assert pools == dict(retired=[0, 1, 2, 3, 4], hopeless=[5, 6, 7, 8, 9], wrong=[10, 11, 12, 13, 14],
                         right=[15, 16, 17, 18, 19], unseen=[])


def test_right_to_wrong_share_and_retry_rate_hold():
    miner = planted_miner(retry_rate=0.1)
    rng = np.random.default_rng(0)
    drawn = Counter()
    for _ in range(400):
        batch = miner.sample(rng, 6)
        assert len(batch) == 6 and not set(batch) & set(range(5))  # retired never come back
        drawn.update("right" if i >= 15 else "hopeless" if i < 10 else "wrong" for i in batch)
    total = sum(drawn.values())
    assert drawn["right"] / total == pytest.approx(1 / 3, abs=0.005)  # 2 of 6 slots, exactly
    assert drawn["hopeless"] / total == pytest.approx(2 / 3 * 0.1, abs=0.02)
    # Difficult items (10, 11) have weight 2: with 2 wrong slots of 5, each is included
    # ~0.52 of the time against ~0.32 for the others.
    counts = Counter(i for _ in range(2000) for i in miner.sample(rng, 3) if 10 <= i < 15)
    assert counts[10] + counts[11] > 1.3 * (counts[12] + counts[13])


def test_retired_questions_leave_and_a_solved_pool_is_an_error():
    miner = mining.Miner(records(3), mining.MinerConfig(retire_after=2))
    miner.update([0, 1, 2], [[1, 1]] * 3)
    with pytest.raises(ValueError, match="every question is retired"):
        miner.sample(np.random.default_rng(0), 4)


def test_state_survives_a_json_round_trip():
    miner = planted_miner()
    restored = mining.Miner(records(20, difficult=range(10, 12)), mining.MinerConfig())
    restored.load_state_dict(json.loads(json.dumps(miner.state_dict())))
    assert miner.sample(np.random.default_rng(7), 9) == restored.sample(np.random.default_rng(7), 9)
    assert restored.summary() == miner.summary()
    with pytest.raises(ValueError, match="belongs to other data"):
        mining.Miner(records(3), mining.MinerConfig()).load_state_dict(miner.state_dict())


def test_stage1_balance_and_missing_levels():
    recs = records(30)
    for i, r in enumerate(recs):
        r.meta["difficulty"] = ["Easy", "Moderate", "Difficult"][i % 3]
    rng = np.random.default_rng(1)
    levels = Counter(mining.difficulty(recs[i]) for _ in range(200)
                     for i in mining.balanced_batch(rng, recs, 8, {"Easy": 1, "Moderate": 1}))
    assert set(levels) == {"Easy", "Moderate"}
    assert levels["Easy"] / 1600 == pytest.approx(0.5, abs=0.04)
    with pytest.raises(ValueError, match="no records with difficulty"):
        mining.balanced_batch(rng, recs[2::3], 4, {"Easy": 1, "Moderate": 1})


def test_grading_prints_its_cost_first_and_warns_when_a_blend_level_is_empty():
    lines = []

    def score(indices, k):
        lines.append(f"scored {len(indices)} x {k}")
        return [[False, False, True, True]] * len(indices)  # pass rate 0.5: all Moderate
    pool = mining.GradedBlend([dataclasses.replace(r, meta={}) for r in records(30)],
                              {"Easy": 1, "Moderate": 1}, grade_k=4, max_new_tokens=96)
    assert pool.prepare(score, lines.append).startswith("graded 30 records")
    # 30 questions x 4 tries = 120 sequences, x 96 new tokens at most = 11,520 tokens
    assert lines[0] == ("grading 30 questions x 4 tries = 120 sequences, at most 11,520 new tokens "
                        "(rl.max_new_tokens=96); rl.max_pool bounds the questions")
    assert lines[1] == "scored 30 x 4"
    assert len(lines) == 3 and lines[2].startswith("warning: rl.stage1_mix=") and "no Easy question" in lines[2]
    assert "'Moderate': 30" in lines[2] and "the blend draws Moderate; start from a stronger policy" in lines[2]
    # ungraded (grade_k=0) records all count as Moderate: the same warning, and no pass at all
    lines.clear()
    assert mining.GradedBlend(records(4), {"Easy": 1, "Moderate": 1}).prepare(score, lines.append) is None
    assert len(lines) == 1 and "no Easy question" in lines[0] and "grade the pool (rl.grade_k > 0)" in lines[0]
    # both levels present: silent
    lines.clear()
    both = records(4)
    both[0].meta["difficulty"] = "Easy"
    mining.GradedBlend(both, {"Easy": 1, "Moderate": 1}).prepare(score, lines.append)
    assert lines == []


def test_stage2_warns_when_difficult_weighting_has_nothing_to_weigh():
    lines = []
    score = lambda indices, k: [[True] * k] * len(indices)
    mining.Miner(records(5), mining.MinerConfig(), score_k=2, max_new_tokens=10).prepare(score, lines.append)
    assert lines[0].startswith("warning: rl.miner.difficult_weight=2.0 has no effect")
    assert lines[1].startswith("scoring 5 questions x 2 tries = 10 sequences, at most 100 new tokens")
    lines.clear()
    mining.Miner(records(5, difficult=[3]), mining.MinerConfig(), score_k=0).prepare(score, lines.append)
    mining.Miner(records(5), mining.MinerConfig(difficult_weight=1.0), score_k=0).prepare(score, lines.append)
    assert lines == []


def test_stage1_pool_graded_by_real_rollouts_draws_easy_and_moderate(toy_run, tmp_path, monkeypatch):
    """The real pass: the trainer's sampler writes 4 replies per question, rewards score them,
    the pool grades from them. Rewards are planted per question: 0-7 always right (Easy), 8-15
    right every other try (2 of 4: Moderate)."""
    from fleming_jax.train import rl
    calls = Counter()
    monkeypatch.setattr(sys.modules[__name__], "CALLS", calls)
    trainer = rl.RLTrainer(toy_config(toy_run, 1, grade_k=4, rewards=toy_rewards("tests.test_mining:planted")),
                           str(tmp_path))
    lines = []
    assert trainer.pool.prepare(trainer.score_pool, lines.append).startswith("graded 16 records")
    # 16 questions x 4 tries = 64 sequences of at most 8 new tokens = 512 tokens
    assert lines == ["grading 16 questions x 4 tries = 64 sequences, at most 512 new tokens "
                     "(rl.max_new_tokens=8); rl.max_pool bounds the questions"]
    assert dict(calls) == {str(i): 4 for i in range(16)}
    assert trainer.pool.levels() == ["Easy"] * 8 + ["Moderate"] * 8
    drawn = Counter(trainer.pool.levels()[i] for _ in range(10) for i in trainer.pick(4))
    assert drawn == {"Easy": 20, "Moderate": 20}


@pytest.mark.parametrize("preset", ["tiny", "qwen2.5-7b", "qwen3-32b"])
def test_stage1_grades_by_default_on_every_preset(preset):
    from configs import rl_stage1
    config = rl_stage1.get_config(preset)
    assert config.rl.grade_k == 4 and dict(config.rl.stage1_mix) == {"Easy": 1.0, "Moderate": 1.0}
    assert isinstance(mining.make_pool([], config.rl), mining.GradedBlend)

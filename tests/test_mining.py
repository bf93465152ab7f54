"""Stage-1 balance and the stage-2 miner: pools follow planted pass rates, shares hold."""

import json
from collections import Counter

import numpy as np
import pytest

from fleming_jax.data.records import QARecord
from fleming_jax.train import mining


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

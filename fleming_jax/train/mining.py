"""What the RL stages train on next: stage 1's difficulty balance and stage 2's miner.

Stage 1 draws a configured blend of difficulty levels (the paper's stage-1 figure:
Hard:Simple = 1:1 over Easy and Moderate items). Stage 2 keeps each question's pass rate
from every rollout, mines the ones the policy fails (Difficult first) and mixes them with
ones it solves at a configured ratio (the paper's figure: Right:Wrong = 1:2); questions
solved every time leave the pool, never-solved ones are retried at a low rate. Both are
plain Python with a JSON state, checkpointed with the run.
"""

from __future__ import annotations

import dataclasses
from collections import Counter
from typing import Any, Sequence

import numpy as np

from fleming_jax.data.records import QARecord

UNGRADED = "Moderate"  # difficulty assumed for records the data stage did not grade


def difficulty(record: QARecord) -> str:
    return (record.meta or {}).get("difficulty") or UNGRADED


def balanced_batch(rng: np.random.Generator, records: Sequence[QARecord], n: int,
                   mix: dict[str, float]) -> list[int]:
    """n record indices whose difficulty levels follow `mix` (e.g. {"Easy": 1, "Moderate": 1});
    a level with no records gives its share to the others."""
    by_level = {level: [i for i, r in enumerate(records) if difficulty(r) == level] for level in mix}
    levels = [lvl for lvl in mix if by_level[lvl] and mix[lvl] > 0]
    if not levels:
        raise ValueError(f"no records with difficulty in {sorted(mix)}; levels present: "
                         f"{dict(Counter(difficulty(r) for r in records))}")
    weights = np.array([mix[lvl] for lvl in levels], float)
    counts = rng.multinomial(n, weights / weights.sum())
    picked = []
    for level, count in zip(levels, counts):
        pool = by_level[level]
        picked += list(rng.choice(pool, size=count, replace=count > len(pool)))
    return [int(i) for i in rng.permutation(picked)]


@dataclasses.dataclass
class MinerConfig:
    wrong_below: float = 0.5  # pass rate below this counts as "wrong" (a hard sample)
    retire_after: int = 8  # solved in every one of >= this many tries: leaves the pool
    hopeless_after: int = 16  # never solved in >= this many tries: retried only at retry_rate
    retry_rate: float = 0.05  # share of the wrong slots given to never-solved questions
    right_to_wrong: tuple[float, float] = (1.0, 2.0)  # the paper's stage-2 mix
    difficult_weight: float = 2.0  # Difficult items are drawn this much more often


class Miner:
    """Per-question pass-rate statistics and stage-2 batch construction."""

    def __init__(self, records: Sequence[QARecord], config: MinerConfig):
        self.records, self.config = records, config
        self.correct = np.zeros(len(records), np.int64)
        self.total = np.zeros(len(records), np.int64)

    def update(self, indices: Sequence[int], correct: Sequence[Sequence[bool]]) -> None:
        """Adds the outcomes of one rollout group per index."""
        for i, outcomes in zip(indices, correct):
            self.correct[i] += int(np.sum(outcomes))
            self.total[i] += len(outcomes)

    def pools(self) -> dict[str, np.ndarray]:
        """Indices per pool: wrong, right, hopeless (never solved), retired (always solved),
        unseen. A question's pool follows from its statistics alone."""
        c, t = self.config, self.total
        rate = np.where(t > 0, self.correct / np.maximum(t, 1), np.nan)
        retired = (t >= c.retire_after) & (self.correct == t)
        hopeless = (t >= c.hopeless_after) & (self.correct == 0)
        seen = t > 0
        wrong = seen & ~retired & ~hopeless & (rate < c.wrong_below)
        right = seen & ~retired & ~hopeless & (rate >= c.wrong_below)
        return {name: np.flatnonzero(mask) for name, mask in
                dict(wrong=wrong, right=right, hopeless=hopeless, retired=retired, unseen=~seen).items()}

    def sample(self, rng: np.random.Generator, n: int) -> list[int]:
        """A stage-2 batch: right:wrong as configured; wrong ones weighted toward low pass
        rates and Difficult items; a `retry_rate` share of the wrong slots re-tries
        never-solved questions. A short pool lends its slots to the other."""
        pools = self.pools()
        right_share, wrong_share = self.config.right_to_wrong
        n_wrong = int(round(n * wrong_share / (right_share + wrong_share)))
        n_hopeless = int(rng.binomial(n_wrong, self.config.retry_rate)) if len(pools["hopeless"]) else 0
        wanted = {"wrong": n_wrong - n_hopeless, "hopeless": n_hopeless, "right": n - n_wrong}
        # Unseen questions (not scored yet) are treated as wrong: the stage-start scoring
        # pass normally leaves none.
        candidates = {"wrong": np.concatenate([pools["wrong"], pools["unseen"]]),
                      "hopeless": pools["hopeless"], "right": pools["right"]}
        if sum(len(v) for v in candidates.values()) == 0:
            raise ValueError("the stage-2 pool is empty: every question is retired (always solved)")
        picked = []
        for name in ("wrong", "hopeless", "right"):
            picked += self._draw(rng, candidates[name], min(wanted[name], len(candidates[name])))
        short = n - len(picked)
        if short:  # lend the missing slots to whatever is left, wrong first
            rest = np.setdiff1d(np.concatenate([candidates["wrong"], candidates["right"],
                                                candidates["hopeless"]]), picked)
            if len(rest) == 0:
                rest = np.concatenate(list(candidates.values()))
            picked += list(rng.choice(rest, size=short, replace=short > len(rest)))
        return [int(i) for i in rng.permutation(picked)]

    def _draw(self, rng, pool: np.ndarray, k: int) -> list[int]:
        if k == 0:
            return []
        rate = self.correct[pool] / np.maximum(self.total[pool], 1)
        hard = np.array([difficulty(self.records[i]) == "Difficult" for i in pool])
        weights = (1.0 - rate + 0.05) * np.where(hard, self.config.difficult_weight, 1.0)
        return list(rng.choice(pool, size=k, replace=False, p=weights / weights.sum()))

    def summary(self) -> dict[str, Any]:
        """Pool sizes and the pass-rate histogram of seen questions (for the logs)."""
        seen = self.total > 0
        hist, _ = np.histogram(self.correct[seen] / self.total[seen], bins=5, range=(0, 1))
        return {f"pool_{k}": len(v) for k, v in self.pools().items()} | {"pass_rate_hist": hist.tolist()}

    def state_dict(self) -> dict[str, list[int]]:
        return {"correct": self.correct.tolist(), "total": self.total.tolist()}

    def load_state_dict(self, state: dict[str, list[int]]) -> None:
        if len(state["total"]) != len(self.records):
            raise ValueError(f"miner state has {len(state['total'])} questions, the pool has "
                             f"{len(self.records)}: the checkpoint belongs to other data")
        self.correct = np.asarray(state["correct"], np.int64)
        self.total = np.asarray(state["total"], np.int64)

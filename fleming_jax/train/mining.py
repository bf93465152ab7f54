"""What the RL stages train on next: one prompt-pool interface, two implementations.

A pool has `prepare(score, log)` (once at the start of a stage, not on resume; `score(indices,
k)` samples k replies per question and says which were correct; `log` gets the pass's cost
before it starts and any warning), `sample(rng, n)`,
`observe(indices, correct)` (every rollout's outcomes), `state_dict`/`load_state_dict`
(JSON, checkpointed with the run), `summary()` (for the logs), `levels(indices)` (how many
drawn prompts were Easy / Moderate / Difficult) and `stops_on_plateau`.
`GradedBlend` is stage 1, `Miner` is stage 2; `make_pool` picks one from the config.

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
from typing import Any, Callable, Sequence

import numpy as np

from fleming_jax.data import quality
from fleming_jax.data.records import QARecord

Score = Callable[[list[int], int], list[list[bool]]]
LEVELS = quality.DIFFICULTIES  # ("Easy", "Moderate", "Difficult")

UNGRADED = "Moderate"  # difficulty assumed for records the data stage did not grade


def difficulty(record: QARecord) -> str:
    return (record.meta or {}).get("difficulty") or UNGRADED


def pass_cost(what: str, n: int, k: int, max_new_tokens: int) -> str:
    """The one line printed before a pool pass: it generates n x k sequences."""
    return (f"{what} {n:,} questions x {k} tries = {n * k:,} sequences, at most {n * k * max_new_tokens:,} "
            f"new tokens (rl.max_new_tokens={max_new_tokens}); rl.max_pool bounds the questions")


def level_counts(levels: Sequence[str]) -> dict[str, int]:
    """{"drawn_easy": n, "drawn_moderate": n, "drawn_difficult": n} for the per-step log."""
    counts = Counter(levels)
    return {f"drawn_{level.lower()}": counts.get(level, 0) for level in LEVELS}


def balanced_batch(rng: np.random.Generator, records: Sequence[QARecord], n: int,
                   mix: dict[str, float]) -> list[int]:
    """n record indices whose difficulty levels follow `mix` (e.g. {"Easy": 1, "Moderate": 1});
    a level with no records gives its share to the others."""
    return balanced_draw(rng, [difficulty(r) for r in records], n, mix)


def balanced_draw(rng: np.random.Generator, record_levels: Sequence[str], n: int,
                  mix: dict[str, float]) -> list[int]:
    """`balanced_batch` over each record's difficulty level."""
    by_level = {level: [i for i, lvl in enumerate(record_levels) if lvl == level] for level in mix}
    levels = [lvl for lvl in mix if by_level[lvl] and mix[lvl] > 0]
    if not levels:
        raise ValueError(f"no records with difficulty in {sorted(mix)}; levels present: "
                         f"{dict(Counter(record_levels))}; check rl.stage1_mix or grade the pool "
                         "(rl.grade_k > 0)")
    # Each level gets floor(n x share) slots; the remaining slots go to levels drawn by their
    # fractional parts, so the blend holds in every batch (1:1 of 4 is 2 + 2) and on average.
    shares = np.array([mix[lvl] for lvl in levels], float)
    shares = n * shares / shares.sum()
    counts = np.floor(shares).astype(int)
    rest, frac = n - counts.sum(), shares - np.floor(shares)
    if rest:
        counts[rng.choice(len(levels), size=rest, replace=False, p=frac / frac.sum())] += 1
    picked = []
    for level, count in zip(levels, counts):
        pool = by_level[level]
        picked += list(rng.choice(pool, size=count, replace=count > len(pool)))
    return [int(i) for i in rng.permutation(picked)]


class GradedBlend:
    """Stage 1: draws `mix` over difficulty levels. Records the data stage did not grade are
    graded at `prepare` by the starting policy's pass rate over `grade_k` tries
    (`quality.grade`); the levels live in this pool's state, so a resumed run draws the
    same prompts as an uninterrupted one."""

    stops_on_plateau = True

    def __init__(self, records: Sequence[QARecord], mix: dict[str, float], grade_k: int = 0,
                 thresholds: tuple[float, float] = (0.8, 0.4), max_new_tokens: int = 0):
        self.records, self.mix, self.grade_k, self.thresholds = records, dict(mix), grade_k, thresholds
        self.max_new_tokens = max_new_tokens
        self.level = [(r.meta or {}).get("difficulty") for r in records]  # None: not graded yet
        self.pass_rate: list[float | None] = [(r.meta or {}).get("pass_rate") for r in records]

    def prepare(self, score: Score, log: Callable[[str], None] = print) -> str | None:
        todo = [i for i, level in enumerate(self.level) if level is None]
        message = None
        if self.grade_k and todo:
            log(pass_cost("grading", len(todo), self.grade_k, self.max_new_tokens))
            graded = quality.grade([self.records[i] for i in todo], score(todo, self.grade_k), self.thresholds)
            for i, record in zip(todo, graded):
                self.level[i], self.pass_rate[i] = record.meta["difficulty"], record.meta["pass_rate"]
            counts = Counter(self.level[i] for i in todo)
            message = f"graded {len(todo)} records by pass rate over {self.grade_k} tries: {dict(counts)}"
        counts = Counter(self.levels())
        asked = [level for level, share in self.mix.items() if share > 0]
        empty = [level for level in asked if not counts[level]]
        if empty:  # the blend silently draws fewer levels than asked otherwise
            drawn = "/".join(level for level in asked if counts[level]) or "nothing"
            fix = "start from a stronger policy" if self.grade_k else "grade the pool (rl.grade_k > 0)"
            log(f"warning: rl.stage1_mix={self.mix} but the pool has no {'/'.join(empty)} question "
                f"(levels: {dict(counts)}; ungraded count as {UNGRADED}): the blend draws {drawn}; "
                f"{fix} or change rl.stage1_mix")
        return message

    def levels(self) -> list[str]:
        return [level or UNGRADED for level in self.level]

    def sample(self, rng: np.random.Generator, n: int) -> list[int]:
        return balanced_draw(rng, self.levels(), n, self.mix)

    def observe(self, indices: Sequence[int], correct: Sequence[Sequence[bool]]) -> None:
        pass  # the blend is fixed for the stage

    def summary(self) -> dict[str, Any]:
        counts = Counter(self.levels())
        return {f"pool_{level.lower()}": counts.get(level, 0) for level in LEVELS}

    def state_dict(self) -> dict[str, list]:
        return {"difficulty": list(self.level), "pass_rate": list(self.pass_rate)}

    def load_state_dict(self, state: dict[str, list]) -> None:
        _check_size(state["difficulty"], self.records, "stage-1 pool")
        self.level, self.pass_rate = list(state["difficulty"]), list(state["pass_rate"])


def _check_size(saved: Sequence, records: Sequence, what: str) -> None:
    if len(saved) != len(records):
        raise ValueError(f"{what} state has {len(saved)} questions, the pool has {len(records)}: the "
                         "checkpoint belongs to other data (check data.train and rl.max_pool)")


@dataclasses.dataclass
class MinerConfig:
    wrong_below: float = 0.5  # pass rate below this counts as "wrong" (a hard sample)
    retire_after: int = 8  # solved in every one of >= this many tries: leaves the pool
    hopeless_after: int = 16  # never solved in >= this many tries: retried only at retry_rate
    retry_rate: float = 0.05  # share of the wrong slots given to never-solved questions
    right_to_wrong: tuple[float, float] = (1.0, 2.0)  # the paper's stage-2 mix
    difficult_weight: float = 2.0  # Difficult items are drawn this much more often


class Miner:
    """Stage 2: per-question pass-rate statistics and batch construction. `prepare` is the
    scoring pass (`score_k` samples per question) that seeds the statistics."""

    stops_on_plateau = False

    def __init__(self, records: Sequence[QARecord], config: MinerConfig, score_k: int = 0,
                 max_new_tokens: int = 0):
        self.records, self.config, self.score_k, self.max_new_tokens = records, config, score_k, max_new_tokens
        self.correct = np.zeros(len(records), np.int64)
        self.total = np.zeros(len(records), np.int64)

    def prepare(self, score: Score, log: Callable[[str], None] = print) -> str | None:
        if self.config.difficult_weight != 1.0 and "Difficult" not in self.levels():
            log(f"warning: rl.miner.difficult_weight={self.config.difficult_weight} has no effect: no question "
                "of data.train has meta.difficulty=Difficult (stage 1's grades stay in its checkpoint); "
                "grade the data (quality.grade) or set it to 1.0")
        if not self.score_k:
            return None
        everything = list(range(len(self.records)))
        log(pass_cost("scoring", len(everything), self.score_k, self.max_new_tokens))
        self.observe(everything, score(everything, self.score_k))
        return f"scored the pool: {self.summary()}"

    def observe(self, indices: Sequence[int], correct: Sequence[Sequence[bool]]) -> None:
        self.update(indices, correct)

    def levels(self) -> list[str]:
        return [difficulty(r) for r in self.records]

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
        _check_size(state["total"], self.records, "miner")
        self.correct = np.asarray(state["correct"], np.int64)
        self.total = np.asarray(state["total"], np.int64)


def make_pool(records: Sequence[QARecord], rl_config) -> GradedBlend | Miner:
    """The pool of `rl.stage`: 1 (graded blend) or 2 (miner)."""
    c = rl_config
    if c.stage == 1:
        return GradedBlend(records, dict(c.stage1_mix), c.grade_k, max_new_tokens=c.max_new_tokens)
    if c.stage == 2:
        miner = MinerConfig(**{k: tuple(v) if k == "right_to_wrong" else v for k, v in c.miner.items()})
        return Miner(records, miner, c.score_k, c.max_new_tokens)
    raise ValueError(f"rl.stage={c.stage}; choose 1 (graded blend) or 2 (hard-sample miner)")

"""Cleaning (RODS filtering): format checks, exact and near-duplicate removal,
decontamination against the evaluation sets, and difficulty grading.

Every drop is counted under a reason in the source's `SourceReport`:
`encoding_debris`, `duplicate_options`, `empty_option`, `duplicate` (exact, after text
normalisation), `near_duplicate` (MinHash/LSH estimate, then exact Jaccard of word
n-gram shingles >= `near_dup_threshold`), `contaminated:<eval set>` (share of the item's
word n-grams found in that evaluation set >= `contamination_threshold`).
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import hashlib
import re
import unicodedata
from typing import Callable, Iterable, Sequence

import numpy as np

from fleming_jax.data.records import DIFFICULTIES, QARecord
from fleming_jax.data.sources import Malformed, SourceReport, check

# ---------------------------------------------------------------- text checks

# UTF-8 read as Latin-1/CP1252 ("Ã©", "â€™", "Â "), U+FFFD, control characters other than
# tab/newline, and HTML entities left in the text.
_DEBRIS = re.compile(r"Ã[\u0080-\u00bf]|â€|Â[\u00a0-\u00bf ]|\ufffd|[\u0000-\u0008\u000b-\u001f\u007f]"
                     r"|&(?:[a-zA-Z]{2,8}|#\d{2,5}|#x[0-9a-fA-F]{2,4});")


def normalize(text: str) -> str:
    """Case-, accent-, punctuation- and whitespace-insensitive form used for matching."""
    text = unicodedata.normalize("NFKC", text).lower()
    return " ".join(re.sub(r"[^\w\s]", " ", text).split())


def format_problem(record: QARecord) -> str | None:
    """The first format problem the paper filters (debris, duplicate/empty options), or None."""
    texts = [record.question, record.answer, *(record.options or {}).values()]
    if any(_DEBRIS.search(t) for t in texts):
        return "encoding_debris"
    if record.options:
        options = [normalize(t) for t in record.options.values()]
        if any(not t for t in options):
            return "empty_option"
        if len(set(options)) < len(options):
            return "duplicate_options"
    return None


def _text(record: QARecord) -> str:
    """What makes two items the same question: the stem and the option set (any order)."""
    return normalize(" ".join([record.question, *sorted((record.options or {}).values())]))


def ngrams(text: str, n: int) -> set[str]:
    """Word n-grams of normalised text; a text shorter than n words is one gram."""
    words = normalize(text).split()
    return {" ".join(words[i:i + n]) for i in range(max(1, len(words) - n + 1))} if words else set()


# ---------------------------------------------------------------- near duplicates

_PRIME = (1 << 61) - 1


def _hashes(shingles: Iterable[str]) -> np.ndarray:
    return np.array([int.from_bytes(hashlib.blake2b(s.encode(), digest_size=8).digest(), "little")
                     % _PRIME for s in shingles], dtype=np.uint64)


@functools.lru_cache(maxsize=None)
def _permutations(num_perm: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    return (rng.integers(1, 1 << 31, num_perm, dtype=np.uint64),
            rng.integers(0, 1 << 31, num_perm, dtype=np.uint64))


def minhash(shingles: set[str], num_perm: int = 64, seed: int = 0) -> np.ndarray:
    """MinHash signature: P(two signatures agree at a position) = Jaccard of the sets."""
    if not shingles:
        return np.full(num_perm, _PRIME, dtype=np.uint64)
    a, b = _permutations(num_perm, seed)
    h = _hashes(shingles) % np.uint64(1 << 31)  # keep a*h+b inside uint64
    return ((np.outer(h, a) + b) % np.uint64(_PRIME)).min(axis=0)


def near_duplicate_pairs(texts: Sequence[str], threshold: float, n: int = 3, bands: int = 16,
                         rows: int = 4) -> dict[int, int]:
    """{i: j} for each text i that is a near duplicate (Jaccard >= threshold) of an earlier
    kept text j. LSH on MinHash finds candidates; the exact Jaccard decides."""
    shingles = [ngrams(t, n) for t in texts]
    buckets: dict[tuple, list[int]] = collections.defaultdict(list)
    duplicate_of: dict[int, int] = {}
    for i, s in enumerate(shingles):
        sig = minhash(s, bands * rows)
        keys = [(band, sig[band * rows:(band + 1) * rows].tobytes()) for band in range(bands)]
        candidates = {j for key in keys for j in buckets.get(key, ())}
        match = next((j for j in sorted(candidates)
                      if len(s & shingles[j]) / max(1, len(s | shingles[j])) >= threshold), None)
        if match is not None:
            duplicate_of[i] = match
            continue
        for key in keys:
            buckets[key].append(i)
    return duplicate_of


# ---------------------------------------------------------------- cleaning

@dataclasses.dataclass
class CleanConfig:
    near_dup_threshold: float = 0.8  # Jaccard of word 3-gram shingles
    contamination_ngram: int = 8
    contamination_threshold: float = 0.5  # share of an item's n-grams seen in an eval set


def clean(records: list[QARecord], reports: dict[str, SourceReport],
          eval_sets: dict[str, list[QARecord]] | None = None, config: CleanConfig = CleanConfig()
          ) -> list[QARecord]:
    """Records that pass format checks, dedup and decontamination, in input order (earlier
    sources win duplicates). Drops are counted in `reports[record.source]`; `kept` is updated."""

    def drop(record, reason):
        reports[record.source].drop(reason, f"id {record.id}")

    survivors, seen = [], set()
    for record in records:
        try:
            check(record)
            reason = format_problem(record)
        except Malformed as e:
            reason = e.reason
        key = _text(record)
        if reason is None and key in seen:
            reason = "duplicate"
        if reason:
            drop(record, reason)
        else:
            seen.add(key)
            survivors.append(record)

    near = near_duplicate_pairs([_text(r) for r in survivors], config.near_dup_threshold)
    for i in near:
        drop(survivors[i], "near_duplicate")
    survivors = [r for i, r in enumerate(survivors) if i not in near]

    kept = survivors
    for name, eval_records in (eval_sets or {}).items():
        seen_grams = set().union(*(ngrams(r.question, config.contamination_ngram) for r in eval_records))
        clean_now = []
        for record in kept:
            grams = ngrams(record.question, config.contamination_ngram)
            if grams and len(grams & seen_grams) / len(grams) >= config.contamination_threshold:
                drop(record, f"contaminated:{name}")
            else:
                clean_now.append(record)
        kept = clean_now

    counts = collections.Counter(r.source for r in kept)
    for name, report in reports.items():
        report.kept = counts[name]
    return kept


# ---------------------------------------------------------------- difficulty

def grade(records: list[QARecord], outcomes: list[list[bool]],
          thresholds: tuple[float, float] = (0.8, 0.4)) -> list[QARecord]:
    """Copies of `records` with `meta.difficulty` from the measured pass rate of k tries
    (>= thresholds[0]: Easy, >= thresholds[1]: Moderate, else Difficult), `meta.pass_rate`,
    and `meta.suspect_label` when all k tries failed (the paper reviews those labels)."""
    if len(outcomes) != len(records):
        raise ValueError(f"{len(outcomes)} outcome lists for {len(records)} records")
    easy, moderate = thresholds
    graded = []
    for record, tries in zip(records, outcomes):
        if not tries:
            raise ValueError(f"record {record.id}: no tries to grade from")
        rate = sum(map(bool, tries)) / len(tries)
        level = DIFFICULTIES[0] if rate >= easy else DIFFICULTIES[1] if rate >= moderate else DIFFICULTIES[2]
        meta = dict(record.meta, difficulty=level, pass_rate=rate)
        if rate == 0:
            meta["suspect_label"] = True
        graded.append(dataclasses.replace(record, meta=meta))
    return graded


def grade_with(records: list[QARecord], solve: Callable[[list[QARecord], int], list[list[bool]]],
               k: int = 5, thresholds: tuple[float, float] = (0.8, 0.4)) -> list[QARecord]:
    """`grade` on the outcomes of `solve(records, k)`: a reference model's k sampled answers
    checked against each record (the sampler), or an LLM grader behind the same interface."""
    return grade(records, solve(records, k), thresholds)

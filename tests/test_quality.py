"""Cleaning with planted problems: exact and near duplicates, benchmark overlap, format
debris; and difficulty grading from per-item correctness lists."""

import pytest

from fleming_jax.data import quality
from fleming_jax.data.records import QARecord
from fleming_jax.data.sources import SourceReport

OPTS = {"A": "Ethosuximide", "B": "Phenytoin", "C": "Carbamazepine", "D": "Valproate"}


def rec(id, question, options=OPTS, answer="A", source="train"):
    return QARecord(id, source, question, answer, dict(options) if options else None)


def reports(*names):
    return {n: SourceReport(n, read=0) for n in names}


def test_exact_duplicates_ignore_case_punctuation_and_option_order():
    a = rec("a", "Drug of choice for absence seizures?")
    b = rec("b", "drug of choice for ABSENCE seizures", {k: OPTS[k] for k in "DCBA"}, answer="D")
    c = rec("c", "Drug of choice for absence seizures?", {**OPTS, "D": "Lamotrigine"})  # other options
    r = reports("train")
    kept = quality.clean([a, b, c], r)
    assert [x.id for x in kept] == ["a", "c"]
    assert r["train"].dropped == {"duplicate": 1} and r["train"].kept == 2


def test_near_duplicates_removed_at_threshold_and_distinct_items_kept():
    stem = ("A 34 year old woman presents with fatigue, weight gain, cold intolerance, constipation "
            "and dry skin for six months. Her TSH is elevated. What is the most likely diagnosis?")
    near = stem.replace("six months", "eight months")  # one word changed
    other = ("A 70 year old man has sudden painless loss of vision in one eye with a cherry red spot "
             "on fundoscopy. What is the most likely diagnosis?")
    items = [rec("orig", stem), rec("near", near), rec("other", other)]
    jaccard = (lambda x, y: len(x & y) / len(x | y))(*(quality.ngrams(quality._text(i), 3) for i in items[:2]))
    assert 0.8 <= jaccard < 1  # hand check: 4 of ~38 shingles differ
    r = reports("train")
    assert [x.id for x in quality.clean(items, r)] == ["orig", "other"]
    assert r["train"].dropped == {"near_duplicate": 1}
    strict = reports("train")
    assert len(quality.clean(items, strict, config=quality.CleanConfig(near_dup_threshold=0.99))) == 3


def test_decontamination_removes_planted_benchmark_overlap_and_says_from_where():
    bench = ("A 6 year old boy has periorbital edema, cola colored urine and hypertension two weeks "
             "after a sore throat. Which finding is expected?")
    train = [rec("leak", bench.replace("6 year old boy", "6 year old child"), source="medmcqa"),
             rec("clean", "Which nerve supplies the deltoid muscle in the shoulder region?", source="medmcqa"),
             rec("leak2", "Is aspirin an NSAID used for pain?", None, "yes", source="pubmedqa")]
    evals = {"medqa_test": [rec("t1", bench)], "pubmedqa_test": [rec("t2", "Is aspirin an NSAID used for pain", None, "no")]}
    r = reports("medmcqa", "pubmedqa")
    kept = quality.clean(train, r, evals)
    assert [x.id for x in kept] == ["clean"]
    assert r["medmcqa"].dropped == {"contaminated:medqa_test": 1}
    assert r["pubmedqa"].dropped == {"contaminated:pubmedqa_test": 1}
    assert (r["medmcqa"].kept, r["pubmedqa"].kept) == (1, 0)


@pytest.mark.parametrize("bad, reason", [
    (rec("x", "Which drug â€™s effect?"), "encoding_debris"),
    (rec("x", "Which drug&nbsp;is first line?"), "encoding_debris"),
    (rec("x", "Which drug\x07 is first line?"), "encoding_debris"),
    (rec("x", "Which drug?", {"A": "Aspirin", "B": "aspirin.", "C": "Heparin"}), "duplicate_options"),
    (rec("x", "Which drug?", {"A": "Aspirin", "B": "--", "C": "Heparin"}), "empty_option"),
    (rec("x", "Which drug?", answer="E"), "answer_not_in_options"),
])
def test_format_checks(bad, reason):
    r = reports("train")
    assert quality.clean([bad, rec("ok", "A clean question about heparin?")], r)[0].id == "ok"
    assert r["train"].dropped == {reason: 1}


def test_grade_from_pass_rates_and_suspect_labels():
    items = [rec(str(i), f"q{i}") for i in range(4)]
    outcomes = [[True] * 5, [True, True, False, True, False], [False, True, False, False, False], [False] * 5]
    graded = quality.grade(items, outcomes)
    assert [g.meta["difficulty"] for g in graded] == ["Easy", "Moderate", "Difficult", "Difficult"]
    assert [g.meta.get("suspect_label", False) for g in graded] == [False, False, False, True]
    assert graded[1].meta["pass_rate"] == 0.6 and items[1].meta == {}  # copies, inputs untouched
    calls = []

    def solve(records, k):
        calls.append((len(records), k))
        return outcomes

    assert [g.meta["difficulty"] for g in quality.grade_with(items, solve, k=5, thresholds=(1.0, 0.5))] == [
        "Easy", "Moderate", "Difficult", "Difficult"]
    assert calls == [(4, 5)]
    with pytest.raises(ValueError, match="3 outcome lists for 4 records"):
        quality.grade(items, outcomes[:3])

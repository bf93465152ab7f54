"""Task `eval`: the vote / pass@1 / macro math on hand-computed cases, and the task end to
end on a tiny random model with two benchmark files in their published schemas."""

import json
import os

import numpy as np
import pytest

import main
from configs import eval as eval_config
from fleming_jax import evaluate, models, rewards
from fleming_jax import tokenizer as toklib
from fleming_jax.data.records import QARecord, read_jsonl
from fleming_jax.train import checkpoint

FIXTURES = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fixtures")
OPTIONS = {"A": "Aspirin", "B": "Heparin", "C": "Warfarin", "D": "Alteplase"}


def reply(letter):
    return f"<think>because</think><answer>{letter}</answer>"


def test_majority_vote_breaks_ties_by_first_occurrence():
    assert evaluate.majority_vote(["B", "A", "A", "B"]) == "B"
    assert evaluate.majority_vote([None, "C", "A", "A"]) == "A"
    assert evaluate.majority_vote([None, "D", None]) == "D"
    assert evaluate.majority_vote([None, None]) is None
    assert evaluate.pass_at_1([True, False, False, False]) == 0.25
    assert evaluate.macro_average({"x": 0.375, "y": 0.5}) == 0.4375


def test_bootstrap_interval_matches_the_normal_approximation_and_pairs_questions():
    assert evaluate.bootstrap_interval([0.5] * 40) == (0.5, 0.5, 0.5)  # no spread, no interval
    before = np.zeros(600)
    before[:240] = 1  # accuracy 0.4 on 600 questions: standard error sqrt(0.4 * 0.6 / 600) = 0.0200
    mean, low, high = evaluate.bootstrap_interval(before)
    assert mean == 0.4 and abs(low - (0.4 - 1.96 * 0.02)) < 0.004 and abs(high - (0.4 + 1.96 * 0.02)) < 0.004
    after = before.copy()
    after[240:270] = 1  # 30 more right, none lost: +0.05
    _, after_low, _ = evaluate.bootstrap_interval(after)
    assert after_low < high  # each stage's interval alone overlaps the other's
    gain, low, high = evaluate.bootstrap_interval(after - before)  # paired: se sqrt(0.05 * 0.95 / 600) = 0.0089
    assert gain == pytest.approx(0.05) and abs(low - 0.0326) < 0.004 and abs(high - 0.0674) < 0.004
    # runs x questions (seeds on the same questions): questions are resampled, runs averaged
    assert evaluate.bootstrap_interval([before, before]) == evaluate.bootstrap_interval(before)
    assert evaluate.bootstrap_interval([before, after])[0] == pytest.approx(0.425)


def test_pass_at_1_and_vote_on_hand_built_samples(monkeypatch):
    q1 = QARecord(id="q1", source="t", question="Which?", options=OPTIONS, answer="B")
    q2 = QARecord(id="q2", source="t", question="Which?", options=OPTIONS, answer="A")
    texts = {  # k = 4 samples per question, scored by the real reward code
        "q1": [reply("B"), reply("C"), "<answer>C</answer>", "no answer at all"],  # extracted B C C -
        "q2": [reply("A"), reply("C"), reply("C"), "<answer>(A)</answer>"],  # A C C A: tie, A came first
    }
    lengths = {"q1": [10, 20, 30, 40], "q2": [5, 5, 5, 5]}
    monkeypatch.setattr(evaluate, "sample_texts", lambda engine, tok, batch, *a: (
        [texts[r.id] for r in batch], np.array([lengths[r.id] for r in batch])))
    got = evaluate.evaluate_records(None, None, [q1, q2], stop_ids=[], batch_size=1)
    r1, r2 = got["outputs"]
    assert r1["extracted"] == ["B", "C", "C", None] and r1["correct"] == [True, False, False, False]
    assert (r1["vote"], r1["vote_correct"]) == ("C", False)
    assert r2["extracted"] == ["A", "C", "C", "A"] and (r2["vote"], r2["vote_correct"]) == ("A", True)
    assert got["accuracy"] == (0.25 + 0.5) / 2  # pass@1 averaged over the 4 samples, then questions
    assert got["majority_accuracy"] == 0.5
    assert got["format_error_rate"] == 3 / 8  # "<answer>…" without think twice, "no answer" once
    assert got["mean_length"] == (100 + 20) / 8
    assert got["n"] == 2


# ------------------------------------------------------------------ the task end to end

def toy_extract(completion, record):
    """A random model never writes `<answer>`: its first character stands in for the answer."""
    return completion[:1] or None


def toy_score(completion, record, config=None):
    """Correct when the toy answer's code point is even (about half of a random model's)."""
    ok = float(bool(completion) and ord(completion[0]) % 2 == 0)
    return dict(reward=ok, accuracy=ok, format=float(completion[:1].isalpha()))


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """A tiny tokenizer and a random tiny model checkpoint on disk."""
    root = tmp_path_factory.mktemp("eval")
    texts = [row.get("question", "") for row in read_jsonl(os.path.join(FIXTURES, "medqa.jsonl"))]
    toklib.build(texts * 20 + ["yes no maybe A B C D E 0123456789"] * 20, str(root / "tokenizer"), vocab_size=320)
    checkpoint.save_params(str(root / "init"), models.build(model_cfg())[0])
    return root


def model_cfg():
    cfg = eval_config.get_config("tiny").model
    cfg.update(num_layers=2, hidden_size=64, intermediate_size=128, num_heads=4, num_kv_heads=2, head_dim=16,
               vocab_size=320, seed=1, init_from="")
    return cfg


def task_config(root, **changes):
    config = eval_config.get_config("tiny")
    config.model = model_cfg()
    config.model.init_from = os.path.join(root, "init")
    config.tokenizer = os.path.join(root, "tokenizer")
    config.benchmarks = [dict(format="medqa", path=os.path.join(FIXTURES, "medqa.jsonl"), name="medqa"),
                         dict(format="pubmedqa", path=os.path.join(FIXTURES, "pubmedqa_ori.json"), name="pubmedqa")]
    config.eval.update(dict(samples=4, temperature=1.0, max_new_tokens=8, batch_size=1, model_name="tiny") | changes)
    return config


def table_rows(markdown):
    """The first table of results.md as {row label: [cells]}, plus its header."""
    lines = [line for line in markdown.split("\n\n")[0].splitlines() if not line.startswith("|---")]
    cells = [[c.strip() for c in line.strip("|").split("|")] for line in lines]
    return cells[0], {row[0]: row[1:] for row in cells[1:]}


def test_eval_task_writes_consistent_results(tiny_run, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(rewards, "score", toy_score)
    monkeypatch.setattr(rewards, "extract_answer", toy_extract)
    results = main.run_task(task_config(tiny_run), str(tmp_path))
    assert "[eval] medqa: 1/2 questions" in capsys.readouterr().out  # progress per batch

    with open(tmp_path / "results.json") as f:
        saved = json.load(f)
    assert saved == json.loads(json.dumps(results))
    bench = saved["benchmarks"]
    assert list(bench) == ["medqa", "pubmedqa"]
    assert bench["medqa"]["reader"]["dropped"] == {"answer_not_in_options": 1, "missing_answer_idx": 1,
                                                   "missing_question": 1}
    assert bench["pubmedqa"]["reader"]["dropped"] == {"answer_not_yes_no_maybe": 1, "missing_final_decision": 1}

    for name, r in bench.items():  # the numbers, recomputed from the per-question outputs
        rows = list(read_jsonl(str(tmp_path / "outputs" / f"{name}.jsonl")))
        assert len(rows) == r["n"] == 2 and all(len(row["completions"]) == 4 for row in rows)
        assert r["accuracy"] == pytest.approx(np.mean([np.mean(row["correct"]) for row in rows]))
        assert r["majority_accuracy"] == pytest.approx(np.mean([row["vote_correct"] for row in rows]))
        for row in rows:
            assert row["vote"] == evaluate.majority_vote(row["extracted"])
            assert row["correct"] == [toy_score(t, None)["accuracy"] == 1.0 for t in row["completions"]]
    accuracies = [r["accuracy"] for r in bench.values()]
    assert 0 < np.mean(accuracies) < 1  # the check above has something to check
    assert saved["macro"]["accuracy"] == pytest.approx(np.mean(accuracies))

    header, table = table_rows((tmp_path / "results.md").read_text())
    assert header == ["Model", "medqa", "pubmedqa", "Avg"]
    for key, label in (("accuracy", "tiny (pass@1, k=4)"), ("majority_accuracy", "tiny (maj@4)")):
        expected = [f"{100 * bench[n][key]:.2f}" for n in bench] + [f"{100 * saved['macro'][key]:.2f}"]
        assert table[label] == expected
    assert "75.4" in (tmp_path / "results.md").read_text()  # the published note


def test_missing_inputs_and_mismatches_say_what_to_do(tiny_run, tmp_path):
    config = task_config(tiny_run)
    config.benchmarks = eval_config.get_config("tiny").benchmarks
    config.benchmarks[0]["path"] = str(tmp_path / "none.jsonl")
    with pytest.raises(FileNotFoundError, match=r"config.benchmarks\[0\] \(held-out\).*configs/synthesize.py"):
        evaluate.run(config, str(tmp_path))
    config = task_config(tiny_run)
    config.model.init_from = str(tmp_path / "no_checkpoints")
    with pytest.raises(FileNotFoundError, match="config.model.init_from=.*configs/rl_stage2.py"):
        evaluate.run(config, str(tmp_path))
    config = task_config(tiny_run)
    config.model.vocab_size = 128
    with pytest.raises(ValueError, match="vocab mismatch: the tokenizer .* has 320 tokens .* vocab_size is 128"):
        evaluate.run(config, str(tmp_path))
    with pytest.raises(ValueError, match="identical greedy samples"):
        evaluate.run(task_config(tiny_run, temperature=0.0), str(tmp_path))

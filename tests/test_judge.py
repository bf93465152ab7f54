"""The LLM-judge reward against a local OpenAI-compatible chat server that grades by script."""

import http.server
import json
import logging
import threading
import time

import numpy as np
import pytest

from configs import eval as eval_config
from fleming_jax import engine, evaluate, judge, parallel, rewards
from fleming_jax.data.records import QARecord, read_jsonl, write_jsonl
from fleming_jax.train import rl
from tests.test_rl import Killed, kill_at, model_cfg, toy_config, toy_rewards, toy_run  # noqa: F401 (toy_run: a fixture)

KEY = "sk-judge-secret-777"


class JudgeServer:
    """Grades the answer in the prompt: "right" 9, "wrong" 2, "rambling" no SCORE line, "slow"
    answers after 1 s; anything else (a toy model's reply) 10 if it starts with a digit, else 1.
    Keeps each request's answer and prompt."""

    def __init__(self):
        self.requests, self.prompts, self.keys, self.lock = [], [], set(), threading.Lock()
        outer = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                content = body["messages"][0]["content"]
                answer = content.split("Answer to grade:\n", 1)[1].rsplit("\n\nJudge", 1)[0]
                with outer.lock:
                    outer.requests.append(answer)
                    outer.prompts.append(content)
                    outer.keys.add(self.headers.get("Authorization"))
                if answer == "slow":
                    time.sleep(1.0)
                verdict = {"right": "It matches.\nSCORE: 9", "wrong": "SCORE: 2", "rambling": "Hard to say."}.get(
                    answer, f"SCORE: {10 if answer[:1].isdigit() else 1}")
                data = json.dumps(dict(choices=[dict(index=0, message=dict(role="assistant", content=verdict))],
                                       usage=dict(total_tokens=10))).encode()
                try:
                    self.send_response(200)
                    self.send_header("Content-Length", str(len(data)))
                    self.end_headers()
                    self.wfile.write(data)
                except OSError:
                    pass  # the client timed out and hung up

            def log_message(self, *args):
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.httpd.serve_forever, args=(0.01,), daemon=True).start()
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"


@pytest.fixture
def server(monkeypatch):
    monkeypatch.setenv("JUDGE_KEY", KEY)
    monkeypatch.setenv("no_proxy", "127.0.0.1")
    judge._caches.clear()
    s = JudgeServer()
    yield s
    s.httpd.shutdown()
    s.httpd.server_close()


def test_parse_takes_the_last_score_line_out_of_ten():
    assert judge.parse("ok\nSCORE: 7") == 0.7 and judge.parse("SCORE: 3\nOn reflection:\nSCORE: 10") == 1.0
    assert judge.parse("no, SCORE: 10") is None  # a line of its own
    assert judge.parse("score:4.5 ") == 0.45
    assert judge.parse("SCORE: 11") is None and judge.parse("I give it a 7") is None and judge.parse("") is None


def test_scores_counts_failures_and_asks_each_pair_once(server, tmp_path, caplog, capsys, monkeypatch):
    record = QARecord(id="1", source="t", question="What lowers LDL?", answer="Statins")
    replies = ["right", "wrong", "rambling", "slow", "right"]
    settings = dict(base_url=server.url, model="judge", api_key_env="JUDGE_KEY", cache=str(tmp_path / "judge.jsonl"),
                    timeout_s=0.2, max_retries=0)
    with caplog.at_level(logging.DEBUG):
        values, counts = judge.score(replies, [record] * 5, **settings)
    assert values == [0.9, 0.2, 0.0, 0.0, 0.9]
    assert counts == dict(requests=4, cached=1, unparsable=1, failed=1, tokens=30, seconds=counts["seconds"])
    assert sorted(server.requests) == ["rambling", "right", "slow", "wrong"]  # the repeated pair asked once
    assert server.keys == {f"Bearer {KEY}"}
    out = capsys.readouterr()
    assert KEY not in out.out + out.err + caplog.text
    # a fresh process (a resumed run) reads the cache: only the failed request is asked again
    judge._caches.clear()
    values, counts = judge.score(replies, [record] * 5, **settings)
    assert values == [0.9, 0.2, 0.0, 0.0, 0.9] and counts["requests"] == 1 and counts["cached"] == 4
    assert server.requests[4:] == ["slow"]
    # another host gets process 0's result as JSON (a list): still (values, counts) for the rewards
    monkeypatch.setattr(parallel, "on_main", lambda work, *args: json.loads(json.dumps(work(*args))))
    component = rewards.Component("judge", judge.score, 1.0, settings)
    values, reported = rewards.score_components([component], replies, [record] * 5)
    assert values["judge"] == [0.9, 0.2, 0.0, 0.0, 0.9] and reported["judge_cached"] == 4
    with pytest.raises(ValueError, match="needs base_url"):
        judge.score(replies, [record] * 5, base_url="", model="judge")


@pytest.mark.slow
def test_rl_with_the_judge_reward_logs_it_and_a_rerun_step_asks_nothing(toy_run, server, tmp_path):
    """Real RL steps scored by the judge (its verdict by reply length here), checkpoints every
    2 steps: killed after step 3 (unsaved), the rerun repeats step 3's rollout exactly and
    finds every verdict in the cache."""
    rewards = dict(toy_rewards(), judge=dict(fn="fleming_jax.judge:score", weight=1.0, base_url=server.url,
                                               model="judge", api_key_env="JUDGE_KEY",
                                               cache=str(tmp_path / "judge.jsonl")))
    config = lambda: toy_config(toy_run, steps=4, rewards=rewards)
    with pytest.raises(Killed):
        rl.RLTrainer(config(), str(tmp_path / "run")).train(on_step=kill_at(3))
    asked = len(server.requests)
    judge._caches.clear()  # as a new process would start
    rows = rl.RLTrainer(config(), str(tmp_path / "run")).train()
    assert [r["step"] for r in rows] == [3, 4]
    assert rows[0]["reward_judge_requests"] == 0 and rows[0]["reward_judge_cached"] == 32
    assert len(server.requests) == asked + rows[1]["reward_judge_requests"] > asked
    logged = [json.loads(line) for line in open(tmp_path / "run" / "metrics.jsonl")]
    assert {"reward_judge", "reward_judge_positive", "reward_judge_tokens"} <= set(logged[0])
    assert np.isclose(logged[0]["reward_mean"], logged[0]["reward_judge"] + logged[0]["reward_correctness"])
    assert all(r["reward_judge_tokens"] == 10 * r["reward_judge_requests"] and r["reward_judge_seconds"] >= 0
               for r in logged)  # the server's usage: 10 tokens a verdict


@pytest.mark.slow
def test_open_ended_records_flow_through_rl_and_eval_with_the_judge(toy_run, server, tmp_path):
    """Records without options (a reference answer and a rubric) pass the data checks (a
    non-text rubric is dropped), RL optimises the judge's score with the judge deciding what
    counts as solved (`rl.solved_by`), and eval reports the judge's mean score: the mean of
    each question's verdicts, by hand from the replies."""
    rubric = "Full marks only for a reply that opens with a digit."
    records = [QARecord(id=str(i), source="open", question=f"question {i}: which option?", answer=str(i % 10),
                        meta=dict(rubric=rubric)) for i in range(16)]
    bad = QARecord(id="99", source="open", question="question 99: which option?", answer="9", meta=dict(rubric=5))
    write_jsonl(str(tmp_path / "open.jsonl"), records + [bad])
    settings = dict(base_url=server.url, model="judge", api_key_env="JUDGE_KEY")
    config = toy_config(toy_run, steps=30, rewards=dict(judge=dict(fn="fleming_jax.judge:score", weight=1.0, **settings)),
                        solved_by="judge", solved_at=1.0)
    config.data.train = str(tmp_path / "open.jsonl")
    rows = rl.RLTrainer(config, str(tmp_path / "run")).train()
    first, last = np.mean([r["accuracy"] for r in rows[:3]]), np.mean([r["accuracy"] for r in rows[-3:]])
    assert first < 0.5 and last > 0.9, [round(r["accuracy"], 2) for r in rows]
    np.testing.assert_allclose([r["reward_judge"] for r in rows], [0.1 + 0.9 * r["accuracy"] for r in rows])
    assert all(f"Grading rubric:\n{rubric}" in p for p in server.prompts)
    assert not any("question 99" in p for p in server.prompts)  # the record with a non-text rubric

    config = eval_config.get_config("tiny")
    config.model = model_cfg(str(toy_run))
    config.model.init_from = str(tmp_path / "run" / "checkpoints")
    config.tokenizer = str(toy_run / "tokenizer")
    config.benchmarks = [dict(format="jsonl", path=str(tmp_path / "open.jsonl"), name="open")]
    config.eval.update(max_new_tokens=8, judge=settings)
    results = evaluate.run(config, str(tmp_path / "eval"))
    got = results["benchmarks"]["open"]
    assert got["reader"]["dropped"] == {"rubric_not_text": 1} and got["n"] == 16
    outputs = list(read_jsonl(str(tmp_path / "eval" / "outputs" / "open.jsonl")))
    by_hand = [1.0 if row["completions"][0][:1].isdigit() else 0.1 for row in outputs]
    assert [row["judge"] for row in outputs] == [[v] for v in by_hand]
    assert got["judge_score"] == pytest.approx(np.mean(by_hand)) and got["judge_score"] > 0.9
    assert "judge's mean score" in open(tmp_path / "eval" / "results.md").read()


@pytest.mark.slow
def test_a_groups_replies_are_judged_while_the_engine_decodes_the_next_groups(toy_run, server, tmp_path, monkeypatch):
    """One group decodes at a time (rollout.slots = G): four waves of 4 decode calls (2 chunks
    of 4 tokens, then the calls that find them finished and admit the next). The ninth call (the
    third wave's) waits up to 10 s for the judge's first request, which can only come from the
    first group being scored beside the decoding; each reply still gets its own scores."""
    settings = dict(fn="fleming_jax.judge:score", weight=1.0, base_url=server.url, model="judge",
                    api_key_env="JUDGE_KEY")
    config = toy_config(toy_run, steps=1, rewards=dict(toy_rewards(), judge=settings))
    config.rollout.update(slots=8, chunk=4)
    real, heard = engine._decode, []

    def decode(*args, **kwargs):
        heard.append(None)
        if len(heard) == 9:
            deadline = time.monotonic() + 10
            while not server.requests and time.monotonic() < deadline:
                time.sleep(0.01)
            heard[-1] = len(server.requests)
        return real(*args, **kwargs)

    monkeypatch.setattr(engine, "_decode", decode)
    (row,) = rl.RLTrainer(config, str(tmp_path / "run")).train()
    assert len(heard) == 16 and heard[8] >= 1, heard  # the judge heard of group 1 while wave 3 decoded
    assert row["reward_judge_requests"] + row["reward_judge_cached"] == 32  # summed over the 4 groups
    # each reply's two components side by side: digit first -> 1 + 1.0, else 0 + 0.1
    per_reply = np.round(row["histogram/reward"], 6)
    assert set(per_reply) <= {0.1, 2.0} and np.mean(per_reply == 2.0) == row["accuracy"]
    assert row["reward_judge"] == pytest.approx(0.1 + 0.9 * row["accuracy"])

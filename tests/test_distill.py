"""Cold-start collection: the KG teacher, rejection sampling, refinement, and an HTTP
teacher killed mid-run and resumed."""

import collections
import http.server
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time

from fleming_jax import rewards
from fleming_jax.data.records import QARecord, format_reply, read_jsonl, write_jsonl
from fleming_jax.distill import collect, teachers
from fleming_jax.prompts import user_prompt

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OPTIONS = {"A": "Aspirin", "B": "Heparin", "C": "Warfarin", "D": "Insulin"}
REASONING = "The patient has the findings of the disease; the drug treats it."


def record(i, answer="B"):
    return QARecord(f"q{i}", "test", f"Question {i}: which drug?", answer, dict(OPTIONS))


def test_kg_teacher_writes_verified_replies_from_the_graph_path(kg_records):
    teacher = teachers.KGTeacher(kg_records[:50])
    for r in kg_records[:50]:
        chat = collect.first_chat(r, answer_conditioned=True)
        (reply,) = teacher.complete(chat)
        assert rewards.is_correct(reply, r) and rewards.format_ok(reply), reply
        assert r.meta["kg_path"]["nodes"][0]["name"][1:] in reply  # (first letter lower-cased in a list)
        # the options are checked in order, and only the answer's line says yes
        checks = [line for line in reply.splitlines() if line[:3] in {f"{x}. " for x in r.options}]
        assert checks == [f"{x}. {text}: {'yes' if x == r.answer else 'no'}" for x, text in r.options.items()]
    assert teacher.complete([{"role": "user", "content": "unknown question"}], n=2) == ["", ""]


class Scripted(teachers.Teacher):
    """Replies chosen per record id and round (1 message: first ask; 3: a refinement)."""

    def __init__(self, script):
        self.script, self.chats = script, []

    def complete(self, messages, n=1, temperature=1.0, max_tokens=4096):
        self.chats.append(messages)
        qid = "q" + re.search(r"Question (\d+)", messages[0]["content"]).group(1)
        return self.script[qid][len(messages) // 2][:n]


def test_rejection_sampling_drops_and_counts_each_reason_and_refines():
    good_long = format_reply(REASONING + " " + "More detail. " * 5, "B")
    good_short = format_reply(REASONING, "B")
    script = {
        "q1": [[format_reply(REASONING, "A"), f"Preamble. {good_short}", good_long, good_short]],
        "q2": [[format_reply(REASONING, "C")] * 4, [good_long] * 4],  # right after one refinement
        "q3": [[""] * 4],  # nothing to refine
        "q4": [[format_reply("x", "B"), format_reply(REASONING * 40, "B"), "<answer>B</answer>", "B"]] * 3,
    }
    teacher = Scripted(script)
    cfg = collect.CollectConfig(k=4, refine_rounds=2, min_chars=40, max_chars=1000)
    outcomes = collect.collect_chunk([record(i) for i in range(1, 5)], teacher, cfg)
    by_id = {o["id"]: o for o in outcomes}
    assert [s["messages"][1]["content"] for s in by_id["q1"]["sft"]] == [good_short]
    assert by_id["q1"]["rejected"] == {"wrong_answer": 1, "bad_format": 1}
    assert by_id["q2"]["refine_rounds"] == 1 and by_id["q2"]["sft"][0]["meta"]["refine_round"] == 1
    refine = [c for c in teacher.chats if len(c) == 3][0]
    assert refine[1]["content"] == format_reply(REASONING, "C") and "B. Heparin" in refine[2]["content"]
    assert by_id["q3"]["sft"] == [] and by_id["q3"]["rejected"] == {"empty": 4}
    assert not by_id["q3"]["answered"] and by_id["q3"]["refine_rounds"] == 0
    # q4: too short, too long, no think block, no answer tag, in all 3 rounds
    assert by_id["q4"]["sft"] == [] and by_id["q4"]["refine_rounds"] == 2
    assert by_id["q4"]["rejected"] == {"too_short": 3, "too_long": 3, "bad_format": 3, "wrong_answer": 3}
    report = collect.summarize(outcomes, resumed=0)
    assert report == {"records_asked": 4, "resumed_from_log": 0, "answered": 3, "verified": 3, "kept": 2,
                      "kept_after_refinement": 1, "trajectories_kept": 2,
                      "rejected": {"empty": 4, "wrong_answer": 8, "bad_format": 4, "too_short": 3,
                                   "too_long": 3}}
    sft = by_id["q1"]["sft"][0]
    assert sft["messages"][0] == {"role": "user", "content": user_prompt(record(1))}
    all_kept = collect.collect_chunk([record(1)], Scripted(script), collect.CollectConfig(keep="all", min_chars=40))
    assert [s["id"] for s in all_kept[0]["sft"]] == ["q1", "q1#1"]


def test_blind_prompt_does_not_give_the_answer():
    assert "Heparin" not in collect.first_chat(record(1), answer_conditioned=False)[0]["content"].split(
        "D. Insulin")[1]
    assert "The correct answer is B. Heparin" in collect.first_chat(record(1), True)[0]["content"]


class Server(http.server.ThreadingHTTPServer):
    """An OpenAI-style endpoint: record i's answer is right when i % 3 != 0, else wrong
    until a refinement; counts first asks per record."""

    def __init__(self):
        super().__init__(("127.0.0.1", 0), Handler)
        self.first_asks, self.lock = collections.Counter(), threading.Lock()


class Handler(http.server.BaseHTTPRequestHandler):
    def log_message(self, *args):
        pass

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        messages = body["messages"]
        i = int(re.search(r"Question (\d+)", messages[0]["content"]).group(1))
        if len(messages) == 1:
            with self.server.lock:
                self.server.first_asks[i] += 1
        time.sleep(0.03)
        answer = "A" if i % 3 == 0 and len(messages) == 1 else "B"
        text = format_reply(REASONING, answer)
        reply = {"choices": [{"index": j, "message": {"role": "assistant", "content": text}}
                             for j in range(body["n"])]}
        data = json.dumps(reply).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)


def test_http_teacher_collection_is_killed_and_resumes_without_asking_twice(tmp_path):
    n = 60
    write_jsonl(tmp_path / "qa.jsonl", [record(i) for i in range(n)])
    server = Server()
    threading.Thread(target=server.serve_forever, daemon=True).start()
    args = [sys.executable, "main.py", "--config=configs/distill.py", f"--workdir={tmp_path}/out",
            f"--config.data.train={tmp_path}/qa.jsonl", "--config.data.validation=",
            "--config.teacher.kind=http", "--config.teacher.model=scripted",
            f"--config.teacher.base_url=http://127.0.0.1:{server.server_address[1]}/v1",
            "--config.teacher.max_concurrency=4", "--config.collect.chunk=4", "--config.collect.k=2"]
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="")
    log = tmp_path / "out" / "trajectories" / "train.jsonl"
    try:
        first = subprocess.Popen(args, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        deadline = time.time() + 120
        while not (log.exists() and len(log.read_text().splitlines()) >= 12):
            assert first.poll() is None and time.time() < deadline, first.stderr.read().decode()[-2000:]
            time.sleep(0.02)
        first.send_signal(signal.SIGKILL)
        first.wait()
        written = {json.loads(line)["id"] for line in log.read_text().splitlines() if line.endswith("}")}
        assert 12 <= len(written) < n
        second = subprocess.run(args, cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
        assert second.returncode == 0, second.stderr[-3000:]
    finally:
        server.shutdown()
    assert f"{len(written)} records done" in second.stdout
    for i in range(n):
        # Done records are never asked again; one in flight at the kill may be asked twice (its
        # request can reach the server's handler thread just after the kill).
        allowed = (1,) if f"q{i}" in written else (1, 2)
        assert server.first_asks[i] in allowed, (i, server.first_asks[i])
    assert sum(server.first_asks.values()) - n <= 4  # at most one chunk was in flight
    sft = list(read_jsonl(tmp_path / "out" / "train.jsonl"))
    assert [s["id"] for s in sft] == [f"q{i}" for i in range(n)]  # none lost, none twice, in order
    report = json.loads((tmp_path / "out" / "report.json").read_text())["train"]
    assert report["kept"] == n and report["kept_after_refinement"] == n // 3
    assert report["rejected"] == {"wrong_answer": 2 * (n // 3)}


def test_missing_input_names_the_command_that_makes_it(tmp_path):
    result = subprocess.run([sys.executable, "main.py", "--config=configs/distill.py", f"--workdir={tmp_path}",
                             f"--config.data.train={tmp_path}/nope.jsonl"], cwd=ROOT, capture_output=True,
                            text=True, env=dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS=""))
    assert result.returncode != 0
    assert "run `python main.py --config=configs/synthesize.py --workdir=runs/synthesize` first" in result.stderr

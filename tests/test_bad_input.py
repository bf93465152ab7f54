"""Bad input never costs a run (issue 18): each case below ends either in one clear line
naming the file, line or config key (and a non-zero exit), or with the bad rows dropped,
counted by reason with their file:line, and the run completing. Through the real paths:
`main.py` in a subprocess for the one-line errors, the trainers, `hf.load` and the eval
task in process on files the tests write and corrupt."""

import json
import os
import shutil
import struct
import subprocess
import sys

import numpy as np
import pytest

from configs import sft as sft_config
from fleming_jax import evaluate, rewards
from fleming_jax import tokenizer as toklib
from fleming_jax.data.records import QARecord, write_jsonl
from fleming_jax.models import hf
from fleming_jax.train import rl, sft
from tests.test_evaluate import task_config, tiny_run, toy_extract  # noqa: F401 (fixture)
from tests.test_evaluate import toy_score as eval_score
from tests.test_rl import toy_config, toy_run  # noqa: F401 (fixture)
from tests.test_teachers import KEY, FakeServer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OPTIONS = {"A": "a", "B": "b"}
LONG = "why " * 3000  # thousands of tokens: over any tiny model's 2048 positions


def run_main(*args, env=None, code=None):
    """main.py (or `code` that calls it) in a subprocess; (returncode, stdout + stderr, stderr)."""
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="", no_proxy="127.0.0.1", NO_PROXY="127.0.0.1",
               **(env or {}))
    argv = ["-c", code, *args] if code else ["main.py", *args]
    r = subprocess.run([sys.executable, *argv], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    return r.returncode, r.stdout + r.stderr, r.stderr


def assert_one_line_error(rc, stderr, *expected):
    assert rc != 0
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in stderr, stderr[-3000:]
    for text in expected:
        assert text in lines[0], lines[0]


def qa(i, **changes):
    return QARecord(id=str(i), source="toy", question=f"question {i}: which option?", options=OPTIONS,
                    answer="A").to_dict() | changes


def chat(i, **message):
    return {"id": str(i), "messages": [{"role": "user", "content": f"Which gene causes disease {i}?"},
                                       {"role": "assistant", "content": f"<think>\ngene {i}\n</think>\n"
                                                                        f"<answer>A</answer>"} | message]}


# ------------------------------------------------------------------ config: one line naming the key

@pytest.mark.parametrize("args,expected", [
    (["--config=configs/rl_stage1.py", "--config.optimizer.learning_rate=-0.001"],
     "config.optimizer.learning_rate=-0.001: must be > 0"),
    (["--config=configs/rl_stage1.py", "--config.rl.group_size=1"], "config.rl.group_size=1: must be >= 2"),
    (["--config=configs/sft.py", "--config.checkpoint.every=0"], "config.checkpoint.every=0: must be >= 1"),
    (["--config=configs/rl_stage2.py", "--config.rl.prompts_per_step=0"], "config.rl.prompts_per_step=0: must be >= 1"),
    (["--config=configs/sft.py", "--config.train.batch_size=6", "--config.train.grad_accum_steps=4"],
     "config.train.batch_size=6 is not divisible by config.train.grad_accum_steps=4"),
    (["--config=configs/eval.py", "--config.eval.samples=0"], "config.eval.samples=0: must be >= 1"),
    (["--config=configs/rl_stage1.py", "--config.rl.pack_length=100"],
     "config.rl.pack_length=100: must be -1 (pack rows of the power of two that holds the longest sequence), 0 "
     "(one sequence per row) or a power of two >= 16 (the row length)"),
    (["--config=configs/rl_stage1.py", "--config.rl.group_sise=4"],
     "a --config override names a key the config does not have: 'group_sise' Did you mean "
     '"group_size" instead of "group_sise"?'),
])
def test_bad_config_value_is_one_line_naming_the_key(tmp_path, args, expected):
    rc, _, err = run_main(*args, f"--workdir={tmp_path}")
    assert_one_line_error(rc, err, "error: " + expected)
    assert not os.listdir(tmp_path)  # refused before anything ran


# ------------------------------------------------------------------ input files: one line naming the file

def rl_args(toy_run, train):
    return ["--config=configs/rl_stage1.py", f"--config.model.init_from={toy_run}/init",
            f"--config.tokenizer={toy_run}/tokenizer", f"--config.data.train={train}", "--config.data.eval="]


def sft_args(train):
    return ["--config=configs/sft.py", f"--config.data.train={train}", "--config.data.eval="]


@pytest.mark.parametrize("case", ["rl_empty", "distill_no_usable_row", "sft_empty", "sft_content_null"])
def test_unusable_input_file_is_one_line_naming_it(toy_run, tmp_path, case):
    train = tmp_path / "train.jsonl"
    if case == "rl_empty":
        train.write_text("\n")
        expected = [f"config.data.train={train} is empty (no rows)", "configs/synthesize.py"]
    elif case == "distill_no_usable_row":  # the QA reader RL uses too
        write_jsonl(str(train), [qa(0, answer="Z"), qa(1, answer=None), qa(2, answer=1)])
        expected = [f"config.data.train={train} has no usable row (kept 0 of 3 rows; dropped "
                    f"answer_not_in_options 3 (first at {train}:1))"]
    elif case == "sft_empty":
        train.write_text("")
        expected = [f"config.data.train={train} is empty (no rows)", "configs/distill.py"]
    else:
        write_jsonl(str(train), [chat(0, content=None)])
        expected = [f"config.data.train={train} has no usable row (kept 0 of 1 rows; dropped "
                    f"content_not_text 1 (first at {train}:1))"]
    args = {"rl": rl_args(toy_run, train), "sft": sft_args(train),
            "distill": ["--config=configs/distill.py", f"--config.data.train={train}", "--config.data.validation="]
            }[case.split("_")[0]]
    rc, _, err = run_main(*args, f"--workdir={tmp_path / 'run'}")
    assert_one_line_error(rc, err, "error: ", *expected)


def test_traceback_with_verbosity_1_and_for_bugs(tmp_path):
    (tmp_path / "train.jsonl").write_text("")
    rc, _, err = run_main(*sft_args(tmp_path / "train.jsonl"), f"--workdir={tmp_path}", "--verbosity=1")
    assert rc != 0 and "Traceback" in err and "is empty (no rows)" in err
    bug = ("import sys, main; from absl import app; "
           "main.run_task = lambda config, workdir: {}['a bug']; app.run(main.main)")
    rc, _, err = run_main("--config=configs/export.py", f"--workdir={tmp_path}", code=bug)
    assert rc != 0 and "Traceback" in err and "KeyError: 'a bug'" in err


# ------------------------------------------------------------------ secrets

@pytest.mark.parametrize("env_key,outcome", [
    (KEY + "\n", "HTTP 401"),  # stripped, sent, refused by the server: which echoes it back
    ("sk-test-sec\nret-4242", "environment variable FLEMING_TEACHER_KEY has a space, a control character"),
])
def test_api_key_never_reaches_any_output(tmp_path, env_key, outcome):
    srv = FakeServer([(500, dict(error=dict(message=f"upstream rejected {KEY}"))),
                      (401, dict(error=dict(message=f"Incorrect API key provided: {KEY}")))], delay=0.0)
    try:
        write_jsonl(str(tmp_path / "qa.jsonl"), [qa(0)])
        rc, out, err = run_main(
            "--config=configs/distill.py", f"--workdir={tmp_path / 'run'}", f"--config.data.train={tmp_path}/qa.jsonl",
            "--config.data.validation=", "--config.teacher.kind=http", f"--config.teacher.base_url={srv.url}",
            "--config.teacher.model=m", "--config.teacher.api_key_env=FLEMING_TEACHER_KEY",
            "--config.teacher.max_retries=1", env={"FLEMING_TEACHER_KEY": env_key})
    finally:
        srv.httpd.shutdown()
        srv.httpd.server_close()
    assert rc != 0 and outcome in err.splitlines()[-1], err[-3000:]
    for secret in (KEY, "sk-test-sec", "ret-4242"):
        assert secret not in out
    if "HTTP" in outcome:
        assert [r["headers"]["Authorization"] for r in srv.requests] == [f"Bearer {KEY}"] * 2
        assert "upstream rejected ***" in out  # the retry warning was logged, redacted
    else:
        assert not srv.requests


# ------------------------------------------------------------------ RL and SFT: dropped, counted, run completes

@pytest.mark.slow
def test_rl_drops_and_counts_bad_records_and_trains(toy_run, tmp_path, capsys):
    train, held_out = tmp_path / "train.jsonl", tmp_path / "eval.jsonl"
    good = [qa(i) for i in range(6)]
    bad = [qa(10, answer="Z"), qa(11, answer=None), qa(12, answer=1), qa(13, question=LONG),
           qa(14, question=None), qa(15, options=None, answer="")]
    write_jsonl(str(train), good[:3] + bad + good[3:])
    write_jsonl(str(held_out), [qa(20), qa(21, question=LONG)])
    config = toy_config(toy_run, steps=1, prompts_per_step=2, group_size=2)
    config.data.update(train=str(train), eval=str(held_out))
    rows = rl.RLTrainer(config, str(tmp_path / "run")).train()
    assert [r["step"] for r in rows] == [1] and "eval_accuracy" in rows[-1]
    out = capsys.readouterr().out
    limit = 2048 - config.rl.max_new_tokens
    assert (f"[data] config.data.train={train}: kept 6 of 12 rows; dropped answer_not_in_options 3 (first at "
            f"{train}:4), empty_question 1 (first at {train}:8), missing_answer 1 (first at {train}:9), "
            f"prompt_over_{limit}_tokens 1 (first at {train}:7)") in out
    assert f"[data] config.data.eval={held_out}: kept 1 of 2 rows; dropped prompt_over_{limit}_tokens 1" in out
    size = len(toklib.load(f"{toy_run}/tokenizer"))
    config.model.vocab_size = size - 1  # a tokenizer the model cannot embed is refused before anything is built
    with pytest.raises(ValueError, match=f"the tokenizer at {toy_run}/tokenizer has {size} tokens but the model's "
                                         f"vocab_size is {size - 1}"):
        rl.RLTrainer(config, str(tmp_path / "other"))


def test_sft_drops_bad_chats_rebuilds_a_stale_tokenizer_and_trains(tmp_path, capsys):
    train = tmp_path / "train.jsonl"
    bad = [chat(100, content=None), {"id": "x", "messages": []}, chat(101, role="tool"),
           chat(102, content=" "), chat(103, name="extra key")]
    write_jsonl(str(train), [chat(i) for i in range(20)] + bad + [chat(i) for i in range(20, 40)])
    work = tmp_path / "run"
    # What a failed run on an empty file left (issue 18): a tokenizer without merges, no fingerprint.
    toklib.build(["leftover text"] * 4, str(work / "tokenizer"), vocab_size=300)
    file = work / "tokenizer" / "tokenizer.json"
    stale = json.loads(file.read_text())
    stale["model"]["merges"] = []
    file.write_text(json.dumps(stale))
    with pytest.raises(ValueError, match=f"{file}: a BPE tokenizer with no merges"):
        toklib.load(str(work / "tokenizer"))

    config = sft_config.get_config("tiny")
    config.model.update(num_layers=1, hidden_size=32, num_heads=2, num_kv_heads=1, head_dim=16,
                        intermediate_size=64, vocab_size=512)
    config.train.update(seq_len=128, batch_size=8, log_every=1)
    config.data.update(train=str(train), eval="")
    config.optimizer.total_steps = 1
    rows = sft.Trainer(config, str(work)).train()
    assert [r["step"] for r in rows] == [1] and np.isfinite(rows[-1]["loss"])
    out = capsys.readouterr().out
    assert (f"[data] config.data.train={train}: kept 40 of 45 rows; dropped content_not_text 1 (first at "
            f"{train}:21), message_not_role_content 1 (first at {train}:25), no_assistant_text 1 (first at "
            f"{train}:24), no_messages 1 (first at {train}:22), unknown_role 1 (first at {train}:23)") in out
    assert f"[tokenizer] {work / 'tokenizer'} was not built from these 80 texts at vocab_size=512; rebuilding" in out
    tok = toklib.load(str(work / "tokenizer"))
    assert len(json.loads(file.read_text())["model"]["merges"]) > 0
    # The same chats again (a resume): reused as is; other chats or another vocab size: rebuilt.
    texts = [m["content"] for row in sft.read_chats(str(train), "train") for m in row["messages"]]
    capsys.readouterr()
    assert toklib.build_once(texts, str(work / "tokenizer"), 512).get_vocab() == tok.get_vocab()
    assert "rebuilding" not in capsys.readouterr().out
    toklib.build_once(texts[:10], str(work / "tokenizer"), 512)
    assert "was not built from these 10 texts" in capsys.readouterr().out
    with pytest.raises(ValueError, match="no text to build a tokenizer from"):
        toklib.build_once([], str(tmp_path / "empty_tok"), 512)
    # Chats whose user turn fills the packed row leave nothing to learn: refused, not a StopIteration.
    write_jsonl(str(train), [chat(i) | {"messages": [{"role": "user", "content": LONG[:400]}, chat(i)["messages"][1]]}
                             for i in range(3)])
    config.train.seq_len = 32
    with pytest.raises(ValueError, match=f"config.data.train={train}: no chat has an assistant token within "
                                         r"train.seq_len=32 \(\{'truncated': 3, 'no_assistant_tokens': 3"):
        sft.Trainer(config, str(tmp_path / "short"))


# ------------------------------------------------------------------ eval: skip, count, write as it goes, stay inside

def test_eval_skips_over_long_questions_writes_each_benchmark_and_stays_in_its_workdir(
        tiny_run, tmp_path, monkeypatch):
    monkeypatch.setattr(rewards, "score", eval_score)
    monkeypatch.setattr(rewards, "extract_answer", toy_extract)
    bench = tmp_path / "bench.jsonl"
    write_jsonl(str(bench), [qa(0), qa(1, question=LONG), qa(2)])
    lines = bench.read_text().splitlines(keepends=True)
    bench.write_text(lines[0] + "\n" + "".join(lines[1:]))  # a blank line: the long question is on line 3
    config = task_config(tiny_run, samples=1, temperature=0.0)
    config.benchmarks = [dict(format="jsonl", path=str(bench), name=name) for name in ("/abs/evil", "../up", "third")]
    calls = []
    original = evaluate.evaluate_records

    def third_fails(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise RuntimeError("killed during the third benchmark")
        return original(*args, **kwargs)

    monkeypatch.setattr(evaluate, "evaluate_records", third_fails)
    work = tmp_path / "work"
    with pytest.raises(RuntimeError, match="third benchmark"):
        evaluate.run(config, str(work))
    results = json.loads((work / "results.json").read_text())
    assert list(results["benchmarks"]) == ["/abs/evil", "../up"] and results["pending"] == ["third"]
    too_long = f"prompt_over_{2048 - config.eval.max_new_tokens}_tokens"
    for r in results["benchmarks"].values():
        assert r["n"] == 2 and r["reader"]["dropped"] == {too_long: 1}
        assert r["reader"]["examples"] == {too_long: f"{bench}:3"}
    assert sorted(os.listdir(work / "outputs")) == ["_abs_evil.jsonl", "_up.jsonl"]
    assert sorted(os.listdir(tmp_path)) == ["bench.jsonl", "work"]  # nothing written outside
    assert not os.path.exists("/abs/evil.jsonl")


# ------------------------------------------------------------------ hf.load: the header is checked, the file named

def rewrite_header(file, change):
    data = file.read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8:8 + n])
    change(header)
    raw = json.dumps(header).encode()
    file.write_bytes(struct.pack("<Q", len(raw)) + raw + data[8 + n:])


def first_tensor(header):
    return header[sorted(k for k in header if k != "__metadata__")[0]]


CORRUPTIONS = {
    "header_length_1e12": ("model.safetensors", "header length 1000000000000 is beyond the file",
                           lambda f: f.write_bytes(struct.pack("<Q", 10**12) + f.read_bytes()[8:])),
    "dtype_I32": ("model.safetensors", "is I32, not a float dtype",
                  lambda f: rewrite_header(f, lambda h: [e.update(dtype="I32") for k, e in h.items()
                                                         if k != "__metadata__"])),
    "dtype_F8_E4M3": ("model.safetensors", "dtype 'F8_E4M3'; 8-bit float weights are not supported",
                      lambda f: rewrite_header(f, lambda h: first_tensor(h).update(dtype="F8_E4M3"))),
    "end_offset": ("model.safetensors", "has data_offsets",
                   lambda f: rewrite_header(f, lambda h: first_tensor(h)["data_offsets"].__setitem__(1, 7))),
    "truncated": ("model.safetensors", "the file is truncated or corrupt",
                  lambda f: f.write_bytes(f.read_bytes()[:-100])),
    "shard_outside": ("model.safetensors.index.json", "names shard '../../other.safetensors', which is not a file "
                      "name inside the model directory", None),
    "missing_shard": ("model.safetensors.index.json", "names shard model-00002-of-00002.safetensors, which is not in",
                      None),
}


@pytest.mark.parametrize("case", list(CORRUPTIONS))
def test_hf_load_refuses_a_corrupt_checkpoint_naming_the_file(hf_dir, tmp_path, case):
    path = tmp_path / "model"
    shutil.copytree(hf_dir("qwen2"), path)
    named, message, corrupt = CORRUPTIONS[case]
    if corrupt:
        corrupt(path / named)
    else:
        names = list(hf.SafetensorsCheckpoint(str(path)).tensors)
        shard = "../../other.safetensors" if case == "shard_outside" else "model-00002-of-00002.safetensors"
        weight_map = {n: ("model.safetensors" if i % 2 else shard) for i, n in enumerate(names)}
        (path / named).write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    with pytest.raises((ValueError, FileNotFoundError)) as e:
        hf.load(str(path))
    assert str(e.value).startswith(str(path / named)) and message in str(e.value), str(e.value)

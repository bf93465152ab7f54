"""An LLM judge as an RL reward component: a model behind an OpenAI-compatible
`/v1/chat/completions` (vLLM, SGLang, a hosted API) grades each reply against the record's
reference answer and rubric, for answers a string match cannot check (open-ended questions,
HealthBench-style rubrics).

    config.rl.rewards.judge = dict(fn="fleming_jax.judge:score", weight=1.0,
                                   base_url="http://judge:8000/v1", model="Qwen3-32B",
                                   api_key_env="JUDGE_KEY", cache="runs/rl_stage1/judge.jsonl")

The verdict must end in a line `SCORE: <0-10>`; the reward is that over 10. A verdict
without one (unparsable) or a request that still fails after its retries (a timeout, a
server down) scores 0 and is counted, never stopping the run. Verdicts are cached by
(question, reply): in memory, and in the JSONL file `cache` when given, so a step rerun after
a resume asks nothing twice. On several hosts process 0 asks and every host gets its scores.
The client is the teacher's (`distill.teachers.HttpTeacher`: retries, timeouts, at most
`max_concurrency` requests at once; the API key is read from `api_key_env` and never logged).
Logged per step: `reward_<name>_requests`, `_cached`, `_unparsable`, `_failed`, `_seconds`
and `_tokens` (the server's reported usage: the judge's cost).
"""

from __future__ import annotations

import concurrent.futures
import json
import re
import threading
import time
from typing import Sequence

from fleming_jax import parallel, paths
from fleming_jax.data.records import QARecord

TEMPLATE = """You grade an answer to a medical question against the reference answer.

Question:
{question}

Reference answer:
{reference}

Grading rubric:
{rubric}

Answer to grade:
{answer}

Judge whether the answer agrees with the reference and meets the rubric. End with one line:
SCORE: <an integer from 0 (wrong) to 10 (fully right)>"""
DEFAULT_RUBRIC = "The answer names the same conclusion as the reference; reasoning errors lower the score."
_SCORE = re.compile(r"^\s*SCORE:\s*(\d+(?:\.\d+)?)\s*$", re.IGNORECASE | re.MULTILINE)

_caches: dict[str, dict[str, float | None]] = {}  # cache path -> verdicts (None: unparsable)
_appenders: dict[str, paths.Appender] = {}
_clients: dict[tuple, object] = {}


def parse(verdict: str) -> float | None:
    """The verdict's last `SCORE: x` line as x / 10, or None (no such line, or x over 10)."""
    found = _SCORE.findall(verdict or "")
    if not found or float(found[-1]) > 10:
        return None
    return float(found[-1]) / 10


def prompt(record: QARecord, reply: str, template: str = TEMPLATE) -> str:
    """The judge's prompt for one reply: the question (with its options), the reference (the
    answer, or the option it names) and the record's rubric (`meta.rubric`)."""
    question = record.question + "".join(f"\n{k}. {v}" for k, v in (record.options or {}).items())
    reference = record.answer if not record.options else f"{record.answer}. {record.options.get(record.answer, '')}"
    rubric = (record.meta or {}).get("rubric") or DEFAULT_RUBRIC
    return template.format(question=question, reference=reference, rubric=rubric, answer=reply)


def _key(record: QARecord, reply: str) -> str:
    return json.dumps([record.question, record.answer, reply])


def _cache(path: str) -> dict[str, float | None]:
    """The verdicts cached for `path` ("" : this process only), read once."""
    if path not in _caches:
        _caches[path] = {}
        if path and paths.exists(path):
            for line in paths.read_text(path).splitlines():
                if line.strip():
                    row = json.loads(line)
                    _caches[path][row["key"]] = row["score"]
    return _caches[path]


def score(completions: Sequence[str], records: Sequence[QARecord], *, base_url: str, model: str,
          api_key_env: str = "", template: str = TEMPLATE, cache: str = "", max_concurrency: int = 8,
          timeout_s: float = 120.0, max_retries: int = 2, max_tokens: int = 512):
    """The judge's score of each reply (0 where unparsable or failed) and the batch's counts."""
    if not base_url or not model:
        raise ValueError("the judge reward needs base_url (the server's /v1 URL) and model (the served name)")
    values, counts = parallel.on_main(_score_here, list(completions), list(records), base_url, model, api_key_env,
                                      template, cache, max_concurrency, timeout_s, max_retries, max_tokens)
    return values, counts  # a tuple again (process 0's result reaches the other hosts as JSON: a list)


def _score_here(completions, records, base_url, model, api_key_env, template, cache, max_concurrency, timeout_s,
                max_retries, max_tokens):
    from fleming_jax.distill.teachers import HttpTeacher, TeacherError

    client_key = (base_url, model, api_key_env, timeout_s, max_retries, max_concurrency)
    if client_key not in _clients:
        _clients[client_key] = HttpTeacher(base_url, model, api_key_env=api_key_env or None, timeout_s=timeout_s,
                                           max_retries=max_retries, max_concurrency=max_concurrency)
    client, known = _clients[client_key], _cache(cache)
    keys = [_key(r, c) for c, r in zip(completions, records)]
    todo = sorted({k: i for i, k in enumerate(keys) if k not in known}.values())
    counts = dict(requests=len(todo), cached=len(keys) - len(todo), unparsable=0, failed=0, tokens=0)
    lock, failed = threading.Lock(), set()

    def ask(i):
        """The verdict's score (None: unparsable); a failed request goes into `failed`."""
        body = dict(model=client.model, n=1, temperature=0.0, max_tokens=max_tokens,
                    messages=[{"role": "user", "content": prompt(records[i], completions[i], template)}])
        try:
            reply = client.client.post(client.url, body)
            verdict = reply["choices"][0]["message"].get("content") or ""
        except (TeacherError, KeyError, IndexError, TypeError, AttributeError):
            with lock:
                failed.add(i)
            return None
        with lock:
            counts["tokens"] += int((reply.get("usage") or {}).get("total_tokens", 0))
        got = parse(verdict)
        if got is None:
            with lock:
                counts["unparsable"] += 1
        return got

    start = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(max_concurrency) as pool:
        answers = list(pool.map(ask, todo))
    counts["failed"] = len(failed)
    new = {keys[i]: got for i, got in zip(todo, answers) if i not in failed}  # failed: asked again later
    known.update(new)
    if cache and new:
        appender = _appenders.setdefault(cache, paths.Appender(cache))
        appender.write("".join(json.dumps(dict(key=k, score=v)) + "\n" for k, v in new.items()))
        appender.flush()
    counts["seconds"] = time.perf_counter() - start
    return [known.get(k) or 0.0 for k in keys], counts

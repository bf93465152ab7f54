"""Teachers: whatever writes chains of thought for the cold start, behind one small interface.

`Teacher.complete(messages, n, temperature, max_tokens)` returns n completions for one chat;
`complete_many` runs many chats, at most `max_concurrency` at a time, in order. Backends:
`HttpTeacher` (any OpenAI-compatible `/v1/chat/completions`: vLLM, SGLang, hosted APIs),
`KGTeacher` (offline: reasoning along a synthesised question's knowledge-graph path),
`LocalTeacher` (a fleming_jax model generating through the engine, `prompts.sample_chat`).
"""

from __future__ import annotations

import abc
import concurrent.futures
import dataclasses
import http.client
import json
import logging
import os
import random
import time
import urllib.error
import urllib.request
from typing import Any

log = logging.getLogger(__name__)

Chat = list[dict[str, str]]


class TeacherError(RuntimeError):
    """A teacher could not produce completions; the message says why and what to check."""


class Teacher(abc.ABC):
    """n completions for a chat. Subclasses implement `complete`; a backend that batches
    natively (a local model) overrides `complete_many` too."""

    max_concurrency: int = 1

    @abc.abstractmethod
    def complete(self, messages: Chat, n: int = 1, temperature: float = 1.0,
                 max_tokens: int = 4096) -> list[str]:
        """n completions of one chat (a list of {"role", "content"} messages)."""

    def complete_many(self, chats: list[Chat], n: int = 1, temperature: float = 1.0,
                      max_tokens: int = 4096) -> list[list[str]]:
        """`complete` for each chat, `max_concurrency` at a time; results in the chats' order.
        The first failure is raised and the chats not yet started are cancelled."""
        with concurrent.futures.ThreadPoolExecutor(max_workers=self.max_concurrency) as pool:
            futures = [pool.submit(self.complete, chat, n, temperature, max_tokens) for chat in chats]
            try:
                return [f.result() for f in futures]
            except BaseException:
                pool.shutdown(wait=False, cancel_futures=True)
                raise


_RETRY_STATUS = {408, 429} | set(range(500, 600))
_HINTS = {401: "check the API key (api_key, or the variable named by api_key_env)",
          403: "check the API key's permissions for this model",
          404: "check base_url (it should end in /v1) and the model name",
          400: "check the model name and that max_tokens fits the model's context"}


@dataclasses.dataclass
class HttpTeacher(Teacher):
    """An OpenAI-compatible chat-completions endpoint.

    base_url: up to and including `/v1`, e.g. http://127.0.0.1:8000/v1 for `vllm serve`.
    api_key, or api_key_env naming the environment variable that holds it (read once, here;
    neither is ever logged, shown in repr or put in an error). No key: no Authorization header.
    timeout_s: per socket operation (connect, waiting for the reply), not per whole request.
    Retries: HTTP 408/429/5xx, connection errors and timeouts, up to max_retries more tries,
    sleeping Retry-After seconds when the server sends it, else backoff_s * 2**try with
    jitter (a uniform draw from half to all of it); both capped at max_backoff_s. Other 4xx
    fail at once naming the status, the URL and the server's message.
    """

    base_url: str
    model: str
    api_key: str | None = dataclasses.field(default=None, repr=False)
    api_key_env: str | None = None
    timeout_s: float = 600.0
    max_retries: int = 5
    backoff_s: float = 1.0
    max_backoff_s: float = 60.0
    max_concurrency: int = 8

    def __post_init__(self):
        if self.max_retries < 0 or self.max_concurrency < 1:
            raise ValueError(f"max_retries must be >= 0 and max_concurrency >= 1, got "
                             f"{self.max_retries} and {self.max_concurrency}")
        self.url = self.base_url.rstrip("/") + "/chat/completions"
        self._key = _read_key(self.api_key, self.api_key_env)

    def complete(self, messages: Chat, n: int = 1, temperature: float = 1.0,
                 max_tokens: int = 4096) -> list[str]:
        body = dict(model=self.model, messages=messages, n=n, temperature=temperature, max_tokens=max_tokens)
        reply = self._post(body)
        try:
            choices = sorted(reply["choices"], key=lambda c: c.get("index", 0))
            texts = [c["message"].get("content") or "" for c in choices]
        except (KeyError, TypeError, AttributeError) as e:
            raise TeacherError(f"POST {self.url}: the reply has no choices[].message ({e!r}): "
                               f"{self._redact(json.dumps(reply)[:300])}") from None
        if len(texts) != n:
            raise TeacherError(f"POST {self.url}: asked for n={n} completions, got {len(texts)}; "
                               "the server may not support n > 1 (call complete n times instead)")
        return texts

    def _post(self, body: dict[str, Any]) -> dict[str, Any]:
        data = json.dumps(body).encode()
        headers = {"Content-Type": "application/json"}
        if self._key:
            headers["Authorization"] = f"Bearer {self._key}"
        for attempt in range(self.max_retries + 1):
            request = urllib.request.Request(self.url, data=data, headers=headers, method="POST")
            retry_after = None
            try:
                with urllib.request.urlopen(request, timeout=self.timeout_s) as response:
                    raw = response.read()
                break
            except urllib.error.HTTPError as e:
                message = self._redact(_server_message(e))
                if e.code not in _RETRY_STATUS:
                    hint = _HINTS.get(e.code, "check the request")
                    raise TeacherError(f"POST {self.url} returned HTTP {e.code}: {message}; {hint}") from None
                reason, retry_after = f"HTTP {e.code}: {message}", _seconds(e.headers.get("Retry-After"))
            except (OSError, http.client.HTTPException) as e:  # refused, reset, timed out, cut short
                reason = self._redact(f"{type(e).__name__}: {e}")
            if attempt == self.max_retries:
                raise TeacherError(f"POST {self.url} failed after {attempt + 1} attempts, last: {reason}; "
                                   "check the server is up and reachable, or raise timeout_s / max_retries")
            if retry_after is not None:
                delay = min(retry_after, self.max_backoff_s)
            else:
                delay = min(self.backoff_s * 2 ** attempt, self.max_backoff_s) * random.uniform(0.5, 1.0)
            log.warning("POST %s: %s; retry %d/%d in %.2fs", self.url, reason, attempt + 1,
                        self.max_retries, delay)
            time.sleep(delay)
        try:
            return json.loads(raw)
        except ValueError:
            raise TeacherError(f"POST {self.url} returned a reply that is not JSON: "
                               f"{self._redact(raw[:300].decode(errors='replace'))!r}") from None

    def _redact(self, text: str) -> str:
        """Servers sometimes echo the key they refused; keep it out of our messages."""
        return text.replace(self._key, "***") if self._key else text


def _read_key(api_key: str | None, api_key_env: str | None) -> str | None:
    """The API key, surrounding whitespace stripped (a trailing newline from `$(cat key)` or a
    secrets file is common); a key with spaces or control characters inside, which no HTTP
    header can carry, is refused naming where it came from and never showing it."""
    where = "api_key"
    if not api_key and api_key_env:
        where = f"the environment variable {api_key_env}"
        api_key = os.environ.get(api_key_env)
        if api_key is None:
            raise ValueError(f"config.teacher.api_key_env={api_key_env}: the environment variable is not set; "
                             "export it, or clear api_key_env for a server without a key")
    key = (api_key or "").strip()
    if api_key and not key:
        raise ValueError(f"the API key in {where} is blank; set it, or leave it unset for a server without a key")
    if any(not (32 < ord(c) < 127) for c in key):
        raise ValueError(f"the API key in {where} has a space, a control character or a non-ASCII character "
                         "inside it; an HTTP header cannot carry it: check how it was pasted or exported")
    return key or None


def _server_message(error: urllib.error.HTTPError) -> str:
    """The error text of an OpenAI-style ({"error": {"message"}}), FastAPI-style ({"detail"})
    or plain-text error body."""
    try:
        raw = error.read().decode(errors="replace")
    except (OSError, http.client.HTTPException):
        return error.reason or ""
    try:
        body = json.loads(raw)
    except ValueError:
        return raw.strip()[:500] or str(error.reason)
    if isinstance(body, dict):
        detail = body.get("error", body.get("detail", body.get("message", body)))
        if isinstance(detail, dict):
            detail = detail.get("message", detail)
        return str(detail)[:500]
    return raw.strip()[:500]


def _seconds(value: str | None) -> float | None:
    """Retry-After in seconds (the HTTP-date form is ignored: backoff applies instead)."""
    try:
        return max(0.0, float(value)) if value is not None else None
    except ValueError:
        return None


class KGTeacher(Teacher):
    """Writes the chain of thought of a KG-synthesised question from its `meta.kg_path`:
    the facts along the path, then each option checked against the entity it reaches.

    Offline and deterministic: it is the tiny demo's teacher, and a grounded one for
    synthetic items. It sees only chat messages like any teacher, so it finds the record
    whose `user_prompt` the chat's first user message starts with (prompts built by
    `fleming_jax.distill.collect` do). Records without a `kg_path` get no completion ("").
    """

    def __init__(self, records):
        from fleming_jax.prompts import user_prompt

        self._records = {user_prompt(r): r for r in records}
        self._lengths = sorted({len(k) for k in self._records}, reverse=True)

    def complete(self, messages: Chat, n: int = 1, temperature: float = 1.0,
                 max_tokens: int = 4096) -> list[str]:
        from fleming_jax.data import synthesis
        from fleming_jax.data.records import format_reply

        record = self._find(next(m["content"] for m in messages if m["role"] == "user"))
        path = (record.meta or {}).get("kg_path") if record else None
        if not path:
            return [""] * n
        thought = synthesis.reasoning(path) + "\n" + synthesis.option_check(record.options, record.answer)
        return [format_reply(thought, record.answer)] * n

    def _find(self, text: str):
        for length in self._lengths:
            record = self._records.get(text[:length])
            if record is not None:
                return record
        return None


def from_config(cfg, records=()) -> Teacher:
    """The teacher `config.teacher` names: `kind` = "kg" (needs the records it will be asked
    about) or "http" (`base_url`, `model`, `api_key_env`, `max_concurrency`, `timeout_s`,
    `max_retries`)."""
    if cfg.kind == "kg":
        return KGTeacher(records)
    if cfg.kind == "http":
        if not cfg.base_url or not cfg.model:
            raise ValueError("config.teacher.kind='http' needs config.teacher.base_url "
                             "(e.g. http://127.0.0.1:8000/v1) and config.teacher.model")
        return HttpTeacher(cfg.base_url, cfg.model, api_key_env=cfg.api_key_env or None,
                           timeout_s=cfg.timeout_s, max_retries=cfg.max_retries,
                           max_concurrency=cfg.max_concurrency)
    if cfg.kind == "local":
        if not cfg.get("hf_path"):
            raise ValueError("config.teacher.kind='local' needs config.teacher.hf_path (an HF model "
                             "directory with its tokenizer)")
        return LocalTeacher.from_hf(cfg.hf_path, dtype=cfg.get("dtype") or None)
    raise ValueError(f"config.teacher.kind={cfg.kind!r}: use 'kg', 'http' or 'local'")


class LocalTeacher(Teacher):
    """A fleming_jax model (any HF checkpoint we import) generating through our engine
    (`prompts.sample_chat`), `batch_size` chats at a time, each sample in a decode slot."""

    def __init__(self, model, tokenizer, seed: int = 0, batch_size: int = 32, mesh=None):
        from fleming_jax import tokenizer as toklib

        self.model, self.tokenizer, self.mesh, self.batch_size = model, tokenizer, mesh, batch_size
        self.stop_ids = toklib.stop_ids(tokenizer)
        self.seed, self.calls = seed, 0

    @classmethod
    def from_hf(cls, path: str, dtype: str | None = None, **kwargs) -> "LocalTeacher":
        from fleming_jax import tokenizer as toklib
        from fleming_jax.models import hf

        return cls(hf.load(path, dtype=dtype)[0], toklib.load(path), **kwargs)

    def complete(self, messages: Chat, n: int = 1, temperature: float = 1.0,
                 max_tokens: int = 4096) -> list[str]:
        return self.complete_many([messages], n, temperature, max_tokens)[0]

    def complete_many(self, chats: list[Chat], n: int = 1, temperature: float = 1.0,
                      max_tokens: int = 4096) -> list[list[str]]:
        import jax

        from fleming_jax import prompts, sampler

        params = sampler.SamplingParams(temperature=temperature, num_samples=n, max_new_tokens=max_tokens)
        texts = []
        for start in range(0, len(chats), self.batch_size):
            key = jax.random.fold_in(jax.random.key(self.seed), self.calls)  # fresh draws per call
            self.calls += 1
            texts += prompts.sample_chat(self.model, self.tokenizer, chats[start:start + self.batch_size], key,
                                         params, self.stop_ids, slots=self.batch_size * n, mesh=self.mesh)
        return texts

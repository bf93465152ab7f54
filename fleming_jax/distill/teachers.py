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
import json

from fleming_jax import openai_api

Chat = list[dict[str, str]]


class TeacherError(openai_api.ServerError):
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


@dataclasses.dataclass
class HttpTeacher(Teacher):
    """An OpenAI-compatible chat-completions endpoint.

    base_url: up to and including `/v1`, e.g. http://127.0.0.1:8000/v1 for `vllm serve`.
    api_key, or api_key_env naming the environment variable that holds it (read once, here;
    neither is ever logged, shown in repr or put in an error). No key: no Authorization header.
    timeout_s, max_retries, backoff_s, max_backoff_s: see `openai_api` (retries of 408/429/5xx
    and connection errors, with backoff; other 4xx fail at once naming the server's message).
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
        self.client = openai_api.Client(self.api_key, self.api_key_env, self.timeout_s, self.max_retries, self.backoff_s,
                                        self.max_backoff_s, error=TeacherError, config_key="config.teacher")

    def complete(self, messages: Chat, n: int = 1, temperature: float = 1.0,
                 max_tokens: int = 4096) -> list[str]:
        body = dict(model=self.model, messages=messages, n=n, temperature=temperature, max_tokens=max_tokens)
        reply = self.client.post(self.url, body)
        try:
            choices = sorted(reply["choices"], key=lambda c: c.get("index", 0))
            texts = [c["message"].get("content") or "" for c in choices]
        except (KeyError, TypeError, AttributeError) as e:
            raise TeacherError(f"POST {self.url}: the reply has no choices[].message ({e!r}): "
                               f"{self.client.redact(json.dumps(reply)[:300])}") from None
        if len(texts) != n:
            raise TeacherError(f"POST {self.url}: asked for n={n} completions, got {len(texts)}; "
                               "the server may not support n > 1 (call complete n times instead)")
        return texts

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

        from fleming_jax.engine import LocalEngine

        self.tokenizer, self.batch_size = tokenizer, batch_size
        self.engine = LocalEngine.of(model, mesh=mesh, pad_id=tokenizer.pad_token_id or 0)
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
            texts += prompts.sample_chat(self.engine, self.tokenizer, chats[start:start + self.batch_size], key,
                                         params, self.stop_ids)
        return texts

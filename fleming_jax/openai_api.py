"""One JSON POST to an OpenAI-compatible server (vLLM, SGLang, hosted APIs), with the retries
and error messages that the HTTP teacher (`distill.teachers.HttpTeacher`) and the external
rollout engine (`remote_engine.OpenAIEngine`) share.

Retries: HTTP 408/429/5xx, connection errors and timeouts, up to `max_retries` more tries,
sleeping Retry-After seconds when the server sends it, else backoff_s * 2**try with jitter (a
uniform draw from half to all of it); both capped at max_backoff_s. Other 4xx fail at once
naming the status, the URL and the server's message. The API key is never logged or shown.
"""

from __future__ import annotations

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

_RETRY_STATUS = {408, 429} | set(range(500, 600))
_HINTS = {401: "check the API key (api_key, or the variable named by api_key_env)",
          403: "check the API key's permissions for this model",
          404: "check base_url (it should end in /v1) and the model name",
          400: "check the model name and that max_tokens fits the model's context"}


class ServerError(RuntimeError):
    """A server could not answer; the message says why and what to check."""


@dataclasses.dataclass
class Client:
    """POSTs JSON to `url` and returns the parsed reply; failures raise `error`.

    api_key, or api_key_env naming the environment variable that holds it (read once, here).
    timeout_s: per socket operation (connect, waiting for the reply), not per whole request.
    """

    api_key: str | None = dataclasses.field(default=None, repr=False)
    api_key_env: str | None = None
    timeout_s: float = 600.0
    max_retries: int = 5
    backoff_s: float = 1.0
    max_backoff_s: float = 60.0
    error: type[ServerError] = ServerError
    config_key: str = "config"  # where the key settings live, for messages: "config.teacher"

    def __post_init__(self):
        if self.max_retries < 0:
            raise ValueError(f"max_retries must be >= 0, got {self.max_retries}")
        self._key = read_key(self.api_key, self.api_key_env, self.config_key)

    def post(self, url: str, body: dict[str, Any]) -> dict[str, Any]:
        data = json.dumps(body).encode()
        headers = {"Content-Type": "application/json"}
        if self._key:
            headers["Authorization"] = f"Bearer {self._key}"
        for attempt in range(self.max_retries + 1):
            request = urllib.request.Request(url, data=data, headers=headers, method="POST")
            retry_after = None
            try:
                with urllib.request.urlopen(request, timeout=self.timeout_s) as response:
                    raw = response.read()
                break
            except urllib.error.HTTPError as e:
                message = self.redact(_server_message(e))
                if e.code not in _RETRY_STATUS:
                    hint = _HINTS.get(e.code, "check the request")
                    raise self.error(f"POST {url} returned HTTP {e.code}: {message}; {hint}") from None
                reason, retry_after = f"HTTP {e.code}: {message}", _seconds(e.headers.get("Retry-After"))
            except (OSError, http.client.HTTPException) as e:  # refused, reset, timed out, cut short
                reason = self.redact(f"{type(e).__name__}: {e}")
            if attempt == self.max_retries:
                raise self.error(f"POST {url} failed after {attempt + 1} attempts, last: {reason}; "
                                 "check the server is up and reachable, or raise timeout_s / max_retries")
            if retry_after is not None:
                delay = min(retry_after, self.max_backoff_s)
            else:
                delay = min(self.backoff_s * 2 ** attempt, self.max_backoff_s) * random.uniform(0.5, 1.0)
            log.warning("POST %s: %s; retry %d/%d in %.2fs", url, reason, attempt + 1, self.max_retries, delay)
            time.sleep(delay)
        try:
            return json.loads(raw)
        except ValueError:
            raise self.error(f"POST {url} returned a reply that is not JSON: "
                             f"{self.redact(raw[:300].decode(errors='replace'))!r}") from None

    def redact(self, text: str) -> str:
        """Servers sometimes echo the key they refused; keep it out of our messages."""
        return text.replace(self._key, "***") if self._key else text


def read_key(api_key: str | None, api_key_env: str | None, config_key: str = "config") -> str | None:
    """The API key, surrounding whitespace stripped (a trailing newline from `$(cat key)` or a
    secrets file is common); a key with spaces or control characters inside, which no HTTP
    header can carry, is refused naming where it came from and never showing it."""
    where = "api_key"
    if not api_key and api_key_env:
        where = f"the environment variable {api_key_env}"
        api_key = os.environ.get(api_key_env)
        if api_key is None:
            raise ValueError(f"{config_key}.api_key_env={api_key_env}: the environment variable is not set; "
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

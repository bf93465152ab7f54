"""The QA record every reader produces, and the one place the reply format is defined.

A model's reply is `<think>…</think>` followed by `<answer>X</answer>`; `format_reply`
here, the prompt that asks for it (`fleming_jax.prompts.user_prompt`) and the answer
extraction in `fleming_jax.rewards` all use these tags.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any, Iterable, Iterator

THINK_OPEN, THINK_CLOSE = "<think>", "</think>"
ANSWER_OPEN, ANSWER_CLOSE = "<answer>", "</answer>"
DIFFICULTIES = ("Easy", "Moderate", "Difficult")


@dataclasses.dataclass
class QARecord:
    """One question. `options` maps letters to option texts (None for free-text answers);
    `answer` is the correct letter, or the short free-text answer (e.g. yes/no/maybe)."""

    id: str
    source: str
    question: str
    answer: str
    options: dict[str, str] | None = None
    explanation: str | None = None
    meta: dict[str, Any] = dataclasses.field(default_factory=dict)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "QARecord":
        fields = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - fields
        if unknown:
            raise ValueError(f"unknown QA record keys {sorted(unknown)}; expected {sorted(fields)}")
        return cls(**{k: v for k, v in d.items() if not (k == "meta" and v is None)})

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def format_reply(reasoning: str, answer: str) -> str:
    """A reply in the format the rewards verify."""
    return f"{THINK_OPEN}\n{reasoning.strip()}\n{THINK_CLOSE}\n{ANSWER_OPEN}{answer}{ANSWER_CLOSE}"


def read_jsonl(path: str) -> Iterator[dict[str, Any]]:
    """Dicts from a JSON-lines file; a bad line raises naming the file and line number."""
    return (row for _, row in numbered_jsonl(path))


def numbered_jsonl(path: str) -> Iterator[tuple[int, dict[str, Any]]]:
    """(line number, dict) for each non-blank line of a JSON-lines file."""
    from fleming_jax import paths

    with paths.open_file(path) as f:
        for number, line in enumerate(f, 1):
            if line.strip():
                try:
                    yield number, json.loads(line)
                except json.JSONDecodeError as e:
                    raise ValueError(f"{path}:{number}: not valid JSON ({e.msg})") from e


def write_jsonl(path: str, rows: Iterable[dict[str, Any] | QARecord]) -> int:
    """Writes rows (dicts or records) as JSON lines (local or gs://); returns how many."""
    from fleming_jax import paths

    n = 0
    with paths.open_file(path, "w") as f:
        for row in rows:
            row = row.to_dict() if isinstance(row, QARecord) else row
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
            n += 1
    return n

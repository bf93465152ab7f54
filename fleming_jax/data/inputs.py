"""Training inputs checked at the door: QA records (RL, distill) and SFT chats.

Each row is checked once, when its file is read. A bad row is dropped and counted under its
reason, and one line names the file and the first line dropped for each reason; a missing
file, an empty one, or one with no usable row is refused naming its config key, so a bad
row never surfaces later as a crash at step 17 (and again at step 17 of every resume).
"""

from __future__ import annotations

from typing import Callable

from fleming_jax import paths
from fleming_jax.data.records import QARecord
from fleming_jax.data.sources import Malformed, SourceReport, check, load_rows

ROLES = ("system", "user", "assistant")


def read_records(path: str, key: str, hint: str,
                 accept: Callable[[QARecord], None] | None = None) -> list[QARecord]:
    """The QA records of the JSONL file `config.<key>`. Each passes `sources.check` (a
    question, the answer among the options) and then `accept`, which raises `Malformed`
    for a record this run cannot use (e.g. a prompt longer than the context)."""
    def parse(row):
        if not isinstance(row, dict):
            raise Malformed("not_an_object")
        try:
            record = QARecord.from_dict(row)
        except (TypeError, ValueError):
            raise Malformed("not_a_qa_record") from None
        check(record)
        if accept:
            accept(record)
        return record

    return _read(path, key, hint, parse)


def check_chat(row) -> dict:
    """An SFT record: `messages`, a list of {role, content} with text content (not null),
    known roles, and at least one assistant message with text to learn."""
    messages = row.get("messages") if isinstance(row, dict) else None
    if not isinstance(messages, list) or not messages:
        raise Malformed("no_messages")
    for m in messages:
        if not isinstance(m, dict) or set(m) != {"role", "content"}:
            raise Malformed("message_not_role_content")
        if not isinstance(m["content"], str):
            raise Malformed("content_not_text")
        if m["role"] not in ROLES:
            raise Malformed("unknown_role")
    if not any(m["role"] == "assistant" and m["content"].strip() for m in messages):
        raise Malformed("no_assistant_text")
    return row


def read_chats(path: str, key: str, hint: str) -> list[dict]:
    """The SFT chats of the JSONL file `config.<key>`, each passing `check_chat`."""
    return _read(path, key, hint, check_chat)


def _read(path: str, key: str, hint: str, parse: Callable) -> list:
    paths.require(path, f"config.{key}", hint)
    report, rows = SourceReport(path), []
    for where, row in load_rows(path):
        report.read += 1
        try:
            rows.append(parse(row))
        except Malformed as e:
            report.drop(e.reason, where)
    report.kept = len(rows)
    if not report.read:
        raise ValueError(f"config.{key}={path} is empty (no rows); {hint}")
    if not rows:
        raise ValueError(f"config.{key}={path} has no usable row ({report.summary()}); fix the rows "
                         f"or {hint}")
    if report.dropped:
        print(f"[data] config.{key}={path}: {report.summary()}", flush=True)
    return rows

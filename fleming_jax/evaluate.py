"""Closed-ended accuracy of a model on QA records, through the sampler and the reward code.

The RL stages call `evaluate_records` for held-out accuracy curves; the benchmark harness
(task `eval`) builds on the same function.
"""

from __future__ import annotations

from typing import Sequence

import jax
import numpy as np

from fleming_jax import rewards, sampler
from fleming_jax.data.records import QARecord, user_prompt


def record_prompts(tokenizer, records: Sequence[QARecord]) -> list[list[int]]:
    """Each record as one user message (no system prompt, as the paper evaluates)."""
    return sampler.chat_prompts(tokenizer, [[{"role": "user", "content": user_prompt(r)}] for r in records])


def evaluate_records(model, tokenizer, records: Sequence[QARecord], params: sampler.SamplingParams,
                     stop_ids: Sequence[int], key=None, mesh=None, batch_size: int = 64) -> dict:
    """accuracy (pass@1 averaged over samples), format error rate, mean completion length
    and per-question outputs."""
    key = jax.random.key(0) if key is None else key
    rows, acc, fmt, lengths = [], [], [], []
    for start in range(0, len(records), batch_size):
        batch = records[start:start + batch_size]
        out = sampler.generate(model, record_prompts(tokenizer, batch), jax.random.fold_in(key, start), params,
                               stop_ids=stop_ids, mesh=mesh, pad_id=tokenizer.pad_token_id or 0)
        for record, texts, n in zip(batch, sampler.completion_texts(tokenizer, out), out.lengths):
            scores = [rewards.score(t, record) for t in texts]
            acc.append(np.mean([s["accuracy"] for s in scores]))
            fmt.append(np.mean([s["format"] for s in scores]))
            lengths.append(float(np.mean(n)))
            rows.append(dict(id=record.id, answer=record.answer, completions=texts,
                             extracted=[rewards.extract_answer(t, record) for t in texts]))
    return dict(accuracy=float(np.mean(acc)), format_error_rate=1.0 - float(np.mean(fmt)),
                mean_length=float(np.mean(lengths)), n=len(records), outputs=rows)

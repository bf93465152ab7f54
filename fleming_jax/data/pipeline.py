"""Grain input pipelines. SFT: chats -> token ids + assistant-token loss weights -> packed
rows of `seq_len` with segment ids -> per-host batches, from a checkpointable iterator.

For training, each host reads its own slice of the examples (`process_index::process_count`)
and produces `batch_size / process_count` rows; `parallel.global_batch` assembles them. The
held-out split is packed whole on every host instead (`eval_batches`), so that every host
runs the same number of eval batches, whatever their examples' lengths.
"""

from __future__ import annotations

import collections

import grain
import numpy as np

from fleming_jax import tokenizer as toklib


def tokenize(rows: list[dict], tokenizer, seq_len: int) -> tuple[list[dict], dict]:
    """SFT records (checked by `data.inputs.read_chats`) -> {"tokens", "loss_weights"}
    examples, and counts of what was changed.

    An example longer than `seq_len` is cut to it (`truncated`); one left with no
    assistant token is dropped (`no_assistant_tokens`), naming nothing silently.
    """
    examples, stats = [], collections.Counter()
    for row in rows:
        ids, mask = toklib.encode_chat(tokenizer, row["messages"])
        if len(ids) > seq_len:
            ids, mask = ids[:seq_len], mask[:seq_len]
            stats["truncated"] += 1
        if not mask.any():
            stats["no_assistant_tokens"] += 1
            continue
        examples.append({"tokens": ids, "loss_weights": mask})
    stats["examples"] = len(examples)
    return examples, dict(stats)


def _row(packed: dict) -> dict:
    """A packed row in the model's layout: segment ids double as the attention mask; a
    segment's first token is never a target (it would be predicted from the previous one)."""
    segments = packed["tokens_segment_ids"].astype(np.int32)
    weights = packed["loss_weights"].astype(np.float32) * (segments > 0)
    weights[..., 0] = 0
    weights[..., 1:] *= segments[..., 1:] == segments[..., :-1]
    return {"tokens": packed["tokens"].astype(np.int32), "segments": segments, "loss_weights": weights}


def _packed(ds: grain.IterDataset, seq_len: int, batch_size: int) -> grain.IterDataset:
    lengths = {"tokens": seq_len, "loss_weights": seq_len}
    return grain.experimental.FirstFitPackIterDataset(
        ds, length_struct=lengths, num_packing_bins=batch_size, shuffle_bins=False).map(_row)


def _local(batch_size: int, process_count: int) -> int:
    if batch_size % process_count:
        raise ValueError(f"train.batch_size={batch_size} is not divisible by the {process_count} processes")
    return batch_size // process_count


def train_dataset(examples: list[dict], seq_len: int, batch_size: int, seed: int,
                  process_index: int = 0, process_count: int = 1) -> grain.IterDataset:
    """Shuffled (a new order each epoch), repeated forever, packed and batched; iterate it
    and `get_state()`/`set_state()` the iterator to resume exactly."""
    local = _local(batch_size, process_count)
    ds = grain.MapDataset.source(examples)[process_index::process_count]
    ds = ds.seed(seed).shuffle().repeat(None).to_iter_dataset()
    return _packed(ds, seq_len, local).batch(local, drop_remainder=True)


def eval_batches(examples: list[dict], seq_len: int, batch_size: int) -> list[dict]:
    """The held-out split once, packed, in fixed order, as whole global batches of
    `batch_size` rows: every host builds the same list and feeds only its own rows of each
    (`parallel.global_batch(whole=True)`), so all hosts make the same collective calls and
    the loss is the 1-process run's. The last batch is filled with all-padding rows (zero
    weight) so every batch has the same shape."""
    ds = grain.MapDataset.source(examples).to_iter_dataset()
    batches = list(_packed(ds, seq_len, batch_size).batch(batch_size, drop_remainder=False))
    for i, b in enumerate(batches):
        pad = batch_size - len(b["tokens"])
        if pad:
            batches[i] = {k: np.concatenate([v, np.zeros((pad,) + v.shape[1:], v.dtype)]) for k, v in b.items()}
    return batches

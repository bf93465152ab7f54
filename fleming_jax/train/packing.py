"""The RL update's batches: a rollout's (prompt + completion) sequences laid into rows.

One batch format serves both layouts (see `grpo.grpo_loss`): tokens/segments/positions/
prefixes [R, L], each prompt and each completion under its own segment id (1, 2, … within the
row, 0 after the last), a completion's `prefixes` naming its prompt's segment (it attends to
both) and `positions` counting on from the prompt; and per-token arrays [R, K] over the
positions that carry a loss: `targets` (the position in the row of each scored token),
`sources` (the position whose hidden state predicts it), `completion_mask`, `token_share`
(1 / the sequence's completion length, so each sequence's shares sum to 1), `advantages` (the
sequence's, per token), `old_logprobs` and, when present, `rollout_logprobs` and
`ref_logprobs`. Only those K positions are unembedded.

`rl.pack_length` picks the layout: 0 puts one sequence in each row (the padded layout, as
wide as the longest prompt's power-of-two bucket plus the longest reply's); -1 packs rows of
the power of two that holds the longest sequence (or of the padded width when narrower); N
packs rows of N tokens (wider when a sequence needs it). The RL update sizes all of this for
the longest possible sequences and a share of the longest possible rollout, from the config
(`Budget`), so its shape does not change from step to step. Packing is balanced: sequences,
longest first, go to the least-loaded row, so rows (and the data-parallel shards and
gradient-accumulation microbatches made of them) carry about the same tokens. A sequence is
never split, so each aggregation's (numerator, denominator) is the padded layout's.

With `rl.share_prompts` (packed layouts), the replies of one group that land in one row
follow a single copy of their prompt: packing puts a reply after its group's prompt where a
row holds it and has room, so the update runs each prompt about once per row it reaches
instead of once per reply.
"""

from __future__ import annotations

import base64
import dataclasses
import io

import numpy as np

from fleming_jax import sampler


@dataclasses.dataclass
class Sequences:
    """A rollout's kept sequences: prompt tokens, completion tokens [N, budget] (the first
    `lengths[i]` real), advantages [N], and per-token arrays [N, budget] aligned with the
    completions (old_logprobs; rollout_logprobs and ref_logprobs when computed). `groups` [N]
    numbers each sequence's group (sequences of one group have one prompt); with
    `share_prompts`, a group's replies in one row share one copy of it."""

    prompts: list[np.ndarray]
    completions: np.ndarray
    lengths: np.ndarray
    advantages: np.ndarray
    per_token: dict[str, np.ndarray]
    groups: np.ndarray | None = None  # None: each sequence its own group
    share_prompts: bool = False

    def __post_init__(self):
        if self.groups is None:
            self.groups = np.arange(len(self.prompts))

    def __len__(self) -> int:
        return len(self.prompts)

    @property
    def sizes(self) -> np.ndarray:
        """Tokens of each sequence (prompt + completion)."""
        return np.array([len(p) for p in self.prompts], np.int64) + self.lengths

    def to_text(self) -> str:
        """The sequences, exactly, as ASCII text (a checkpoint's JSON meta holds them while an
        update is unfinished: `rl.RLTrainer.one_step`)."""
        arrays = dict(prompts=np.concatenate(self.prompts or [np.zeros(0, np.int32)]),
                      prompt_lengths=np.array([len(p) for p in self.prompts], np.int64), completions=self.completions,
                      lengths=self.lengths, advantages=self.advantages, groups=self.groups,
                      share_prompts=np.array(self.share_prompts))
        buffer = io.BytesIO()
        np.savez_compressed(buffer, **arrays, **{f"per_token_{k}": v for k, v in self.per_token.items()})
        return base64.b64encode(buffer.getvalue()).decode("ascii")

    @classmethod
    def from_text(cls, text: str) -> "Sequences":
        with np.load(io.BytesIO(base64.b64decode(text))) as got:
            a = dict(got)
        ends = np.cumsum(a.pop("prompt_lengths"))
        return cls(prompts=np.split(a.pop("prompts"), ends[:-1]) if len(ends) else [],
                   completions=a.pop("completions"), lengths=a.pop("lengths"), advantages=a.pop("advantages"),
                   groups=a.pop("groups"), share_prompts=bool(a.pop("share_prompts")),
                   per_token={k.removeprefix("per_token_"): v for k, v in a.items()})

    @classmethod
    def from_rollout(cls, prompts: list[list[int]], out: sampler.SampleOutput, advantages: np.ndarray,
                     keep: np.ndarray, share_prompts: bool = False) -> "Sequences":
        """The sequences of the groups in `keep`, group by group; old_logprobs are the
        rollout's own (`out.model_logprobs`)."""
        groups = np.flatnonzero(keep)
        g = out.tokens.shape[1]
        take = lambda x: x[groups].reshape(len(groups) * g, *x.shape[2:])
        lengths = take(out.lengths).astype(np.int64)
        mask = np.arange(out.tokens.shape[2])[None] < lengths[:, None]
        return cls(prompts=[np.asarray(prompts[i], np.int32) for i in groups for _ in range(g)],
                   completions=take(out.tokens).astype(np.int32), lengths=lengths,
                   advantages=take(advantages).astype(np.float32),
                   per_token=dict(old_logprobs=np.where(mask, take(out.model_logprobs), 0).astype(np.float32)),
                   groups=np.repeat(np.arange(len(groups)), g), share_prompts=share_prompts)


def row_length(prompt: int, reply: int, pack_length: int, sequence: int = 0) -> int:
    """Tokens per row for prompts of up to `prompt` tokens, replies of up to `reply` and
    sequences of up to `sequence` (default: their sum). One sequence per row (0): the power
    of two that holds the prompt plus the one that holds the reply. Packed (-1): the narrower
    of that and the power of two that holds the sequence, so packing never takes more tokens
    than one sequence per row; `pack_length` when that is longer."""
    padded = sampler.bucket(prompt) + sampler.bucket(reply)
    if pack_length == 0:
        return padded
    return max(min(padded, sampler.bucket(sequence or prompt + reply)), pack_length)


def row_count(needed: int, multiple: int) -> int:
    """`needed` rows rounded up to a multiple of `multiple` (minibatch x accumulation x batch
    devices), counted in units of `multiple` that take the values 1..8, then four steps a
    doubling (10, 12, 14, 16, 20, …): a run compiles a few shapes, and padding stays < 25%."""
    units = max(1, -(-needed // multiple))
    if units > 8:
        step = 1 << (units.bit_length() - 3)
        units = -(-units // step) * step
    return units * multiple


def assign(sizes: np.ndarray, length: int, multiple: int, packed: bool = True, prompts: np.ndarray | None = None,
           groups: np.ndarray | None = None, count: int = 0) -> list[list[int]] | None:
    """Rows of sequence indices: the fewest (of `row_count`'s sizes, the last ones maybe
    empty) that hold them, or exactly `count` rows (None when those do not hold them).

    Unpacked: one sequence per row, in order. Packed: each sequence, longest first, goes to
    the least-loaded row (then row loads differ by at most one sequence unless rows are
    full). With `groups` (shared prompts; `prompts` their lengths) a sequence goes after its
    group's prompt in the least-loaded row that holds it and has room for the reply, else as
    above."""
    sizes = np.asarray(sizes, np.int64)
    fixed = count > 0
    if not packed:
        count = count or row_count(len(sizes), multiple)
        return [[i] for i in range(len(sizes))] + [[] for _ in range(count - len(sizes))] if len(sizes) <= count else None
    if len(sizes) and sizes.max() > length:
        raise ValueError(f"a sequence of {sizes.max()} tokens does not fit rows of {length}")
    shared = groups is not None
    groups = np.unique(groups, return_inverse=True)[1] if shared else np.zeros(len(sizes), np.int64)
    prompts = np.asarray(prompts, np.int64) if shared else np.zeros_like(sizes)
    tokens = sizes.sum() - prompts.sum() + prompts[np.unique(groups, return_index=True)[1]].sum()  # a prompt a group
    order = np.argsort(-sizes, kind="stable")
    count = count or row_count(-(-int(tokens) // length), multiple)
    while True:
        rows: list[list[int]] = [[] for _ in range(count)]
        loads = np.zeros(count, np.int64)
        holds = np.zeros((count, groups.max(initial=0) + 1), bool)  # rows that hold a group's prompt
        for i in order:
            reply = sizes[i] - prompts[i]
            sharing = holds[:, groups[i]] & (loads + reply <= length)
            if sharing.any():  # after its group's prompt, in the least-loaded such row
                r = int(np.argmin(np.where(sharing, loads, length + 1)))
                loads[r] += reply
            else:
                r = int(np.argmin(loads))
                if loads[r] + sizes[i] > length:
                    break  # the least-loaded row is full: every row is; take more rows
                loads[r] += sizes[i]
                holds[r, groups[i]] = shared
            rows[r].append(int(i))
        else:
            return rows
        if fixed:
            return None
        count = row_count(count + 1, multiple)


def rows_of(seqs: Sequences, indices, length: int, multiple: int, packed: bool, count: int = 0
            ) -> list[list[int]] | None:
    """Rows (of sequence indices) of `indices` (see `assign`); with shared prompts a row's
    sequences of one group sit together, after one copy of their prompt."""
    indices = np.asarray(indices, np.int64)
    share = seqs.share_prompts and packed
    prompts = np.array([len(seqs.prompts[i]) for i in indices], np.int64)
    rows = assign(seqs.sizes[indices], length, multiple, packed, prompts, seqs.groups[indices] if share else None, count)
    if rows is None:
        return None
    rows = [[int(indices[j]) for j in row] for row in rows]
    return [sorted(row, key=lambda i: (seqs.groups[i], i)) for row in rows] if share else rows


def lay_out(seqs: Sequences, pack_length: int, multiple: int) -> tuple[list[list[int]], int]:
    """(the fewest rows of sequence indices that hold all of `seqs` under `rl.pack_length`, a
    multiple of `multiple`; their row length), sized to these sequences (the RL update uses
    `Budget`'s fixed shape instead)."""
    longest_prompt = max([len(p) for p in seqs.prompts] or [1])
    length = row_length(longest_prompt, int(np.max(seqs.lengths, initial=1)), pack_length,
                        int(np.max(seqs.sizes, initial=1)))
    return rows_of(seqs, np.arange(len(seqs)), length, multiple, packed=pack_length != 0), length


@dataclasses.dataclass(frozen=True)
class Budget:
    """The fixed shape of the RL update's minibatches and of the rollout's reference /
    recompute forward: `rows` rows of `length` tokens with `scored` positions each, `rows`
    a multiple of `multiple` (grad_accum_steps x batch devices). Decided from the config
    alone (`update_budget`), so a run compiles one update program; a rollout whose sequences
    do not fit takes 2x, 4x, … the rows, run as 2x, 4x, … the microbatches of the same size
    (one more program each, never more memory a microbatch)."""

    rows: int
    length: int
    scored: int
    packed: bool
    multiple: int

    def fit(self, seqs: Sequences, indices) -> list[list[int]]:
        """Rows of `indices`: `rows` of them, or the first of 2x, 4x, … that holds them."""
        count = self.rows
        while (rows := rows_of(seqs, indices, self.length, self.multiple, self.packed, count)) is None:
            count *= 2
        return rows


def update_budget(rl, prompt_tokens: int, batch_devices: int) -> Budget:
    """The update's `Budget` from `config.rl` and the longest prompt (its power-of-two bucket
    counts): rows of `row_length` for that prompt and `max_new_tokens` replies. One sequence
    per row (`pack_length` 0): a row for each of a minibatch's sequences (prompts_per_step x
    group_size / minibatches), scored over the reply's bucket. Packed: `rl.update_budget` (a
    share) of the rows that a minibatch's worst case packs into (every reply `max_new_tokens`
    long, after its prompt bucket), every position scored."""
    if not 0 < rl.update_budget <= 1:
        raise ValueError(f"rl.update_budget={rl.update_budget}: the share of a minibatch's longest possible "
                         "rollout an update batch holds must be in (0, 1]")
    sequences = -(-rl.prompts_per_step * rl.group_size // rl.minibatches)
    multiple = rl.grad_accum_steps * batch_devices
    prompt = sampler.bucket(prompt_tokens)
    length = row_length(prompt, rl.max_new_tokens, rl.pack_length)
    if rl.pack_length == 0:
        return Budget(-(-sequences // multiple) * multiple, length, sampler.bucket(rl.max_new_tokens), False, multiple)
    groups = np.arange(sequences) // rl.group_size if rl.share_prompts else None
    worst = len(assign(np.full(sequences, prompt + rl.max_new_tokens), length, 1, True, np.full(sequences, prompt),
                       groups))
    units = max(1, int(np.ceil(rl.update_budget * worst / multiple)))
    return Budget(units * multiple, length, length, True, multiple)


def update_arrays(rl) -> tuple[str, ...]:
    """The per-token arrays of an RL update batch besides the layout's: old log-probs (the
    rollout's, or the trainer's own when recomputed: `recompute_old_logprobs`, `tis_cap`,
    with the rollout's beside them) and the KL reference's (`grpo.beta` > 0)."""
    return (("old_logprobs",) + (("rollout_logprobs",) if rl.recompute_old_logprobs or rl.tis_cap else ())
            + (("ref_logprobs",) if rl.grpo.beta else ()))


def width(seqs: Sequences, rows: list[list[int]], length: int) -> int:
    """Scored positions per row: the power of two that holds any row's completion tokens, at
    most the row length."""
    return min(sampler.bucket(max([int(seqs.lengths[row].sum()) for row in rows if row] or [1])), length)


def _placements(seqs: Sequences, rows: list[list[int]]):
    """(row, sequence, where its prompt starts or None when it shares the one before, where
    its completion starts, its first scored column) of every placed sequence."""
    for r, row in enumerate(rows):
        start = column = 0
        for k, i in enumerate(row):
            shared = seqs.share_prompts and k > 0 and seqs.groups[row[k - 1]] == seqs.groups[i]
            prompt_start = None if shared else start
            start += 0 if shared else len(seqs.prompts[i])
            yield r, i, prompt_start, start, column
            start += int(seqs.lengths[i])
            column += int(seqs.lengths[i])


def batch_shapes(rows: int, length: int, scored: int, per_token) -> dict[str, tuple[tuple[int, int], type]]:
    """Name -> (shape, dtype) of a batch of `rows` rows (the module doc's format), with the
    per-token arrays named in `per_token` (old_logprobs, ...)."""
    shapes = {name: ((rows, length), np.int32) for name in ("tokens", "segments", "positions", "prefixes")}
    shapes |= {name: ((rows, scored), np.int32) for name in ("targets", "sources")}
    return shapes | {name: ((rows, scored), np.float32)
                     for name in ("completion_mask", "token_share", "advantages", *per_token)}


def build(seqs: Sequences, rows: list[list[int]], length: int, scored: int | None = None) -> dict[str, np.ndarray]:
    """The batch of `rows` (see the module doc): [len(rows), length] tokens, segments,
    positions and prefixes, [len(rows), scored] per-token arrays (`scored` defaults to
    `width(seqs, rows, length)`)."""
    shapes = batch_shapes(len(rows), length, scored or width(seqs, rows, length), seqs.per_token)
    batch = {name: np.zeros(shape, dtype) for name, (shape, dtype) in shapes.items()}
    segment, prompt_segment, prompt_end = {}, 0, 0
    for r, i, prompt_start, start, column in _placements(seqs, rows):
        prompt, c = seqs.prompts[i], int(seqs.lengths[i])
        p = len(prompt)
        if prompt_start is not None:
            segment[r] = prompt_segment = segment.get(r, 0) + 1
            prompt_end = prompt_start + p
            batch["tokens"][r, prompt_start:prompt_end] = prompt
            batch["segments"][r, prompt_start:prompt_end] = prompt_segment
            batch["positions"][r, prompt_start:prompt_end] = np.arange(p)
        segment[r] += 1
        reply = slice(start, start + c)
        batch["tokens"][r, reply] = seqs.completions[i, :c]
        batch["segments"][r, reply] = segment[r]
        batch["prefixes"][r, reply] = prompt_segment
        batch["positions"][r, reply] = np.arange(p, p + c)
        cols = slice(column, column + c)
        batch["targets"][r, cols] = np.arange(start, start + c)
        batch["sources"][r, cols] = np.concatenate([[prompt_end - 1], np.arange(start, start + c - 1)])[:c]
        batch["completion_mask"][r, cols] = 1.0
        batch["token_share"][r, cols] = np.float32(1.0) / np.float32(max(c, 1))
        batch["advantages"][r, cols] = seqs.advantages[i]
        for name, values in seqs.per_token.items():
            batch[name][r, cols] = values[i, :c]
    return batch


def unpack(seqs: Sequences, rows: list[list[int]], values: np.ndarray) -> np.ndarray:
    """Per-token values [R, K] of a batch built from `rows` -> [N, budget] per sequence (0
    after each completion)."""
    out = np.zeros(seqs.completions.shape, np.float32)
    for r, i, _, _, column in _placements(seqs, rows):
        c = int(seqs.lengths[i])
        out[i, :c] = values[r, column:column + c]
    return out


def minibatch_rows(seqs: Sequences, parts: list[np.ndarray], budget: Budget) -> list[list[list[int]]]:
    """Rows of each part (sequence indices into `seqs`) in the budget's shape, all padded with
    empty rows to the same count, so every minibatch of an update runs one program."""
    laid = [budget.fit(seqs, part) for part in parts]
    most = max(map(len, laid))
    return [rows + [[] for _ in range(most - len(rows))] for rows in laid]


def tokens_per_update(prompt_lengths: np.ndarray, completion_lengths: np.ndarray, pack_length: int,
                      multiple: int = 1, group_size: int = 0) -> dict[str, int]:
    """What one update batch of these sequences costs: tokens processed (rows x row length),
    positions unembedded (rows x scored width) and tokens that carry a loss. `group_size` > 0:
    consecutive sequences form groups of that size that share their prompt."""
    n = len(completion_lengths)
    seqs = Sequences(prompts=[np.zeros(p, np.int32) for p in prompt_lengths],
                     completions=np.zeros((n, 1), np.int32), lengths=np.asarray(completion_lengths, np.int64),
                     advantages=np.zeros(n, np.float32), per_token={},
                     groups=np.arange(n) // max(group_size, 1), share_prompts=group_size > 0)
    rows, length = lay_out(seqs, pack_length, multiple)
    return dict(rows=len(rows), row_length=length, processed=len(rows) * length,
                unembedded=len(rows) * width(seqs, rows, length), loss_tokens=int(seqs.lengths.sum()))

"""Continuous batching for long, ragged rollouts over a paged KV cache: a fixed set of decode
slots that finished sequences hand over to waiting ones, and a pool of cache pages that they
take and give back.

GRPO's replies have long-tailed lengths; a static batch decodes until its longest row stops,
so most of its work goes to rows that have already finished. Here host-side scheduling runs
three kinds of jitted program (JetStream's shape): `prefill` a bucket of prompts, `insert`
their caches into free slots and pages, and `decode` up to `chunk` tokens in every slot (in
only those holding a sequence once the rollout drains). A sequence is admitted when a slot
and pages for its prompt and first chunk are free: a group's samples share their prompt's
full pages (`paged`); each takes its own pages as its reply grows, a chunk ahead, and gives
them back when it finishes. When the pool runs short the youngest sequence is evicted and
later recomputed. How many sequences are in flight and how many pages the pool has follow
from a memory budget (`CacheLayout`). Attention reads each row's own pages
only (`paged.attention`). Every sequence draws from its own random stream (the key folded with
its sequence number, then each token's position), so the samples do not depend on how slots
were scheduled. A preemption (`fleming_jax.preemption`) is checked between chunks, so a long
rollout stops within one chunk of a SIGTERM on any host.
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools
import math
import operator
from typing import Callable, Sequence

import flax
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from fleming_jax import paged, parallel, preemption
from fleming_jax.models.decoder import KVCache
from fleming_jax.sampler import RolloutEngine, SampleOutput, SamplingParams, bucket, pick, sync_program

CACHE_AXES = ("batch", "length", "kv_heads", "head_dim")  # a prefill's cache buffers
TRACES = {"prefill": 0, "insert": 0, "decode": 0, "empty": 0, "take": 0}  # programs traced (tests count them)
FETCH_ROWS = 8  # finished rows fetched a call: one `_take` program however many finish at once
PAGE_SIZE = 16  # tokens a cache page holds (rollout.page_size)
CPU_SLOTS = 128  # sequences in flight on a CPU by default, all its devices together (measured: docs/generation.md)
DRAIN_FLOOR = 8  # a draining rollout decodes down to 1/8 of the slots (powers of two: 4 decode programs)
HBM_SHARE = 0.8  # of an accelerator's free memory the cache pool takes by default (rollout.kv_cache_gib 0)
OVERCOMMIT = 2  # sequences in flight per full-length sequence the pool holds (replies are long-tailed)


def _row_axes(x) -> tuple:
    """A per-slot array's logical axes: its rows over the data-parallel shards, the rest whole."""
    return ("batch",) + (None,) * (x.ndim - 1)


@flax.struct.dataclass
class Slots:
    """Every decode slot's sequence: its page table and position in the paged cache, the logits
    its next token is drawn from, its random stream, how many tokens it has made, its outputs."""

    cache: paged.PagedCache
    table: jax.Array  # [slots, pages_per_sequence] page ids, local to the slot's data-parallel shard
    ring: jax.Array  # [slots, pages_per_sequence] the same into the slot's own ring (sliding-window layers)
    index: jax.Array  # [slots] the position its next token is written at
    last_logits: jax.Array  # [slots, vocab] fp32
    keys: jax.Array  # [slots] one PRNG key per sequence
    steps: jax.Array  # [slots] tokens generated so far
    done: jax.Array  # [slots] bool: stopped (stop token or budget), or empty
    tokens: jax.Array  # [slots, budget]
    logprobs: jax.Array  # [slots, budget] under the sampling distribution
    model_logprobs: jax.Array  # [slots, budget] under the raw model

    def constrained(self) -> "Slots":
        """Each slot's row on its data-parallel shard (logits split over the vocabulary as the
        model makes them) and the pool as `paged` lays it out: every program returns its slots
        so, so the next program's inputs, and its compile key, never change."""
        per_row = jax.tree.map(lambda x: parallel.constrain(x, _row_axes(x)),
                               self.replace(cache=None, last_logits=None))
        return per_row.replace(cache=self.cache.constrained(),
                               last_logits=parallel.constrain(self.last_logits, ("batch", "vocab")))


@dataclasses.dataclass(frozen=True)
class CacheLayout:
    """The shapes of one rollout's engine: `slots` sequences in flight (split over `shards`
    data-parallel groups), a pool of `pages` pages of `page_size` tokens (each shard a
    contiguous share), page tables `pages_per_sequence` wide, prompts right-padded to `width`."""

    slots: int
    pages: int
    page_size: int
    pages_per_sequence: int
    width: int
    shards: int

    @classmethod
    def plan(cls, config, sequences: int, group: int, longest: int, budget: int, shards: int = 1, slots: int = 0,
             kv_cache_gib: float = 0.0, page_size: int = PAGE_SIZE, dtype: str = "float32",
             platform: str = "cpu", free_bytes: int | None = None) -> "CacheLayout":
        """How many sequences fly at once and how many pages hold them, for a rollout of
        `sequences` (groups of `group`) with prompts up to `longest` tokens and `budget` new
        tokens each. The pool: `kv_cache_gib` a device, or by default `HBM_SHARE` of an
        accelerator's `free_bytes`; on a CPU what 1/OVERCOMMIT of the slots need at full
        length. Slots (`slots` 0): OVERCOMMIT times as many as the pool holds with every
        sequence at full length and its own prompt pages, CPU_SLOTS on a CPU; never more than
        the rollout has (its power-of-two bucket), always whole groups on every shard. Pages
        are taken as replies grow and most replies stop well short of the budget; shared
        prompts save more (when the pool does run short, `generate` evicts the youngest
        sequence). Sizes follow the prompt bucket, not the longest prompt, so rollouts share
        compiled programs."""
        if page_size < 1 or page_size & (page_size - 1):
            raise ValueError(f"rollout.page_size={page_size} must be a power of two")
        width = -(-bucket(longest) // page_size) * page_size
        worst = -(-(width + budget) // page_size)  # the pages a sequence may need
        per_block = paged.block_pages(page_size)
        table = -(-worst // per_block) * per_block  # whole blocks: the XLA path reads a block at a time
        # a slot's rings (sliding-window layers) spread over the pages its share of the pool holds
        page_bytes = paged.PagedCache.page_bytes(config, page_size, dtype) + -(
            -OVERCOMMIT * paged.PagedCache.ring_bytes(config, page_size, dtype) // worst)
        multiple = group * shards // math.gcd(group, shards)
        whole = lambda n: max(multiple, n // multiple * multiple)
        want = bucket(sequences, minimum=1)
        if kv_cache_gib > 0:
            pool = int(kv_cache_gib * 2**30) // page_bytes
        elif platform != "cpu" and free_bytes:
            pool = int(HBM_SHARE * free_bytes) // page_bytes
        else:
            pool = None
        if slots <= 0:
            slots = CPU_SLOTS if pool is None else OVERCOMMIT * (pool // worst) * shards
        slots = min(whole(slots), -(-want // multiple) * multiple)
        pages = max(1, -(-slots // (shards * OVERCOMMIT))) * worst if pool is None else pool
        if pages < worst:
            raise ValueError(f"the KV cache pool holds {pages} pages of {page_size} tokens a device, fewer than one "
                             f"sequence needs ({worst}: a {width}-token prompt bucket + max_new_tokens={budget}); "
                             "raise rollout.kv_cache_gib or lower max_new_tokens")
        return cls(slots=slots, pages=pages * shards, page_size=page_size, pages_per_sequence=table, width=width,
                   shards=shards)

    def bytes_per_device(self, config, dtype: str) -> int:
        """The pool's and the rings' bytes on one device (before tensor parallelism splits the KV heads)."""
        return (self.pages * paged.PagedCache.page_bytes(config, self.page_size, dtype)
                + self.slots * paged.PagedCache.ring_bytes(config, self.page_size, dtype)) // self.shards


@functools.partial(jax.jit, static_argnames=("config", "slots", "pages", "page_size", "table_width", "budget",
                                             "cache_dtype", "shards"))
def _empty(config, slots: int, pages: int, page_size: int, table_width: int, budget: int, cache_dtype: str,
           shards: int = 1) -> Slots:
    TRACES["empty"] += 1
    zeros = lambda dtype: jnp.zeros((slots, budget), dtype)
    ring = paged.ring_table(slots, shards, paged.ring_pages(config, page_size), table_width)
    return Slots(cache=paged.PagedCache.zeros(config, pages, page_size, cache_dtype, slots),
                 table=jnp.zeros((slots, table_width), jnp.int32), ring=ring, index=jnp.zeros((slots,), jnp.int32),
                 last_logits=jnp.zeros((slots, config.vocab_size), jnp.float32),
                 keys=jax.random.split(jax.random.key(0), slots), steps=jnp.zeros((slots,), jnp.int32),
                 done=jnp.ones((slots,), bool), tokens=zeros(jnp.int32), logprobs=zeros(jnp.float32),
                 model_logprobs=zeros(jnp.float32)).constrained()


def empty(config, layout: CacheLayout, budget: int, cache_dtype: str) -> Slots:
    """Slots and a page pool laid out as `layout` says, every slot empty."""
    return _empty(config, layout.slots, layout.pages, layout.page_size, layout.pages_per_sequence, budget, cache_dtype,
                  layout.shards)


def splits_layers(device) -> bool:
    """The engine's programs on `device`'s platform take each layer's weights split out once
    (`Layers.split()`): XLA:CPU copies a slice of the stacked weights every time it takes one.
    Elsewhere decode slices in place and prefill scans the stacked weights (`_decode`, `_prefill`)."""
    return device.platform == "cpu"


def uses_kernel(device, config, page_size: int) -> bool:
    """Decode attention through the Pallas TPU kernel (`paged.attend_kernel`): on TPUs, for the
    shapes its blocks tile (head_dim a multiple of 128 lanes, pages of whole 16-row bf16 tiles;
    Qwen2.5-0.5B's head_dim 64, say, takes the XLA path)."""
    return device.platform == "tpu" and config.head_dim % 128 == 0 and page_size % 16 == 0


@functools.partial(jax.jit, static_argnames=("graphdef", "cache_dtype", "split_layers"))
def _prefill(graphdef, state, tokens, lengths, cache_dtype: str, split_layers: bool):
    """Caches and next-token logits of right-padded prompts [rows, width] (`lengths` real).

    `split_layers` (XLA:CPU, as in `_decode`): the layers unrolled over split weights; else a
    scan over the stacked weights, which the TPU compiler compiles once instead of per layer
    (the 7B's unrolled prefill compiled for over 15 minutes on 2 cores)."""
    TRACES["prefill"] += 1
    model = nnx.merge(graphdef, state)
    rows, width = tokens.shape
    mask = (jnp.arange(width)[None, :] < lengths[:, None]).astype(jnp.int32)
    constrain = lambda cache: cache.replace(k=tuple(parallel.constrain(b, CACHE_AXES) for b in cache.k),
                                            v=tuple(parallel.constrain(b, CACHE_AXES) for b in cache.v))
    cache = constrain(KVCache.zeros(model.config, rows, width, cache_dtype))
    hidden, cache = model.hidden_states(tokens, attention_mask=mask, cache=cache,
                                        layers=model.layers.split() if split_layers else None,
                                        scan_cache=not split_layers)
    last = hidden[jnp.arange(rows), lengths - 1]
    return constrain(cache), model.logits(last)


@functools.partial(jax.jit, donate_argnums=(0,), static_argnames=("config",))
def _insert(slots: Slots, prefilled: KVCache, logits, lengths, slot_ids, rows, key, sequences,
            prompt_pages, config) -> Slots:
    """Prefilled prompt `rows[j]` into slot `slot_ids[j]` (out-of-range ids, for padding, are
    dropped): its prompt's pages go to pool pages `prompt_pages[j]` (global ids; out of range
    where a sharing sample already wrote them), and for `config`'s sliding-window layers its
    last `paged.ring_pages` pages to the slot's own ring (the earlier ones would share their
    ring pages). Those slots start
    sequence `sequences[j]`, whose random stream is `key` folded with its number (the same
    samples whichever slot and chunk it gets). A group's samples admitted together share one
    prefilled row."""
    TRACES["insert"] += 1
    keys = jax.vmap(jax.random.fold_in, (None, 0))(key, sequences)
    size = slots.cache.k[0].shape[2]

    def to_pages(pool, prompt, sliding):  # [rows, width, kv_heads, d] -> the pages of each admitted row
        chosen = prompt[rows]
        n, width, kv_heads, d = chosen.shape
        chosen = chosen.reshape(n, width // size, size, kv_heads, d).transpose(3, 0, 1, 2, 4)
        return pool.at[:, ring_pages if sliding else prompt_pages].set(chosen.astype(pool.dtype), mode="drop")

    ring = paged.ring_pages(config, size)
    used = -(-lengths[rows] // size)  # pages the prompt fills
    page = jnp.arange(prefilled.k[0].shape[1] // size)
    kept = (page[None, :] >= used[:, None] - ring) & (page[None, :] < used[:, None])
    kept &= (slot_ids < len(slots.index))[:, None]
    ring_pages = jnp.where(kept, slot_ids[:, None] * ring + page[None, :] % max(ring, 1), len(slots.index) * ring)
    sliding = config.sliding_layers()
    cache = paged.PagedCache(k=tuple(map(to_pages, slots.cache.k, prefilled.k, sliding)),
                             v=tuple(map(to_pages, slots.cache.v, prefilled.v, sliding)))
    put = lambda buffer, values: buffer.at[slot_ids].set(values, mode="drop")
    n = len(slot_ids)
    zeros = lambda like, dtype: jnp.zeros((n,) + like.shape[1:], dtype)
    return Slots(cache=cache, table=slots.table, ring=slots.ring, index=put(slots.index, lengths[rows]),
                 last_logits=put(slots.last_logits, logits[rows]), keys=put(slots.keys, keys),
                 steps=put(slots.steps, zeros(slots.steps, jnp.int32)), done=put(slots.done, zeros(slots.done, bool)),
                 tokens=put(slots.tokens, zeros(slots.tokens, jnp.int32)),
                 logprobs=put(slots.logprobs, zeros(slots.logprobs, jnp.float32)),
                 model_logprobs=put(slots.model_logprobs, zeros(slots.logprobs, jnp.float32))).constrained()


@jax.jit
def _take(slots: Slots, ids):
    """The outputs of slots `ids` (finished sequences): all the host fetches of a rollout."""
    TRACES["take"] += 1
    return slots.tokens[ids], slots.logprobs[ids], slots.model_logprobs[ids], slots.steps[ids]


def _per_shard(function, *trees):
    """`function` on each data-parallel shard's rows of `trees` (every leaf's first axis is the
    batch; row ids in them are local to the shard), or on the whole when no mesh is set."""
    if jax.sharding.get_abstract_mesh().empty:
        return function(*trees)
    spec = lambda x: parallel.logical_to_spec(_row_axes(x))
    specs = tuple(jax.tree.map(spec, tree) for tree in trees)
    out = jax.eval_shape(function, *trees)
    return jax.shard_map(function, in_specs=specs, out_specs=jax.tree.map(spec, out), check_vma=False)(*trees)


@functools.partial(jax.jit, static_argnames=("graphdef", "params", "split_layers", "kernel"), donate_argnums=(2,))
def _decode(graphdef, state, slots: Slots, tables, held, rows_in_flight, stop_ids, max_new_tokens, chunk,
            params: SamplingParams, split_layers: bool, kernel: bool = False) -> Slots:
    """Up to `chunk` tokens in every unfinished slot (fewer when all finish first); returns the
    slots and a copy of their `done` flags (the slots are donated to the next call, the flags
    stay readable while it runs). Attention reads each row's own pages (`kernel`: the Pallas
    TPU kernel), so a finished or short row costs nothing beyond its own pages.

    `tables` [slots, pages_per_sequence]: each slot's page table as the host keeps it (pages
    are added as replies grow); `held` [slots]: False for a slot the host emptied (evicted),
    which then stops.

    `rows_in_flight` [k] (ids local to each shard, shard after shard): the slots to decode.
    Fewer than all when the rollout drains: the step then runs on k rows, not every slot's
    (the pages stay where they are; only the rows' tables and state are gathered).

    `split_layers`: slice each layer's weights out of the stacked arrays once, before the
    loop. XLA:CPU needs it (it would copy every slice every token); the TPU compiler fuses the
    slices into the matmuls, where splitting first would hold a second copy of the weights
    (15 GiB a chip for Qwen3-32B), so there each step slices in place."""
    TRACES["decode"] += 1
    model = nnx.merge(graphdef, state)
    layers = model.layers.split() if split_layers else None
    slots = slots.replace(table=tables, done=slots.done | ~held)
    every = rows_in_flight.shape[0] == slots.steps.shape[0]
    rows_of = slots.replace(cache=None)
    take = lambda tree, ids: jax.tree.map(lambda x: x[ids], tree)
    picked = rows_of if every else _per_shard(take, rows_of, rows_in_flight)
    rows = jnp.arange(rows_in_flight.shape[0])
    budget = slots.tokens.shape[1]

    def step(carry):
        i, s = carry
        active = ~s.done
        keys = jax.vmap(jax.random.fold_in)(s.keys, s.steps)
        token, lp, raw = pick(keys, s.last_logits, params)
        at = jnp.minimum(s.steps, budget - 1)
        write = lambda buf, value: buf.at[rows, at].set(jnp.where(active, value, buf[rows, at]))
        steps = s.steps + active
        done = s.done | (active & (jnp.isin(token, stop_ids) | (steps >= max_new_tokens)))
        logits, cache = model.decode(jnp.where(active, token, 0), s.cache, s.table, s.index, active, layers, kernel,
                                     s.ring)
        cache = cache.constrained()
        last = jnp.where(active[:, None], logits, s.last_logits)
        return i + 1, s.replace(cache=cache, index=s.index + active, last_logits=last, steps=steps, done=done,
                                tokens=write(s.tokens, token), logprobs=write(s.logprobs, lp),
                                model_logprobs=write(s.model_logprobs, raw))

    _, decoded = jax.lax.while_loop(lambda c: (c[0] < chunk) & ~jnp.all(c[1].done), step,
                                    (0, picked.replace(cache=slots.cache)))
    if every:
        slots = decoded
    else:
        put = lambda tree, ids, new: jax.tree.map(lambda x, y: x.at[ids].set(y), tree, new)
        slots = _per_shard(put, rows_of, rows_in_flight, decoded.replace(cache=None)).replace(cache=decoded.cache)
    slots = slots.constrained()
    return slots, jnp.copy(slots.done)


@dataclasses.dataclass
class Hold:
    """The pages one sequence holds: its prompt's `full` pages, shared with its group's samples
    on `shard`, and `pages` of its own (the rest of its prompt, then its reply as it grows)."""

    prompt: int
    shard: int
    full: int
    pages: list


class PagePool:
    """The free pages of each data-parallel shard, and the full prompt pages that a group's
    samples on one shard share (counted, given back when the last of them finishes)."""

    def __init__(self, layout: CacheLayout):
        self.layout, per_shard = layout, layout.pages // layout.shards
        self.free = [list(range(per_shard)) for _ in range(layout.shards)]
        self.shared: dict[tuple[int, int], list] = {}  # (prompt, shard) -> [pages, users]
        self.in_use = self.peak = 0

    def _count(self, pages: int) -> None:
        self.in_use += pages
        self.peak = max(self.peak, self.in_use)

    def take(self, shard: int, prompt: int, length: int, tokens: int, keep: int = 0):
        """Pages for a sequence of prompt `prompt` (`length` tokens) and its first `tokens` new
        tokens on `shard`, leaving `keep` free: (its page table row, the global page ids its
        prompt's pages are written to, out of range where a sharing sample wrote them already,
        its `Hold`), or None when the shard has too few free pages."""
        size, per_shard = self.layout.page_size, self.layout.pages // self.layout.shards
        full = length // size  # whole prompt pages: shared by the group's samples on this shard
        own = -(-(length + tokens) // size) - full
        shared = self.shared.get((prompt, shard))
        fresh = shared is None
        if len(self.free[shard]) < own + (full if fresh else 0) + keep:
            return None
        if fresh:
            shared = self.shared[(prompt, shard)] = [[self.free[shard].pop() for _ in range(full)], 0]
        shared[1] += 1
        hold = Hold(prompt, shard, full, [self.free[shard].pop() for _ in range(own)])
        table = np.zeros((self.layout.pages_per_sequence,), np.int32)
        table[:full + own] = shared[0] + hold.pages
        write = np.full((self.layout.width // size,), self.layout.pages, np.int32)  # out of range: not written
        if fresh:
            write[:full] = shard * per_shard + np.array(shared[0], np.int32)
        if length % size:  # the prompt's last page, partly filled: the sample's own
            write[full] = shard * per_shard + hold.pages[0]
        self._count(own + (full if fresh else 0))
        return table, write, hold

    def grow(self, hold: Hold, pages: int) -> list:
        """`pages` more pages for `hold`'s reply (the caller checked its shard has them)."""
        new = [self.free[hold.shard].pop() for _ in range(pages)]
        hold.pages += new
        self._count(pages)
        return new

    def give_back(self, hold: Hold) -> None:
        """A finished sequence's pages back to its shard (its prompt's too, if it was the last)."""
        self.free[hold.shard].extend(hold.pages)
        known = self.shared[(hold.prompt, hold.shard)]
        known[1] -= 1
        self.in_use -= len(hold.pages)
        if not known[1]:
            self.free[hold.shard].extend(known[0])
            self.in_use -= len(known[0])
            del self.shared[(hold.prompt, hold.shard)]


def generate(model, prompts: Sequence[Sequence[int]], key: jax.Array, params: SamplingParams,
             stop_ids: Sequence[int] = (), slots: int = 0, chunk: int = 16, mesh=None,
             cache_dtype: str | None = None, pad_id: int = 0, stats: dict | None = None,
             kv_cache_gib: float = 0.0, page_size: int = PAGE_SIZE,
             on_prompt_done: Callable[[int, SampleOutput], None] | None = None) -> SampleOutput:
    """`params.num_samples` completions of each prompt, at most `slots` sequences in flight
    (0: from memory, `CacheLayout.plan`, with `kv_cache_gib` of cache pages a device); the
    same SampleOutput for any `slots`, `chunk` and pool (the same samples, too).

    A sequence is admitted as soon as a slot and pages for its prompt and first chunk are free
    (with a page a chunk kept for each sequence already in flight), alone if need be (a group's
    samples admitted together share one prefill). After each chunk the host reads its finished
    flags, frees those slots, gives every sequence in flight the pages its next chunk writes,
    admits waiting sequences and dispatches the next chunk; the finished rows are fetched while
    it runs. Where a shard's pool runs short, its youngest sequences are evicted (their pages
    freed, they wait first in line and are recomputed from their prompt: the same tokens,
    their random streams being theirs). (Reading the flags a chunk late would keep
    the device busy through that bookkeeping, milliseconds, but leave each finished slot idle
    for a whole chunk: 13% of the slots' time on long-tailed replies.) `stats` (a dict)
    receives `admitted_late` (sequences admitted after the first chunk), `chunks`,
    `drain_chunks` (those decoded on fewer rows than slots), `evicted` (sequences evicted to
    free pages), `slots`, `kv_pool_gib` (the pool a device holds) and `kv_peak_gib` (the most
    of it sequences held at once). `on_prompt_done(i, output)` is called on the host as soon as
    every sample of prompt i is fetched, while later chunks decode (RL scores a group's replies
    then): `output` is prompt i's part of the SampleOutput (a leading axis of 1), final already.
    """
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("generate needs at least one prompt, and no empty prompts")
    config, group, budget = model.config, params.num_samples, params.max_new_tokens
    longest = max(len(p) for p in prompts)
    if longest + budget > config.max_position_embeddings:
        raise ValueError(f"the longest prompt ({longest} tokens) + max_new_tokens={budget} = {longest + budget} "
                         f"exceeds the model's max_position_embeddings={config.max_position_embeddings}; shorten "
                         "the prompt or lower max_new_tokens")
    device = (jax.devices() if mesh is None else mesh.devices.flat)[0]
    dp = 1 if mesh is None else parallel.batch_devices(mesh)
    cache_dtype = cache_dtype or config.compute_dtype
    layout = CacheLayout.plan(config, len(prompts) * group, group, longest, budget, dp, slots, kv_cache_gib,
                              page_size, cache_dtype, device.platform, free_memory(device))
    n_slots, width = layout.slots, layout.width
    graphdef, state = nnx.split(model)
    stop = jnp.asarray(list(stop_ids) or [-1], jnp.int32)
    run_params = dataclasses.replace(params, max_new_tokens=0)  # traced instead: not a compile key
    split_layers, kernel = splits_layers(device), uses_kernel(device, config, layout.page_size)

    out = {name: np.zeros((len(prompts), group, budget), dtype) for name, dtype in
           (("tokens", np.int32), ("logprobs", np.float32), ("model_logprobs", np.float32))}
    lengths = np.zeros((len(prompts), group), np.int32)
    owner: list[int | None] = [None] * n_slots  # the sequence (i*G+s) in each slot
    holds: list[Hold | None] = [None] * n_slots  # its pages
    tables = np.zeros((n_slots, layout.pages_per_sequence), np.int32)  # each slot's page table
    made = np.zeros((n_slots,), np.int64)  # tokens its sequence may have made: chunk a chunk
    admitted = np.zeros((n_slots,), np.int64)  # when: the youngest is evicted first
    waiting = list(range(len(prompts) * group))
    pool = PagePool(layout)
    counts = dict(admitted_late=0, chunks=0, drain_chunks=0, evicted=0)
    fetch = min(n_slots, FETCH_ROWS)  # finished rows a `_take` call fetches
    per_shard = n_slots // dp
    ahead = -(-chunk // layout.page_size)  # pages a sequence may need a chunk

    def held_on(d):
        return [s for s in range(d * per_shard, (d + 1) * per_shard) if owner[s] is not None]

    def short(s):
        """The pages slot `s`'s sequence lacks for its next chunk."""
        hold = holds[s]
        end = len(prompts[owner[s] // group]) + min(made[s] + chunk, budget)
        return -(-end // layout.page_size) - hold.full - len(hold.pages)

    def grow():
        """The pages every sequence's next chunk writes; on a shard with too few, the youngest
        sequences are evicted first. Returns the shards that evicted."""
        evicted = set()
        for d in range(dp):
            held = sorted(held_on(d), key=lambda s: admitted[s])
            while sum(map(short, held)) > len(pool.free[d]):
                s = held.pop()
                pool.give_back(holds[s])
                waiting.insert(0, owner[s])
                owner[s] = holds[s] = None
                counts["evicted"] += 1
                evicted.add(d)
            for s in held:
                if (n := short(s)) > 0:
                    start = holds[s].full + len(holds[s].pages)
                    tables[s, start:start + n] = pool.grow(holds[s], n)
        return evicted

    def admit(table, skip=()):
        batch = []
        in_flight_on = [len(held_on(d)) for d in range(dp)]
        for s in range(n_slots):
            d = s // per_shard
            if owner[s] is not None or not waiting or d in skip:
                continue
            q = waiting[0]
            got = pool.take(d, q // group, len(prompts[q // group]), min(chunk, budget), keep=ahead * in_flight_on[d])
            if got is None:
                continue
            waiting.pop(0)
            in_flight_on[d] += 1
            batch.append((s, q, got))
        if not batch:
            return table
        if counts["chunks"]:
            counts["admitted_late"] += len(batch)
        rows_of = list(dict.fromkeys(q // group for _, q, _ in batch))  # each prompt prefilled once
        rows = -(-bucket(len(rows_of), minimum=1) // dp) * dp
        tokens = np.full((rows, width), pad_id, np.int32)
        real = np.ones((rows,), np.int32)
        for r, i in enumerate(rows_of):
            tokens[r, :len(prompts[i])] = prompts[i]
            real[r] = len(prompts[i])
        cache, logits = _prefill(graphdef, state, tokens, real, cache_dtype=cache_dtype, split_layers=split_layers)
        n = rows * group  # room for every sample of the prefilled prompts: one insert program per prefill's
        ids, row, seq = np.full((n,), n_slots, np.int32), np.zeros((n,), np.int32), np.zeros((n,), np.int32)
        prompt_pages = np.full((n, width // layout.page_size), layout.pages, np.int32)
        for j, (s, q, (table_row, written, hold)) in enumerate(batch):  # padding keeps out-of-range ids
            ids[j], row[j], seq[j], prompt_pages[j] = s, rows_of.index(q // group), q, written
            owner[s], holds[s], tables[s], made[s], admitted[s] = q, hold, table_row, 0, counts["chunks"]
        return _insert(table, cache, logits, real, ids, row, key, seq, prompt_pages, config=config)

    every_slot = np.tile(np.arange(per_shard, dtype=np.int32), dp)

    def in_flight():
        """The slots the next chunk decodes: all of them, or once too few sequences are left to
        fill them, those holding one (a power of two a shard, at least 1/DRAIN_FLOOR of the
        slots, padded with empty slots): a draining rollout's steps then cost what its
        sequences need, where a static batch would still compute every finished row."""
        held = [[s - d * per_shard for s in held_on(d)] for d in range(dp)]
        k = min(per_shard, bucket(max(map(len, held)), minimum=max(1, per_shard // DRAIN_FLOOR)))
        if k == per_shard:
            return every_slot
        counts["drain_chunks"] += 1
        pad = lambda h: h + [min(set(range(per_shard)) - set(h))] * (k - len(h))
        return np.concatenate([pad(h) for h in held]).astype(np.int32)

    unfetched = np.full((len(prompts),), group)  # samples of each prompt not yet on the host

    def output(part: slice) -> SampleOutput:
        """Prompts `part`'s samples as they are returned (views): nothing after a sequence's end,
        `done` where a stop token ended it."""
        arrays, n = {name: values[part] for name, values in out.items()}, lengths[part]
        last = np.take_along_axis(arrays["tokens"], np.maximum(n - 1, 0)[..., None], -1)[..., 0]
        stopped = (n > 0) & np.isin(last, list(stop_ids))
        for values in arrays.values():
            values[np.arange(budget)[None, None, :] >= n[..., None]] = 0
        return SampleOutput(**arrays, lengths=n, done=stopped)

    def store(fetched):
        seqs, (tokens, logprobs, model_logprobs, steps) = fetched
        host = [parallel.to_host(x) for x in (tokens, logprobs, model_logprobs, steps)]
        for j, q in enumerate(seqs):
            i, g = divmod(q, group)
            for name, values in zip(("tokens", "logprobs", "model_logprobs"), host):
                out[name][i, g] = values[j]
            lengths[i, g] = host[3][j]
            unfetched[i] -= 1
            if on_prompt_done and not unfetched[i]:
                on_prompt_done(i, output(slice(i, i + 1)))

    with jax.set_mesh(mesh) if mesh is not None else contextlib.nullcontext():
        table = admit(empty(config, layout, budget, cache_dtype))
        fetching = []  # finished rows being fetched
        while True:
            held = np.array([o is not None for o in owner])
            # a copy: a numpy argument may share its memory with the device buffer on a CPU, and
            # `grow` writes `tables` while this chunk runs
            table, flags = _decode(graphdef, state, table, tables.copy(), held, in_flight(), stop,
                                   jnp.asarray(budget, jnp.int32), jnp.asarray(chunk, jnp.int32), params=run_params,
                                   split_layers=split_layers, kernel=kernel)
            counts["chunks"] += 1
            made[held] += chunk
            preemption.check("a rollout")  # between chunks: every host stops at the same one
            for fetched in fetching:  # rows taken after the last chunk: fetched while this one ran
                store(fetched)
            done = parallel.to_host(flags)  # this chunk's: the device waits for the bookkeeping below only
            finished = [s for s in range(n_slots) if owner[s] is not None and done[s]]
            fetching = []
            for start in range(0, len(finished), fetch):  # fixed-size pieces: one program
                piece = finished[start:start + fetch]
                ids = np.zeros((fetch,), np.int32)  # padding rows fetch slot 0, unread
                ids[:len(piece)] = piece
                fetching.append(([owner[s] for s in piece], _take(table, ids)))
            for s in finished:  # its pages go to the next sequences
                pool.give_back(holds[s])
                owner[s] = holds[s] = None
            if not waiting and all(o is None for o in owner):
                for fetched in fetching:
                    store(fetched)
                break
            table = admit(table, skip=grow())
            if all(o is None for o in owner):  # CacheLayout.plan makes one always fit
                raise RuntimeError(f"the KV cache pool ({layout.pages} pages) cannot hold the next sequence")
    if stats is not None:
        device_gib = layout.bytes_per_device(config, cache_dtype) / 2**30
        stats.update(counts, slots=n_slots, kv_pool_gib=device_gib,
                     kv_peak_gib=device_gib * pool.peak / (layout.pages // dp) / dp)
    return output(slice(None))


def free_memory(device) -> int | None:
    """Bytes free on `device` now (None where it does not say: CPUs). On several hosts, the
    first host's figure, so that every host plans the same pool."""
    stats = device.memory_stats() if device.platform != "cpu" else None
    if not stats or "bytes_limit" not in stats:
        return None
    free = stats["bytes_limit"] - stats.get("bytes_in_use", 0)
    return parallel.on_main(lambda: free) if jax.process_count() > 1 else free


class LocalEngine(RolloutEngine):
    """`generate` on a copy of the policy in the decode layout: `sync` casts it to `dtype` and
    reshards it onto `mesh` (`sampler.sync_program`, one jitted program, into the last copy's
    buffers); with no mesh it samples from the model as given. `slots`, `kv_cache_gib`,
    `page_size`: the paged cache's knobs (`generate`; 0 = sized from memory).

    `mirror`: where `mesh` has devices of its own (RL's `rollout.devices`), the decode layout
    over the trainer's devices (`parallel.rollout_mesh` over them). The policy is cast and
    resharded there, then each shard is copied to the rollout device that holds the same
    piece on the same host (`parallel.move`): no program spans both device groups."""

    def __init__(self, mesh=None, dtype: str | None = None, slots: int = 0, chunk: int = 16, pad_id: int = 0,
                 kv_cache_gib: float = 0.0, page_size: int = PAGE_SIZE, mirror=None):
        self.mesh, self.dtype, self.slots, self.chunk, self.pad_id = mesh, dtype, slots, chunk, pad_id
        self.kv_cache_gib, self.page_size, self.mirror = kv_cache_gib, page_size, mirror
        self.model, self.sync_stats = None, {}
        self._base_from, self._base_copy = [], None

    @classmethod
    def of(cls, model, **kwargs) -> "LocalEngine":
        """An engine already synced with `model` (kwargs: see the class)."""
        made = cls(**kwargs)
        made.sync(model)
        return made

    def sync(self, model) -> None:
        """Sample from `model` from now on; its decode copy takes the buffers of the last one."""
        self.use(self.decode_copy(model, reuse=True))

    def use(self, copy: tuple) -> None:
        """Sample from a `decode_copy` from now on."""
        self.model, self.sync_stats = copy
        jax.block_until_ready(nnx.state(self.model))  # done when it returns: RL times the sync

    def decode_copy(self, model, reuse: bool = False) -> tuple:
        """(`model` in the decode layout, what each device received): in new buffers, or with
        `reuse` in those of the copy in use (nothing may be sampling from it). A model with
        LoRA adapters keeps the decode copy of its base while the base arrays are the ones
        copied last (RL's frozen base): later copies move only the adapters, which the decode
        program applies beside the base weights."""
        if self.mesh is None:
            return model, {}
        graphdef, adapters, base = nnx.split(model, nnx.LoRAParam, ...)
        last = (None, None) if self.model is None or not reuse else nnx.split(self.model, nnx.LoRAParam, ...)[1:]
        leaves = jax.tree.leaves(base)
        kept = self._base_copy is not None and len(leaves) == len(self._base_from) and all(
            map(operator.is_, leaves, self._base_from))  # the base copied last time: its copy stays
        parts, received = [], []
        for state, previous, keep in ((adapters, last[0], False), (base, last[1], kept)):
            if keep or not jax.tree.leaves(state):  # (a model without adapters has an empty state)
                parts.append(self._base_copy if keep else state)
                continue
            copied, moved = self._copy(graphdef, state, previous, self.dtype or model.config.compute_dtype)
            parts.append(copied)
            received.append(moved)
        self._base_from, self._base_copy = leaves, parts[1]
        # what each device received: RL logs it every step
        return nnx.merge(graphdef, *parts), {} if None in received else {"sync_received_gib": sum(received) / 2**30}

    def _copy(self, graphdef, state, previous, dtype: str) -> tuple:
        """(`state` cast and resharded into the decode layout, bytes a device received)."""
        if self.mirror is None:
            program = sync_program(graphdef, state, self.mesh, dtype)
            return program.copy(state, previous), program.received_bytes
        program = sync_program(graphdef, state, self.mirror, dtype)
        staged = program.copy(state)
        return parallel.move(staged, parallel.tree_shardings(state, self.mesh)), program.received_bytes

    def generate(self, prompts, key, params: SamplingParams, stop_ids, on_prompt_done=None) -> SampleOutput:
        if self.model is None:
            raise RuntimeError("LocalEngine.generate before sync: sync the policy first")
        self.stats = dict(self.sync_stats)
        return generate(self.model, prompts, key, params, stop_ids=stop_ids, slots=self.slots, chunk=self.chunk,
                        mesh=self.mesh, pad_id=self.pad_id, stats=self.stats, kv_cache_gib=self.kv_cache_gib,
                        page_size=self.page_size, on_prompt_done=on_prompt_done)


def from_config(rollout, mesh=None, pad_id: int = 0, workdir: str = "", mirror=None) -> RolloutEngine:
    """The engine `rollout.engine` names: "local" (this module; `mirror`: see `LocalEngine`) or
    "openai" (an external OpenAI-compatible server, `remote_engine.OpenAIEngine`; its weights
    go under `workdir`)."""
    if rollout.engine == "local":
        return LocalEngine(mesh, rollout.dtype or None, rollout.slots, rollout.chunk, pad_id, rollout.kv_cache_gib,
                           rollout.page_size, mirror)
    if rollout.engine == "openai":
        from fleming_jax import remote_engine

        return remote_engine.OpenAIEngine.from_config(rollout.server, workdir)
    raise ValueError(f"config.rollout.engine={rollout.engine!r}: use 'local' (the in-tree engine) or 'openai' "
                     "(an OpenAI-compatible server, config.rollout.server)")

"""Continuous batching for long, ragged rollouts: a fixed set of decode slots that finished
sequences hand over to waiting ones.

GRPO's replies have long-tailed lengths; a static batch decodes until its longest row stops,
so most of its work goes to rows that have already finished. Here host-side scheduling runs
three kinds of jitted program (JetStream's shape): `prefill` a bucket of prompts, `insert`
their caches into free slots (G copies per prompt: a group shares one prefill), and `decode`
up to `chunk` tokens in every slot. Each slot keeps its own cache position, a finished
sequence frees its slot at the next chunk boundary, and attention visits only the cache
blocks that hold live tokens (`qwen.attend_live_blocks`). Every sequence draws from its own
random stream (the key folded with its sequence number, then each token's position), so the
samples do not depend on how slots were scheduled. A preemption (`fleming_jax.preemption`) is
checked between chunks, so a long rollout stops within one chunk of a SIGTERM on any host.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import math
from typing import Sequence

import flax
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from fleming_jax import parallel, preemption
from fleming_jax.models.qwen import ATTENTION_BLOCK, KVCache
from fleming_jax.sampler import RolloutEngine, SampleOutput, SamplingParams, bucket, pick, sync_program

CACHE_AXES = ("batch", "length", "kv_heads", "head_dim")  # each layer's cache buffer
TRACES = {"prefill": 0, "insert": 0, "decode": 0, "empty": 0, "take": 0}  # programs traced (tests count them)
FETCH_ROWS = 8  # finished rows fetched a call: one `_take` program however many finish at once


@flax.struct.dataclass
class Slots:
    """Every decode slot's sequence: its cache (one position per slot), the logits its next
    token is drawn from, its random stream, how many tokens it has made, and its outputs."""

    cache: KVCache
    last_logits: jax.Array  # [slots, vocab] fp32
    keys: jax.Array  # [slots] one PRNG key per sequence
    steps: jax.Array  # [slots] tokens generated so far
    done: jax.Array  # [slots] bool: stopped (stop token or budget), or empty
    tokens: jax.Array  # [slots, budget]
    logprobs: jax.Array  # [slots, budget] under the sampling distribution
    model_logprobs: jax.Array  # [slots, budget] under the raw model


def _constrain_cache(cache: KVCache) -> KVCache:
    constrain = lambda buffers: tuple(parallel.constrain(b, CACHE_AXES) for b in buffers)
    return cache.replace(k=constrain(cache.k), v=constrain(cache.v))


@functools.partial(jax.jit, static_argnames=("config", "slots", "length", "budget", "cache_dtype"))
def _empty(config, slots: int, length: int, budget: int, cache_dtype: str) -> Slots:
    TRACES["empty"] += 1
    cache = _constrain_cache(KVCache.zeros(config, slots, length, cache_dtype))
    zeros = lambda dtype: jnp.zeros((slots, budget), dtype)
    return Slots(cache=cache, last_logits=jnp.zeros((slots, config.vocab_size), jnp.float32),
                 keys=jax.random.split(jax.random.key(0), slots), steps=jnp.zeros((slots,), jnp.int32),
                 done=jnp.ones((slots,), bool), tokens=zeros(jnp.int32), logprobs=zeros(jnp.float32),
                 model_logprobs=zeros(jnp.float32))


def splits_layers(device) -> bool:
    """The engine's programs on `device`'s platform take each layer's weights split out once
    (`Layers.split()`): XLA:CPU copies a slice of the stacked weights every time it takes one.
    Elsewhere decode slices in place and prefill scans the stacked weights (`_decode`, `_prefill`)."""
    return device.platform == "cpu"


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
    cache = _constrain_cache(KVCache.zeros(model.config, rows, width, cache_dtype))
    hidden, cache = model.hidden_states(tokens, attention_mask=mask, cache=cache,
                                        layers=model.layers.split() if split_layers else None,
                                        scan_cache=not split_layers)
    cache = _constrain_cache(cache)
    last = hidden[jnp.arange(rows), lengths - 1]
    return cache, model.logits(last)


@functools.partial(jax.jit, donate_argnums=(0,))
def _insert(slots: Slots, prefilled: KVCache, logits, lengths, slot_ids, rows, key, sequences) -> Slots:
    """Prefilled prompt `rows[j]`'s cache and logits into slot `slot_ids[j]` (out-of-range ids,
    for padding, are dropped); those slots start sequence `sequences[j]`, whose random stream
    is `key` folded with its number (the same samples whichever slot and chunk it gets). A
    group's samples admitted together share one prefilled row."""
    TRACES["insert"] += 1
    keys = jax.vmap(jax.random.fold_in, (None, 0))(key, sequences)
    copy = lambda x: x[rows]
    width = prefilled.segment.shape[1]
    put = lambda buffer, values: buffer.at[slot_ids].set(values, mode="drop")
    put_prefix = lambda buffer, values: buffer.at[slot_ids, :width].set(values.astype(buffer.dtype), mode="drop")
    cache = slots.cache
    n = len(slot_ids)
    segment = jnp.zeros((n,) + cache.segment.shape[1:], jnp.int32).at[:, :width].set(copy(prefilled.segment))
    cache = KVCache(k=tuple(put_prefix(b, copy(k)) for b, k in zip(cache.k, prefilled.k)),
                    v=tuple(put_prefix(b, copy(v)) for b, v in zip(cache.v, prefilled.v)),
                    segment=put(cache.segment, segment), index=put(cache.index, copy(lengths)))
    return Slots(cache=_constrain_cache(cache), last_logits=put(slots.last_logits, copy(logits)),
                 keys=put(slots.keys, keys), steps=put(slots.steps, jnp.zeros((n,), jnp.int32)),
                 done=put(slots.done, jnp.zeros((n,), bool)),
                 tokens=put(slots.tokens, jnp.zeros((n,) + slots.tokens.shape[1:], jnp.int32)),
                 logprobs=put(slots.logprobs, jnp.zeros((n,) + slots.logprobs.shape[1:], jnp.float32)),
                 model_logprobs=put(slots.model_logprobs, jnp.zeros((n,) + slots.logprobs.shape[1:], jnp.float32)))


@jax.jit
def _take(slots: Slots, ids):
    """The outputs of slots `ids` (finished sequences): all the host fetches of a rollout."""
    TRACES["take"] += 1
    return slots.tokens[ids], slots.logprobs[ids], slots.model_logprobs[ids], slots.steps[ids]


@functools.partial(jax.jit, static_argnames=("graphdef", "params", "split_layers"), donate_argnums=(2,))
def _decode(graphdef, state, slots: Slots, stop_ids, max_new_tokens, chunk, params: SamplingParams,
            split_layers: bool) -> Slots:
    """Up to `chunk` tokens in every unfinished slot (fewer when all finish first); returns the
    slots and a copy of their `done` flags (the slots are donated to the next call, the flags
    stay readable while it runs). A finished slot's cache index goes back to 0, so the
    attention loop's bound (`qwen.attend_live_blocks`) follows the longest live sequence.

    `split_layers`: slice each layer's weights out of the stacked arrays once, before the
    loop. XLA:CPU needs it (it would copy every slice every token); the TPU compiler fuses the
    slices into the matmuls, where splitting first would hold a second copy of the weights
    (15 GiB a chip for Qwen3-32B), so there each step slices in place."""
    TRACES["decode"] += 1
    model = nnx.merge(graphdef, state)
    layers = model.layers.split() if split_layers else None
    rows = jnp.arange(slots.steps.shape[0])
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
        index = s.cache.index
        logits, cache = model(jnp.where(active, token, 0)[:, None], attention_mask=active[:, None].astype(jnp.int32),
                              cache=s.cache, layers=layers)
        cache = _constrain_cache(cache.replace(index=jnp.where(done, 0, index + active)))
        last = jnp.where(active[:, None], logits[:, -1], s.last_logits)
        return i + 1, Slots(cache=cache, last_logits=last, keys=s.keys, steps=steps, done=done,
                            tokens=write(s.tokens, token), logprobs=write(s.logprobs, lp),
                            model_logprobs=write(s.model_logprobs, raw))

    _, slots = jax.lax.while_loop(lambda c: (c[0] < chunk) & ~jnp.all(c[1].done), step, (0, slots))
    return slots, jnp.copy(slots.done)


def cache_length(prompt_width: int, budget: int) -> int:
    """Cache slots per sequence: the prompt bucket + the budget, rounded up to whole attention
    blocks (so the budget itself never doubles into a power-of-two bucket)."""
    length = prompt_width + budget
    return -(-length // ATTENTION_BLOCK) * ATTENTION_BLOCK if length > ATTENTION_BLOCK else length


def generate(model, prompts: Sequence[Sequence[int]], key: jax.Array, params: SamplingParams,
             stop_ids: Sequence[int] = (), slots: int = 64, chunk: int = 16, mesh=None,
             cache_dtype: str | None = None, pad_id: int = 0, stats: dict | None = None) -> SampleOutput:
    """`params.num_samples` completions of each prompt through `slots` decode slots (fewer
    when fewer sequences are asked for; a multiple of the group and the data-parallel degree);
    the same SampleOutput for any `slots` and `chunk` (the same samples, too).

    The cache holds slots x `cache_length` tokens. A sequence is admitted as soon as a slot is
    free, alone if need be (a group's samples admitted together share one prefill). One chunk
    is always queued ahead: the host reads a chunk's finished flags, fetches those rows and
    admits new sequences while the next chunk runs, so a freed slot waits one chunk longer
    and the device never waits for the host. `stats` (a dict) receives `admitted_late`, the
    sequences admitted after the first chunk, and `chunks`.
    """
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("generate needs at least one prompt, and no empty prompts")
    config, group, budget = model.config, params.num_samples, params.max_new_tokens
    longest = max(len(p) for p in prompts)
    if longest + budget > config.max_position_embeddings:
        raise ValueError(f"the longest prompt ({longest} tokens) + max_new_tokens={budget} = {longest + budget} "
                         f"exceeds the model's max_position_embeddings={config.max_position_embeddings}; shorten "
                         "the prompt or lower max_new_tokens")
    width = bucket(longest)
    length = cache_length(width, budget)
    dp = 1 if mesh is None else parallel.batch_devices(mesh)
    multiple = group * dp // math.gcd(group, dp)
    n_slots = -(-min(slots, bucket(len(prompts) * group, minimum=1)) // multiple) * multiple
    cache_dtype = cache_dtype or config.compute_dtype
    graphdef, state = nnx.split(model)
    stop = jnp.asarray(list(stop_ids) or [-1], jnp.int32)
    run_params = dataclasses.replace(params, max_new_tokens=0)  # traced instead: not a compile key
    split_layers = splits_layers((jax.devices() if mesh is None else mesh.devices.flat)[0])

    out = {name: np.zeros((len(prompts), group, budget), dtype) for name, dtype in
           (("tokens", np.int32), ("logprobs", np.float32), ("model_logprobs", np.float32))}
    lengths = np.zeros((len(prompts), group), np.int32)
    owner: list[int | None] = [None] * n_slots  # the sequence (i*G+s) in each slot
    since = [0] * n_slots  # the first chunk that decodes the slot's sequence (older flags are stale)
    waiting = list(range(len(prompts) * group))
    counts = dict(admitted_late=0, chunks=0)
    fetch = min(n_slots, FETCH_ROWS)  # finished rows a `_take` call fetches

    def admit(table):
        free = [s for s in range(n_slots) if owner[s] is None]
        batch = waiting[:len(free)]
        del waiting[:len(batch)]
        if not batch:
            return table
        if counts["chunks"]:
            counts["admitted_late"] += len(batch)
        rows_of = list(dict.fromkeys(q // group for q in batch))  # each prompt prefilled once
        rows = -(-bucket(len(rows_of), minimum=1) // dp) * dp
        tokens = np.full((rows, width), pad_id, np.int32)
        real = np.ones((rows,), np.int32)
        for r, i in enumerate(rows_of):
            tokens[r, :len(prompts[i])] = prompts[i]
            real[r] = len(prompts[i])
        cache, logits = _prefill(graphdef, state, tokens, real, cache_dtype=cache_dtype,
                                 split_layers=split_layers)
        n = bucket(len(batch), minimum=1)
        ids, row, seq = np.full((n,), n_slots, np.int32), np.zeros((n,), np.int32), np.zeros((n,), np.int32)
        for j, q in enumerate(batch):  # padding rows keep an out-of-range slot id: dropped
            ids[j], row[j], seq[j] = free[j], rows_of.index(q // group), q
            owner[free[j]], since[free[j]] = q, counts["chunks"] + 1
        return _insert(table, cache, logits, real, ids, row, key, seq)  # sequence i*G+s: its own stream

    def store(fetched):
        seqs, (tokens, logprobs, model_logprobs, steps) = fetched
        host = [parallel.to_host(x) for x in (tokens, logprobs, model_logprobs, steps)]
        for j, q in enumerate(seqs):
            i, g = divmod(q, group)
            for name, values in zip(("tokens", "logprobs", "model_logprobs"), host):
                out[name][i, g] = values[j]
            lengths[i, g] = host[3][j]

    with jax.set_mesh(mesh) if mesh is not None else contextlib.nullcontext():
        table = admit(_empty(config, n_slots, length, budget, cache_dtype))
        flags, fetching = None, []  # (chunk number, its done flags); rows being fetched
        while True:
            table, next_flags = _decode(graphdef, state, table, stop, jnp.asarray(budget, jnp.int32),
                                        jnp.asarray(chunk, jnp.int32), params=run_params, split_layers=split_layers)
            counts["chunks"] += 1
            next_flags = (counts["chunks"], next_flags)
            preemption.check("a rollout")  # between chunks: every host stops at the same one
            for fetched in fetching:  # rows taken a chunk ago: ready while this chunk runs
                store(fetched)
            fetching = []
            if flags is not None:
                number, done = flags[0], parallel.to_host(flags[1])  # the chunk before this one
                finished = [s for s in range(n_slots) if owner[s] is not None and since[s] <= number and done[s]]
                for start in range(0, len(finished), fetch):  # fixed-size pieces: one program
                    piece = finished[start:start + fetch]
                    ids = np.zeros((fetch,), np.int32)  # padding rows fetch slot 0, unread
                    ids[:len(piece)] = piece
                    fetching.append(([owner[s] for s in piece], _take(table, ids)))
                for s in finished:
                    owner[s] = None
                table = admit(table)
            flags = next_flags
            if not fetching and not waiting and all(o is None for o in owner):
                break
    if stats is not None:
        stats.update(counts)
    last = np.take_along_axis(out["tokens"], np.maximum(lengths - 1, 0)[..., None], -1)[..., 0]
    stopped = (lengths > 0) & np.isin(last, list(stop_ids))
    for name in out:  # nothing after the end of a sequence
        out[name][np.arange(budget)[None, None, :] >= lengths[..., None]] = 0
    return SampleOutput(tokens=out["tokens"], logprobs=out["logprobs"], model_logprobs=out["model_logprobs"],
                        lengths=lengths, done=stopped)


class LocalEngine(RolloutEngine):
    """`generate` on a copy of the policy in the decode layout: `sync` casts it to `dtype` and
    reshards it onto `mesh` (`sampler.sync_program`, one jitted program, into the last copy's
    buffers); with no mesh it samples from the model as given. `slots` 0: a decode slot for
    every sequence asked for (the prompt count's power-of-two bucket x samples, so batch sizes
    share programs)."""

    def __init__(self, mesh=None, dtype: str | None = None, slots: int = 0, chunk: int = 16, pad_id: int = 0):
        self.mesh, self.dtype, self.slots, self.chunk, self.pad_id = mesh, dtype, slots, chunk, pad_id
        self.model, self.sync_stats = None, {}

    @classmethod
    def of(cls, model, **kwargs) -> "LocalEngine":
        """An engine already synced with `model` (kwargs: see the class)."""
        made = cls(**kwargs)
        made.sync(model)
        return made

    def sync(self, model) -> None:
        if self.mesh is None:
            self.model = model
        else:
            graphdef, state = nnx.split(model)
            program = sync_program(graphdef, state, self.mesh, self.dtype or model.config.compute_dtype)
            self.model = program(graphdef, state, previous=self.model)
            received = program.received_bytes  # what each device received: RL logs it every step
            self.sync_stats = {} if received is None else {"sync_received_gib": received / 2**30}
        jax.block_until_ready(nnx.state(self.model))  # done when it returns: RL times the sync

    def generate(self, prompts, key, params: SamplingParams, stop_ids) -> SampleOutput:
        if self.model is None:
            raise RuntimeError("LocalEngine.generate before sync: sync the policy first")
        slots = self.slots or bucket(len(prompts), minimum=1) * params.num_samples
        self.stats = dict(self.sync_stats)
        return generate(self.model, prompts, key, params, stop_ids=stop_ids, slots=slots, chunk=self.chunk,
                        mesh=self.mesh, pad_id=self.pad_id, stats=self.stats)


def from_config(rollout, mesh=None, pad_id: int = 0, workdir: str = "") -> RolloutEngine:
    """The engine `rollout.engine` names: "local" (this module) or "openai" (an external
    OpenAI-compatible server, `remote_engine.OpenAIEngine`; its weights go under `workdir`)."""
    if rollout.engine == "local":
        return LocalEngine(mesh, rollout.dtype or None, rollout.slots, rollout.chunk, pad_id)
    if rollout.engine == "openai":
        from fleming_jax import remote_engine

        return remote_engine.OpenAIEngine.from_config(rollout.server, workdir)
    raise ValueError(f"config.rollout.engine={rollout.engine!r}: use 'local' (the in-tree engine) or 'openai' "
                     "(an OpenAI-compatible server, config.rollout.server)")

"""Batched generation with a KV cache: one jitted prefill + `while_loop` decode.

GRPO spends most of its time here. Shapes are static per bucket (batch, prompt length and
generation budget are rounded up to powers of two), so a run compiles a handful of
programs; the number of new tokens is a traced value, so any budget inside a bucket reuses
the program. The prefill runs once per prompt; its cache is then repeated for the
`num_samples` completions of each prompt (GRPO's group).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from fleming_jax import parallel
from fleming_jax.models.qwen import KVCache

MIN_BUCKET = 16
CACHE_AXES = ("batch", "length", "kv_heads", "head_dim")  # each layer's buffer


@dataclasses.dataclass(frozen=True)
class SamplingParams:
    """How to pick tokens. temperature 0 is greedy; top_k 0 and top_p 1.0 disable those."""

    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    num_samples: int = 1
    max_new_tokens: int = 256

    def __post_init__(self):
        if self.temperature < 0 or not 0 < self.top_p <= 1 or self.top_k < 0 or self.num_samples < 1:
            raise ValueError(f"bad sampling params {self}: need temperature >= 0, 0 < top_p <= 1, "
                             "top_k >= 0, num_samples >= 1")


@dataclasses.dataclass
class SampleOutput:
    """Per prompt and sample: tokens [B, n, G] (pad after the stop token), log-probs of the
    sampled tokens under the sampling distribution and under the raw model, lengths (stop
    token included) and whether a stop token ended the sample."""

    tokens: np.ndarray
    logprobs: np.ndarray
    model_logprobs: np.ndarray
    lengths: np.ndarray
    done: np.ndarray


def bucket(n: int, minimum: int = MIN_BUCKET) -> int:
    """The power of two (at least `minimum`) that holds n."""
    return max(minimum, 1 << max(0, n - 1).bit_length())


def filter_logits(logits: jax.Array, temperature: float, top_k: int, top_p: float) -> jax.Array:
    """Logits of the sampling distribution: scaled by 1/temperature, then everything outside
    the top-k and outside the smallest set whose probability reaches top_p set to -inf."""
    logits = logits.astype(jnp.float32) / temperature
    if top_k:
        kth = jax.lax.top_k(logits, top_k)[0][..., -1:]
        logits = jnp.where(logits < kth, -jnp.inf, logits)
    if top_p < 1.0:
        sorted_logits = jnp.sort(logits, axis=-1)[..., ::-1]
        probs = jax.nn.softmax(sorted_logits, axis=-1)
        before = jnp.cumsum(probs, axis=-1) - probs  # mass of strictly more likely tokens
        keep = before < top_p  # a token stays while the set before it is still short of p
        cutoff = jnp.min(jnp.where(keep, sorted_logits, jnp.inf), axis=-1, keepdims=True)
        logits = jnp.where(logits < cutoff, -jnp.inf, logits)
    return logits


def pick(key, logits, params: SamplingParams):
    """(token, log-prob under the sampling distribution, log-prob under the raw model)."""
    raw = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    if params.temperature == 0:
        token = jnp.argmax(logits, axis=-1)
        sampled_logprob = jnp.zeros(token.shape, jnp.float32)
    else:
        filtered = filter_logits(logits, params.temperature, params.top_k, params.top_p)
        token = inverse_cdf_sample(key, filtered)
        sampled_logprob = jnp.take_along_axis(jax.nn.log_softmax(filtered, axis=-1), token[:, None], -1)[:, 0]
    return token, sampled_logprob, jnp.take_along_axis(raw, token[:, None], -1)[:, 0]


def inverse_cdf_sample(key, logits):
    """One categorical draw per row from a single uniform number: the first token whose
    cumulative probability reaches it. Exact, and ~6x cheaper on CPU than Gumbel-max, which
    needs a random number for every vocabulary entry. `key`: one key, or one per row."""
    cdf = jnp.cumsum(jax.nn.softmax(logits, axis=-1), axis=-1)
    tiny = jnp.finfo(jnp.float32).tiny
    if key.ndim:  # one key per row (the engine: every sequence has its own stream)
        u = jax.vmap(lambda k: jax.random.uniform(k, (1,), minval=tiny))(key)
    else:
        u = jax.random.uniform(key, (logits.shape[0], 1), minval=tiny)
    return jnp.sum(cdf < u * cdf[:, -1:], axis=-1).astype(jnp.int32)


TRACES = {"generate": 0}  # how many programs were traced (tests count compilations)


@functools.partial(jax.jit, static_argnames=("graphdef", "params", "budget", "cache_dtype"))
def _generate(graphdef, state, prompts, prompt_mask, stop_ids, max_new_tokens, key,
              params: SamplingParams, budget: int, cache_dtype: str):
    TRACES["generate"] += 1
    model = nnx.merge(graphdef, state)
    config = model.config
    batch, prompt_len = prompts.shape
    cache = KVCache.zeros(config, batch, prompt_len + budget, cache_dtype)
    constrain = lambda buffers: tuple(parallel.constrain(b, CACHE_AXES) for b in buffers)
    cache = cache.replace(k=constrain(cache.k), v=constrain(cache.v))
    layers = model.layers.split()  # once, outside the decode loop (see Layers.split)
    logits, cache = model(prompts, attention_mask=prompt_mask, cache=cache, layers=layers)
    last = logits[:, -1]  # left padding: every row's last prompt token is at the end
    n = params.num_samples
    if n > 1:  # the group's samples share one prefill
        cache = jax.tree.map(lambda x: jnp.repeat(x, n, axis=0) if x.ndim else x, cache)
        last = jnp.repeat(last, n, axis=0)
    rows = batch * n
    out = dict(tokens=jnp.zeros((rows, budget), jnp.int32),
               logprobs=jnp.zeros((rows, budget), jnp.float32),
               model_logprobs=jnp.zeros((rows, budget), jnp.float32))

    def not_finished(carry):
        step, done = carry[0], carry[1]
        return (step < max_new_tokens) & ~jnp.all(done)

    def decode(carry):
        step, done, lengths, last, cache, out, key = carry
        key, sub = jax.random.split(key)
        token, lp, raw = pick(sub, last, params)
        live = ~done
        token = jnp.where(live, token, 0)
        out = dict(tokens=out["tokens"].at[:, step].set(token),
                   logprobs=out["logprobs"].at[:, step].set(jnp.where(live, lp, 0.0)),
                   model_logprobs=out["model_logprobs"].at[:, step].set(jnp.where(live, raw, 0.0)))
        lengths = lengths + live
        done = done | (live & jnp.isin(token, stop_ids))
        logits, cache = model(token[:, None], attention_mask=jnp.ones((rows, 1), jnp.int32), cache=cache,
                              layers=layers)
        return step + 1, done, lengths, logits[:, -1], cache, out, key

    init = (jnp.zeros((), jnp.int32), jnp.zeros((rows,), bool), jnp.zeros((rows,), jnp.int32),
            last, cache, out, key)
    _, done, lengths, _, _, out, _ = jax.lax.while_loop(not_finished, decode, init)
    return out, lengths, done


def generate(model, prompts: Sequence[Sequence[int]], key: jax.Array, params: SamplingParams,
             stop_ids: Sequence[int] = (), mesh=None, cache_dtype: str | None = None,
             pad_id: int = 0) -> SampleOutput:
    """Samples `params.num_samples` completions for each prompt (token id lists).

    Prompts are left-padded to a power-of-two length; the batch is padded to a power of two
    (and to a multiple of the mesh's data-parallel size) with dummy rows that are dropped.
    Same key, same output; the mesh does not change the output.
    """
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("generate needs at least one prompt, and no empty prompts")
    longest = max(len(p) for p in prompts)
    prompt_len = bucket(longest)
    budget = bucket(params.max_new_tokens)
    # Positions come from the real tokens (left padding has none), so what must fit is the
    # longest prompt plus the requested budget, not the buckets the cache is sized by.
    if longest + params.max_new_tokens > model.config.max_position_embeddings:
        raise ValueError(f"the longest prompt ({longest} tokens) + max_new_tokens={params.max_new_tokens} = "
                         f"{longest + params.max_new_tokens} exceeds the model's max_position_embeddings="
                         f"{model.config.max_position_embeddings}; shorten the prompt or lower max_new_tokens")
    dp = 1 if mesh is None else parallel.batch_devices(mesh)
    rows = bucket(len(prompts), minimum=1)
    rows = -(-rows // dp) * dp
    tokens = np.full((rows, prompt_len), pad_id, np.int32)
    mask = np.zeros((rows, prompt_len), np.int32)
    for i in range(rows):
        p = prompts[i] if i < len(prompts) else prompts[0]  # dummy rows repeat prompt 0
        tokens[i, prompt_len - len(p):] = p
        mask[i, prompt_len - len(p):] = 1
    graphdef, state = nnx.split(model)
    args = (jnp.asarray(tokens), jnp.asarray(mask))
    if mesh is not None:
        args = tuple(jax.device_put(a, parallel.batch_sharding(mesh)) for a in args)
    call = functools.partial(
        _generate, graphdef, state, *args, jnp.asarray(list(stop_ids) or [-1], jnp.int32),
        jnp.asarray(params.max_new_tokens, jnp.int32), key,
        params=dataclasses.replace(params, max_new_tokens=0),  # traced above: not a compile key
        budget=budget, cache_dtype=cache_dtype or model.config.compute_dtype)
    if mesh is None:
        out, lengths, done = call()
    else:
        with jax.set_mesh(mesh):
            out, lengths, done = call()
    n, g, b = params.num_samples, params.max_new_tokens, len(prompts)
    shape = lambda x: parallel.to_host(x).reshape(rows, n, *x.shape[1:])[:b]
    return SampleOutput(tokens=shape(out["tokens"])[..., :g], logprobs=shape(out["logprobs"])[..., :g],
                        model_logprobs=shape(out["model_logprobs"])[..., :g],
                        lengths=shape(lengths), done=shape(done))


_LAYOUTS: dict = {}  # (graphdef, mesh, dtype) -> the jitted cast + reshard, built once per run


def rollout_model(model, mesh: jax.sharding.Mesh, dtype: str | None = None):
    """The policy in the decode layout: its params cast to `dtype` (default: the model's
    compute dtype, bf16 for the real presets) and resharded onto `mesh` (see
    `parallel.rollout_mesh`) by one jitted program. Synced once per RL step, so the decode
    loop reads weights where they are instead of gathering FSDP shards every token."""
    graphdef, state = nnx.split(model)
    dtype = dtype or model.config.compute_dtype
    key = (graphdef, mesh, dtype)
    if key not in _LAYOUTS:
        # Cast in the training layout, gather each weight whole, then keep this device's part:
        # the partitioner cannot map FSDP shards onto another mesh's tensor shards directly.
        whole = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
        cast = lambda x: jax.lax.with_sharding_constraint(
            x.astype(dtype) if jnp.issubdtype(x.dtype, jnp.floating) else x, whole)
        _LAYOUTS[key] = jax.jit(lambda s: jax.tree.map(cast, s),
                                out_shardings=parallel.tree_shardings(state, mesh))
    with jax.set_mesh(mesh):
        return nnx.merge(graphdef, _LAYOUTS[key](state))

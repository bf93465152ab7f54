"""Per-token log-probabilities, computed in chunks over the sequence.

A 152k vocabulary makes `[batch, length, vocab]` fp32 logits the largest tensor of a step;
here only `[batch, chunk, vocab]` exists at a time, and the backward pass recomputes each
chunk's logits instead of storing them (unless there is only one chunk).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from fleming_jax.models.decoder import project


def token_logprobs(model, tokens, attention_mask, positions=None, chunk_size: int = 256,
                   temperature: float = 1.0, with_entropy: bool = False, last: int | None = None,
                   at: jax.Array | None = None, sources: jax.Array | None = None, prefixes=None, dropout_key=None,
                   router_stats: list | None = None):
    """`out[:, t] = log p(tokens[:, t] | tokens[:, :t])` for t >= 1; `out[:, 0] = 0`.

    With `with_entropy`, also returns the entropy of each predictive distribution, aligned
    the same way. `temperature` divides the logits (the sampling distribution's log-probs).
    `last` or `at` unembed only some positions (the completions', not the prompts'): with
    `last`, the last `last`, and `out` is [B, last], aligned with `tokens[:, -last:]` (a
    completion window); with `at` [B, K] (positions >= 1; others give values to be masked),
    those positions, and `out[:, k]` is the log-prob of `tokens[:, at[:, k]]` (the scored
    tokens of packed rows); `at` overrides `last`. `sources` [B, K] are the positions whose
    hidden states predict `at`'s tokens (default `at - 1`; a reply packed after a shared prompt
    continues from the prompt's last token); `prefixes`, `dropout_key` and `router_stats` go to the
    model (`hidden_states`).
    """
    hidden, _ = model.hidden_states(tokens, attention_mask, positions, prefixes=prefixes, dropout_key=dropout_key,
                                    router_stats=router_stats)
    if at is not None:
        sources = jnp.maximum(at - 1, 0) if sources is None else sources
        h = jnp.take_along_axis(hidden, sources[..., None], axis=1)
        targets, skip = jnp.take_along_axis(tokens, at, axis=1), 1
    else:
        width = tokens.shape[1]
        skip = 0 if last is None else width - min(last, width)  # unscored leading positions
        h, targets = hidden[:, max(skip - 1, 0):-1], tokens[:, max(skip, 1):]
    batch, length = targets.shape
    chunk = max(1, min(chunk_size, length))
    n_chunks = -(-length // chunk)
    pad = n_chunks * chunk - length
    h = jnp.pad(h, ((0, 0), (0, pad), (0, 0))).reshape(batch, n_chunks, chunk, -1).swapaxes(0, 1)
    t = jnp.pad(targets, ((0, 0), (0, pad))).reshape(batch, n_chunks, chunk).swapaxes(0, 1)
    unembed = model.unembedding().astype(hidden.dtype)

    def one_chunk(args):
        h_chunk, t_chunk = args
        logits = project("bce,ev->bcv", h_chunk, unembed, jnp.float32) / temperature
        log_z = jax.nn.logsumexp(logits, axis=-1)
        picked = jnp.take_along_axis(logits, t_chunk[..., None], axis=-1)[..., 0] - log_z
        entropy = log_z - jnp.sum(jax.nn.softmax(logits, axis=-1) * logits, axis=-1)
        return picked, entropy

    # Several chunks: recompute each chunk's logits in the backward pass (only one chunk's
    # logits live at a time). One chunk: its logits exist whole in the forward pass anyway and
    # their backward runs first, so keeping them costs no extra peak and saves a matmul.
    picked, entropy = jax.lax.map(jax.checkpoint(one_chunk) if n_chunks > 1 else one_chunk, (h, t))
    unchunk = lambda x: jnp.pad(x.swapaxes(0, 1).reshape(batch, -1)[:, :length], ((0, 0), (int(skip == 0), 0)))
    if with_entropy:
        return unchunk(picked), unchunk(entropy)
    return unchunk(picked)


PACKED_BATCH = ("tokens", "segments", "positions", "prefixes", "targets", "sources")  # what it reads


def packed_logprobs(graphdef, chunk_size: int):
    """jitted `(weights, batch) -> log-probs at a packed batch's scored positions` (`PACKED_BATCH`
    keys), `weights` the tuple of states `graphdef` merges with: RL's reference and recompute
    forward, and the program `plan` compiles for it."""
    return jax.jit(lambda weights, b: token_logprobs(
        nnx.merge(graphdef, *weights), b["tokens"], b["segments"], b["positions"], chunk_size=chunk_size,
        at=b["targets"], sources=b["sources"], prefixes=b["prefixes"]))

"""Qwen3-MoE's sparse MLP: top-k routing, grouped expert matmuls, expert parallelism.

Routing is per token, so it runs as plain sharded array code. The experts run per shard
(`jax.shard_map`): a device gathers the tokens of its `expert` mesh group, sorts their
(token, choice) pairs so the ones routed to its own experts come first, grouped by expert,
and runs `jax.lax.ragged_dot` over its slice of the stacked expert weights (rows routed
elsewhere come out zero). The partial outputs are summed over the `tensor` axis and
reduce-scattered back over `expert`. Every choice is computed: no capacity, no dropped
token, so the output equals transformers' loop over experts.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from fleming_jax import parallel


def route(router_logits: jax.Array, k: int, normalize: bool) -> tuple[jax.Array, jax.Array, jax.Array]:
    """(weights [..., k], expert ids [..., k], probabilities [..., experts]) of the top-k
    experts as transformers' Qwen3-MoE router picks them: softmax in fp32, top k, renormalised
    to sum to 1 when `normalize` (`norm_topk_prob`)."""
    probs = jax.nn.softmax(router_logits.astype(jnp.float32), axis=-1)
    weights, ids = jax.lax.top_k(probs, k)
    if normalize:
        weights = weights / jnp.sum(weights, axis=-1, keepdims=True)
    return weights, ids, probs


def balance_stats(ids: jax.Array, probs: jax.Array, mask: jax.Array) -> jax.Array:
    """[2, experts]: over the tokens where `mask` > 0, how many routing choices each expert got
    and the sum of its router probability (summed over layers and divided at the end, as
    transformers' `load_balancing_loss_func` does)."""
    m = (mask > 0).astype(jnp.float32)
    counts = jnp.sum(jax.nn.one_hot(ids, probs.shape[-1], dtype=jnp.float32) * m[..., None, None], axis=(0, 1, 2))
    return jnp.stack([counts, jnp.sum(probs * m[..., None], axis=(0, 1))])


def balance_loss(stats: jax.Array, tokens: jax.Array) -> jax.Array:
    """Switch Transformer's load-balancing loss from `balance_stats` summed over `tokens` x layers
    rows: experts x sum(fraction of choices x mean router probability)."""
    fraction, prob = stats[0] / tokens, stats[1] / tokens
    return stats.shape[-1] * jnp.sum(fraction * prob)


def experts(h: jax.Array, weights: jax.Array, ids: jax.Array, gate: jax.Array, up: jax.Array,
            down: jax.Array) -> jax.Array:
    """sum_k weight_k * expert_{id_k}(h) for tokens `h` [b, t, embed] with their routing
    (`weights`, `ids` [b, t, k]); `gate`, `up` [experts, embed, mlp], `down` [experts, mlp, embed].
    Under a mesh, each shard computes its own experts (module docstring)."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        return _local(h, weights, ids, gate, up, down, sharded=False)
    spec = parallel.logical_to_spec
    tokens, wide = spec(("batch", None, None)), spec(("expert", "expert_embed", "mlp"))
    n = mesh.shape["expert"]
    if gate.shape[0] % n:
        raise ValueError(f"num_experts={gate.shape[0]} must be a multiple of the mesh's expert axis ({n}): "
                         "set --config.mesh.expert to a divisor of it")
    local = lambda *a: _local(*a, sharded=True)
    return jax.shard_map(local, in_specs=(tokens, tokens, tokens, wide, wide, spec(("expert", "mlp", "expert_embed"))),
                         out_specs=tokens, check_vma=False)(h, weights, ids, gate, up, down)


def _local(h, weights, ids, gate, up, down, sharded: bool):
    """One shard's experts over its expert group's tokens (all of them when not `sharded`)."""
    if sharded:  # whole expert weights of this shard's experts; the tokens of its expert group
        gate, up = (jax.lax.all_gather(w, "fsdp", axis=1, tiled=True) for w in (gate, up))
        down = jax.lax.all_gather(down, "fsdp", axis=2, tiled=True)
        h, weights, ids = (jax.lax.all_gather(x, "expert", axis=0, tiled=True) for x in (h, weights, ids))
    b, t, e = h.shape
    k, n_local = ids.shape[-1], gate.shape[0]
    first = jax.lax.axis_index("expert") * n_local if sharded else 0
    local = ids.reshape(-1) - first
    group = jnp.where((local >= 0) & (local < n_local), local, n_local)  # other shards' experts sort last
    order = jnp.argsort(group, stable=True)
    sizes = jnp.bincount(group, length=n_local + 1)[:n_local].astype(jnp.int32)
    rows = h.reshape(b * t, e)[order // k]
    hidden = jax.nn.silu(jax.lax.ragged_dot(rows, gate, sizes)) * jax.lax.ragged_dot(rows, up, sizes)
    out = jax.lax.ragged_dot(hidden, down, sizes)
    out = out * weights.reshape(-1)[order][:, None].astype(out.dtype)
    out = jnp.zeros_like(out).at[order].set(out).reshape(b, t, k, e).sum(axis=2)
    if sharded:
        out = jax.lax.psum(out, "tensor")
        out = jax.lax.psum_scatter(out, "expert", scatter_dimension=0, tiled=True)
    return out

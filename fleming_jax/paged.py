"""A paged KV cache for decoding: fixed-size pages in one pool per layer, and a page table
per sequence that says which pages hold its tokens.

Memory then follows what sequences hold, not the batch's longest row: a group's G samples
point at the same pages for their prompt (only the last, partly filled prompt page is each
sample's own), and the engine sizes the pool and the number of sequences in flight from a
memory budget (`engine.CacheLayout`).

Decode attention reads each row's own pages up to its own length. On TPU it is JAX's Pallas
paged-attention kernel (`jax.experimental.pallas.ops.tpu.paged_attention`: one query per
sequence, pages fetched by DMA, a row costs its own pages only). JAX also ships
`ragged_paged_attention`, which mixes prefill and decode; decode is all the engine needs,
and that kernel does not run in Pallas' TPU interpret mode on jax 0.10.2 (its reshaped refs
are refused), where `paged_attention` does, so tests compare it with the XLA path on a CPU.
Elsewhere the XLA path visits blocks of pages in a loop that stops after the longest live
row of the device's shard. Both run per shard (`jax.shard_map`): pages and sequences split
over the data-parallel axes, KV heads over `tensor`, and page ids are local to a shard.
"""

from __future__ import annotations

import functools

import flax
import jax
import jax.numpy as jnp

from fleming_jax import parallel

PAGE_AXES = ("kv_heads", "batch", None, "head_dim")  # a pool [kv_heads, pages, page_size, head_dim]
BLOCK_TOKENS = 128  # tokens a step of the XLA path (and a kernel block) reads per row


@flax.struct.dataclass
class PagedCache:
    """Each layer's key and value pages, [kv_heads, pages, page_size, head_dim]. A
    sliding-window layer's pool is a ring of `ring_pages` pages for each of `slots` sequences
    instead: it never reads further back than its window, so it keeps no more."""

    k: tuple[jax.Array, ...]
    v: tuple[jax.Array, ...]

    @classmethod
    def zeros(cls, config, pages: int, page_size: int, dtype, slots: int = 0) -> "PagedCache":
        ring = slots * ring_pages(config, page_size)
        shape = lambda sliding: (config.num_kv_heads, ring if sliding else pages, page_size, config.head_dim)
        make = lambda: tuple(jnp.zeros(shape(sliding), dtype) for sliding in config.sliding_layers())
        return cls(k=make(), v=make()).constrained()

    def constrained(self) -> "PagedCache":
        """Every pool laid out as PAGE_AXES says (under a mesh; else as it is)."""
        lay = lambda pools: tuple(parallel.constrain(pool, PAGE_AXES) for pool in pools)
        return PagedCache(k=lay(self.k), v=lay(self.v))

    @staticmethod
    def page_bytes(config, page_size: int, dtype) -> int:
        """Bytes of one page of the shared pool across every layer's K and V (all KV heads; the
        sliding-window layers' rings aside: `ring_bytes`)."""
        full = config.num_layers - sum(config.sliding_layers())
        return 2 * full * config.num_kv_heads * config.head_dim * page_size * jnp.dtype(dtype).itemsize

    @staticmethod
    def ring_bytes(config, page_size: int, dtype) -> int:
        """Bytes of one sequence's rings across the sliding-window layers' K and V."""
        sliding = sum(config.sliding_layers())
        return (2 * sliding * config.num_kv_heads * config.head_dim * page_size * ring_pages(config, page_size)
                * jnp.dtype(dtype).itemsize)


def ring_pages(config, page_size: int) -> int:
    """Pages a sliding-window layer keeps a sequence: any `sliding_window` consecutive positions
    lie on at most this many consecutive pages, so a ring of them never overwrites one it reads
    (0 without sliding layers)."""
    return -(-config.sliding_window // page_size) + 1 if config.sliding_window else 0


def ring_table(slots: int, shards: int, ring: int, width: int) -> jax.Array:
    """[slots, width]: the page each position's page of a slot's sequence takes in its ring
    (ids local to the slot's shard, as page tables are): slot s's ring is pages s*ring ..
    s*ring + ring - 1 of its shard, position page j goes to j mod ring."""
    local = jnp.arange(slots) % (slots // shards)
    return (local[:, None] * ring + jnp.arange(width)[None, :] % max(ring, 1)).astype(jnp.int32)


def block_pages(page_size: int) -> int:
    """Pages a block of attention reads: BLOCK_TOKENS worth (a page table's width is a multiple)."""
    return max(1, BLOCK_TOKENS // page_size)


def write(pages: jax.Array, new: jax.Array, table: jax.Array, index: jax.Array, active: jax.Array) -> jax.Array:
    """Each active row's token `new` [rows, kv_heads, d] into its page for position `index`.

    Whole pages are read, changed and written back: a scatter of single tokens made the TPU
    compiler keep the pool in a layout of its own and copy all of it into the kernel's layout
    every token (2 x 75 MB a layer a token for Qwen3-32B on v5p; 0.8 MB this way)."""
    size = pages.shape[2]
    page = jnp.take_along_axis(table, (index // size)[:, None], 1)[:, 0]
    page = jnp.where(active, page, pages.shape[1])  # inactive rows: out of range, dropped
    touched = pages.at[:, page].get(mode="fill", fill_value=0)  # [kv_heads, rows, page_size, d]
    touched = touched.at[:, jnp.arange(len(page)), index % size].set(jnp.swapaxes(new, 0, 1).astype(pages.dtype))
    return pages.at[:, page].set(touched, mode="drop")


def attend_xla(q: jax.Array, k_pages: jax.Array, v_pages: jax.Array, table: jax.Array, lengths: jax.Array,
               scale: float, window: int = 0):
    """q [rows, heads, d] over each row's first `lengths` cached tokens (only the last `window`
    of them when > 0: a sliding-window layer), scores q k^T x `scale`: a loop over blocks of
    pages (gathered through the table) up to the longest row, with a running softmax; with a
    window it starts at the first block any row's window reaches."""
    rows, heads, d = q.shape
    kv_heads, _, size, _ = k_pages.shape
    group, per_block = heads // kv_heads, block_pages(size)
    q = q.reshape(rows, kv_heads, group, d).astype(jnp.float32) * scale

    def visit(i, carry):
        best, total, acc = carry
        ids = jax.lax.dynamic_slice_in_dim(table, i * per_block, per_block, 1)  # [rows, per_block]
        take = lambda pages: pages[:, ids].reshape(kv_heads, rows, per_block * size, d).astype(jnp.float32)
        keys, values = take(k_pages), take(v_pages)
        scores = jnp.einsum("bkgd,kbsd->bkgs", q, keys)
        position = (i * per_block * size + jnp.arange(per_block * size))[None, :]
        ok = position < lengths[:, None]
        if window:
            ok &= position >= lengths[:, None] - window
        ok = ok[:, None, None, :]
        new_best = jnp.maximum(best, jnp.max(jnp.where(ok, scores, -jnp.inf), axis=-1))
        probs = jnp.where(ok, jnp.exp(scores - new_best[..., None]), 0.0)
        rescale = jnp.exp(best - new_best)
        return (new_best, total * rescale + probs.sum(-1),
                acc * rescale[..., None] + jnp.einsum("bkgs,kbsd->bkgd", probs, values))

    init = (jnp.full((rows, kv_heads, group), -1e30, jnp.float32), jnp.zeros((rows, kv_heads, group), jnp.float32),
            jnp.zeros((rows, kv_heads, group, d), jnp.float32))
    span = per_block * size
    blocks = (jnp.max(lengths, initial=0) + span - 1) // span
    first = 0  # a sliding window starts at the block where the shortest live row's window does
    if window:
        first = jnp.maximum(jnp.min(jnp.where(lengths > 0, lengths, blocks * span)) - window, 0) // span
    _, total, acc = jax.lax.fori_loop(first, blocks, visit, init)
    return (acc / jnp.maximum(total, 1e-30)[..., None]).reshape(rows, heads, d)


def attend_kernel(q, k_pages, v_pages, table, lengths, scale: float):
    """The same through the Pallas TPU paged-attention kernel (scaled queries in, as it expects;
    no sliding window: the kernel reads every page up to a row's length)."""
    from jax.experimental.pallas.ops.tpu.paged_attention import paged_attention

    size = k_pages.shape[2]
    per_block = min(block_pages(size), table.shape[1])
    out = paged_attention((q.astype(jnp.float32) * scale).astype(q.dtype), k_pages, v_pages,
                          jnp.maximum(lengths, 1), table, pages_per_compute_block=per_block)
    return out.astype(jnp.float32)


def _step(q, k, v, k_pages, v_pages, table, index, active, kernel: bool, scale: float, window: int):
    k_pages, v_pages = write(k_pages, k, table, index, active), write(v_pages, v, table, index, active)
    lengths = jnp.where(active, index + 1, 0)  # a finished row reads nothing
    if kernel and not window:
        return attend_kernel(q, k_pages, v_pages, table, lengths, scale), k_pages, v_pages
    return attend_xla(q, k_pages, v_pages, table, lengths, scale, window), k_pages, v_pages


def attention(q, k, v, k_pages, v_pages, table, index, active, kernel: bool, scale: float, window: int = 0):
    """One decode token per row: its keys/values `k`, `v` [rows, kv_heads, d] written at
    position `index` of its pages, then its queries `q` [rows, heads, d] over its first
    index + 1 tokens, the last `window` of them when > 0 (fp32 out; scores scaled by `scale`).
    Rows not `active` write and read nothing.
    A sliding-window layer takes the XLA path even with `kernel`. Under a mesh it runs per
    shard; `table` then holds page ids local to the row's shard."""
    step = functools.partial(_step, kernel=kernel, scale=scale, window=window)
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        return step(q, k, v, k_pages, v_pages, table, index, active)
    spec = parallel.logical_to_spec
    rows3, pages, rows = spec(("batch", "heads", None)), spec(PAGE_AXES), spec(("batch",))
    return jax.shard_map(step, in_specs=(rows3, rows3, rows3, pages, pages, spec(("batch", None)), rows, rows),
                         out_specs=(rows3, pages, pages), check_vma=False)(
        q, k, v, k_pages, v_pages, table, index, active)

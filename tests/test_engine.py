"""The continuous-batching engine: scheduling never changes the samples, finished sequences
free their slots and pages, a group's samples share their prompt's pages, attention reads each
row's own pages (XLA path and the Pallas TPU kernel), and a run compiles few programs.
(Greedy vs transformers and log-probs vs a full forward: tests/test_sampler.py, both engines.)"""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from configs import models as presets
from fleming_jax import engine, models, paged, parallel
from fleming_jax.sampler import SamplingParams

STOPS = list(range(3, 4096, 40))  # ~2.5% of the vocabulary: ragged lengths in a random model


@pytest.fixture(scope="module")
def tiny():
    cfg = presets.get("tiny")
    cfg.update(num_layers=2)
    return models.build(cfg)[0]


def _prompts(n, seed=0):
    rng = np.random.default_rng(seed)
    return [[int(t) for t in rng.integers(20, 4000, size=k)] for k in rng.integers(2, 30, size=n)]


@pytest.mark.slow
def test_samples_do_not_depend_on_slots_or_chunk(tiny):
    prompts = _prompts(6)
    params = SamplingParams(temperature=1.0, top_p=0.95, num_samples=3, max_new_tokens=48)
    stats = [{}, {}, {}]
    runs = [engine.generate(tiny, prompts, jax.random.key(5), params, stop_ids=STOPS, slots=s, chunk=c, stats=st)
            for (s, c), st in zip([(3, 1), (6, 7), (64, 16)], stats)]
    assert 0 < runs[0].done.mean() < 1  # ragged: some stop early, some hit the budget
    # all but the first 3 / 6, and any evicted to free pages (on a CPU the pool holds half the slots at full length)
    assert stats[0]["admitted_late"] == 15 + stats[0]["evicted"] and stats[1]["admitted_late"] == 12 + stats[1]["evicted"]
    assert stats[2]["admitted_late"] == 0  # every sequence had a slot from the start
    assert stats[1]["drain_chunks"] > 0 and stats[2]["drain_chunks"] > 0  # the tail decoded on fewer rows
    for other in runs[1:]:
        np.testing.assert_array_equal(other.tokens, runs[0].tokens)
        np.testing.assert_array_equal(other.lengths, runs[0].lengths)
        np.testing.assert_array_equal(other.done, runs[0].done)
        np.testing.assert_allclose(other.logprobs, runs[0].logprobs, atol=5e-4)  # batch-size rounding
    out = runs[0]
    for i in range(len(prompts)):
        for g in range(3):
            n = out.lengths[i, g]
            assert not out.tokens[i, g, n:].any()  # nothing after the end
            assert out.done[i, g] == (out.tokens[i, g, n - 1] in STOPS)
            assert out.done[i, g] or n == 48
    assert len({tuple(out.tokens[0, g]) for g in range(3)}) == 3  # a group's samples differ


def test_a_short_pool_evicts_the_youngest_and_recomputes_the_same_samples(tiny):
    prompts = _prompts(6)  # prompts of up to 32 tokens + 48 new: 5 pages at most
    params = SamplingParams(temperature=1.0, num_samples=3, max_new_tokens=48)
    roomy, short = {}, {}
    expected = engine.generate(tiny, prompts, jax.random.key(2), params, stop_ids=STOPS, slots=9, stats=roomy)
    gib = 2 * 5 * paged.PagedCache.page_bytes(tiny.config, 16, "float32") / 2**30  # 2 sequences at full length
    got = engine.generate(tiny, prompts, jax.random.key(2), params, stop_ids=STOPS, slots=9, kv_cache_gib=gib,
                          stats=short)
    assert roomy["evicted"] == 0 and short["evicted"] > 0  # replies grew past 10 pages
    assert short["kv_peak_gib"] <= short["kv_pool_gib"] < roomy["kv_pool_gib"]
    np.testing.assert_array_equal(got.tokens, expected.tokens)
    np.testing.assert_array_equal(got.lengths, expected.lengths)
    np.testing.assert_allclose(got.logprobs, expected.logprobs, atol=5e-4)


def test_a_long_run_compiles_a_handful_of_programs(tiny):
    params = SamplingParams(temperature=1.0, num_samples=4, max_new_tokens=40)
    start = dict(engine.TRACES)
    engine.generate(tiny, _prompts(3, 1), jax.random.key(0), params, stop_ids=STOPS, slots=8, chunk=4)
    before = dict(engine.TRACES)
    for n, seed in [(9, 2), (13, 3), (5, 4)]:  # different prompt counts, lengths and stop patterns
        engine.generate(tiny, _prompts(n, seed), jax.random.key(seed), params, stop_ids=STOPS, slots=8, chunk=4)
    new = {k: engine.TRACES[k] - before[k] for k in before}
    assert new["empty"] == 0, new  # same slots and cache length: reused
    assert engine.TRACES["decode"] - start["decode"] <= 4  # all 8 slots, and while draining 4, 2 or 1 of them
    assert new["prefill"] + new["insert"] <= 4, new  # prefill row buckets 1 and 2 at most
    assert new["take"] == 0, new  # finished rows fetched in fixed-size pieces


def _paged_case(seed, lengths, kv_heads=2, group=2, d=16, size=16, width=4, window=0):
    """A random page pool, page tables of distinct pages, and the dense attention of each row
    over its first `lengths` tokens, the last `window` of them when > 0 (numpy, float64)."""
    rng = np.random.default_rng(seed)
    rows, pages = len(lengths), len(lengths) * width + 3
    q = rng.normal(size=(rows, kv_heads * group, d)).astype(np.float32)
    k = rng.normal(size=(kv_heads, pages, size, d)).astype(np.float32)
    v = rng.normal(size=(kv_heads, pages, size, d)).astype(np.float32)
    table = rng.permutation(pages)[:rows * width].reshape(rows, width).astype(np.int32)
    expected = np.zeros((rows, kv_heads, group, d))
    for r, n in enumerate(lengths):
        if not n:
            continue  # a finished row: nothing to attend to
        first = max(0, n - window) if window else 0
        keys = k[:, table[r]].reshape(kv_heads, -1, d)[:, first:n].astype(np.float64)
        values = v[:, table[r]].reshape(kv_heads, -1, d)[:, first:n].astype(np.float64)
        scores = np.einsum("kgd,ksd->kgs", q[r].reshape(kv_heads, group, d), keys) / np.sqrt(d)
        probs = np.exp(scores - scores.max(-1, keepdims=True))
        expected[r] = np.einsum("kgs,ksd->kgd", probs / probs.sum(-1, keepdims=True), values)
    return q, k, v, table, np.asarray(lengths, np.int32), expected.reshape(rows, -1, d)


@pytest.mark.parametrize("lengths,window", [([1, 16, 17, 64], 0), ([37, 5, 128, 2], 0), ([37, 5, 128, 2], 20),
                                            ([200, 256, 0, 150], 20)])
def test_paged_attention_reads_each_rows_own_pages_up_to_its_length(lengths, window):
    """(With a sliding window: Gemma 3's local layers; in the last case no live row's window
    reaches the first block of 128 tokens, which is then never read.)"""
    q, k, v, table, lens, expected = _paged_case(0, lengths, width=16, window=window)
    unused = np.setdiff1d(np.arange(k.shape[1]), table)
    k[:, unused], v[:, unused] = np.nan, np.nan  # pages no row owns: never read
    if min(n for n in lengths if n) - window >= paged.BLOCK_TOKENS:
        before = table[:, :paged.block_pages(k.shape[2])]
        k[:, before], v[:, before] = np.nan, np.nan
    got = paged.attend_xla(jnp.asarray(q), jnp.asarray(k), jnp.asarray(v), jnp.asarray(table), jnp.asarray(lens),
                           q.shape[-1] ** -0.5, window)
    np.testing.assert_allclose(np.asarray(got), expected, atol=1e-5)


def test_paged_write_puts_each_active_rows_token_at_its_position_only():
    pool = np.zeros((2, 6, 4, 3), np.float32)
    table = np.array([[4, 1], [2, 0], [5, 3]], np.int32)
    new = np.arange(3 * 2 * 3, dtype=np.float32).reshape(3, 2, 3) + 1
    index, active = np.array([5, 2, 0]), np.array([True, True, False])
    got = np.asarray(paged.write(jnp.asarray(pool), jnp.asarray(new), jnp.asarray(table), jnp.asarray(index),
                                 jnp.asarray(active)))
    expected = pool.copy()
    expected[:, 1, 1] = new[0]  # row 0: position 5 = its second page (1), slot 1
    expected[:, 2, 2] = new[1]  # row 1: position 2 = its first page (2), slot 2
    np.testing.assert_array_equal(got, expected)  # row 2 is not active: nothing written


def test_the_pallas_tpu_kernel_equals_the_xla_path():
    """The TPU decode attention (Pallas `paged_attention`, in TPU interpret mode on this CPU)
    against the XLA path. The interpreter rounds matmul inputs to bf16 as a TPU's default
    precision does, hence the tolerance (one bf16 rounding of values ~1)."""
    from jax.experimental.pallas import tpu as pltpu

    q, k, v, table, lens, expected = _paged_case(1, [1, 20, 100, 128, 0, 77, 3, 50], kv_heads=2, group=4, d=128,
                                                 width=8)
    args = [jnp.asarray(x) for x in (q, k, v, table, lens)] + [q.shape[-1] ** -0.5]
    xla = np.asarray(paged.attend_xla(*args))
    with pltpu.force_tpu_interpret_mode():
        kernel = np.asarray(jax.jit(paged.attend_kernel, static_argnums=5)(*args))
    live = lens > 0  # a row of length 0 (finished) is read by neither; its output is unused
    np.testing.assert_allclose(xla[live], expected[live], atol=1e-5)
    np.testing.assert_allclose(kernel[live], xla[live], atol=2e-2)
    assert np.abs(kernel[live] - xla[live]).mean() < 2e-3


def test_cache_layout_follows_memory():
    config = models.config_from(presets.get("tiny"))
    per_token = 2 * config.num_layers * config.num_kv_heads * config.head_dim * 4  # fp32 K and V
    # a CPU: CPU_SLOTS sequences a device, pages for 1/OVERCOMMIT of them at their longest
    cpu = engine.CacheLayout.plan(config, 128, 8, 200, 96, dtype="float32")
    assert engine.OVERCOMMIT == 2 and cpu.slots == engine.CPU_SLOTS and cpu.width == 256 and cpu.page_size == 16
    assert cpu.pages == cpu.slots // 2 * (256 + 96) // 16
    assert cpu.pages_per_sequence == 24  # 22 pages, in whole blocks of 128 tokens (8 pages)
    # a memory budget: the slots are OVERCOMMIT x what it holds at full length, in whole groups
    gib = 64 * (256 + 96) * per_token / 2**30
    sized = engine.CacheLayout.plan(config, 1024, 8, 200, 96, kv_cache_gib=gib, dtype="float32")
    assert sized.slots == 128 and sized.pages == 64 * 22
    assert sized.bytes_per_device(config, "float32") == 64 * 22 * 16 * per_token
    # an accelerator's free memory (HBM_SHARE of it) on 2 data-parallel shards; never more than the rollout
    tpu = engine.CacheLayout.plan(config, 16, 8, 200, 96, shards=2, dtype="float32", platform="tpu",
                                  free_bytes=10 * 2**30)
    assert tpu.slots == 16 and tpu.pages == 2 * int(engine.HBM_SHARE * 10 * 2**30) // (16 * per_token)
    with pytest.raises(ValueError, match="kv_cache_gib"):
        engine.CacheLayout.plan(config, 16, 8, 200, 96, kv_cache_gib=1e-5, dtype="float32")


def test_a_groups_samples_share_their_prompts_full_pages():
    layout = engine.CacheLayout(slots=4, pages=40, page_size=16, pages_per_sequence=8, width=64, shards=2)
    pool = engine.PagePool(layout)
    first = pool.take(1, prompt=7, length=40, tokens=20)  # 2 full prompt pages + 2 of its own (40..59)
    second = pool.take(1, prompt=7, length=40, tokens=20)
    other_shard = pool.take(0, prompt=7, length=40, tokens=20)
    (t1, w1, _), (t2, w2, _), (t0, w0, _) = first, second, other_shard
    assert list(t1[:2]) == list(t2[:2]) and set(t1[2:4]).isdisjoint(t2[2:4])  # shared, then its own
    # global ids of what each writes: the first its 3 prompt pages, the second only its partial one
    assert list(w1[:3]) == [20 + p for p in t1[:3]] and list(w1[3:]) == [40]
    assert list(w2[:2]) == [40, 40] and w2[2] == 20 + t2[2]
    assert list(w0[:3]) == list(t0[:3])  # shard 0's own copy, ids 0-19
    assert pool.in_use == pool.peak == 4 + 2 + 4
    assert pool.take(1, prompt=9, length=64, tokens=64, keep=7) is None  # 8 of 14 free would leave 6
    ninth = pool.take(1, prompt=9, length=64, tokens=64, keep=6)
    assert ninth is not None and pool.take(1, prompt=10, length=64, tokens=64) is None  # 8 more: 6 left
    grown = pool.grow(first[2], 3)  # the first sample's reply grows by 3 pages: its own
    assert first[2].pages[2:] == grown and len(pool.free[1]) == 3 and pool.peak == 4 + 2 + 4 + 8 + 3
    for hold in (first[2], second[2], other_shard[2], ninth[2]):
        pool.give_back(hold)
    assert pool.in_use == 0 and sorted(pool.free[1]) == list(range(20)) and not pool.shared


def test_sharded_engine_equals_single_device(tiny):
    from fleming_jax import sampler

    over = parallel.make_mesh(ml_collections.ConfigDict(dict(data=-1, fsdp=1, tensor=1)))
    mesh = parallel.rollout_mesh(-1, tiny.config.num_kv_heads, over)
    prompts = _prompts(5, 7)
    params = SamplingParams(temperature=1.0, num_samples=2, max_new_tokens=24)
    one = engine.generate(tiny, prompts, jax.random.key(2), params, stop_ids=STOPS, slots=4, chunk=4)
    stats = {}
    many = engine.generate(sampler.rollout_model(tiny, mesh, "float32"), prompts, jax.random.key(2), params,
                           stop_ids=STOPS, slots=8, chunk=4, mesh=mesh, stats=stats)
    assert stats["evicted"] > 0  # a shard's pool holds one sequence at full length: it evicts under the mesh too
    np.testing.assert_array_equal(many.tokens, one.tokens)
    np.testing.assert_allclose(many.model_logprobs, one.model_logprobs, atol=1e-4)


@pytest.mark.slow
def test_sliding_layers_decode_from_rings_that_hold_their_window(hf_dir):
    """Gemma 3's sliding-window layers keep a ring of ceil(window / page) + 1 pages a slot
    (here 2 of 16 tokens for a 4-token window; the global layer keeps the shared pool). Sampled
    on 4 data-parallel shards with slots reused (replies of up to 40 tokens wrap each ring
    several times), every token's log-prob equals a full forward's over the finished sequence."""
    from fleming_jax import sampler
    from fleming_jax.models import hf
    from fleming_jax.train.logprobs import token_logprobs

    model, config = hf.load(hf_dir("gemma3_text"))
    layout = engine.CacheLayout.plan(config, 12, 2, 70, 40, shards=4, slots=8)
    slots = engine.empty(config, layout, 40, "float32")
    assert [pool.shape[1] for pool in slots.cache.k] == [8 * 2, 8 * 2, layout.pages]  # sliding, sliding, global
    real = models.config_from(presets.get("gemma3-27b"))  # 52 of 62 layers slide over 1,024 tokens
    plans = [engine.CacheLayout.plan(c, 512, 8, 512, 4096, shards=16, kv_cache_gib=8.0, dtype="bfloat16")
             for c in (real, real.replace(layer_types=(), sliding_window=0))]
    assert plans[0].slots >= 1.8 * plans[1].slots  # the same 8 GiB a chip: ~2x the sequences in flight
    assert max(p.bytes_per_device(c, "bfloat16") for p, c in zip(plans, (real, real))) <= 8 * 2**30
    over = parallel.make_mesh(ml_collections.ConfigDict(dict(data=-1, fsdp=1, tensor=1)))
    mesh = parallel.rollout_mesh(-1, config.num_kv_heads, over)
    assert mesh.shape["data"] == 4
    rng = np.random.default_rng(3)  # prompts of 1 to 5 pages: the longer ones wrap the ring at insert
    prompts = [[int(t) for t in rng.integers(1, config.vocab_size, n)] for n in (40, 5, 70, 33, 12, 50)]
    params = SamplingParams(temperature=1.0, num_samples=2, max_new_tokens=40)
    on_mesh = hf.load(hf_dir("gemma3_text"), mesh=over)[0]
    out = engine.generate(sampler.rollout_model(on_mesh, mesh, "float32"), prompts, jax.random.key(1), params,
                          stop_ids=[], slots=8, chunk=4, mesh=mesh)
    for i, prompt in enumerate(prompts):
        for j in range(2):
            n = int(out.lengths[i, j])
            ids = jnp.asarray([list(prompt) + list(out.tokens[i, j, :n])])
            full = np.asarray(token_logprobs(model, ids, jnp.ones_like(ids)))[0, -n:]
            np.testing.assert_allclose(out.model_logprobs[i, j, :n], full, atol=2e-4)


def test_scanned_prefill_equals_the_unrolled_one(tiny):
    """The TPU path (a scan over stacked weights and cache) against XLA:CPU's (unrolled layers)."""
    from fleming_jax import sampler
    from flax import nnx

    over = parallel.make_mesh(ml_collections.ConfigDict(dict(data=-1, fsdp=1, tensor=1)))
    mesh = parallel.rollout_mesh(-1, tiny.config.num_kv_heads, over)
    model = sampler.rollout_model(tiny, mesh, "float32")
    graphdef, state = nnx.split(model)
    prompts = _prompts(4, 3)
    tokens = np.zeros((4, 32), np.int32)
    for r, p in enumerate(prompts):
        tokens[r, :len(p)] = p
    lengths = jnp.asarray([len(p) for p in prompts], jnp.int32)
    with jax.set_mesh(mesh):
        runs = [engine._prefill(graphdef, state, jnp.asarray(tokens), lengths, cache_dtype="float32", split_layers=s)
                for s in (True, False)]
    (unrolled, logits), (scanned, scanned_logits) = runs
    assert len(scanned.k) == len(unrolled.k) == tiny.config.num_layers
    for a, b in zip(unrolled.k + unrolled.v, scanned.k + scanned.v):
        assert a.shape == b.shape and a.sharding.is_equivalent_to(b.sharding, a.ndim)
        np.testing.assert_allclose(np.asarray(b), np.asarray(a), atol=1e-5)
    np.testing.assert_array_equal(np.asarray(scanned.segment), np.asarray(unrolled.segment))
    np.testing.assert_array_equal(np.asarray(scanned.index), np.asarray(unrolled.index))
    np.testing.assert_allclose(np.asarray(scanned_logits), np.asarray(logits), atol=1e-4)

"""The continuous-batching engine: scheduling never changes the samples, finished sequences
free their slots, attention reads only live cache blocks, and a run compiles few programs.
(Greedy vs transformers and log-probs vs a full forward: tests/test_sampler.py, both engines.)"""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from configs import models as presets
from fleming_jax import engine, models, parallel
from fleming_jax.models import qwen
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


def test_samples_do_not_depend_on_slots_or_chunk(tiny):
    prompts = _prompts(6)
    params = SamplingParams(temperature=1.0, top_p=0.95, num_samples=3, max_new_tokens=48)
    stats = [{}, {}, {}]
    runs = [engine.generate(tiny, prompts, jax.random.key(5), params, stop_ids=STOPS, slots=s, chunk=c, stats=st)
            for (s, c), st in zip([(3, 1), (6, 7), (64, 16)], stats)]
    assert 0 < runs[0].done.mean() < 1  # ragged: some stop early, some hit the budget
    assert stats[0]["admitted_late"] == 15 and stats[1]["admitted_late"] == 12  # all but the first 3 / 6
    assert stats[2]["admitted_late"] == 0  # every sequence had a slot from the start
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


def test_a_long_run_compiles_a_handful_of_programs(tiny):
    params = SamplingParams(temperature=1.0, num_samples=4, max_new_tokens=40)
    engine.generate(tiny, _prompts(3, 1), jax.random.key(0), params, stop_ids=STOPS, slots=8, chunk=4)
    before = dict(engine.TRACES)
    for n, seed in [(9, 2), (13, 3), (5, 4)]:  # different prompt counts, lengths and stop patterns
        engine.generate(tiny, _prompts(n, seed), jax.random.key(seed), params, stop_ids=STOPS, slots=8, chunk=4)
    new = {k: engine.TRACES[k] - before[k] for k in before}
    assert new["decode"] == 0 and new["empty"] == 0, new  # same slots and cache length: reused
    assert new["prefill"] + new["insert"] <= 4, new  # prefill row buckets 1 and 2 at most
    assert new["take"] == 0, new  # finished rows fetched in fixed-size pieces


def test_cache_is_sized_by_the_budget_not_a_power_of_two_bucket():
    assert engine.cache_length(32, 1100) == 1152  # not 32 + bucket(1100) = 2080
    assert engine.cache_length(16, 40) == 56
    assert engine.cache_length(512, 4096) == 4608


@pytest.mark.parametrize("live", [1, 37, 128, 300, 384])
def test_live_block_attention_equals_full_attention_and_never_reads_dead_blocks(live):
    rng = np.random.default_rng(live)
    b, slots, kvh, g, d = 3, 384, 2, 2, 16
    q = jnp.asarray(rng.normal(size=(b, 1, kvh, g, d)), jnp.float32)
    k = rng.normal(size=(b, slots, kvh, d)).astype(np.float32)
    v = rng.normal(size=(b, slots, kvh, d)).astype(np.float32)
    lengths = np.array([live, max(1, live // 2), max(1, live - 5)])
    allowed = np.arange(slots)[None, None, :] < lengths[:, None, None]
    scores = np.einsum("bkgd,bskd->bkgs", np.asarray(q[:, 0]), k) / np.sqrt(d)
    scores = np.where(allowed[:, 0][:, None, None, :], scores, -np.inf)
    probs = np.exp(scores - scores.max(-1, keepdims=True))
    expected = np.einsum("bkgs,bskd->bkgd", probs / probs.sum(-1, keepdims=True), v)
    dead = -(-live // qwen.ATTENTION_BLOCK) * qwen.ATTENTION_BLOCK
    k[:, dead:], v[:, dead:] = np.nan, np.nan  # whole blocks past the live ones: never read
    got = qwen.attend_live_blocks(q, jnp.asarray(k), jnp.asarray(v), jnp.asarray(allowed), jnp.asarray(live))
    np.testing.assert_allclose(np.asarray(got), expected, atol=1e-5)


def test_sharded_engine_equals_single_device(tiny):
    from fleming_jax import sampler

    over = parallel.make_mesh(ml_collections.ConfigDict(dict(data=-1, fsdp=1, tensor=1)))
    mesh = parallel.rollout_mesh(-1, tiny.config.num_kv_heads, over)
    prompts = _prompts(5, 7)
    params = SamplingParams(temperature=1.0, num_samples=2, max_new_tokens=24)
    one = engine.generate(tiny, prompts, jax.random.key(2), params, stop_ids=STOPS, slots=4, chunk=4)
    many = engine.generate(sampler.rollout_model(tiny, mesh, "float32"), prompts, jax.random.key(2), params,
                           stop_ids=STOPS, slots=8, chunk=4, mesh=mesh)
    np.testing.assert_array_equal(many.tokens, one.tokens)
    np.testing.assert_allclose(many.model_logprobs, one.model_logprobs, atol=1e-4)


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

"""Generation (the rollout engine) against transformers.generate, its own log-probs, and the
sampling controls."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
import torch
import transformers

import functools

from fleming_jax import engine, parallel, sampler
from fleming_jax.models import hf
from fleming_jax.sampler import SamplingParams
from fleming_jax.train.logprobs import token_logprobs

PROMPT_LENGTHS = (5, 9, 3, 12)


def prompts(seed=0, lengths=PROMPT_LENGTHS):
    rng = np.random.default_rng(seed)
    return [[int(t) for t in rng.integers(1, 128, n)] for n in lengths]


# Fewer slots than sequences: prompts wait for slots, slots are reused mid-run.
generate = functools.partial(engine.generate, slots=2, chunk=5)


@pytest.fixture(scope="module")
def qwen2(hf_dir):
    return hf.load(hf_dir("qwen2"))[0]


@pytest.mark.parametrize("model_type", ["qwen2", "qwen3"] + [pytest.param(t, marks=pytest.mark.slow)
                                                               for t in ("qwen3_moe", "gemma3_text", "llama")])
def test_greedy_equals_transformers_generate(hf_dir, model_type):
    """64 new tokens (the Llama's past its rope scaling's 32-token original context; the
    Qwen3-MoE's experts picked afresh for each token; the Gemma's sliding layers reading only
    their last 4 tokens of the paged cache)."""
    path = hf_dir(model_type)
    reference = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    batch = prompts()
    width = max(map(len, batch))
    ids = np.zeros((len(batch), width), np.int64)
    mask = np.zeros_like(ids)
    for i, p in enumerate(batch):
        ids[i, width - len(p):], mask[i, width - len(p):] = p, 1
    with torch.no_grad():
        expected = reference.generate(torch.tensor(ids), attention_mask=torch.tensor(mask), do_sample=False,
                                      max_new_tokens=64, min_new_tokens=64, pad_token_id=0,
                                      eos_token_id=None).numpy()[:, width:]
    model, _ = hf.load(path)
    out = generate(model, batch, jax.random.key(0), SamplingParams(temperature=0, max_new_tokens=64))
    np.testing.assert_array_equal(out.tokens[:, 0], expected)
    assert (out.lengths == 64).all() and not out.done.any()


def full_sequences(batch, out):
    """Each prompt + its first sample, left-padded into one batch, with the mask."""
    rows = [p + list(out.tokens[i, 0, :out.lengths[i, 0]]) for i, p in enumerate(batch)]
    width = max(map(len, rows))
    ids = np.zeros((len(rows), width), np.int32)
    mask = np.zeros_like(ids)
    for i, r in enumerate(rows):
        ids[i, width - len(r):], mask[i, width - len(r):] = r, 1
    return ids, mask


@pytest.mark.parametrize("temperature,top_k", [(1.0, 0)] + [pytest.param(*p, marks=pytest.mark.slow) for p in ((0.7, 0), (1.3, 20))])
def test_logprobs_of_own_tokens_equal_a_full_forward(qwen2, temperature, top_k):
    batch = prompts(1)
    params = SamplingParams(temperature=temperature, top_k=top_k, max_new_tokens=24)
    out = generate(qwen2, batch, jax.random.key(3), params)
    ids, mask = full_sequences(batch, out)
    raw = np.asarray(token_logprobs(qwen2, jnp.asarray(ids), jnp.asarray(mask)))
    scaled = np.asarray(token_logprobs(qwen2, jnp.asarray(ids), jnp.asarray(mask), temperature=temperature))
    for i in range(len(batch)):
        n = out.lengths[i, 0]
        np.testing.assert_allclose(out.model_logprobs[i, 0, :n], raw[i, -n:], atol=2e-4)
        if top_k == 0:  # without truncation the sampling distribution is softmax(logits / T)
            np.testing.assert_allclose(out.logprobs[i, 0, :n], scaled[i, -n:], atol=2e-4)
        else:  # truncation only moves mass onto the kept tokens
            assert (out.logprobs[i, 0, :n] >= scaled[i, -n:] - 1e-4).all()


@pytest.mark.slow
def test_top_k_one_and_tiny_temperature_equal_greedy(qwen2):
    batch = prompts(2)
    greedy = generate(qwen2, batch, jax.random.key(0), SamplingParams(temperature=0, max_new_tokens=32))
    top1 = generate(qwen2, batch, jax.random.key(1), SamplingParams(top_k=1, max_new_tokens=32))
    cold = generate(qwen2, batch, jax.random.key(2), SamplingParams(temperature=1e-4, max_new_tokens=32))
    np.testing.assert_array_equal(top1.tokens, greedy.tokens)
    np.testing.assert_array_equal(cold.tokens, greedy.tokens)
    np.testing.assert_allclose(top1.logprobs, 0.0, atol=1e-6)  # one token holds all the mass


def test_top_p_keeps_the_smallest_set_reaching_p():
    logits = jnp.log(jnp.array([[0.05, 0.5, 0.15, 0.3]]))
    kept = lambda p: np.isfinite(np.asarray(sampler.filter_logits(logits, 1.0, 0, p)))[0].tolist()
    assert kept(0.5) == [False, True, False, False]  # 0.5 alone reaches 0.5
    assert kept(0.7) == [False, True, False, True]  # 0.5 + 0.3 = 0.8 >= 0.7
    assert kept(0.85) == [False, True, True, True]  # needs 0.15 as well: 0.95
    assert kept(1.0) == [True, True, True, True]
    probs = jax.nn.softmax(sampler.filter_logits(logits, 1.0, 0, 0.7))
    np.testing.assert_allclose(probs[0], [0, 0.5 / 0.8, 0, 0.3 / 0.8], atol=1e-6)


@pytest.mark.parametrize("vocab", [300, 4096])  # 4 blocks of 75; 128 blocks of 32
def test_blockwise_inverse_cdf_draws_the_first_token_whose_cdf_reaches_u(vocab):
    """The sampler's CDF, built per vocabulary block (so a vocab-sharded chip scans only its
    own blocks), picks what the textbook inverse CDF picks from one float64 running sum, for
    the same uniform numbers; and -inf logits (filtered tokens) are never drawn."""
    rows = 2048
    rng = np.random.default_rng(vocab)
    logits = rng.normal(0, 3, (rows, vocab)).astype(np.float32)
    logits[:, ::7] = -np.inf
    keys = jax.random.split(jax.random.key(1), rows)
    token = np.asarray(sampler.inverse_cdf_sample(keys, jnp.asarray(logits)))
    u = np.asarray(jax.vmap(lambda k: jax.random.uniform(k, (), minval=jnp.finfo(jnp.float32).tiny))(keys))
    probs = np.exp(logits.astype(np.float64) - logits.max(-1, keepdims=True))
    cdf = np.cumsum(probs / probs.sum(-1, keepdims=True), -1)
    want = np.array([np.searchsorted(c, x) for c, x in zip(cdf, u)])
    assert np.mean(token == want) > 0.999  # float32 vs float64 sums may split a boundary draw
    assert token.max() < vocab and not np.any(token % 7 == 0)


@pytest.mark.slow
def test_keys_control_randomness_and_groups_share_the_prefill(qwen2):
    batch = prompts(3)
    params = SamplingParams(temperature=1.0, num_samples=4, max_new_tokens=16)
    a = generate(qwen2, batch, jax.random.key(5), params)
    b = generate(qwen2, batch, jax.random.key(5), params)
    c = generate(qwen2, batch, jax.random.key(6), params)
    assert a.tokens.shape == (4, 4, 16)
    np.testing.assert_array_equal(a.tokens, b.tokens)
    assert (a.tokens != c.tokens).any()
    assert len({tuple(s) for s in a.tokens[0]}) > 1  # the group's samples differ
    greedy = generate(qwen2, batch, jax.random.key(0), SamplingParams(temperature=0, num_samples=3,
                                                                            max_new_tokens=16))
    one = generate(qwen2, batch, jax.random.key(0), SamplingParams(temperature=0, max_new_tokens=16))
    for s in range(3):
        np.testing.assert_array_equal(greedy.tokens[:, s], one.tokens[:, 0])


def test_stop_tokens_end_a_row_and_pad_after(qwen2):
    batch = prompts(4)
    free = generate(qwen2, batch, jax.random.key(0), SamplingParams(temperature=0, max_new_tokens=32))
    stop = int(free.tokens[0, 0, 6])  # row 0 emits this at step 6 (maybe earlier too)
    first = int(np.argmax(free.tokens[0, 0] == stop))
    out = generate(qwen2, batch, jax.random.key(0), SamplingParams(temperature=0, max_new_tokens=32),
                           stop_ids=[stop])
    assert out.done[0, 0] and out.lengths[0, 0] == first + 1
    np.testing.assert_array_equal(out.tokens[0, 0, :first + 1], free.tokens[0, 0, :first + 1])
    assert (out.tokens[0, 0, first + 1:] == 0).all() and (out.model_logprobs[0, 0, first + 1:] == 0).all()
    for i in range(len(batch)):  # every row stops at its first stop token, or runs to the budget
        hits = np.flatnonzero(free.tokens[i, 0] == stop)
        assert out.lengths[i, 0] == (hits[0] + 1 if len(hits) else 32)


@pytest.mark.slow
def test_sharded_output_equals_single_device(hf_dir, qwen2):
    mesh = parallel.make_mesh(ml_collections.ConfigDict(dict(data=2, fsdp=2, tensor=2)))
    sharded, _ = hf.load(hf_dir("qwen2"), mesh=mesh)
    batch = prompts(6)
    for params in [SamplingParams(temperature=0, max_new_tokens=24),
                   SamplingParams(temperature=1.0, top_p=0.9, num_samples=2, max_new_tokens=24)]:
        one = generate(qwen2, batch, jax.random.key(9), params)
        many = generate(sharded, batch, jax.random.key(9), params, mesh=mesh)
        np.testing.assert_array_equal(many.tokens, one.tokens)
        np.testing.assert_allclose(many.model_logprobs, one.model_logprobs, atol=1e-4)


def test_refuses_prompts_beyond_the_context_and_checks_the_real_budget(qwen2):
    with pytest.raises(ValueError, match=r"longest prompt \(200 tokens\) \+ max_new_tokens=100 = 300 exceeds "
                                         "the model's max_position_embeddings=256; shorten the prompt"):
        generate(qwen2, prompts(0, (200,)), jax.random.key(0), SamplingParams(max_new_tokens=100))
    # 97 + 150 fits 256 although the prompt bucket + budget (128 + 150) does not: sampled, not refused
    out = generate(qwen2, prompts(0, (97,)), jax.random.key(0), SamplingParams(max_new_tokens=150))
    assert out.tokens.shape == (1, 1, 150)
    with pytest.raises(ValueError, match="no empty prompts"):
        generate(qwen2, [[]], jax.random.key(0), SamplingParams())


@pytest.mark.slow
def test_bfloat16_cache_stays_close_to_float32(qwen2):
    batch = prompts(7)
    params = SamplingParams(temperature=0, max_new_tokens=8)
    f32 = generate(qwen2, batch, jax.random.key(0), params)
    bf16 = generate(qwen2, batch, jax.random.key(0), params, cache_dtype="bfloat16")
    np.testing.assert_array_equal(bf16.tokens[:, :, :4], f32.tokens[:, :, :4])
    np.testing.assert_allclose(bf16.model_logprobs[:, :, :4], f32.model_logprobs[:, :, :4], atol=0.1)

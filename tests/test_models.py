"""The Qwen2/Qwen3/Qwen3-MoE/Llama/Gemma 3 port against transformers, and its own padding, packing and cache rules."""

import numpy as np
import pytest
import torch
import transformers
import jax
import jax.numpy as jnp

from fleming_jax.models import hf, decoder

VOCAB = 128


def reference_logits(path, ids, mask):
    model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    positions = np.clip(mask.cumsum(1) - 1, 0, None)
    with torch.no_grad():
        out = model(torch.tensor(ids), attention_mask=torch.tensor(mask),
                    position_ids=torch.tensor(positions))
    return out.logits.numpy()


def padded_batch(seed=0, batch=4, length=12, left=True):
    rng = np.random.default_rng(seed)
    ids = rng.integers(0, VOCAB, (batch, length))
    mask = np.ones((batch, length), np.int64)
    for row, pad in enumerate([0, 3, 7, 1][:batch]):
        if left:
            mask[row, :pad] = 0
        else:
            mask[row, length - pad:] = 0
    return ids, mask


@pytest.mark.parametrize("model_type,tie,left", [
    (t, tie, left) for t in ("qwen2", "qwen3", "llama") for tie in (False, True) for left in (True, False)] + [
    ("qwen3_moe", False, True), ("gemma3_text", True, True)] + [
    pytest.param(t, *p, marks=pytest.mark.slow) for t in ("qwen3_moe", "gemma3_text")
    for p in ((True, True), (False, False), (False, True), (True, False))
    if (t, *p) not in (("qwen3_moe", False, True), ("gemma3_text", True, True))])
def test_logits_match_transformers(hf_dir, model_type, tie, left):
    path = hf_dir(model_type, tie)
    model, config = hf.load(path)
    assert (config.qkv_bias, config.qk_norm, config.tie_embeddings, config.num_experts, config.sliding_window) == (
        model_type == "qwen2", model_type.startswith(("qwen3", "gemma3")), tie, 8 * (model_type == "qwen3_moe"),
        4 * (model_type == "gemma3_text"))  # Gemma: a 4-token window, shorter than the 12-token rows
    assert config.rope_type == {"llama": "llama3", "gemma3_text": "linear"}.get(model_type, "default")
    ids, mask = padded_batch(left=left)
    ours = np.asarray(model(jnp.asarray(ids), attention_mask=jnp.asarray(mask)))
    ref = reference_logits(path, ids, mask)
    real = mask.astype(bool)
    assert np.abs(ours[real] - ref[real]).max() < 1e-4


def test_left_and_right_padding_agree(hf_dir):
    model, _ = hf.load(hf_dir("qwen3"))
    ids, left_mask = padded_batch(left=True)
    _, right_mask = padded_batch(left=False)
    # Move each row's real tokens from the right end to the left end.
    right_ids = np.stack([np.roll(r, -int((m == 0).sum())) for r, m in zip(ids, left_mask)])
    left = np.asarray(model(jnp.asarray(ids), attention_mask=jnp.asarray(left_mask)))
    right = np.asarray(model(jnp.asarray(right_ids), attention_mask=jnp.asarray(right_mask)))
    for row in range(len(ids)):
        np.testing.assert_allclose(left[row][left_mask[row] == 1], right[row][right_mask[row] == 1],
                                   atol=1e-5)


def test_packed_segments_do_not_attend_across_examples(hf_dir):
    model, _ = hf.load(hf_dir("qwen2"))
    rng = np.random.default_rng(1)
    a, b = rng.integers(0, VOCAB, 5), rng.integers(0, VOCAB, 7)
    packed = np.concatenate([a, b, [0, 0]])[None]
    segments = np.array([[1] * 5 + [2] * 7 + [0, 0]])
    out = np.asarray(model(jnp.asarray(packed), attention_mask=jnp.asarray(segments)))[0]
    alone_a = np.asarray(model(jnp.asarray(a[None])))[0]
    alone_b = np.asarray(model(jnp.asarray(b[None])))[0]
    np.testing.assert_allclose(out[:5], alone_a, atol=1e-5)
    np.testing.assert_allclose(out[5:12], alone_b, atol=1e-5)


@pytest.mark.slow
@pytest.mark.parametrize("model_type", ["qwen2", "qwen3", "qwen3_moe", "llama", "gemma3_text"])
def test_kv_cache_prefill_then_decode_equals_full_forward(hf_dir, model_type):
    model, config = hf.load(hf_dir(model_type))
    ids, mask = padded_batch(length=12)
    full = np.asarray(model(jnp.asarray(ids), attention_mask=jnp.asarray(mask)))
    cache = decoder.KVCache.zeros(config, batch=len(ids), max_len=16)
    prompt = 8
    logits, cache = model(jnp.asarray(ids[:, :prompt]), attention_mask=jnp.asarray(mask[:, :prompt]),
                          cache=cache)
    steps = [np.asarray(logits)]
    for t in range(prompt, 12):
        logits, cache = model(jnp.asarray(ids[:, t:t + 1]), attention_mask=jnp.ones((len(ids), 1), jnp.int32),
                              cache=cache)
        steps.append(np.asarray(logits))
    incremental = np.concatenate(steps, axis=1)
    real = mask.astype(bool)
    assert (np.asarray(cache.index) == 12).all()
    assert np.abs(incremental[real] - full[real]).max() < 1e-4


@pytest.mark.parametrize("spec,x_shape,w_shape", [
    ("bte,em->btm", (2, 3, 4), (4, 5)), ("bte,ehd->bthd", (2, 3, 4), (4, 2, 3)),
    ("bthd,hde->bte", (2, 3, 2, 3), (2, 3, 4)), ("...e,ev->...v", (2, 3, 4), (4, 7))])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_project_gradients_equal_autodiff_of_einsum(spec, x_shape, w_shape, dtype):
    kx, kw, kg = jax.random.split(jax.random.key(0), 3)
    x = jax.random.normal(kx, x_shape, dtype)
    w = jax.random.normal(kw, w_shape, dtype)
    out_dtype = jnp.float32 if spec.startswith("...") else None
    cotangent = jax.random.normal(kg, jnp.einsum(spec, x, w).shape, out_dtype or dtype)
    ours = jax.vjp(lambda x, w: decoder.project(spec, x, w, out_dtype), x, w)
    reference = jax.vjp(lambda x, w: jnp.einsum(spec, x, w, preferred_element_type=out_dtype), x, w)
    np.testing.assert_array_equal(np.asarray(ours[0], np.float32), np.asarray(reference[0], np.float32))
    tol = 1e-6 if dtype == "float32" else 2e-2
    for a, b in zip(ours[1](cotangent), reference[1](cotangent)):
        assert a.dtype == b.dtype and a.shape == b.shape
        np.testing.assert_allclose(np.asarray(a, np.float32), np.asarray(b, np.float32), rtol=tol, atol=tol)


def test_bfloat16_compute_stays_close_to_float32(hf_dir):
    path = hf_dir("qwen3")
    ids, mask = padded_batch()
    f32, _ = hf.load(path)
    bf16, config = hf.load(path, dtype="bfloat16")
    assert config.param_dtype == config.compute_dtype == "bfloat16"
    a = np.asarray(f32(jnp.asarray(ids), attention_mask=jnp.asarray(mask)))
    b = np.asarray(bf16(jnp.asarray(ids), attention_mask=jnp.asarray(mask)))
    real = mask.astype(bool)
    # bf16 keeps ~3 significant digits; logits here are O(10).
    assert np.abs(a[real] - b[real]).max() < 0.05 * np.abs(a[real]).max()
    assert (a[real].argmax(-1) == b[real].argmax(-1)).mean() > 0.9


@pytest.mark.parametrize("chunk, query_block", [pytest.param(4, 64, marks=pytest.mark.slow), (64, 5)])
def test_blocked_attention_equals_full_attention_with_gradients(hf_dir, monkeypatch, chunk, query_block):
    """Query blocks give full attention's logits and gradients: blocks of `attention_chunk`
    recomputed in the backward (12 tokens > 4), and blocks of QUERY_BLOCK that score only the
    keys up to their end for shorter sequences (5, 5 and 2 queries), on left-padded rows and
    a packed row of two segments."""
    import jax
    from flax import nnx

    from fleming_jax.models import decoder

    path = hf_dir("qwen2")
    ids, mask = padded_batch(length=12)
    mask[0] = [1] * 5 + [2] * 7
    full, _ = hf.load(path, attention_chunk=64)  # 12 tokens: one block, all keys
    blocked, _ = hf.load(path, attention_chunk=chunk)

    def loss_and_grads(model):
        graphdef, params = nnx.split(model, nnx.Param)
        loss = lambda p: jnp.sum(nnx.merge(graphdef, p)(jnp.asarray(ids), attention_mask=jnp.asarray(mask))
                                 * (jnp.asarray(mask) > 0)[..., None]) * 1e-3
        return jax.value_and_grad(loss)(params)

    a, ga = loss_and_grads(full)
    monkeypatch.setattr(decoder, "QUERY_BLOCK", query_block)
    b, gb = loss_and_grads(blocked)
    np.testing.assert_allclose(a, b, rtol=1e-5)
    for x, y in zip(jax.tree.leaves(ga), jax.tree.leaves(gb)):
        np.testing.assert_allclose(x, y, atol=1e-5)


@pytest.mark.parametrize("preset", ["llama3.1-8b", "llama3.2-1b"])
def test_llama3_rope_frequencies_equal_transformers(preset):
    """Llama 3's scaled rotary frequencies for the real presets (every band: scaled, blended,
    kept) against transformers' own llama3 rope init."""
    from configs import models
    from fleming_jax.models import config_from

    config = config_from(models.get(preset))
    hf_config = transformers.LlamaConfig(**{k: v for k, v in config.to_hf().items() if k != "architectures"})
    inv_freq, _ = transformers.modeling_rope_utils.ROPE_INIT_FUNCTIONS["llama3"](hf_config, "cpu")
    ours = decoder.rope_frequencies(config)
    np.testing.assert_allclose(ours, inv_freq.numpy(), rtol=1e-6)
    unscaled = 1.0 / (config.rope_theta ** (np.arange(0, config.head_dim, 2) / config.head_dim))
    ratio = unscaled / ours
    assert ratio.min() == pytest.approx(1.0) and ratio.max() == pytest.approx(config.rope_factor)
    assert ((ratio > 1.01) & (ratio < config.rope_factor - 0.01)).any()  # the blended band

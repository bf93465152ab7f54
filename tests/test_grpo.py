"""GRPO's pure functions against hand-computed values of the published formulas."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from flax import nnx

from fleming_jax.train import grpo
from fleming_jax.train.logprobs import token_logprobs
from tests.test_parallel import global_batch_for_test, small_model_cfg
from fleming_jax import models


def cfg(**changes):
    base = dict(loss_mode="clipped", eps_low=0.2, eps_high=0.28, beta=0.0, entropy_coef=0.0,
                log_entropy=False, aggregation="sequence_mean", loss_normalizer=1.0, advantage="std",
                importance_sampling_level="token", seq_eps_low=3e-4, seq_eps_high=4e-4)
    return ml_collections.ConfigDict(base | changes)


def test_group_advantages():
    rewards = jnp.array([[1.0, 0.0, 0.0, 1.0], [1.0, 1.0, 1.0, 1.0], [0.0, 0.0, 0.0, 3.0]])
    np.testing.assert_allclose(grpo.group_advantages(rewards, "mean"),
                               [[0.5, -0.5, -0.5, 0.5], [0, 0, 0, 0], [-0.75, -0.75, -0.75, 2.25]])
    std = np.sqrt(0.75 ** 2 * 3 + 2.25 ** 2) / 2  # population std of [0, 0, 0, 3]
    np.testing.assert_allclose(grpo.group_advantages(rewards, "std_population", eps=1e-4),
                               [[0.5 / 0.5001, -0.5 / 0.5001, -0.5 / 0.5001, 0.5 / 0.5001], [0, 0, 0, 0],
                                [-0.75 / (std + 1e-4)] * 3 + [2.25 / (std + 1e-4)]], rtol=1e-6)
    # the default is the sample std (ddof=1), as TRL and verl: sqrt(4/3) smaller advantages at G=4
    s01, s3 = np.sqrt(1 / 3), std * np.sqrt(4 / 3)
    np.testing.assert_allclose(grpo.group_advantages(rewards, "std", eps=1e-4),
                               [[0.5 / (s01 + 1e-4), -0.5 / (s01 + 1e-4), -0.5 / (s01 + 1e-4), 0.5 / (s01 + 1e-4)],
                                [0, 0, 0, 0], [-0.75 / (s3 + 1e-4)] * 3 + [2.25 / (s3 + 1e-4)]], rtol=1e-6)
    with pytest.raises(ValueError, match="rl.grpo.advantage='z'"):
        grpo.group_advantages(rewards, "z")


RATIOS = np.array([0.5, 1.0, 1.5])


def clipped_case():
    old = jnp.log(jnp.array([[0.2, 0.3, 0.4], [0.2, 0.3, 0.4]]))
    logp = old + jnp.log(jnp.asarray(RATIOS))[None]
    return logp, old, jnp.array([1.0, -1.0])


def test_clipped_surrogate_by_hand():
    logp, old, adv = clipped_case()
    loss, m = grpo.token_terms(logp, old, adv, cfg())
    # A = +1: min(rho, clip(rho, 0.8, 1.28)) -> 0.5, 1, 1.28; A = -1: min(-rho, -clip) -> -0.8, -1, -1.5
    np.testing.assert_allclose(loss, [[-0.5, -1.0, -1.28], [0.8, 1.0, 1.5]], rtol=1e-6)
    np.testing.assert_array_equal(m["clip_high"], [[0, 0, 1], [0, 0, 0]])
    np.testing.assert_array_equal(m["clip_low"], [[0, 0, 0], [1, 0, 0]])
    # approx KL(old || new) with k3: rho - log(rho) - 1
    np.testing.assert_allclose(m["approx_kl"][0], RATIOS - np.log(RATIOS) - 1, rtol=1e-5)


def test_clipped_gradient_is_zero_where_clipped_in_the_advantage_direction():
    logp, old, adv = clipped_case()
    grad = jax.grad(lambda lp: grpo.token_terms(lp, old, adv, cfg())[0].sum())(logp)
    # d/dlogp of -rho*A is -rho*A; clipped entries (A>0, rho>1.28) and (A<0, rho<0.8) give 0
    np.testing.assert_allclose(grad, [[-0.5, -1.0, 0.0], [0.0, 1.0, 1.5]], rtol=1e-6)


def test_k3_kl_to_reference_and_entropy_bonus():
    logp = jnp.log(jnp.array([[0.5, 0.25]]))
    ref = jnp.log(jnp.array([[0.25, 0.5]]))
    entropy = jnp.array([[1.0, 2.0]])
    loss, m = grpo.token_terms(logp, logp, jnp.array([0.0]), cfg(beta=0.1, entropy_coef=0.01), ref, entropy)
    kl = np.array([0.5 - np.log(0.5) - 1, 2.0 - np.log(2.0) - 1])  # exp(d) - d - 1, d = ref - logp
    np.testing.assert_allclose(m["kl_ref"][0], kl, rtol=1e-5)
    np.testing.assert_allclose(loss[0], 0.1 * kl - 0.01 * np.array([1.0, 2.0]), rtol=1e-5)


def test_paper_loss_is_minus_advantage_times_sequence_logprob():
    # sequence log-probs: y0 = log(0.5 * 0.5), y1 = log(0.125 * 1 * 1); the third token of y0 is padding
    logp = jnp.log(jnp.array([[0.5, 0.5, 0.9], [0.125, 1.0, 1.0]]))
    mask = jnp.array([[1, 1, 0], [1, 1, 1]])
    adv = jnp.array([1.0, -0.5])
    loss, _ = grpo.token_terms(logp, logp - 3.0, adv, cfg(loss_mode="paper"))  # no ratio: old unused
    num, den = grpo.aggregate(loss, mask, "sequence_sum", 1.0)
    # L = -(1/N) sum_i A_i log pi(y_i|x)
    expected = -(1.0 * np.log(0.25) + -0.5 * np.log(0.125)) / 2
    assert float(num / den) == pytest.approx(expected, rel=1e-6)


def test_sequence_mean_by_hand():
    """GSPO's per-sequence mean log-ratio: a packed row's sequences apart, masked tokens out,
    and the GSPO ratio clipped to its own range."""
    values = jnp.array([[1.0, 2.0, 3.0, 4.0, 5.0, 9.0], [2.0, 4.0, 6.0, 1.0, 1.0, 1.0]])
    mask = jnp.array([[1, 1, 1, 1, 0, 0], [1, 1, 1, 0, 0, 0]])
    ids = jnp.array([[1, 1, 2, 2, 2, 1], [2, 2, 2, 3, 3, 3]])
    np.testing.assert_allclose(grpo.sequence_mean(values, mask, ids),
                               [[1.5, 1.5, 3.5, 3.5, 3.5, 1.5], [4.0, 4.0, 4.0, 0.0, 0.0, 0.0]])
    np.testing.assert_allclose(grpo.sequence_mean(values, mask), [[2.5] * 6, [4.0] * 6])  # a row: one sequence
    old = jnp.zeros((1, 3))
    logp = jnp.array([[0.1, -0.1, 0.003]])  # mean log-ratio 0.001 > 4e-4: clipped for A > 0
    loss, metrics = grpo.token_terms(logp, old, jnp.array([1.0]), cfg(importance_sampling_level="sequence"))
    np.testing.assert_allclose(loss, -(1 + 4e-4) * jnp.ones((1, 3)), rtol=1e-6)
    assert float(metrics["clip_high"].mean()) == 1.0


def test_aggregations_by_hand():
    per_token = jnp.array([[1.0, 2.0, 3.0, 9.0], [4.0, 9.0, 9.0, 9.0]])
    mask = jnp.array([[1, 1, 1, 0], [1, 0, 0, 0]])
    assert [float(x) for x in grpo.aggregate(per_token, mask, "sequence_mean")] == [6.0, 2.0]  # (2 + 4) / 2
    assert [float(x) for x in grpo.aggregate(per_token, mask, "token_mean")] == [10.0, 4.0]
    assert [float(x) for x in grpo.aggregate(per_token, mask, "sequence_sum", 4.0)] == [2.5, 2.0]
    with pytest.raises(ValueError, match="aggregation 'nope'"):
        grpo.aggregate(per_token, mask, "nope")


def test_on_policy_clipped_gradient_equals_policy_gradient():
    """At rho = 1 the clipped surrogate's gradient is the REINFORCE gradient -A grad log pi."""
    model, _ = models.build(small_model_cfg())
    graphdef, params = nnx.split(model, nnx.Param)
    data = global_batch_for_test()
    tokens, segments = jnp.asarray(data["tokens"]), jnp.asarray(data["segments"])
    old = token_logprobs(model, tokens, segments)
    batch = dict(tokens=tokens, segments=segments, completion_mask=jnp.asarray(data["loss_weights"]),
                 advantages=jnp.linspace(-1, 1, tokens.shape[0]), old_logprobs=old)

    def clipped(p):
        num, den, _ = grpo.grpo_loss(nnx.merge(graphdef, p), batch, cfg())
        return num / den

    def reinforce(p):
        lp = token_logprobs(nnx.merge(graphdef, p), tokens, segments)
        num, den = grpo.aggregate(-batch["advantages"][:, None] * lp, batch["completion_mask"], "sequence_mean")
        return num / den

    for a, b in zip(jax.tree.leaves(jax.grad(clipped)(params)), jax.tree.leaves(jax.grad(reinforce)(params))):
        np.testing.assert_allclose(a, b, atol=1e-6)


@pytest.mark.slow
@pytest.mark.parametrize("last", [1, 5, 31, 32])
def test_completion_window_equals_the_full_sequence(last):
    """Scoring only the last positions (the rollout's completion window) gives the full
    sequence's log-probs, entropies, loss and gradient there."""
    model, _ = models.build(small_model_cfg())
    graphdef, params = nnx.split(model, nnx.Param)
    data = global_batch_for_test(length=32)
    tokens, segments = jnp.asarray(data["tokens"]), jnp.asarray(data["segments"])
    width = tokens.shape[1]
    full_lp, full_ent = token_logprobs(model, tokens, segments, chunk_size=8, with_entropy=True)
    lp, ent = token_logprobs(model, tokens, segments, chunk_size=8, with_entropy=True, last=last)
    np.testing.assert_allclose(lp, full_lp[:, -last:], atol=1e-6)
    np.testing.assert_allclose(ent, full_ent[:, -last:], atol=1e-5)

    mask = np.asarray(data["loss_weights"]).copy()
    mask[:, :width - last] = 0  # the loss lives in the window
    old = full_lp - 0.1
    full = dict(tokens=tokens, segments=segments, completion_mask=jnp.asarray(mask),
                advantages=jnp.linspace(-1, 1, tokens.shape[0]), old_logprobs=old)
    window = dict(full, completion_mask=full["completion_mask"][:, -last:], old_logprobs=old[:, -last:])

    def loss(p, batch):
        num, den, _ = grpo.grpo_loss(nnx.merge(graphdef, p), batch, cfg(), chunk_size=8)
        return num / jnp.maximum(den, 1e-8)
    np.testing.assert_allclose(loss(params, window), loss(params, full), rtol=1e-6)
    for a, b in zip(jax.tree.leaves(jax.grad(loss)(params, window)), jax.tree.leaves(jax.grad(loss)(params, full))):
        np.testing.assert_allclose(a, b, atol=1e-6)


@pytest.mark.parametrize("chunk_size", [8, 32])
@pytest.mark.slow
def test_chunked_logprobs_gradient_equals_full_logits(chunk_size):
    """Several chunks (logits recomputed in the backward pass) and one chunk (kept) give the
    value and gradient of log_softmax over the model's full logits."""
    model, _ = models.build(small_model_cfg())
    graphdef, params = nnx.split(model, nnx.Param)
    data = global_batch_for_test(length=32)
    tokens, segments = jnp.asarray(data["tokens"]), jnp.asarray(data["segments"])
    weights = jnp.asarray(data["loss_weights"])[:, 1:]

    def ours(p):
        lp = token_logprobs(nnx.merge(graphdef, p), tokens, segments, chunk_size=chunk_size)
        return jnp.sum(lp[:, 1:] * weights)

    def reference(p):
        logp = jax.nn.log_softmax(nnx.merge(graphdef, p)(tokens, attention_mask=segments)[:, :-1], axis=-1)
        return jnp.sum(jnp.take_along_axis(logp, tokens[:, 1:, None], axis=-1)[..., 0] * weights)

    np.testing.assert_allclose(ours(params), reference(params), rtol=1e-5)
    for a, b in zip(jax.tree.leaves(jax.grad(ours)(params)), jax.tree.leaves(jax.grad(reference)(params))):
        np.testing.assert_allclose(a, b, atol=1e-5)


def test_mismatch_metrics_and_tis_weights_by_hand():
    trainer = jnp.log(jnp.array([[0.6, 0.1, 0.9]]))
    rollout = jnp.log(jnp.array([[0.2, 0.3, 0.9]]))  # ratios pi_t / pi_r = 3, 1/3, 1
    metrics, weights = grpo.mismatch_terms(trainer, rollout, tis_cap=2.0)
    np.testing.assert_allclose(weights, [[2.0, 1 / 3, 1.0]], rtol=1e-6)  # min(ratio, 2)
    np.testing.assert_allclose(metrics["mismatch_abs"], [[np.log(3), np.log(3), 0]], rtol=1e-6, atol=1e-7)
    # k3 of KL(rollout || trainer) on the rollout's tokens: r - 1 - log r
    np.testing.assert_allclose(metrics["mismatch_k3"], [[2 - np.log(3), 1 / 3 - 1 + np.log(3), 0]], rtol=1e-5,
                               atol=1e-7)
    np.testing.assert_array_equal(metrics["mismatch_far"], [[1, 1, 0]])  # outside [1/2, 2]
    _, off = grpo.mismatch_terms(trainer, rollout)
    np.testing.assert_array_equal(off, np.ones((1, 3)))


@pytest.mark.parametrize("aggregation", ["token_mean", "sequence_mean"])
@pytest.mark.slow
def test_tis_weights_the_policy_term_and_changes_nothing_without_mismatch(aggregation):
    """At an update's first step (pi = pi_old = the trainer) the clipped term is -A per token;
    TIS makes it -A min(pi_old / pi_rollout, C). With equal rollout log-probs it is a no-op."""
    model, _ = models.build(small_model_cfg())
    graphdef, params = nnx.split(model, nnx.Param)
    data = global_batch_for_test()
    tokens, segments = jnp.asarray(data["tokens"]), jnp.asarray(data["segments"])
    mask = jnp.asarray(data["loss_weights"])
    own = token_logprobs(model, tokens, segments)
    ratios = np.exp(np.random.default_rng(0).normal(0, 0.8, own.shape)).astype(np.float32)
    adv = jnp.linspace(-1, 1, tokens.shape[0])
    batch = dict(tokens=tokens, segments=segments, completion_mask=mask, advantages=adv, old_logprobs=own)
    c = cfg(aggregation=aggregation)

    def loss(p, b, cap):
        num, den, metrics = grpo.grpo_loss(nnx.merge(graphdef, p), b, c, tis_cap=cap)
        return num / den, metrics

    skewed = dict(batch, rollout_logprobs=own - jnp.log(ratios))
    got, metrics = loss(params, skewed, 2.0)
    per_token = -np.asarray(adv)[:, None] * np.minimum(ratios, 2.0) * np.asarray(mask)
    if aggregation == "token_mean":
        want = per_token.sum() / np.asarray(mask).sum()
    else:
        rows = np.asarray(mask).sum(1) > 0
        want = (per_token.sum(1)[rows] / np.asarray(mask).sum(1)[rows]).mean()
    np.testing.assert_allclose(got, want, rtol=1e-5)
    m = np.asarray(mask).astype(bool)
    np.testing.assert_allclose(metrics["mismatch_abs"], np.abs(np.log(ratios))[m].mean(), rtol=1e-4)
    np.testing.assert_allclose(metrics["mismatch_max"], np.abs(np.log(ratios))[m].max(), rtol=1e-5)
    np.testing.assert_allclose(metrics["mismatch_far"], (np.abs(np.log(ratios)) > np.log(2))[m].mean(), rtol=1e-5)

    same = dict(batch, rollout_logprobs=own)
    (a, ma), (b, _) = loss(params, same, 2.0), loss(params, batch, 0.0)
    assert a == b and float(ma["mismatch_abs"]) == 0.0
    for x, y in zip(jax.tree.leaves(jax.grad(lambda p: loss(p, same, 2.0)[0])(params)),
                    jax.tree.leaves(jax.grad(lambda p: loss(p, batch, 0.0)[0])(params))):
        np.testing.assert_array_equal(x, y)

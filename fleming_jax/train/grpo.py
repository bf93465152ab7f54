"""GRPO as small pure functions: group advantages, per-token policy terms, aggregation.

Two objectives (`loss_mode`):
- "paper": Fleming-R1's Eq. 1-3 as written, L = -(1/N) sum_i A_i log pi(y_i|x) with
  A_i = r_i - mean(group): no ratio, clip or KL (use advantage="mean", aggregation
  "sequence_sum", loss_normalizer=1 for the exact formula).
- "clipped": the PPO-style surrogate of GRPO/DAPO, -min(rho A, clip(rho, 1-eps_low,
  1+eps_high) A) per token with rho = pi/pi_old, plus beta * KL(pi || pi_ref) with the k3
  estimator, minus an optional entropy bonus. With `importance_sampling_level="sequence"`
  (GSPO, TRL's name) rho is one ratio per sequence, exp of its tokens' mean log-ratio,
  clipped to [1 - seq_eps_low, 1 + seq_eps_high] (GSPO's own small range).
Aggregation returns (numerator, denominator) so that gradient accumulation in
`train.state.make_train_step` reproduces the full-batch loss exactly.

Rollout/trainer mismatch: the engine samples in its own layout and dtype (bf16 by default),
so its log-probs of the sampled tokens differ from the trainer's. `mismatch_*` metrics
measure it per token; truncated importance sampling (TIS, `tis_cap` > 0) weights each
token's policy term by min(pi_trainer_old / pi_rollout, C) to correct the off-policy
sampling it causes.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from fleming_jax.train.logprobs import token_logprobs

AGGREGATIONS = ("sequence_mean", "token_mean", "sequence_sum")


ADVANTAGES = ("std", "std_population", "mean")


def group_advantages(rewards: jax.Array, mode: str = "std", eps: float = 1e-4) -> jax.Array:
    """[prompts, group] rewards -> advantages: r - mean (mode "mean", as the paper writes
    it and Dr.GRPO recommends, TRL's scale_rewards="none") or (r - mean) / (std + eps) with
    the *sample* std, ddof=1 (mode "std", GRPO as TRL's scale_rewards="group" and verl
    compute it), or with the population std, ddof=0 (mode "std_population": sqrt(G/(G-1))
    larger advantages, 1.069x at G=8; what this project did before)."""
    centred = rewards - rewards.mean(axis=-1, keepdims=True)
    if mode == "mean":
        return centred
    if mode in ("std", "std_population"):
        ddof = 1 if mode == "std" else 0
        return centred / (jnp.std(rewards, axis=-1, keepdims=True, ddof=ddof) + eps)
    raise ValueError(f"rl.grpo.advantage={mode!r}; choose one of {ADVANTAGES}")


MISMATCH_RANGE = 2.0  # a token's trainer/rollout probability ratio outside [1/2, 2] counts as far


def mismatch_terms(trainer_logp, rollout_logp, tis_cap: float = 0.0):
    """Per-token maps of how far the rollout's log-probs are from the trainer's (same tokens,
    same weights, the rollout's layout and dtype), and the TIS weights min(ratio, tis_cap)
    (ones when tis_cap is 0)."""
    diff = jax.lax.stop_gradient(trainer_logp - rollout_logp)
    far = jnp.abs(diff) > jnp.log(max(tis_cap, MISMATCH_RANGE))
    # k3 estimate of KL(rollout || trainer) from the rollout's samples: r - 1 - log r, r = pi_t / pi_r
    metrics = dict(mismatch_abs=jnp.abs(diff), mismatch_k3=jnp.exp(diff) - 1 - diff,
                   mismatch_far=far.astype(jnp.float32))
    weights = jnp.minimum(jnp.exp(diff), tis_cap) if tis_cap else jnp.ones_like(diff)
    return metrics, weights


IMPORTANCE_LEVELS = ("token", "sequence")


def sequence_mean(values: jax.Array, mask: jax.Array, sequence_ids: jax.Array | None = None) -> jax.Array:
    """Each token's sequence's mean of `values` over its masked tokens, at every token [B, T].
    `sequence_ids` [B, T] tell a row's sequences apart (packed rows hold several); None: a
    row is one sequence."""
    mask = mask.astype(values.dtype)
    if sequence_ids is None:
        return ((values * mask).sum(-1, keepdims=True) / jnp.maximum(mask.sum(-1, keepdims=True), 1.0)
                * jnp.ones_like(values))
    rows, width = values.shape
    ids = (jnp.arange(rows)[:, None] * (width + 1) + sequence_ids).reshape(-1)  # unique over the batch
    n = rows * (width + 1)
    sums = jax.ops.segment_sum((values * mask).reshape(-1), ids, n)
    counts = jax.ops.segment_sum(mask.reshape(-1), ids, n)
    return (sums / jnp.maximum(counts, 1.0))[ids].reshape(rows, width)


def token_terms(logp, old_logp, advantages, cfg, ref_logp=None, entropy=None, tis_weights=None, mask=None,
                sequence_ids=None):
    """Per-token loss [B, T] and per-token metric maps, for completion tokens of B sequences.

    advantages: [B] (one per row, broadcast over its tokens) or [B, T] (per token: packed
    rows hold several sequences); tis_weights [B, T] multiply the policy term (not the KL
    or entropy terms). GSPO (`cfg.importance_sampling_level` "sequence") needs the `mask`
    and, in packed rows, `sequence_ids` (see `sequence_mean`).
    """
    adv = advantages[:, None] if advantages.ndim == 1 else advantages
    level = cfg.importance_sampling_level
    if level not in IMPORTANCE_LEVELS:
        raise ValueError(f"rl.grpo.importance_sampling_level={level!r}; choose one of {IMPORTANCE_LEVELS}")
    log_ratio = logp - old_logp
    low, high = (cfg.eps_low, cfg.eps_high) if level == "token" else (cfg.seq_eps_low, cfg.seq_eps_high)
    if level == "sequence":
        log_ratio = sequence_mean(log_ratio, jnp.ones_like(logp) if mask is None else mask, sequence_ids)
    ratio = jnp.exp(log_ratio)
    metrics = {}
    if cfg.loss_mode == "paper":
        loss = -adv * logp
    elif cfg.loss_mode == "clipped":
        clipped = jnp.clip(ratio, 1 - low, 1 + high)
        loss = -jnp.minimum(ratio * adv, clipped * adv)
        metrics["clip_low"] = ((ratio < 1 - low) & (adv < 0)).astype(jnp.float32)
        metrics["clip_high"] = ((ratio > 1 + high) & (adv > 0)).astype(jnp.float32)
    else:
        raise ValueError(f"loss_mode {cfg.loss_mode!r}; choose 'paper' or 'clipped'")
    if tis_weights is not None:
        loss = loss * tis_weights
    if cfg.loss_mode == "clipped":
        if cfg.beta:
            log_ref_ratio = ref_logp - logp
            kl = jnp.exp(log_ref_ratio) - log_ref_ratio - 1  # k3: unbiased, always >= 0
            loss = loss + cfg.beta * kl
            metrics["kl_ref"] = kl
    if cfg.entropy_coef and entropy is not None:
        loss = loss - cfg.entropy_coef * entropy
    # k3 estimate of KL(pi_old || pi): how far the update has moved from the rollout policy
    metrics["approx_kl"] = jnp.exp(logp - old_logp) - (logp - old_logp) - 1
    if entropy is not None:
        metrics["entropy"] = entropy
    return loss, metrics


def aggregate(per_token: jax.Array, mask: jax.Array, mode: str, normalizer: float = 1.0, share=None):
    """(numerator, denominator) of the batch loss over masked tokens.

    sequence_mean: mean over sequences of each sequence's token mean (GRPO);
    token_mean: mean over all tokens of the batch (DAPO);
    sequence_sum: each sequence's token sum / `normalizer`, mean over sequences
    (normalizer 1 is the paper's sum of log-probs; the max completion length is Dr.GRPO).
    `share` [B, T]: each token's 1 / (its sequence's token count), so a sequence's shares
    sum to 1 wherever its tokens sit (packed rows hold several); without it each row with a
    masked token is one sequence.
    """
    mask = mask.astype(per_token.dtype)
    if share is None:
        share = mask / jnp.maximum(mask.sum(axis=-1, keepdims=True), 1.0)
    share = share.astype(per_token.dtype) * mask
    n_seq = share.sum()  # sequences with a token (padding has none)
    sums = (per_token * mask).sum(axis=-1)  # row sums first: the same order in any row width
    if mode == "sequence_mean":
        return (per_token * share).sum(axis=-1).sum(), n_seq
    if mode == "token_mean":
        return sums.sum(), mask.sum()
    if mode == "sequence_sum":
        return sums.sum() / normalizer, n_seq
    raise ValueError(f"aggregation {mode!r}; choose one of {AGGREGATIONS}")


def grpo_loss(model, batch, cfg, chunk_size: int = 256, tis_cap: float = 0.0):
    """The loss the train step differentiates: (numerator, denominator, metric sums).

    batch: tokens/segments [B, T] (segment ids: one sequence per row, or several packed, see
    `train.packing`, with its positions, prefixes and sources when it has them) and per-token
    arrays [B, K] over the scored positions: completion_mask,
    old_logprobs (and ref_logprobs when cfg.beta > 0), advantages ([B, K], or [B] with one
    sequence per row), token_share (optional, see `aggregate`). `targets` [B, K] are the
    positions scored; without it they are the last K (a completion window; K = T is the
    whole sequence). Only scored positions are unembedded. With `rollout_logprobs` in the
    batch, old_logprobs are the trainer's own (recomputed before the update) and the
    mismatch is old vs rollout; without, old_logprobs are the rollout's and the mismatch is
    measured against the current policy (exact at an update's first optimizer step, where
    the trainer has not moved yet).
    """
    want_entropy = bool(cfg.entropy_coef) or cfg.log_entropy
    mask = batch["completion_mask"]
    out = token_logprobs(model, batch["tokens"], batch["segments"], batch.get("positions"), chunk_size=chunk_size,
                         with_entropy=want_entropy, last=mask.shape[1], at=batch.get("targets"),
                         sources=batch.get("sources"), prefixes=batch.get("prefixes"),
                         dropout_key=batch.get("dropout_key"))
    logp, entropy = out if want_entropy else (out, None)
    old = batch["old_logprobs"]
    trainer_old, rollout = (old, batch["rollout_logprobs"]) if "rollout_logprobs" in batch else (logp, old)
    mismatch, weights = mismatch_terms(trainer_old, rollout, tis_cap)
    sequence_ids = None
    if cfg.importance_sampling_level == "sequence":  # each scored token's sequence: its segment id
        at, segments = batch.get("targets"), batch["segments"]
        sequence_ids = segments[:, -mask.shape[1]:] if at is None else jnp.take_along_axis(segments, at, axis=1)
    loss, token_metrics = token_terms(logp, old, batch["advantages"], cfg, batch.get("ref_logprobs"), entropy,
                                      weights if tis_cap else None, mask, sequence_ids)
    token_metrics |= mismatch
    num, den = aggregate(loss, mask, cfg.aggregation, cfg.loss_normalizer, batch.get("token_share"))
    tokens = jnp.maximum(mask.sum(), 1.0)
    # Token means per microbatch; the train step averages them over microbatches.
    metrics = {k: (jax.lax.stop_gradient(v) * mask).sum() / tokens for k, v in token_metrics.items()}
    metrics["mismatch_max"] = (mismatch["mismatch_abs"] * mask).max()  # per microbatch (mean over them)
    return num, den, metrics

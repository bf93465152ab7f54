"""Supervised fine-tuning: the loss on assistant tokens (the trainer loop comes with the
cold-start issue)."""

from __future__ import annotations

from fleming_jax.train.logprobs import token_logprobs


def sft_loss(model, batch, chunk_size: int = 256):
    """Cross-entropy summed over tokens whose `loss_weights` are set, and that weight sum.

    batch: `tokens` [B, T], `segments` [B, T] (0 = padding, k = k-th packed example),
    `loss_weights` [B, T] (1 on assistant tokens, aligned with the token being predicted).
    """
    logprobs = token_logprobs(model, batch["tokens"], batch["segments"], chunk_size=chunk_size)
    weights = batch["loss_weights"].astype(logprobs.dtype)
    return -(logprobs * weights).sum(), weights.sum(), {}

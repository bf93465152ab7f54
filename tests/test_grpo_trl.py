"""Our GRPO advantages and loss against TRL 1.16's GRPOTrainer code itself (value and
gradient, fp32, random inputs).

TRL's loss lives in the method `GRPOTrainer._compute_loss`: it runs here on a minimal
stand-in for the trainer whose log-prob function returns our random log-probs (a leaf
tensor, so autograd gives d loss / d logp). TRL's group advantages are a block inside the
400-line `_generate_and_score_completions`: the test runs that block's own source lines
(read from the installed TRL) on random rewards.
"""

import collections
import inspect
import textwrap
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
trl_grpo = pytest.importorskip("trl.trainer.grpo_trainer")
from trl.trainer.utils import nanstd  # noqa: E402

from fleming_jax.train import grpo  # noqa: E402
from tests.test_grpo import cfg  # noqa: E402

B, T, G = 8, 12, 4  # rows (2 groups of G), completion window


def trl_advantages(rewards: np.ndarray, scale_rewards: str) -> np.ndarray:
    source = inspect.getsource(trl_grpo.GRPOTrainer._generate_and_score_completions)
    lines = source.splitlines()
    start = next(i for i, line in enumerate(lines) if "mean_grouped_rewards = torch.nanmean(" in line)
    end = next(i for i, line in enumerate(lines) if "advantages = advantages / (std_rewards + 1e-4)" in line)
    block = textwrap.dedent("\n".join(lines[start:end + 1]))
    scope = dict(torch=torch, nanstd=nanstd, rewards=torch.tensor(rewards.reshape(-1), dtype=torch.float32),
                 num_generations=G, device="cpu", self=types.SimpleNamespace(scale_rewards=scale_rewards))
    exec(block, scope)  # TRL's own lines
    return scope["advantages"].numpy().reshape(rewards.shape)


@pytest.mark.parametrize("scale_rewards,mode", [("group", "std"), ("none", "mean")])
def test_advantages_equal_trl(scale_rewards, mode):
    rng = np.random.default_rng(0)
    rewards = np.concatenate([rng.normal(size=(3, G)), rng.integers(0, 2, (3, G)), np.ones((1, G))]).astype(np.float32)
    ours = np.asarray(grpo.group_advantages(jnp.asarray(rewards), mode))
    np.testing.assert_allclose(ours, trl_advantages(rewards, scale_rewards), atol=1e-5)


def trl_loss(loss_type: str, beta: float, logp, old, ref, adv, mask, level="token", eps=(0.2, 0.28)):
    """TRL's `_compute_loss` on a stand-in trainer (importance sampling `level`, clip range
    `eps`); (loss, d loss / d logp)."""
    leaf = torch.tensor(logp, requires_grad=True)
    accelerator = types.SimpleNamespace(num_processes=1, sync_gradients=True, gather=lambda x: x,
                                        reduce=lambda x, reduction="sum": x)
    trainer = types.SimpleNamespace(
        _get_per_token_logps_and_entropies=lambda *a, **k: (leaf, torch.zeros_like(leaf), None),
        top_entropy_quantile=1.0, off_policy_mask_threshold=None, importance_sampling_level=level,
        beta=beta, loss_type=loss_type, epsilon_low=eps[0], epsilon_high=eps[1], use_vllm=False,
        args=types.SimpleNamespace(use_bias_correction_kl=False, delta=None, steps_per_generation=1),
        model=types.SimpleNamespace(training=True), current_gradient_accumulation_steps=1,
        max_completion_length=T, accelerator=accelerator, aux_loss_enabled=False, _entropy_bonus_enabled=False,
        _metrics=collections.defaultdict(lambda: collections.defaultdict(list)))
    m = torch.tensor(mask)
    inputs = dict(prompt_ids=torch.zeros((B, 3), dtype=torch.long), prompt_mask=torch.ones((B, 3), dtype=torch.long),
                  completion_ids=torch.zeros((B, T), dtype=torch.long), completion_mask=m,
                  advantages=torch.tensor(adv), old_per_token_logps=torch.tensor(old),
                  ref_per_token_logps=torch.tensor(ref), num_items_in_batch=m.sum())
    loss = trl_grpo.GRPOTrainer._compute_loss(trainer, None, inputs)
    loss.backward()
    return float(loss.detach()), leaf.grad.numpy()


# TRL loss type -> our aggregation and loss normaliser
LOSS_TYPES = {"grpo": ("sequence_mean", 1.0), "dapo": ("token_mean", 1.0), "dr_grpo": ("sequence_sum", float(T))}


@pytest.mark.parametrize("level", ["token", "sequence"])
@pytest.mark.parametrize("beta", [0.0, 0.04])
@pytest.mark.parametrize("loss_type", sorted(LOSS_TYPES))
def test_loss_and_gradient_equal_trl(loss_type, beta, level):
    """GRPO's token ratio and GSPO's sequence ratio (`importance_sampling_level`), each with
    ratios on both sides of its clip range (GSPO's own, 3e-4 / 4e-4)."""
    rng = np.random.default_rng(1)
    old = np.log(rng.uniform(0.05, 0.95, (B, T))).astype(np.float32)
    noise = 0.3 if level == "token" else 1e-3  # GSPO: a sequence's mean log-ratio near its small range
    logp = (old + rng.normal(0, noise, (B, T))).astype(np.float32)
    ref = (old + rng.normal(0, 0.3, (B, T))).astype(np.float32)
    lengths = rng.integers(1, T + 1, B)
    mask = (np.arange(T)[None] < lengths[:, None]).astype(np.float32)
    adv = np.asarray(grpo.group_advantages(jnp.asarray(rng.normal(size=(B // G, G)), jnp.float32))).reshape(-1)
    c = cfg(beta=beta, importance_sampling_level=level)
    eps = (c.eps_low, c.eps_high) if level == "token" else (c.seq_eps_low, c.seq_eps_high)
    expected, expected_grad = trl_loss(loss_type, beta, logp, old, ref, adv, mask, level, eps)
    aggregation, normalizer = LOSS_TYPES[loss_type]
    c.update(aggregation=aggregation, loss_normalizer=normalizer)
    if level == "sequence":  # some sequences clipped, some not, both directions
        mean = (np.log(np.exp(logp - old)) * mask).sum(1) / mask.sum(1)
        clipped = (mean < -eps[0]) & (adv < 0) | (mean > eps[1]) & (adv > 0)
        assert 0 < clipped.sum() < B, mean

    def ours(lp):
        per_token, _ = grpo.token_terms(lp, jnp.asarray(old), jnp.asarray(adv), c, jnp.asarray(ref),
                                        mask=jnp.asarray(mask))
        num, den = grpo.aggregate(per_token, jnp.asarray(mask), aggregation, normalizer)
        return num / den
    value, grad = jax.value_and_grad(ours)(jnp.asarray(logp))
    assert abs(float(value) - expected) < 1e-5, (float(value), expected)
    np.testing.assert_allclose(np.asarray(grad), expected_grad, atol=1e-5)
    assert np.abs(expected_grad).max() > 1e-3  # the comparison is not between zeros

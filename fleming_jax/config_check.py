"""The config checked at task start: ranges and divisibility, each error naming its key.

Unknown keys are refused by the locked `ConfigDict` itself (`--config.rl.group_sise=4`
fails on the command line). A rule applies where its keys exist, so one table serves
every task. Needs no JAX: a bad value fails in a second, not after the model is built.
"""

from __future__ import annotations

_POSITIVE = "must be > 0"
_AT_LEAST_1 = "must be >= 1"

# key -> (test, what it must be). Values are read with `config[key]` after the path walk.
RULES = {
    "optimizer.learning_rate": (lambda v: v > 0, _POSITIVE + " (a negative rate climbs the loss)"),
    "optimizer.warmup_steps": (lambda v: v >= 0, "must be >= 0"),
    "optimizer.total_steps": (lambda v: v >= 1, _AT_LEAST_1),
    "optimizer.max_grad_norm": (lambda v: v >= 0, "must be >= 0 (0 disables clipping)"),
    "optimizer.weight_decay": (lambda v: v >= 0, "must be >= 0"),
    "optimizer.b1": (lambda v: 0 <= v < 1, "must be in [0, 1)"),
    "optimizer.b2": (lambda v: 0 <= v < 1, "must be in [0, 1)"),
    "optimizer.final_lr_fraction": (lambda v: 0 <= v <= 1, "must be in [0, 1]"),
    "checkpoint.every": (lambda v: v >= 1, _AT_LEAST_1 + " (steps between checkpoints)"),
    "checkpoint.keep": (lambda v: v >= 1, _AT_LEAST_1),
    "train.seq_len": (lambda v: v >= 2, "must be >= 2"),
    "train.batch_size": (lambda v: v >= 1, _AT_LEAST_1),
    "train.grad_accum_steps": (lambda v: v >= 1, _AT_LEAST_1),
    "train.log_every": (lambda v: v >= 1, _AT_LEAST_1),
    "train.eval_every": (lambda v: v >= 1, _AT_LEAST_1),
    "rl.stage": (lambda v: v in (1, 2), "must be 1 or 2"),
    "rl.steps": (lambda v: v >= 1, _AT_LEAST_1),
    "rl.prompts_per_step": (lambda v: v >= 1, _AT_LEAST_1),
    "rl.group_size": (lambda v: v >= 2, "must be >= 2 (GRPO's advantage compares completions within a group; "
                                        "with one, every advantage is 0 and nothing is learned)"),
    "rl.temperature": (lambda v: v > 0, _POSITIVE + " (GRPO needs varied samples)"),
    "rl.top_p": (lambda v: 0 < v <= 1, "must be in (0, 1]"),
    "rl.max_new_tokens": (lambda v: v >= 1, _AT_LEAST_1),
    "rl.mu": (lambda v: v >= 1, _AT_LEAST_1),
    "rl.minibatches": (lambda v: v >= 1, _AT_LEAST_1),
    "rl.grad_accum_steps": (lambda v: v >= 1, _AT_LEAST_1),
    "rl.max_refills": (lambda v: v >= 0, "must be >= 0"),
    "rl.eval_every": (lambda v: v >= 1, _AT_LEAST_1),
    "rl.max_pool": (lambda v: v >= 0, "must be >= 0 (0: all)"),
    "rl.grade_k": (lambda v: v >= 0, "must be >= 0"),
    "rl.score_k": (lambda v: v >= 0, "must be >= 0"),
    "rl.sparsity_threshold": (lambda v: 0 <= v <= 1, "must be in [0, 1]"),
    "rl.sparsity_patience": (lambda v: v >= 1, _AT_LEAST_1),
    "rl.pack_length": (lambda v: v in (-1, 0) or (v >= 16 and v & (v - 1) == 0),
                       "must be -1 (pack rows of the power of two that holds the longest sequence), 0 (one "
                       "sequence per row) or a power of two >= 16 (the row length)"),
    "rl.max_staleness": (lambda v: v >= 0, "must be >= 0 (0: the synchronous run)"),
    "rollout.devices": (lambda v: v >= 0, "must be >= 0 (0: rollouts and training share the devices)"),
    "rl.tis_cap": (lambda v: v == 0 or v >= 1, "must be 0 (off) or >= 1 (the largest importance weight, e.g. 2)"),
    "rl.grpo.eps_low": (lambda v: v >= 0, "must be >= 0"),
    "rl.grpo.eps_high": (lambda v: v >= 0, "must be >= 0"),
    "rl.grpo.seq_eps_low": (lambda v: v >= 0, "must be >= 0"),
    "rl.grpo.seq_eps_high": (lambda v: v >= 0, "must be >= 0"),
    "rl.grpo.importance_sampling_level": (lambda v: v in ("token", "sequence"),
                                          "must be 'token' (GRPO's ratio per token) or 'sequence' (GSPO)"),
    "rl.grpo.beta": (lambda v: v >= 0, "must be >= 0"),
    "rl.grpo.loss_normalizer": (lambda v: v > 0, _POSITIVE),
    "eval.samples": (lambda v: v >= 1, _AT_LEAST_1),
    "eval.temperature": (lambda v: v >= 0, "must be >= 0 (0: greedy)"),
    "eval.top_p": (lambda v: 0 < v <= 1, "must be in (0, 1]"),
    "eval.max_new_tokens": (lambda v: v >= 1, _AT_LEAST_1),
    "eval.batch_size": (lambda v: v >= 1, _AT_LEAST_1),
    "eval.limit": (lambda v: v >= 0, "must be >= 0 (0: all)"),
    "model.max_position_embeddings": (lambda v: v >= 1, _AT_LEAST_1),
    "model.vocab_size": (lambda v: v >= 1, _AT_LEAST_1),
}


def _get(config, key: str):
    node = config
    for part in key.split("."):
        if not hasattr(node, "keys") or part not in node.keys():
            return None
        node = node[part]
    return node


def check(config) -> None:
    """Raises ValueError naming the first key whose value is out of range, or the keys whose
    values do not divide as they must."""
    for key, (ok, what) in RULES.items():
        value = _get(config, key)
        if value is None:
            continue
        try:
            good = ok(value)
        except TypeError:
            good = False
        if not good:
            raise ValueError(f"config.{key}={value!r}: {what}")
    t = _get(config, "train")
    if t is not None and "grad_accum_steps" in t and t.batch_size % t.grad_accum_steps:
        raise ValueError(f"config.train.batch_size={t.batch_size} is not divisible by "
                         f"config.train.grad_accum_steps={t.grad_accum_steps}")
    rl, positions = _get(config, "rl"), _get(config, "model.max_position_embeddings")
    if rl is not None and positions is not None and not _get(config, "model.hf_path") and rl.max_new_tokens >= positions:
        raise ValueError(f"config.rl.max_new_tokens={rl.max_new_tokens} leaves no room for a prompt in "
                         f"config.model.max_position_embeddings={positions}")
    mix = _get(config, "rl.stage1_mix")
    if mix is not None and (any(w < 0 for w in mix.values()) or not sum(mix.values()) > 0):
        raise ValueError(f"config.rl.stage1_mix={dict(mix)}: weights must be >= 0 with a positive sum")

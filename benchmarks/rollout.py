"""A GRPO-sized rollout with long-tailed reply lengths: our engine with RL's own default
settings (`configs.models.rollout()`: slots and KV pages sized by the engine itself) vs
`transformers.generate` with 64 rows in flight, same model, same CPU.

The ~100M-parameter Qwen2-shaped model has random weights (the same on both sides), and a
reply ends at any of `vocab / (budget / 4)` fixed stop tokens: a random model's next-token
distribution is nearly uniform, so each step stops with probability ~4 / budget and reply
lengths are geometric with a mean of about a quarter of the budget, capped at the budget, as
RL replies are long-tailed. (Raising one end-of-sequence logit instead, calibrated on the
model's hidden states, gave lengths that depend on the position: a 128-token target came out
at a mean of 425-441 with 75-79% of replies at the budget.) transformers decodes 8 prompts x G rows at a time until the
longest row stops; the engine refills a slot and its pages as soon as its sequence stops.
Counted: useful tokens (up to and including the stop token) per second, and each side's peak
KV-cache bytes (ours: the page pool it allocates; also the most of it sequences used at once).

python benchmarks/rollout.py [--prompts 32] [--samples 8] [--budget 512] [--peer-rows 64]
"""

import argparse
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402

from configs import models  # noqa: E402
from fleming_jax import engine, sampler  # noqa: E402
from fleming_jax.models import hf  # noqa: E402

SHAPE = dict(vocab_size=32768, hidden_size=768, intermediate_size=2048, num_hidden_layers=12,
             num_attention_heads=12, num_key_value_heads=2, tie_word_embeddings=False,
             max_position_embeddings=4096)


def long_tail_stops(vocab: int, budget: int, rng: np.random.Generator) -> list[int]:
    """`vocab x 4 / budget` random token ids (never 0-2): with a random model's nearly uniform
    next-token distribution, a reply stops at each step with probability ~4 / budget, so lengths
    are geometric with a mean of about a quarter of the budget, capped at the budget."""
    return sorted(map(int, rng.choice(np.arange(3, vocab), vocab * 4 // budget, replace=False)))


def useful_lengths(tokens: np.ndarray, budget: int, stop: list[int]) -> np.ndarray:
    """Tokens up to and including the first stop token (the whole budget when none)."""
    hit = np.isin(tokens, stop)
    return np.where(hit.any(-1), hit.argmax(-1) + 1, budget)


def kv_bytes(rows: int, length: int) -> int:
    head_dim = SHAPE["hidden_size"] // SHAPE["num_attention_heads"]
    return 2 * SHAPE["num_hidden_layers"] * rows * length * SHAPE["num_key_value_heads"] * head_dim * 4


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--prompts", type=int, default=32)
    parser.add_argument("--samples", type=int, default=8)
    parser.add_argument("--budget", type=int, default=512)
    parser.add_argument("--peer-rows", type=int, default=64)
    parser.add_argument("--prompt", type=int, default=64)
    args = parser.parse_args()
    torch.manual_seed(0)
    reference = transformers.Qwen2ForCausalLM(transformers.Qwen2Config(**SHAPE)).eval()
    rng = np.random.default_rng(0)
    prompts = [list(map(int, rng.integers(3, SHAPE["vocab_size"], rng.integers(args.prompt // 2, args.prompt + 1))))
               for _ in range(args.prompts)]
    stop = long_tail_stops(SHAPE["vocab_size"], args.budget, rng)
    with tempfile.TemporaryDirectory() as path:
        reference.save_pretrained(path)
        model, _ = hf.load(path)
    params = sampler.SamplingParams(temperature=1.0, num_samples=args.samples, max_new_tokens=args.budget)
    per_batch = max(1, args.peer_rows // args.samples)  # prompts whose rows the peer decodes at once

    rollout = engine.from_config(models.rollout())  # RL's defaults
    rollout.sync(model)
    rollout.generate(prompts[:per_batch + 1], jax.random.key(0), params, stop)  # compile
    start = time.perf_counter()
    out = rollout.generate(prompts, jax.random.key(1), params, stop)
    ours = time.perf_counter() - start
    ours_tokens = int(out.lengths.sum())
    stats = rollout.stats
    ours_cache = stats["kv_pool_gib"] * 2**30

    peer_tokens, peer_cache = 0, 0
    with torch.no_grad():
        reference.generate(torch.tensor([prompts[0][:8]]), max_new_tokens=4, pad_token_id=0)  # warm-up
        start = time.perf_counter()
        for i in range(0, len(prompts), per_batch):
            batch = prompts[i:i + per_batch]
            width = max(map(len, batch))
            ids = torch.zeros((len(batch), width), dtype=torch.long)
            mask = torch.zeros_like(ids)
            for r, p in enumerate(batch):
                ids[r, width - len(p):], mask[r, width - len(p):] = torch.tensor(p), 1
            gen = reference.generate(ids.repeat_interleave(args.samples, 0), attention_mask=mask.repeat_interleave(
                args.samples, 0), do_sample=True, temperature=1.0, top_k=0, max_new_tokens=args.budget,
                eos_token_id=stop, pad_token_id=0)[:, width:].numpy()
            peer_tokens += int(useful_lengths(gen, args.budget, stop).sum())
            peer_cache = max(peer_cache, kv_bytes(len(gen), width + gen.shape[1]))
        peer = time.perf_counter() - start

    lengths = out.lengths.ravel()
    print(f"{sum(p.numel() for p in reference.parameters()) / 1e6:.0f}M-param Qwen2 shape, {args.prompts} prompts "
          f"x G={args.samples}, budget {args.budget}, torch threads {torch.get_num_threads()}")
    print(f"ours (RL defaults): {stats['slots']} sequences in flight, {stats['admitted_late']} admitted after the "
          f"first chunk, {stats['evicted']} evicted, {stats['drain_chunks']} of {stats['chunks']} chunks on fewer rows, "
          f"KV pages used at most {stats['kv_peak_gib'] * 1024:.0f} MiB of the "
          f"{stats['kv_pool_gib'] * 1024:.0f} MiB pool; transformers: {per_batch * args.samples} rows at a time")
    print(f"reply lengths (ours): mean {lengths.mean():.0f}, median {np.median(lengths):.0f}, "
          f"max {lengths.max()}, at budget {np.mean(lengths == args.budget):.0%}")
    print(f"{'rollout':<34}{'seconds':>9}{'useful tokens':>15}{'tokens/s':>10}{'peak KV MiB':>13}")
    for name, seconds, tokens, cache in (
            ("fleming_jax engine (continuous)", ours, ours_tokens, ours_cache),
            ("transformers.generate", peer, peer_tokens, peer_cache)):
        print(f"{name:<34}{seconds:>9.2f}{tokens:>15}{tokens / seconds:>10.1f}{cache / 2**20:>13.0f}")
    print(f"ratio={(ours_tokens / ours) / (peer_tokens / peer):.2f}")


if __name__ == "__main__":
    main()

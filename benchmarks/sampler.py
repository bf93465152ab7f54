"""Generated tokens/s at equal lengths: our rollout engine vs `transformers.generate`, same
model, same CPU.

A ~100M-parameter Qwen2-shaped model with random weights, batch 16 prompts x 4 samples,
128 new tokens (no early stop), greedy for transformers and sampling for ours (the same
work per token). Each side gets one warm-up call; the timed call follows. Where continuous
batching cannot help (every row runs to the budget) this is the engine's floor; long-tailed
lengths: benchmarks/rollout.py.

python benchmarks/sampler.py [--new_tokens 128] [--batch 16] [--samples 4]
python benchmarks/sampler.py --batch 1 --samples 1   # latency-bound: per-step overhead dominates

Also prints each side's model FLOP/s against a large matmul's on the same machine: at 64
rows both sides are bound by the weight matmuls, which no decode loop can remove.
"""

import argparse
import functools
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

from fleming_jax import engine, sampler  # noqa: E402
from fleming_jax.models import hf  # noqa: E402

SHAPE = dict(vocab_size=32768, hidden_size=768, intermediate_size=2048, num_hidden_layers=12,
             num_attention_heads=12, num_key_value_heads=2, tie_word_embeddings=True,
             max_position_embeddings=1024)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--new_tokens", type=int, default=128)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--samples", type=int, default=4)
    parser.add_argument("--prompt", type=int, default=64)
    args = parser.parse_args()
    torch.manual_seed(0)
    reference = transformers.Qwen2ForCausalLM(transformers.Qwen2Config(**SHAPE)).eval()
    n_params = sum(p.numel() for p in reference.parameters())
    rng = np.random.default_rng(0)
    prompts = [list(map(int, rng.integers(1, SHAPE["vocab_size"], args.prompt))) for _ in range(args.batch)]
    generated = args.batch * args.samples * args.new_tokens

    with tempfile.TemporaryDirectory() as path:
        reference.save_pretrained(path)
        model, _ = hf.load(path)
    params = sampler.SamplingParams(temperature=1.0, num_samples=args.samples, max_new_tokens=args.new_tokens)
    generate = functools.partial(engine.generate, model, prompts, params=params, slots=len(prompts) * args.samples)
    generate(key=jax.random.key(0))  # compile
    start = time.perf_counter()
    out = generate(key=jax.random.key(1))
    ours = time.perf_counter() - start
    assert out.lengths.min() == args.new_tokens

    ids = torch.tensor(prompts).repeat_interleave(args.samples, dim=0)
    kwargs = dict(do_sample=False, max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens,
                  pad_token_id=0, eos_token_id=None)
    with torch.no_grad():
        reference.generate(ids[:2], **dict(kwargs, max_new_tokens=4, min_new_tokens=4))  # warm-up
        start = time.perf_counter()
        reference.generate(ids, attention_mask=torch.ones_like(ids), **kwargs)
        peer = time.perf_counter() - start

    peak = matmul_peak()
    flops = 2 * n_params * generated  # one matmul pass over the weights per token; attention left out
    print(f"{n_params / 1e6:.0f}M-param Qwen2 shape, {args.batch} prompts x {args.samples} samples x "
          f"{args.new_tokens} new tokens, prompt {args.prompt}, {jax.devices()[0].device_kind}, "
          f"torch threads {torch.get_num_threads()}; fp32 matmul peak here {peak:.0f} GFLOP/s")
    print(f"{'sampler':<28}{'seconds':>9}{'tokens/s':>11}{'GFLOP/s':>9}{'of peak':>9}")
    for name, seconds in (("fleming_jax engine", ours), ("transformers.generate", peer)):
        rate = flops / seconds / 1e9
        print(f"{name:<28}{seconds:>9.2f}{generated / seconds:>11.1f}{rate:>9.0f}{rate / peak:>9.0%}")
    print(f"ratio={peer / ours:.2f}")


def matmul_peak(n: int = 2048, repeats: int = 5) -> float:
    """GFLOP/s of a large fp32 matmul under XLA on this machine: the ceiling for both sides."""
    a = jax.random.normal(jax.random.key(0), (n, n))
    f = jax.jit(lambda x: x @ x)
    f(a).block_until_ready()
    start = time.perf_counter()
    for _ in range(repeats):
        f(a).block_until_ready()
    return 2 * n ** 3 * repeats / (time.perf_counter() - start) / 1e9


if __name__ == "__main__":
    main()

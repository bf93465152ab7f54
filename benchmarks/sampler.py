"""Generated tokens/s at equal lengths: our rollout engine vs `transformers.generate`, same
model shape, same machine.

Default (CPU): a ~100M-parameter Qwen2-shaped model with random weights (the same on both
sides), batch 16 prompts x 4 samples, 128 new tokens (no early stop), greedy for transformers
and sampling for ours (the same work per token). Each side gets one warm-up call; the timed
call follows. Where continuous batching cannot help (every row runs to the budget) this is the
engine's floor; long-tailed lengths: benchmarks/rollout.py.

python benchmarks/sampler.py [--new_tokens 128] [--batch 16] [--samples 4]
python benchmarks/sampler.py --batch 1 --samples 1   # latency-bound: per-step overhead dominates

Prints each side's model FLOP/s against a large matmul's on the same machine: at 64 rows
both sides are bound by the weight matmuls, which no decode loop can remove.

On a GPU, a real preset's shape in bf16 (RL's rollout dtype), random weights made on the
device (each side its own: 15 GB through disk would cost more than the run), e.g.
JAX_PLATFORMS=cuda python benchmarks/sampler.py --preset qwen2.5-7b --batch 64 --samples 8 --prompt 256
Decode alone is timed too (a 1-token run's time taken off: the prefill), with the bytes
a decode step must read (the weights once, every row's KV so far) over its time against a
device-to-device copy's bandwidth measured in the same process: the share of HBM bandwidth.
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
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402

from configs import models as presets  # noqa: E402
from fleming_jax import engine, models, sampler  # noqa: E402
from fleming_jax.models import hf  # noqa: E402

SHAPE = dict(vocab_size=32768, hidden_size=768, intermediate_size=2048, num_hidden_layers=12,
             num_attention_heads=12, num_key_value_heads=2, tie_word_embeddings=True,
             max_position_embeddings=1024)


def build(preset: str):
    """(our model, the transformers reference, torch device, parameter count, bytes a decode
    step reads from the weights, KV bytes a token)."""
    if not preset:
        torch.manual_seed(0)
        reference = transformers.Qwen2ForCausalLM(transformers.Qwen2Config(**SHAPE)).eval()
        with tempfile.TemporaryDirectory() as path:
            reference.save_pretrained(path)
            model, config = hf.load(path)
        device, width = "cpu", 4
    else:
        config = models.config_from(presets.get(preset)).replace(param_dtype="bfloat16", compute_dtype="bfloat16")
        model = models.create_sharded(config, seed=0)
        device, width = ("cuda" if torch.cuda.is_available() else "cpu"), 2
        hf_config = transformers.AutoConfig.for_model(**config.to_hf())
        with torch.device(device):
            reference = transformers.AutoModelForCausalLM.from_config(hf_config, dtype=torch.bfloat16).eval()
    n_params = sum(p.numel() for p in reference.parameters())
    embedding = 0 if config.tie_embeddings else config.vocab_size * config.hidden_size  # a gather, not a read
    kv_token = 2 * config.num_layers * config.num_kv_heads * config.head_dim * width
    return model, reference, device, n_params, (n_params - embedding) * width, kv_token


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--new_tokens", type=int, default=128)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--samples", type=int, default=4)
    parser.add_argument("--prompt", type=int, default=64)
    parser.add_argument("--preset", default="", help="a configs/models.py preset's shape, bf16 (for a GPU)")
    args = parser.parse_args()
    model, reference, device, n_params, weight_bytes, kv_token = build(args.preset)
    vocab = model.config.vocab_size
    rng = np.random.default_rng(0)
    prompts = [list(map(int, rng.integers(1, vocab, args.prompt))) for _ in range(args.batch)]
    rows = args.batch * args.samples
    generated = rows * args.new_tokens

    def ours(new_tokens: int) -> float:
        params = sampler.SamplingParams(temperature=1.0, num_samples=args.samples, max_new_tokens=new_tokens)
        generate = functools.partial(engine.generate, model, prompts, params=params, slots=rows)
        generate(key=jax.random.key(0))  # compile
        start = time.perf_counter()
        out = generate(key=jax.random.key(1))
        assert out.lengths.min() == new_tokens
        return time.perf_counter() - start

    ids = torch.tensor(prompts, device=device).repeat_interleave(args.samples, dim=0)

    def peer(new_tokens: int) -> float:
        kwargs = dict(do_sample=False, max_new_tokens=new_tokens, min_new_tokens=new_tokens, pad_token_id=0,
                      eos_token_id=None)
        with torch.no_grad():
            reference.generate(ids[:2], **dict(kwargs, max_new_tokens=4, min_new_tokens=4))  # warm-up
            sync()
            start = time.perf_counter()
            reference.generate(ids, attention_mask=torch.ones_like(ids), **kwargs)
            sync()
            return time.perf_counter() - start

    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    times = {"fleming_jax engine": (ours(args.new_tokens), ours(1)),
             "transformers.generate": (peer(args.new_tokens), peer(1))}
    steps = args.new_tokens - 1  # decode steps after the prefill's token
    decode_bytes = steps * weight_bytes + rows * kv_token * sum(args.prompt + t for t in range(1, steps + 1))
    peak, copy = matmul_peak(), copy_bandwidth()
    flops = 2 * n_params * generated  # one matmul pass over the weights per token; attention left out
    print(f"{n_params / 1e6:.0f}M-param {args.preset or 'Qwen2'} shape, {args.batch} prompts x {args.samples} "
          f"samples x {args.new_tokens} new tokens, prompt {args.prompt}, {jax.devices()[0].device_kind}, "
          f"torch on {device} ({torch.get_num_threads()} threads); matmul peak here {peak:.0f} GFLOP/s, "
          f"device copy {copy:.0f} GB/s")
    print(f"{'sampler':<24}{'seconds':>9}{'tokens/s':>10}{'GFLOP/s':>9}{'of peak':>9}"
          f"{'decode tok/s':>14}{'decode GB/s':>13}{'of copy':>9}")
    for name, (seconds, first) in times.items():
        rate, decode = flops / seconds / 1e9, seconds - first
        bandwidth = decode_bytes / decode / 1e9
        print(f"{name:<24}{seconds:>9.2f}{generated / seconds:>10.1f}{rate:>9.0f}{rate / peak:>9.0%}"
              f"{rows * steps / decode:>14.1f}{bandwidth:>13.0f}{bandwidth / copy:>9.0%}")
    ratio = times["transformers.generate"][0] / times["fleming_jax engine"][0]
    print(f"ratio={ratio:.2f}")


def matmul_peak(n: int = 2048, repeats: int = 5) -> float:
    """GFLOP/s of a large matmul under XLA on this machine (bf16 on an accelerator): the
    ceiling for both sides."""
    n = n if jax.default_backend() == "cpu" else 8192
    a = jax.random.normal(jax.random.key(0), (n, n), jnp.float32 if jax.default_backend() == "cpu" else jnp.bfloat16)
    f = jax.jit(lambda x: x @ x)
    f(a).block_until_ready()
    start = time.perf_counter()
    for _ in range(repeats):
        f(a).block_until_ready()
    return 2 * n ** 3 * repeats / (time.perf_counter() - start) / 1e9


def copy_bandwidth(repeats: int = 5) -> float:
    """GB/s read + written by a device-to-device copy under XLA: the memory ceiling here."""
    x = jnp.ones(((1 if jax.default_backend() == "cpu" else 8) * 2**28,), jnp.float32)
    f = jax.jit(lambda v: v + 1)
    f(x).block_until_ready()
    start = time.perf_counter()
    for _ in range(repeats):
        f(x).block_until_ready()
    return 2 * x.nbytes * repeats / (time.perf_counter() - start) / 1e9


if __name__ == "__main__":
    main()

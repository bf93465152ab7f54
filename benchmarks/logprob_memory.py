"""Peak memory of the SFT loss + gradient with chunked vs unchunked log-probs.

A Qwen-sized vocabulary (151,936) on a long sequence: unchunked, the step holds
[batch, length, vocab] fp32 logits (and their gradient); chunked, only one chunk's.
Memory comes from XLA's compiled memory analysis of the jitted value_and_grad (what the
device would allocate), so it runs on any backend without allocating the arrays.

python benchmarks/logprob_memory.py [--length 4096]
"""

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from flax import nnx  # noqa: E402

from fleming_jax.models import decoder  # noqa: E402
from fleming_jax.train import sft  # noqa: E402


def peak_bytes(config, batch, length, chunk):
    graphdef, params = nnx.split(nnx.eval_shape(lambda: decoder.create(config)), nnx.Param)
    shape = (batch, length)
    data = dict(tokens=jax.ShapeDtypeStruct(shape, jnp.int32), segments=jax.ShapeDtypeStruct(shape, jnp.int32),
                loss_weights=jax.ShapeDtypeStruct(shape, jnp.float32))

    def loss(p, b):
        num, den, _ = sft.sft_loss(nnx.merge(graphdef, p), b, chunk_size=chunk)
        return num / den
    mem = jax.jit(jax.value_and_grad(loss)).lower(params, data).compile().memory_analysis()
    return mem.temp_size_in_bytes + mem.argument_size_in_bytes + mem.output_size_in_bytes


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--length", type=int, default=4096)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--chunk", type=int, default=256)
    args = parser.parse_args()
    config = decoder.DecoderConfig(vocab_size=151936, hidden_size=256, intermediate_size=512, num_layers=2,
                             num_heads=4, num_kv_heads=2, head_dim=64, tie_embeddings=True)
    unchunked = peak_bytes(config, args.batch, args.length, chunk=args.length)
    chunked = peak_bytes(config, args.batch, args.length, chunk=args.chunk)
    print(f"loss + grad, vocab {config.vocab_size}, batch {args.batch} x {args.length} tokens, "
          f"{jax.devices()[0].device_kind}")
    print(f"{'log-probs':<22}{'peak memory':>14}")
    print(f"{'unchunked (peer)':<22}{unchunked / 2**30:>10.2f} GiB")
    print(f"{f'chunks of {args.chunk} (ours)':<22}{chunked / 2**30:>10.2f} GiB")
    print(f"ratio={unchunked / chunked:.2f}")


if __name__ == "__main__":
    main()

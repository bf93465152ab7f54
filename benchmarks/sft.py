"""SFT train-step throughput: our jitted step vs a plain PyTorch/transformers step.

python benchmarks/sft.py [--preset tiny --batch 8 --seq 256 --steps 10]
python benchmarks/sft.py --preset 100m   # the ~100M Qwen2-shaped model of benchmarks/rollout.py
python benchmarks/sft.py --family llama  # the same shape as Llama 3 (no q/k/v biases), against LlamaForCausalLM

Same model (random init from the preset), same batch of tokens, AdamW, fp32, on this CPU.
MFU is against a measured fp32 matmul peak of this machine. Prints a table and, last,
`ratio=<ours/peer>` in tokens/s.
"""

import argparse
import os
import sys
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402


def matmul_peak(n=1024, reps=10) -> float:
    """fp32 FLOP/s of a jitted n x n matmul (the best of `reps`)."""
    a = jnp.ones((n, n), jnp.float32)
    f = jax.jit(lambda x: x @ x)
    f(a).block_until_ready()
    best = min(_timed(lambda: f(a).block_until_ready()) for _ in range(reps))
    return 2 * n ** 3 / best


def _timed(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def flops_per_step(cfg, params: int, tokens: int, seq: int) -> float:
    """6 x matmul params x tokens (forward + backward) + causal attention scores/values. An
    untied input embedding is a table lookup, not a matmul: it is not counted."""
    matmul_params = params - (0 if cfg.tie_embeddings else cfg.vocab_size * cfg.hidden_size)
    attention = 6 * cfg.num_layers * cfg.num_heads * cfg.head_dim * seq  # per token, fwd+bwd, causal half
    return 6 * matmul_params * tokens + attention * tokens


def ours(model_cfg, batch, steps):
    from configs import models as presets
    from fleming_jax import models
    from fleming_jax.train import sft, state

    model, _ = models.build(model_cfg)
    tx = state.make_optimizer(presets.optimizer(1e-4, 0, 1000))
    graphdef, ts = state.init_state(model, tx)
    step = state.make_train_step(graphdef, tx, sft.sft_loss)
    batch = {k: jnp.asarray(v) for k, v in batch.items()}
    ts, m = step(ts, batch)
    jax.block_until_ready(m)
    t = time.perf_counter()
    for _ in range(steps):
        ts, m = step(ts, batch)
    jax.block_until_ready(m)
    return (time.perf_counter() - t) / steps, float(m["loss"])


def peer(cfg, batch, steps):
    """`cfg`: our model config (a DecoderConfig); transformers builds the same architecture."""
    import torch
    import transformers

    torch.set_num_threads(os.cpu_count())
    hf = transformers.AutoConfig.for_model(**cfg.to_hf())
    model = transformers.AutoModelForCausalLM.from_config(hf, dtype=torch.float32).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.95), weight_decay=0.1)
    ids = torch.from_numpy(batch["tokens"]).long()

    def one():
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.item()
    one()
    t = time.perf_counter()
    for _ in range(steps):
        loss = one()
    return (time.perf_counter() - t) / steps, loss


def from_hf(hf_config: dict):
    """`config.model` for an HF config.json's contents."""
    import json
    import tempfile

    from configs import models as presets

    file = os.path.join(tempfile.mkdtemp(), "config.json")
    with open(file, "w") as f:
        json.dump(hf_config, f)
    return presets.get(file)


def hundred_million():
    """`config.model` of benchmarks/rollout.py's ~100M model (untied embeddings)."""
    from benchmarks.rollout import SHAPE

    return from_hf(dict(SHAPE, model_type="qwen2", rms_norm_eps=1e-6))


def as_family(model_cfg, family: str):
    """`model_cfg`'s shape as another family (an HF model_type: llama drops Qwen2's q/k/v biases)."""
    from fleming_jax.models import config_from

    hf = config_from(model_cfg).to_hf()
    return model_cfg if family == hf["model_type"] else from_hf(hf | {"model_type": family})


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--preset", default="tiny", help="a configs/models.py preset, or 100m")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--family", choices=("qwen2", "llama"), default=None,
                        help="the preset's shape built as this family (default: the preset's own)")
    args = parser.parse_args()
    from configs import models as presets
    from fleming_jax.models import config_from

    model_cfg = presets.get(args.preset) if args.preset != "100m" else hundred_million()
    model_cfg = as_family(model_cfg, args.family) if args.family else model_cfg
    cfg = config_from(model_cfg)
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, cfg.vocab_size, (args.batch, args.seq)).astype(np.int32)
    batch = {"tokens": tokens, "segments": np.ones_like(tokens),
             "loss_weights": np.pad(np.ones((args.batch, args.seq - 1), np.float32), ((0, 0), (1, 0)))}
    n_tokens = args.batch * args.seq
    from fleming_jax import models
    params = sum(x.size for x in jax.tree.leaves(jax.eval_shape(
        lambda: __import__("flax").nnx.state(models.decoder.create(cfg)))))
    flops = flops_per_step(cfg, params, n_tokens, args.seq)
    peak = matmul_peak()
    rows = [("fleming-jax (jit, AdamW)", *ours(model_cfg, batch, args.steps)),
            ("torch + transformers (eager, AdamW)", *peer(cfg, batch, args.steps))]
    print(f"model {args.preset} as {cfg.model_type} ({params / 1e6:.2f}M params), batch {args.batch} x {args.seq} tokens, "
          f"{os.cpu_count()} CPU cores, fp32 matmul peak {peak / 1e9:.1f} GFLOP/s")
    print(f"| {'implementation':<36} | step (s) | tokens/s | MFU | loss |")
    print(f"|{'-' * 38}|----------|----------|-----|------|")
    for name, seconds, loss in rows:
        print(f"| {name:<36} | {seconds:8.3f} | {n_tokens / seconds:8.0f} | "
              f"{flops / seconds / peak:4.0%} | {loss:.3f} |")
    print(f"ratio={rows[1][1] / rows[0][1]:.2f}")


if __name__ == "__main__":
    main()

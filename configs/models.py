"""Model presets: the tiny test/demo model and the real Qwen shapes.

Numbers come from each model's published `config.json`. `get(name)` also accepts a path
to any HF `config.json` (or the directory holding it).
"""

import json
import os

import ml_collections

_QWEN25 = dict(model_type="qwen2", qkv_bias=True, qk_norm=False, rope_theta=1_000_000.0,
               rms_norm_eps=1e-6, vocab_size=151936, max_position_embeddings=32768)
_QWEN3 = dict(model_type="qwen3", qkv_bias=False, qk_norm=True, rope_theta=1_000_000.0,
              rms_norm_eps=1e-6, vocab_size=151936, head_dim=128, max_position_embeddings=40960)


def _shape(layers, hidden, heads, kv_heads, mlp, tie, head_dim=None):
    return dict(num_layers=layers, hidden_size=hidden, num_heads=heads, num_kv_heads=kv_heads,
                intermediate_size=mlp, tie_embeddings=tie, head_dim=head_dim or hidden // heads)


PRESETS = {
    # ~4M parameters: big enough to learn the demo's task, small enough for 2 CPU cores.
    "tiny": dict(model_type="qwen2", qkv_bias=True, qk_norm=False, rope_theta=10_000.0,
                 rms_norm_eps=1e-6, vocab_size=4096, max_position_embeddings=2048,
                 **_shape(4, 256, 4, 2, 768, True)),
    "qwen2.5-0.5b": _QWEN25 | _shape(24, 896, 14, 2, 4864, True),
    "qwen2.5-1.5b": _QWEN25 | _shape(28, 1536, 12, 2, 8960, True),
    "qwen2.5-3b": _QWEN25 | _shape(36, 2048, 16, 2, 11008, True),
    "qwen2.5-7b": _QWEN25 | _shape(28, 3584, 28, 4, 18944, False)
    | dict(vocab_size=152064, max_position_embeddings=131072),
    "qwen3-0.6b": _QWEN3 | _shape(28, 1024, 16, 8, 3072, True, head_dim=128),
    "qwen3-1.7b": _QWEN3 | _shape(28, 2048, 16, 8, 6144, True, head_dim=128),
    "qwen3-4b": _QWEN3 | _shape(36, 2560, 32, 8, 9728, True, head_dim=128),
    "qwen3-8b": _QWEN3 | _shape(36, 4096, 32, 8, 12288, False, head_dim=128),
    "qwen3-14b": _QWEN3 | _shape(40, 5120, 40, 8, 17408, False, head_dim=128),
    "qwen3-32b": _QWEN3 | _shape(64, 5120, 64, 8, 25600, False, head_dim=128),
}


def get(name: str = "tiny") -> ml_collections.ConfigDict:
    """`config.model` for a preset name or an HF config.json path.

    Besides the architecture it holds where weights come from (`hf_path`: an HF directory
    to import; `init_from`: one of our checkpoints; neither: random init from `seed`) and
    the numerics (`param_dtype`, `dtype`, `remat`).
    """
    if name in PRESETS:
        arch = dict(PRESETS[name])
    elif os.path.exists(name):
        from fleming_jax.models.qwen import QwenConfig  # only needed for HF files

        file = os.path.join(name, "config.json") if os.path.isdir(name) else name
        with open(file) as f:
            arch = vars(QwenConfig.from_hf(json.load(f), source=file)).copy()
        for key in ("param_dtype", "compute_dtype", "remat"):
            arch.pop(key)
    else:
        raise ValueError(f"unknown model preset {name!r}; presets: {', '.join(PRESETS)}, "
                         "or a path to an HF config.json")
    return ml_collections.ConfigDict(dict(
        preset=name, hf_path="", init_from="", seed=0,
        param_dtype="float32", compute_dtype="float32", remat="none", **arch))

"""Model presets: the tiny test/demo model and the real Qwen, Qwen3-MoE, Llama 3.x and Gemma 3 shapes.

Numbers come from each model's published `config.json`. `get(name)` also accepts a path
(local or gs://) to any HF `config.json` (or the directory holding it).
"""

import json

import ml_collections

from fleming_jax import paths
from fleming_jax.models.decoder import FULL, LORA_TARGETS, SLIDING

_QWEN25 = dict(model_type="qwen2", qkv_bias=True, qk_norm=False, rope_theta=1_000_000.0,
               rms_norm_eps=1e-6, vocab_size=151936, max_position_embeddings=32768)
_QWEN3 = dict(model_type="qwen3", qkv_bias=False, qk_norm=True, rope_theta=1_000_000.0,
              rms_norm_eps=1e-6, vocab_size=151936, head_dim=128, max_position_embeddings=40960)

_QWEN3_MOE = _QWEN3 | dict(model_type="qwen3_moe", num_experts=128, experts_per_token=8, norm_topk_prob=True)



def _gemma3(layers, hidden, heads, kv_heads, mlp, head_dim, window, **rest):
    """Gemma 3 (text): five sliding-window layers (rope base 10k) to one global (1M)."""
    types = tuple(FULL if (i + 1) % 6 == 0 else SLIDING for i in range(layers))
    return dict(model_type="gemma3_text", qkv_bias=False, qk_norm=True, rope_theta=1_000_000.0, rope_local_theta=10_000.0,
                rms_norm_eps=1e-6, hidden_act="gelu_pytorch_tanh", norm_plus_one=True, sandwich_norms=True,
                embed_scale=True, query_pre_attn_scalar=head_dim, sliding_window=window, layer_types=types,
                **_shape(layers, hidden, heads, kv_heads, mlp, True, head_dim=head_dim)) | rest


# Llama 3.x: Qwen2's block without biases, rope theta 500k with Llama 3's frequency scaling
_LLAMA3 = dict(model_type="llama", qkv_bias=False, qk_norm=False, rope_theta=500_000.0, rope_type="llama3",
               rope_low_freq_factor=1.0, rope_high_freq_factor=4.0, rope_original_max_position=8192,
               rms_norm_eps=1e-5, vocab_size=128256, max_position_embeddings=131072)


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
    "llama3.2-1b": _LLAMA3 | _shape(16, 2048, 32, 8, 8192, True, head_dim=64) | dict(rope_factor=32.0),
    "llama3.2-3b": _LLAMA3 | _shape(28, 3072, 24, 8, 8192, True, head_dim=128) | dict(rope_factor=32.0),
    "llama3.1-8b": _LLAMA3 | _shape(32, 4096, 32, 8, 14336, False, head_dim=128) | dict(rope_factor=8.0),
    # Qwen3-MoE: Qwen3's attention, 128 routed experts in every layer, 8 per token
    "qwen3-30b-a3b": _QWEN3_MOE | _shape(48, 2048, 32, 4, 6144, False, head_dim=128) | dict(moe_intermediate_size=768),
    "qwen3-235b-a22b": _QWEN3_MOE | _shape(94, 4096, 64, 4, 12288, False, head_dim=128)
    | dict(moe_intermediate_size=1536),
    # Gemma 3's text decoders (4b / 27b: the language model of the multimodal checkpoints)
    "gemma3-1b": _gemma3(26, 1152, 4, 1, 6912, 256, 512, vocab_size=262144, max_position_embeddings=32768),
    "gemma3-4b": _gemma3(34, 2560, 8, 4, 10240, 256, 1024, vocab_size=262208, max_position_embeddings=131072,
                         rope_type="linear", rope_factor=8.0),
    "gemma3-27b": _gemma3(62, 5376, 32, 16, 21504, 128, 1024, vocab_size=262208, max_position_embeddings=131072,
                          rope_type="linear", rope_factor=8.0, query_pre_attn_scalar=168),
}


# `PRESET@rehearsal` (e.g. `configs/rl_stage1.py:qwen2.5-7b@rehearsal`, any config file): the
# real preset with only its dimensions shrunk to these (~0.2M parameters, for CPU devices); its
# family switches (qkv bias, q/k norm, tied embeddings, rope) and every default a config file
# sets for it (the mesh rule, rl.*, batch sizes, dtypes, remat) stay the real preset's. The
# vocabulary fits the small offline tokenizer (`fleming_jax.tokenizer.build`). The rehearsal
# (tests/rehearsal.py, docs/scale.md "Rehearsal") runs the whole pipeline with it.
REHEARSAL = "rehearsal"
REHEARSAL_SHAPE = dict(num_layers=2, hidden_size=64, num_heads=4, num_kv_heads=2, head_dim=16,
                       intermediate_size=128, vocab_size=1024)
# and per family: 8 experts, 2 a token (routing still differs per token); a sliding layer and a
# global one, the window shorter than the prompts, and an output matrix of its own (the
# rehearsal's stand-in base is a next-token table written into the embeddings and the output
# matrix, which tied embeddings would make one)
REHEARSAL_FAMILY = {"qwen3_moe": dict(num_experts=8, experts_per_token=2, moe_intermediate_size=32),
                    "gemma3_text": dict(layer_types=(SLIDING, FULL), sliding_window=16,
                                        tie_embeddings=False)}



# `PRESET@tiny`: the preset's family at the tiny default's dimensions, for the demo of a family
# (`configs/demo.py:ci@gemma3-27b`); its experts and windows scaled to them
TINY = "tiny"
TINY_FAMILY = {"qwen3_moe": dict(num_experts=8, experts_per_token=2, moe_intermediate_size=192),
               "gemma3_text": dict(layer_types=(SLIDING,) * 3 + (FULL,), sliding_window=64)}


def rehearsal_shape(preset: str, size: str = REHEARSAL) -> dict:
    """The dimensions `PRESET@rehearsal` (or `PRESET@tiny`) changes in the real preset."""
    family = PRESETS[preset]["model_type"]
    if size == TINY:
        return {k: PRESETS[TINY][k] for k in REHEARSAL_SHAPE} | TINY_FAMILY.get(family, {})
    return REHEARSAL_SHAPE | REHEARSAL_FAMILY.get(family, {})


def get(name: str = "tiny") -> ml_collections.ConfigDict:
    """`config.model` for a preset name or an HF config.json path.

    Besides the architecture it holds where weights come from (`hf_path`: an HF directory
    to import; `init_from`: one of our checkpoints; neither: random init from `seed`) and
    the numerics (`param_dtype`, `dtype`, `remat`).
    """
    base, _, rehearsal = name.partition("@")
    if rehearsal in (REHEARSAL, TINY) and base in PRESETS and base != TINY:
        arch = PRESETS[base] | rehearsal_shape(base, rehearsal)
    elif name in PRESETS:
        arch = dict(PRESETS[name])
    elif paths.exists(name):  # an HF config.json or its directory, local or gs://
        from fleming_jax.models.decoder import DecoderConfig  # only needed for HF files

        file = paths.join(name, "config.json") if paths.path(name).is_dir() else name
        arch = vars(DecoderConfig.from_hf(json.loads(paths.read_text(file)), source=file)).copy()
        for key in ("param_dtype", "compute_dtype", "remat", "attention_chunk", "lora_rank", "lora_alpha",
                    "lora_targets", "lora_base_quant", "lora_dropout"):
            arch.pop(key)
    else:
        raise ValueError(f"unknown model preset {name!r}; presets: {', '.join(PRESETS)} (each but tiny "
                         f"also as PRESET@{REHEARSAL} or PRESET@{TINY}), or a path to an HF config.json")
    return ml_collections.ConfigDict(dict(
        preset=name, hf_path="", init_from="", seed=0,
        param_dtype="float32", compute_dtype="float32", remat="none", attention_chunk=512,
        # LoRA (0: train every weight): adapters of this rank on these projections (PEFT's
        # names), scaled by lora_alpha / lora_rank; only they (and their optimizer state) are
        # trained and checkpointed, the base stays frozen and is named in each checkpoint.
        # lora_dropout drops adapter inputs while training (PEFT's); lora_base_quant="int8" or
        # "nf4" holds that frozen base quantized (QLoRA).
        lora_rank=0, lora_alpha=16.0, lora_targets=",".join(_lora_targets(arch)), lora_dropout=0.0, lora_base_quant="",
        **arch))


def _lora_targets(arch: dict) -> list[str]:
    """Every projection PEFT names, or a mixture-of-experts model's attention ones (its MLP is experts)."""
    return [t for t in LORA_TARGETS if not arch.get("num_experts") or t in ("q_proj", "k_proj", "v_proj", "o_proj")]


# Meshes per target, picked with a `@target` suffix on the preset
# (`configs/sft.py:qwen2.5-7b@v5p-32`). Peak memory per device from `task=plan` for the
# train step at batch 64 x 4096 tokens, bf16 compute, full remat (docs/scale.md, "plan"):
TARGETS = {
    "v5p-32": dict(data=1, fsdp=16, tensor=1),  # 16 chips; 7B: 20.6 of 95 GiB
    "v5e-64": dict(data=1, fsdp=64, tensor=1),  # 64 chips; 7B: 7.8 of 16 GiB
    "8xh100": dict(data=1, fsdp=8, tensor=1),  # 7B: 45.8 of 80 GiB (32B needs 132: no)
    "v5p-128": dict(data=1, fsdp=64, tensor=1),  # 64 chips; 32B: 17.2 of 95 GiB
    "2x8xh100": dict(data=1, fsdp=16, tensor=1),  # 32B: 68.4 of 80 GiB
    # the small slices researchers get: full-weight RL of the real presets does not fit them,
    # LoRA RL does (docs/scale.md, "LoRA")
    "v5p-8": dict(data=1, fsdp=4, tensor=1),
    "v5e-16": dict(data=1, fsdp=16, tensor=1),
    "v6e-8": dict(data=1, fsdp=8, tensor=1),
}

# The expert axis a mixture-of-experts model takes out of each target's FSDP devices: whole
# torus axes on a TPU (jax.make_mesh maps each mesh axis to a product of physical ones: 16 is
# 4x4 of a v5p cube, 8 one side of v5e's 8x8), a host's 8 GPUs or both hosts' 16.
EXPERT_AXIS = {"v5p-32": 16, "v5e-64": 8, "8xh100": 8, "v5p-128": 16, "2x8xh100": 16, "v5p-8": 4, "v5e-16": 16,
               "v6e-8": 8}


def split_target(preset: str) -> tuple[str, str]:
    """'qwen2.5-7b@v5p-32' -> ('qwen2.5-7b', 'v5p-32'); 'qwen2.5-7b@rehearsal' ->
    ('qwen2.5-7b@rehearsal', ''): a model (`get`) with the preset's defaults and mesh rule."""
    name, _, target = (preset or "tiny").partition("@")
    if target == REHEARSAL:
        return preset, ""
    if target and target not in TARGETS:
        raise ValueError(f"unknown target {target!r}; targets: {', '.join(TARGETS)}, or {REHEARSAL}")
    return name, target


def mesh_for(preset: str, target: str = "") -> ml_collections.ConfigDict:
    """The target's mesh; else data-parallel for tiny and FSDP over all devices otherwise.

    A mixture-of-experts preset trades FSDP for expert parallelism: on a target, groups of
    `EXPERT_AXIS[target]` of the FSDP devices form the `expert` axis (each device holds that
    fraction of each layer's experts and gathers its group's tokens; the other weights stay
    split over all of them); without one, every device is on the `expert` axis."""
    if target:
        mesh = dict(TARGETS[target], expert=1)
    elif preset == "tiny":
        mesh = dict(data=-1, fsdp=1, expert=1, tensor=1)
    else:
        mesh = dict(data=1, fsdp=-1, expert=1, tensor=1)
    if PRESETS.get(preset.partition("@")[0], {}).get("num_experts"):
        mesh["expert"] = EXPERT_AXIS[target] if target else -1
        mesh["fsdp"] = mesh["fsdp"] // mesh["expert"] if target else 1
    return ml_collections.ConfigDict(mesh)


def distributed() -> ml_collections.ConfigDict:
    """Multi-host setup (`parallel.initialize_distributed`): `enabled` None detects a
    multi-worker Cloud TPU slice or the coordinator (GPU clusters set it, or the FLEMING_*
    env variables that tpu/gpu_launch.sh exports); True forces `jax.distributed`; False
    keeps one process."""
    return ml_collections.ConfigDict(dict(
        enabled=ml_collections.FieldReference(None, field_type=bool), coordinator_address="",
        num_processes=0, process_id=-1))


def rollout() -> ml_collections.ConfigDict:
    """How RL generates. `engine` "local": the in-tree engine (`fleming_jax.engine`): the
    policy is cast to `dtype` ("" = the model's compute dtype) and resharded once per update
    into the decode layout (`parallel.rollout_mesh`: tensor parallel over `tensor` devices of a
    host, -1 = as many as divide the host's devices and the KV heads; data parallel over the
    rest). Its KV cache is paged (`page_size` tokens a page; a group's samples share their
    prompt's pages): `kv_cache_gib` of pages a device (0 = 80% of an accelerator's free memory,
    or on a CPU what half the slots need at full length); `slots` sequences decode at once
    (0 = twice as many as the pages hold at full length, 128 on a CPU; never more than the
    rollout has). A sequence takes pages as its reply grows (the youngest is evicted and
    recomputed if they run out); a finished one hands its slot and pages to the next every
    `chunk` tokens. `devices`: how many devices the engine gets to itself (the last
    devices / hosts of each host), the trainer keeping the rest (0: both use all); with
    `rl.max_staleness` > 0 the two groups work at once (on several hosts they must be split).
    `engine` "openai": an external OpenAI-compatible server (vLLM, SGLang, tpu-inference:
    `fleming_jax.remote_engine`); `server` says where: `base_url` (up to /v1), the served
    `model` name, `weights_dir` the policy is saved to after each update ("" = <workdir>/
    rollout_weights; a path the server can read), `reload_url` it is told to reload from
    ("" = SGLang's <server>/update_weights_from_disk), `api_key_env`, `max_concurrency`
    requests at once, `timeout_s` per request."""
    server = ml_collections.ConfigDict(dict(base_url="", model="", weights_dir="", reload_url="", api_key_env="",
                                            max_concurrency=16, timeout_s=600.0))
    return ml_collections.ConfigDict(dict(engine="local", tensor=-1, dtype="", slots=0, kv_cache_gib=0.0, page_size=16,
                                           chunk=16, devices=0, server=server))


def metrics() -> ml_collections.ConfigDict:
    """Where a training job's curves go besides `<workdir>/metrics.jsonl` (the source of truth)
    and `<workdir>/tensorboard` (always): `wandb` a Weights & Biases project the same rows are
    mirrored to ("" = off; needs `pip install wandb`; with WANDB_MODE=offline the run is
    written under `<workdir>/wandb` without an account, for `wandb sync` later)."""
    return ml_collections.ConfigDict(dict(wandb=""))


def optimizer(learning_rate: float, warmup_steps: int, total_steps: int) -> ml_collections.ConfigDict:
    """AdamW + warmup/cosine + global-norm clipping (fleming_jax.train.state.make_optimizer)."""
    return ml_collections.ConfigDict(dict(
        learning_rate=learning_rate, warmup_steps=warmup_steps, total_steps=total_steps,
        final_lr_fraction=0.1, max_grad_norm=1.0, b1=0.9, b2=0.95, eps=1e-8, weight_decay=0.1))


# The TPU slice a target names, for `task=plan` (libtpu AOT; GPU targets plan on fake CPU devices).
TOPOLOGIES = {"v5p-32": "v5p:2x2x4", "v5e-64": "v5e:8x8", "v5p-128": "v5p:4x4x4", "v5p-8": "v5p:2x2x1",
              "v5e-16": "v5e:4x4", "v6e-8": "v6e:2x4"}
# Slices of one host whose topology libtpu would otherwise split over hosts of 4 chips (v6e-8
# is one VM with 8 chips): the chips each host has, for the rollout's tensor axis.
HOST_BOUNDS = {"v6e-8": "2,4,1"}
# The target a real preset is planned for without an @target: the run sizes the recipes name.
DEFAULT_TARGETS = {"qwen2.5-7b": "v5p-32", "qwen3-32b": "v5p-128", "llama3.1-8b": "v5p-32", "qwen3-30b-a3b": "v5p-128",
                   "qwen3-235b-a22b": "v5p-128", "gemma3-27b": "v5p-128"}


def plan(preset: str = "tiny", target: str = "") -> ml_collections.ConfigDict:
    """`task=plan`: compile the step ahead of time on fake devices or a TPU topology; by
    default the target's slice (or the preset's usual one: `DEFAULT_TARGETS`)."""
    return ml_collections.ConfigDict(dict(
        devices=0,  # fake this many CPU devices (0: the devices present); set, it wins over topology
        # e.g. "v5p:4x4x2" or "v5e:8x8" (needs `pip install 'jax[tpu]==0.10.2'`); "" = the devices present
        topology=TOPOLOGIES.get(target or DEFAULT_TARGETS.get(preset.removesuffix(f"@{REHEARSAL}"), ""), ""),
        # chips per host as "x,y,z" ("" = libtpu's default for the topology: 4 a host on v5e/v6e)
        host_bounds=HOST_BOUNDS.get(target, ""),
        hbm_gb=0.0,  # per-device memory to check the plan against (0: device's own, if known)
        prompt_len=512,  # RL: the prompt length the rollout's KV cache is planned for (a bucket of it)
    ))

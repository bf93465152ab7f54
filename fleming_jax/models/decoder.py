"""The Qwen2 / Qwen2.5 / Qwen3, Qwen3-MoE, Llama 3.x and Gemma 3 decoder in Flax NNX.

One module covers the five: q/k/v bias (Qwen2), per-head q/k RMSNorm and an explicit
head_dim (Qwen3), routed experts in place of the MLP (Qwen3-MoE: Qwen3's attention,
`fleming_jax.models.moe`), Llama 3's rope scaling (`rope_type="llama3"`; Llama is Qwen2's
block without the biases), Gemma 3's (1 + w) norms around both sublayers, scaled embeddings,
GELU and sliding-window layers with their own rope base, tied embeddings and GQA are config
switches: they share one pre-norm block, so attention, the KV caches, LoRA, quantization and
sharding exist once for all of them. Layer weights are stacked on a leading `layers` axis and
the decoder is a `jax.lax.scan` over a pure block function,
so a 64-layer model compiles as fast as a 2-layer one. Every parameter carries logical
axis names in its `axes` metadata; `fleming_jax.parallel` maps them to mesh axes, so this
file never names a device.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
import qwix
from flax import nnx

from fleming_jax import paged, parallel
from fleming_jax.models import moe

SUPPORTED_MODEL_TYPES = ("qwen2", "qwen3", "qwen3_moe", "llama", "gemma3_text")
ARCHITECTURES = {"qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM", "qwen3_moe": "Qwen3MoeForCausalLM",
                 "llama": "LlamaForCausalLM", "gemma3_text": "Gemma3ForCausalLM"}
# each rope type and the model types whose configs may name it
ROPE_TYPES = {"default": SUPPORTED_MODEL_TYPES, "llama3": ("llama",), "linear": ("gemma3_text",)}
# the MLP's activation by HF's name (gelu_pytorch_tanh: GELU's tanh approximation)
ACTIVATIONS = {"silu": jax.nn.silu, "gelu_pytorch_tanh": functools.partial(jax.nn.gelu, approximate=True)}
SLIDING, FULL = "sliding_attention", "full_attention"  # HF's layer types
REMAT_POLICIES = {
    "none": None,
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


@dataclasses.dataclass(frozen=True)
class DecoderConfig:
    """Architecture and numerics of one model. Field names follow HF where they exist."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    model_type: str = "qwen2"
    rope_theta: float = 1_000_000.0
    # "llama3": Llama 3.1+'s frequency scaling (HF's `rope_parameters`: factor, low/high frequency
    # factors, the original context); "linear": every frequency divided by `rope_factor`; "default": none
    rope_type: str = "default"
    rope_factor: float = 1.0
    rope_low_freq_factor: float = 1.0
    rope_high_freq_factor: float = 4.0
    rope_original_max_position: int = 8192
    rms_norm_eps: float = 1e-6
    tie_embeddings: bool = False
    qkv_bias: bool = True
    qk_norm: bool = False
    max_position_embeddings: int = 32768
    # Qwen3-MoE (0 experts: a dense MLP): every layer's MLP is `num_experts` experts of width
    # `moe_intermediate_size`, each token going to its top `experts_per_token` (HF's
    # num_experts_per_tok), their weights renormalised when `norm_topk_prob`
    num_experts: int = 0
    experts_per_token: int = 0
    moe_intermediate_size: int = 0
    norm_topk_prob: bool = True
    # Gemma 3: RMSNorm scales by (1 + weight); `sandwich_norms` adds norms on the attention's and
    # the MLP's outputs; embeddings are multiplied by sqrt(hidden_size); attention scores are
    # scaled by query_pre_attn_scalar^-0.5 (0: head_dim's); `layer_types` (HF's: SLIDING or
    # FULL per layer; empty: all FULL) marks the layers that attend to their last
    # `sliding_window` positions only and rotate with `rope_local_theta` (no scaling)
    hidden_act: str = "silu"  # one of ACTIVATIONS
    norm_plus_one: bool = False
    sandwich_norms: bool = False
    embed_scale: bool = False
    query_pre_attn_scalar: int = 0
    sliding_window: int = 0
    layer_types: tuple[str, ...] = ()
    rope_local_theta: float = 10_000.0
    param_dtype: str = "float32"  # master weights
    compute_dtype: str = "float32"  # activations and matmul inputs
    remat: str = "none"  # one of REMAT_POLICIES
    attention_chunk: int = 512  # queries per block of attention scores (bounds their memory)
    # LoRA adapters (0: none): x W + (lora_alpha / lora_rank) (x A) B on each of `lora_targets`
    lora_rank: int = 0
    lora_alpha: float = 16.0
    lora_targets: tuple[str, ...] = ()
    lora_dropout: float = 0.0  # PEFT's: dropout on an adapter's input while training (`hidden_states(dropout_key=)`)
    # QLoRA: the frozen base under the adapters held quantized ("": as `weight_dtype`; BASE_QUANT)
    lora_base_quant: str = ""

    def __post_init__(self):
        if self.model_type not in SUPPORTED_MODEL_TYPES:
            raise ValueError(
                f"unknown model_type {self.model_type!r}; supported: {', '.join(SUPPORTED_MODEL_TYPES)}"
            )
        if self.rope_type not in ROPE_TYPES:
            raise ValueError(f"rope_type={self.rope_type!r}; supported: {', '.join(ROPE_TYPES)}")
        if self.hidden_act not in ACTIVATIONS:
            raise ValueError(f"hidden_act={self.hidden_act!r}; supported: {', '.join(ACTIVATIONS)}")
        if self.layer_types and (len(self.layer_types) != self.num_layers or set(self.layer_types) - {SLIDING, FULL}
                                 or (SLIDING in self.layer_types) != (self.sliding_window > 0)):
            raise ValueError(f"layer_types={self.layer_types}, sliding_window={self.sliding_window}: one of "
                             f"{SLIDING!r} / {FULL!r} for each of the {self.num_layers} layers, and a window > 0 "
                             "exactly when some layer slides")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(
                f"num_heads={self.num_heads} must be a multiple of num_kv_heads={self.num_kv_heads}"
            )
        if self.remat not in REMAT_POLICIES:
            raise ValueError(f"remat={self.remat!r}; choose one of {sorted(REMAT_POLICIES)}")
        for name in ("param_dtype", "compute_dtype"):
            jnp.dtype(getattr(self, name))  # raises on a bad dtype name
        unknown = sorted(set(self.lora_targets) - set(LORA_TARGETS))
        if self.lora_rank < 0 or unknown or (self.lora_rank > 0) != bool(self.lora_targets):
            raise ValueError(f"lora_rank={self.lora_rank}, lora_targets={self.lora_targets}: the rank must be >= 0 and "
                             f"the targets a non-empty subset of {', '.join(LORA_TARGETS)} when the rank is > 0"
                             + (f" (unknown: {', '.join(unknown)})" if unknown else ""))
        if (self.model_type == "qwen3_moe") != (self.num_experts > 0) or (
                self.num_experts and not 0 < self.experts_per_token <= self.num_experts):
            raise ValueError(f"model_type={self.model_type!r} with num_experts={self.num_experts}, experts_per_token="
                             f"{self.experts_per_token}: qwen3_moe and only it has experts, and routes each token to "
                             "1..num_experts of them")
        dense_mlp = [t for t in self.lora_targets if t in ("gate_proj", "up_proj", "down_proj")]
        if self.num_experts and dense_mlp:
            raise ValueError(f"lora_targets={','.join(self.lora_targets)}: a mixture-of-experts model has no dense "
                             f"{', '.join(dense_mlp)}; adapt its attention (--config.model.lora_targets=q_proj,k_proj,v_proj,o_proj)")
        if not 0.0 <= self.lora_dropout < 1.0:
            raise ValueError(f"lora_dropout={self.lora_dropout}: a probability in [0, 1)")
        if self.lora_base_quant not in BASE_QUANT or (self.lora_base_quant and not self.lora_rank):
            raise ValueError(f"lora_base_quant={self.lora_base_quant!r}: choose one of {', '.join(map(repr, BASE_QUANT))}; "
                             "a quantized base needs adapters to train (lora_rank > 0)")

    @classmethod
    def from_hf(cls, hf: dict[str, Any], source: str = "config.json", **overrides) -> "DecoderConfig":
        """Reads an HF `config.json` dict (transformers 4 and 5 layouts)."""
        model_type = hf.get("model_type")
        if model_type not in SUPPORTED_MODEL_TYPES:
            raise ValueError(
                f"{source}: unknown model_type {model_type!r}; fleming-jax ports "
                f"{', '.join(SUPPORTED_MODEL_TYPES)}" + (
                    " (this is the multimodal Gemma 3 checkpoint: save its text decoder as a Gemma3ForCausalLM "
                    "directory, model_type gemma3_text, and import that)" if model_type == "gemma3" else ""))
        rope = hf.get("rope_parameters") or hf.get("rope_scaling") or {}
        local_rope = {}
        if FULL in rope:  # one set per layer type (Gemma 3 in transformers 5)
            rope, local_rope = rope[FULL] or {}, rope.get(SLIDING) or {}
        rope_type = rope.get("rope_type", rope.get("type", "default"))
        if model_type not in ROPE_TYPES.get(rope_type, ()):
            raise ValueError(f"{source}: rope_type {rope_type!r} is not supported for {model_type} (supported: "
                             "'default', 'llama3' for llama, 'linear' for gemma3_text)")
        if hf.get("use_sliding_window"):
            raise ValueError(f"{source}: use_sliding_window=true is not supported")
        if model_type == "gemma3_text" and any(hf.get(k) for k in ("use_bidirectional_attention", "final_logit_softcapping",
                                                                    "attn_logit_softcapping")):
            raise ValueError(f"{source}: gemma3_text with use_bidirectional_attention, final_logit_softcapping or "
                             "attn_logit_softcapping set is not supported (Gemma 3's own checkpoints set none of them; "
                             "transformers' Gemma 3 does not apply attention soft-capping either)")
        if model_type == "qwen3_moe" and (hf.get("decoder_sparse_step", 1) != 1 or hf.get("mlp_only_layers")):
            raise ValueError(f"{source}: qwen3_moe with dense layers (decoder_sparse_step "
                             f"{hf.get('decoder_sparse_step')}, mlp_only_layers {hf.get('mlp_only_layers')}) is not "
                             "supported: every layer must have experts (as Qwen3-30B-A3B and 235B-A22B do)")
        if model_type in ("qwen3", "qwen3_moe", "llama") and (hf.get("attention_bias") or hf.get("mlp_bias")):
            raise ValueError(f"{source}: {model_type} with attention_bias or mlp_bias true is not supported")
        if model_type == "llama" and hf.get("hidden_act", "silu") != "silu":
            raise ValueError(f"{source}: llama with hidden_act {hf['hidden_act']!r} is not supported (only silu)")
        scaling = {}
        if rope_type == "linear":
            scaling = dict(rope_type="linear", rope_factor=float(rope["factor"]))
        if rope_type == "llama3":
            scaling = dict(rope_type="llama3", rope_factor=float(rope["factor"]),
                           rope_low_freq_factor=float(rope["low_freq_factor"]),
                           rope_high_freq_factor=float(rope["high_freq_factor"]),
                           rope_original_max_position=int(rope["original_max_position_embeddings"]))
        heads = hf["num_attention_heads"]
        fields = dict(
            model_type=model_type,
            vocab_size=hf["vocab_size"],
            hidden_size=hf["hidden_size"],
            intermediate_size=hf["intermediate_size"],
            num_layers=hf["num_hidden_layers"],
            num_heads=heads,
            num_kv_heads=hf.get("num_key_value_heads") or heads,
            head_dim=hf.get("head_dim") or hf["hidden_size"] // heads,
            rope_theta=float(rope.get("rope_theta", hf.get("rope_theta", 10_000.0))),
            rms_norm_eps=hf.get("rms_norm_eps", 1e-6),
            tie_embeddings=hf.get("tie_word_embeddings", False),
            qkv_bias=model_type == "qwen2",
            qk_norm=model_type in ("qwen3", "qwen3_moe"),
            max_position_embeddings=hf.get("max_position_embeddings", 32768),
            **scaling,
        )
        if model_type == "gemma3_text":
            heads_dim, layers = fields["head_dim"], fields["num_layers"]
            pattern = hf.get("sliding_window_pattern") or hf.get("_sliding_window_pattern") or 6
            types = hf.get("layer_types") or [FULL if (i + 1) % pattern == 0 else SLIDING for i in range(layers)]
            fields.update(qk_norm=True, hidden_act=hf.get("hidden_activation") or "gelu_pytorch_tanh",
                          norm_plus_one=True, sandwich_norms=True, embed_scale=True,
                          tie_embeddings=hf.get("tie_word_embeddings", True),
                          query_pre_attn_scalar=int(hf.get("query_pre_attn_scalar") or heads_dim),
                          sliding_window=hf["sliding_window"] if SLIDING in types else 0, layer_types=tuple(types),
                          rope_local_theta=float(local_rope.get("rope_theta", hf.get("rope_local_base_freq", 10_000.0))))
        if model_type == "qwen3_moe":
            fields.update(num_experts=hf.get("num_experts") or hf["num_local_experts"],
                          experts_per_token=hf["num_experts_per_tok"],
                          moe_intermediate_size=hf["moe_intermediate_size"],
                          norm_topk_prob=bool(hf.get("norm_topk_prob", False)))
        fields.update(overrides)
        return cls(**fields)

    def to_hf(self) -> dict[str, Any]:
        """The HF `config.json` fields that describe this architecture."""
        hf = dict(
            model_type=self.model_type,
            architectures=[ARCHITECTURES[self.model_type]],
            vocab_size=self.vocab_size,
            hidden_size=self.hidden_size,
            intermediate_size=self.intermediate_size,
            num_hidden_layers=self.num_layers,
            num_attention_heads=self.num_heads,
            num_key_value_heads=self.num_kv_heads,
            hidden_act="silu",
            rope_parameters={"rope_theta": self.rope_theta, "rope_type": self.rope_type} | (
                dict(factor=self.rope_factor, low_freq_factor=self.rope_low_freq_factor,
                     high_freq_factor=self.rope_high_freq_factor,
                     original_max_position_embeddings=self.rope_original_max_position)
                if self.rope_type == "llama3" else dict(factor=self.rope_factor) if self.rope_type == "linear" else {}),
            rms_norm_eps=self.rms_norm_eps,
            tie_word_embeddings=self.tie_embeddings,
            max_position_embeddings=self.max_position_embeddings,
        )
        if self.model_type in ("qwen3", "qwen3_moe"):
            hf.update(head_dim=self.head_dim, attention_bias=False)
        if self.model_type == "gemma3_text":
            global_rope = hf.pop("rope_parameters")
            hf.pop("hidden_act")
            hf.update(head_dim=self.head_dim, attention_bias=False, hidden_activation=self.hidden_act,
                      query_pre_attn_scalar=self.query_pre_attn_scalar, attn_logit_softcapping=None,
                      final_logit_softcapping=None, use_bidirectional_attention=False,
                      sliding_window=self.sliding_window or None, layer_types=[SLIDING if s else FULL for s in self.sliding_layers()],
                      rope_parameters={FULL: global_rope, SLIDING: {"rope_type": "default",
                                                                    "rope_theta": self.rope_local_theta}})
        if self.model_type == "qwen3_moe":
            hf.update(num_experts=self.num_experts, num_experts_per_tok=self.experts_per_token,
                      moe_intermediate_size=self.moe_intermediate_size, norm_topk_prob=self.norm_topk_prob,
                      decoder_sparse_step=1, mlp_only_layers=[])
        if self.model_type == "llama":
            hf.update(head_dim=self.head_dim, attention_bias=False, mlp_bias=False)
        return hf

    def sliding_layers(self) -> tuple[bool, ...]:
        """Whether each layer attends over a sliding window (SLIDING in `layer_types`)."""
        return tuple(kind == SLIDING for kind in self.layer_types) or (False,) * self.num_layers

    def replace(self, **changes) -> "DecoderConfig":
        return dataclasses.replace(self, **changes)

    def without_lora(self) -> "DecoderConfig":
        """The same model with no adapters (the base they sit on)."""
        return self.replace(lora_rank=0, lora_targets=(), lora_base_quant="", lora_dropout=0.0)

    @property
    def weight_dtype(self) -> str:
        """The dtype the weights are held in: `param_dtype` (the master weights that train), or
        with adapters `compute_dtype` (a frozen base needs no master copy; adapters keep
        `param_dtype`)."""
        return self.compute_dtype if self.lora_rank else self.param_dtype


@flax.struct.dataclass
class KVCache:
    """Keys and values of every layer, written in place as tokens arrive.

    One buffer per layer: a decode step then reads and writes each in place, where slicing a
    stacked [layers, ...] cache copies the layer's slice every token (seen in XLA:CPU's HLO).
    `index` [batch] is the slot each row writes its next token to: rows advance on their own
    (continuous batching: each decode slot holds its own sequence). `segment` is 0 for empty or
    padded slots and 1 for real tokens.
    """

    k: tuple[jax.Array, ...]  # per layer: [batch, max_len, kv_heads, head_dim]
    v: tuple[jax.Array, ...]
    segment: jax.Array  # [batch, max_len] int32
    index: jax.Array  # [batch] int32: the slot each row's next token is written to

    @classmethod
    def zeros(cls, config: DecoderConfig, batch: int, max_len: int, dtype=None) -> "KVCache":
        shape = (batch, max_len, config.num_kv_heads, config.head_dim)
        dtype = dtype or config.compute_dtype
        layers = range(config.num_layers)
        return cls(
            k=tuple(jnp.zeros(shape, dtype) for _ in layers),
            v=tuple(jnp.zeros(shape, dtype) for _ in layers),
            segment=jnp.zeros((batch, max_len), jnp.int32),
            index=jnp.zeros((batch,), jnp.int32),
        )


# Logical axes of each stacked layer parameter; `None` marks parameters a config may omit.
LAYER_PARAMS = {
    "input_norm": ("layers", "norm"),
    "q_proj": ("layers", "embed", "heads", "head_dim"),
    "k_proj": ("layers", "embed", "kv_heads", "head_dim"),
    "v_proj": ("layers", "embed", "kv_heads", "head_dim"),
    "q_bias": ("layers", "heads", "head_dim"),
    "k_bias": ("layers", "kv_heads", "head_dim"),
    "v_bias": ("layers", "kv_heads", "head_dim"),
    "q_norm": ("layers", "head_dim"),
    "k_norm": ("layers", "head_dim"),
    "o_proj": ("layers", "heads", "head_dim", "embed"),
    "post_attention_norm": ("layers", "norm"),  # before the MLP (HF's name in Qwen and Llama)
    "attn_out_norm": ("layers", "norm"),  # Gemma 3's sandwich norms: on the attention's output
    "mlp_out_norm": ("layers", "norm"),  # and on the MLP's
    "gate_proj": ("layers", "embed", "mlp"),
    "up_proj": ("layers", "embed", "mlp"),
    "down_proj": ("layers", "mlp", "embed"),
    # Qwen3-MoE's MLP: the router and the stacked experts (split over the `expert` mesh axis)
    "router": ("layers", "router_in", "router_out"),
    "expert_gate": ("layers", "expert", "expert_embed", "mlp"),
    "expert_up": ("layers", "expert", "expert_embed", "mlp"),
    "expert_down": ("layers", "expert", "mlp", "expert_embed"),
}


def layer_param_shapes(c: DecoderConfig) -> dict[str, tuple[int, ...]]:
    """Shapes of the stacked layer parameters this config has."""
    L, E, H, K, D, M = (c.num_layers, c.hidden_size, c.num_heads, c.num_kv_heads, c.head_dim,
                        c.intermediate_size)
    shapes = {
        "input_norm": (L, E), "q_proj": (L, E, H, D), "k_proj": (L, E, K, D),
        "v_proj": (L, E, K, D), "o_proj": (L, H, D, E), "post_attention_norm": (L, E),
        "gate_proj": (L, E, M), "up_proj": (L, E, M), "down_proj": (L, M, E),
    }
    if c.num_experts:
        X, M = c.num_experts, c.moe_intermediate_size
        for name in ("gate_proj", "up_proj", "down_proj"):
            del shapes[name]
        shapes.update(router=(L, E, X), expert_gate=(L, X, E, M), expert_up=(L, X, E, M), expert_down=(L, X, M, E))
    if c.sandwich_norms:
        shapes.update(attn_out_norm=(L, E), mlp_out_norm=(L, E))
    if c.qkv_bias:
        shapes.update(q_bias=(L, H, D), k_bias=(L, K, D), v_bias=(L, K, D))
    if c.qk_norm:
        shapes.update(q_norm=(L, D), k_norm=(L, D))
    return shapes


# The projections LoRA can adapt (PEFT's module names), and how many axes of a linear weight
# (after `layers`) it contracts with its input (o_proj: heads and head_dim; the rest: one).
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
LINEAR_IN_AXES = {"o_proj": 2}


def lora_param_shapes(c: DecoderConfig) -> dict[str, tuple[tuple[int, ...], tuple[str, ...]]]:
    """(shape, logical axes) of each stacked adapter: `<target>_lora_a` [layers, in..., rank] and
    `<target>_lora_b` [layers, rank, out...]."""
    shapes, out = layer_param_shapes(c), {}
    for target in c.lora_targets:
        n = 1 + LINEAR_IN_AXES.get(target, 1)
        shape, axes = shapes[target], LAYER_PARAMS[target]
        out[f"{target}_lora_a"] = (shape[:n] + (c.lora_rank,), axes[:n] + ("lora",))
        out[f"{target}_lora_b"] = ((shape[0], c.lora_rank) + shape[n:], ("layers", "lora") + axes[n:])
    return out


# QLoRA's frozen base: each projection weight in int8 or 4-bit NormalFloat (the QLoRA paper's
# code for normally distributed weights), with one absmax scale per layer, output channel and
# block of QUANT_BLOCK inputs along the weight's last input axis.
BASE_QUANT = ("", "int8", "nf4")
QUANT_BLOCK = 64
# NF4's 16 values (QLoRA paper, appendix E), the code qwix encodes to (tests check both)
NF4_VALUES = np.array([-1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
                       -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
                       0.24611230194568634, 0.33791524171066284, 0.44070982933044434, 0.5626170039176941,
                       0.7229568362236023, 1.0], np.float32)


def quantize_weight(name: str, w: jax.Array, qtype: str) -> qwix.QArray:
    """A stacked projection weight as a qwix `QArray`, quantized one layer at a time (qwix's NF4
    encoder works on a flattened copy of what it is given: a layer, not the whole stack)."""
    tiled = LINEAR_IN_AXES.get(name, 1) - 1  # the last input axis of one layer's weight
    how = dict(channelwise_axes=tuple(i for i in range(w.ndim - 1) if i != tiled),
               tiled_axes={tiled: math.gcd(QUANT_BLOCK, w.shape[tiled + 1])})
    return jax.lax.map(lambda x: qwix.quantize(x, jnp.int8 if qtype == "int8" else qtype, **how), w)


def dequantized(w, dtype) -> jax.Array:
    """A weight as a `dtype` array: a quantized base weight decoded, any other cast."""
    if not isinstance(w, qwix.QArray):
        return w.astype(dtype)
    if w.qtype != "nf4":
        return qwix.dequantize(w).astype(dtype)
    # NF4 codes by a table lookup, elementwise: qwix decodes them through a flattened copy,
    # which on a mesh gathers each sharded weight whole at every use
    scale = w.scale
    for axis, tile in enumerate(w.scale_tile_shape):
        scale = jnp.repeat(scale, tile, axis) if tile > 1 else scale
    return jnp.asarray(NF4_VALUES, dtype)[w.qvalue.astype(jnp.int32)] * scale.astype(dtype)


def _init_value(name: str, shape, key, dtype, norm_plus_one: bool = False):
    if name.endswith("lora_a"):  # PEFT's default: kaiming-uniform, bound 1 / sqrt(fan_in)
        bound = 1.0 / (math.prod(shape[1:-1]) ** 0.5)
        return jax.random.uniform(key, shape, dtype, -bound, bound)
    if name.endswith("lora_b"):  # zero: a fresh adapter leaves the model as it was
        return jnp.zeros(shape, dtype)
    if name.endswith("norm"):  # a scale of 1: w = 1, or w = 0 where the norm scales by (1 + w)
        return jnp.zeros(shape, dtype) if norm_plus_one else jnp.ones(shape, dtype)
    if name.endswith("bias"):
        return jnp.zeros(shape, dtype)
    return 0.02 * jax.random.normal(key, shape, dtype)  # HF's initializer_range


class Layers(nnx.Module):
    """All decoder layers' weights, stacked on a leading `layers` axis."""

    def __init__(self, config: DecoderConfig, rngs: nnx.Rngs):
        for name, shape in layer_param_shapes(config).items():
            value = _init_value(name, shape, rngs.params(), config.weight_dtype, config.norm_plus_one)
            if config.lora_base_quant and name in LORA_TARGETS:
                value = quantize_weight(name, value, config.lora_base_quant)
            setattr(self, name, nnx.Param(value, axes=LAYER_PARAMS[name]))
        # adapters are LoRAParams (a kind of Param): `nnx.split(model, nnx.LoRAParam, ...)` finds them
        for name, (shape, axes) in lora_param_shapes(config).items():
            value = _init_value(name, shape, rngs.lora(), config.param_dtype)
            setattr(self, name, nnx.LoRAParam(value, axes=axes))
        self.names = tuple(layer_param_shapes(config)) + tuple(lora_param_shapes(config))

    def arrays(self) -> dict[str, jax.Array]:
        """The stacked weights by name (a quantized base's as qwix `QArray`s)."""
        return {n: getattr(self, n).get_value() for n in self.names}

    def split(self) -> list[dict[str, jax.Array]]:
        """One weight dict per layer. A decode loop takes these, split once outside it, so
        each token's step reads the weights in place instead of slicing (copying) them."""
        stacked = self.arrays()
        return [jax.tree.map(lambda w: w[i], stacked) for i in range(len(stacked["input_norm"]))]


class Decoder(nnx.Module):
    """Causal LM: `logits = model(input_ids, attention_mask=mask)`.

    `attention_mask` is [batch, length] with 0 for padding; values > 0 are segment ids, so
    a packed row of several examples (segments 1, 2, …) never attends across examples.
    Positions restart at 0 in each segment unless given. With `cache=KVCache`, the call
    appends the tokens to the cache and returns `(logits, new_cache)`.
    """

    def __init__(self, config: DecoderConfig, *, rngs: nnx.Rngs):
        self.config = config
        E, V, pd = config.hidden_size, config.vocab_size, config.weight_dtype
        self.embed_tokens = nnx.Param(_init_value("embed", (V, E), rngs.params(), pd),
                                      axes=("vocab", "embed"))
        self.layers = Layers(config, rngs)
        self.final_norm = nnx.Param(_init_value("final_norm", (E,), None, pd, config.norm_plus_one), axes=("norm",))
        if not config.tie_embeddings:
            self.lm_head = nnx.Param(_init_value("lm_head", (E, V), rngs.params(), pd),
                                     axes=("embed", "vocab"))

    def __call__(self, input_ids, attention_mask=None, positions=None, cache: KVCache | None = None,
                 layers: list[dict] | None = None):
        hidden, new_cache = self.hidden_states(input_ids, attention_mask, positions, cache, layers)
        logits = self.logits(hidden)
        return logits if cache is None else (logits, new_cache)

    def unembedding(self) -> jax.Array:
        """[embed, vocab] matrix that turns final hidden states into logits."""
        if self.config.tie_embeddings:
            return self.embed_tokens[...].T
        return self.lm_head[...]

    def logits(self, hidden: jax.Array) -> jax.Array:
        """fp32 logits of final hidden states (callers that chunk over length use this)."""
        w = self.unembedding().astype(self.config.compute_dtype)
        return project("...e,ev->...v", hidden, w, jnp.float32)

    def embed(self, input_ids: jax.Array) -> jax.Array:
        # Gather from a table whose features are whole (vocab may stay split over `tensor`).
        table = parallel.constrain(self.embed_tokens[...], ("vocab", "act_embed"))
        x = table[input_ids].astype(self.config.compute_dtype)
        if self.config.embed_scale:  # Gemma: times sqrt(hidden_size), rounded to the compute dtype as HF does
            x = x * jnp.asarray(self.config.hidden_size ** 0.5, x.dtype)
        return parallel.constrain(x, ("batch", "length", "act_embed"))

    def decode(self, tokens: jax.Array, cache: paged.PagedCache, table: jax.Array, index: jax.Array,
               active: jax.Array, layers: list[dict] | None = None, kernel: bool = False, ring: jax.Array | None = None):
        """One token per row (`tokens` [rows]) at position `index`, over a paged cache (the rollout
        engine's decode step): fp32 logits [rows, vocab] and the cache with the tokens written.
        Rows not `active` neither write nor read the cache. `layers`: as in `hidden_states`;
        `kernel`: the Pallas TPU attention kernel (`paged.attention`); `ring`: the rows' page
        tables into the sliding-window layers' rings (`paged.ring_table`)."""
        c = self.config
        x = self.embed(tokens[:, None])
        rope = rope_tables(index[:, None], c)
        local_rope = rope_tables(index[:, None], c, local=True) if c.sliding_window else None
        k_pages, v_pages = list(cache.k), list(cache.v)
        split = self.layers.split() if layers is None else layers
        for i, (p, sliding) in enumerate(zip(split, c.sliding_layers())):
            if c.lora_base_quant:  # decoded after the layer before: not hoisted out of the token loop whole
                p, x = jax.lax.optimization_barrier((p, x))
            p = layer_weights(p, c)
            q, k, v = qkv(p, norm(x, p["input_norm"], c), *pick(sliding, local_rope, rope), c)
            out, k_pages[i], v_pages[i] = paged.attention(
                q[:, 0], k[:, 0], v[:, 0], k_pages[i], v_pages[i], ring if sliding else table, index, active,
                kernel, attention_scale(c), c.sliding_window if sliding else 0)
            attn = linear(p, "o_proj", "bhd,hde->be", out.astype(x.dtype), c)[:, None]
            x = mlp_block(p, add_output(p, x, attn, "attn_out_norm", c), c)
        x = norm(x[:, 0], self.final_norm[...].astype(c.compute_dtype), c)
        return self.logits(x), paged.PagedCache(k=tuple(k_pages), v=tuple(v_pages))

    def hidden_states(self, input_ids, attention_mask=None, positions=None, cache=None, layers=None,
                      prefixes=None, scan_cache: bool = False, dropout_key=None, router_stats: list | None = None):
        """Final-norm hidden states [batch, length, embed] (and the updated cache).

        Without a cache the layers run as a scan over the stacked weights (one compiled
        block, for training). With a cache they are unrolled over per-layer weights and
        cache buffers; `layers` (from `Layers.split()`) passes weights already split.
        `scan_cache`: scan over the layers with the cache too (one compiled block: a prompt's
        prefill on TPU, where 28-64 unrolled layers compile for many minutes); it stacks
        the cache's buffers, a copy, so a decode step (cache in place) does not use it.
        `prefixes` [batch, length] (no cache): for each token, another segment it also attends
        to (0: none), e.g. the prompt that several replies packed after it share.
        `dropout_key` (training; no cache): the key of the adapters' dropout (`lora_dropout`).
        `router_stats` (a list; mixture-of-experts, no cache): gets the routing statistics summed
        over the layers (`moe.balance_stats`), for the load-balancing loss.
        """
        c = self.config
        if attention_mask is None:
            attention_mask = jnp.ones(input_ids.shape, jnp.int32)
        attention_mask = attention_mask.astype(jnp.int32)
        if positions is None:
            positions = positions_from_mask(attention_mask)
            if cache is not None:  # continue counting after the tokens already cached
                positions = positions + jnp.sum(cache.segment > 0, axis=1, keepdims=True)
        x = self.embed(input_ids)
        rope = rope_tables(positions, c)

        length = input_ids.shape[1]
        if cache is None:
            q_slot = k_slot = jnp.arange(length)
            k_segment = attention_mask
        else:
            q_slot = jnp.reshape(cache.index, (-1, 1)) + jnp.arange(length)
            k_slot = jnp.arange(cache.segment.shape[1])
            k_segment = write_at(cache.segment, attention_mask, cache.index)
        same = attention_mask[:, :, None] == k_segment[:, None, :]
        if prefixes is not None:
            if cache is not None:
                raise ValueError("prefixes are for calls without a cache")
            same |= (prefixes[:, :, None] > 0) & (prefixes[:, :, None] == k_segment[:, None, :])
        allowed = ((k_slot[None, None, :] <= jnp.atleast_2d(q_slot)[:, :, None])
                   & same & (attention_mask[:, :, None] > 0))  # [batch, q, k]
        local_rope = allowed_local = None
        if c.sliding_window:  # a sliding layer's rotation, and its keys: the last `sliding_window` positions
            local_rope = rope_tables(positions, c, local=True)
            k_positions = positions if cache is None else positions_from_mask(k_segment)
            allowed_local = allowed & (jnp.atleast_2d(positions)[:, :, None] - k_positions[:, None, :] < c.sliding_window)

        def block(x, p, kv=None, key=None, sliding=False):
            p = layer_weights(p, c)
            if key is not None:
                p["dropout_key"] = key  # read by `linear`
            h = norm(x, p["input_norm"], c)
            attn, kv = attention(p, h, *pick(sliding, local_rope, rope), pick(sliding, allowed_local, allowed), kv,
                                 None if cache is None else cache.index, c)
            stats = [] if router_stats is not None else None
            x = mlp_block(p, add_output(p, x, attn, "attn_out_norm", c), c, attention_mask, stats)
            return x, (kv, stats[0] if stats else None)

        sliding = c.sliding_layers()
        if cache is None:
            if c.remat != "none":
                block = jax.checkpoint(block, policy=REMAT_POLICIES[c.remat], prevent_cse=False)
            keys = jax.random.split(dropout_key, c.num_layers) if dropout_key is not None and c.lora_dropout else None
            flags = jnp.asarray(sliding) if c.sliding_window else None
            x, (_, stats) = jax.lax.scan(lambda x, p_key: block(x, p_key[0], None, p_key[1], p_key[2]), x,
                                         (self.layers.arrays(), keys, flags))
            if router_stats is not None and stats is not None:
                router_stats.append(stats.sum(axis=0))
            new_cache = None
        elif scan_cache:
            def layer(x, p_kv):
                p, k, v, flag = p_kv
                x, (kv, _) = block(x, p, (k, v), sliding=flag)
                return x, kv

            flags = jnp.asarray(sliding) if c.sliding_window else None
            x, (k, v) = jax.lax.scan(layer, x, (self.layers.arrays(), jnp.stack(cache.k), jnp.stack(cache.v), flags))
            k, v = tuple(k), tuple(v)  # back to one buffer per layer
            new_cache = KVCache(k=k, v=v, segment=k_segment, index=cache.index + length)
        else:
            k, v = list(cache.k), list(cache.v)
            for i, p in enumerate(self.layers.split() if layers is None else layers):
                x, ((k[i], v[i]), _) = block(x, p, (k[i], v[i]), sliding=sliding[i])
            new_cache = KVCache(k=tuple(k), v=tuple(v), segment=k_segment, index=cache.index + length)
        return norm(x, self.final_norm[...].astype(c.compute_dtype), c), new_cache


def pick(sliding, local, full):
    """What a sliding-window layer uses (`local`) or any other (`full`); `sliding` is a bool, or
    a traced one inside the layer scan (then both are computed and one selected)."""
    if local is None or sliding is False:
        return full
    if sliding is True:
        return local
    return jax.tree.map(lambda a, b: jnp.where(sliding, a, b), local, full)


def add_output(p, x, out, norm_name: str, c: DecoderConfig):
    """The residual stream `x` plus a sublayer's output (normed first with `sandwich_norms`)."""
    return x + (norm(out, p[norm_name], c) if c.sandwich_norms else out)


def layer_weights(p: dict, c: DecoderConfig) -> dict[str, jax.Array]:
    """One layer's weights as the matmuls take them (`compute_dtype`; a quantized base decoded)."""
    return {n: dequantized(w, c.compute_dtype) for n, w in p.items()}


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 3))
def project(spec: str, x: jax.Array, w: jax.Array, out_dtype=None) -> jax.Array:
    """`einsum(spec, x, w)` of activations with a weight, with a hand-written backward.

    Same math as autodiff; on XLA:CPU autodiff's weight-gradient dots came out as
    transposed copies plus slow dots: the tiny model's RL update (128 x 256 tokens) took
    13.6 s with autodiff and 8.8 s this way on 2 cores.
    Every index of `spec` appears in the output or in both inputs (a projection).
    """
    return jnp.einsum(spec, x, w, preferred_element_type=out_dtype)


def _project_fwd(spec, x, w, out_dtype):
    return project(spec, x, w, out_dtype), (x, w)


def _project_bwd(spec, out_dtype, saved, g):
    x, w = saved
    inputs, out = spec.split("->")
    x_idx, w_idx = inputs.split(",")
    g = g.astype(x.dtype)
    dx = jnp.einsum(f"{out},{w_idx}->{x_idx}", g, w)
    dw = jnp.einsum(f"{x_idx},{out}->{w_idx}", x, g, preferred_element_type=w.dtype)
    return dx.astype(x.dtype), dw.astype(w.dtype)


project.defvjp(_project_fwd, _project_bwd)


def linear(p: dict, name: str, spec: str, x: jax.Array, c: DecoderConfig) -> jax.Array:
    """`x` through the layer weight `name` (`project(spec, ...)`), plus its LoRA adapter where
    the layer has one: x W + (alpha / rank) (x A) B, never forming A B (rank << width)."""
    y = project(spec, x, p[name])
    if f"{name}_lora_a" not in p:
        return y
    down_spec, up_spec = lora_specs(spec)
    if "dropout_key" in p:  # inverted dropout on the adapter's input only, as PEFT's lora_dropout
        keep = jax.random.bernoulli(jax.random.fold_in(p["dropout_key"], LORA_TARGETS.index(name)),
                                    1.0 - c.lora_dropout, x.shape)
        x = jnp.where(keep, x / (1.0 - c.lora_dropout), 0).astype(x.dtype)
    down = project(down_spec, x, p[f"{name}_lora_a"])
    return y + (c.lora_alpha / c.lora_rank) * project(up_spec, down, p[f"{name}_lora_b"])


@functools.cache
def lora_specs(spec: str) -> tuple[str, str]:
    """The einsums of x A and (x A) B for a projection `spec` ("bte,ehd->bthd" -> "bte,er->btr",
    "btr,rhd->bthd"): A takes the weight's contracted axes, B its output axes."""
    inputs, out = spec.split("->")
    x_idx, w_idx = inputs.split(",")
    contracted = "".join(i for i in w_idx if i not in out)
    kept = "".join(i for i in w_idx if i in out)
    lead = "".join(i for i in x_idx if i in out)
    return f"{x_idx},{contracted}r->{lead}r", f"{lead}r,r{kept}->{out}"


def merged_weight(c: DecoderConfig, name: str, w: jax.Array, a: jax.Array, b: jax.Array) -> jax.Array:
    """A stacked weight with its adapter folded in: W + (alpha / rank) A B, per layer."""
    n = LINEAR_IN_AXES.get(name, 1)
    idx = "".join("cdefghij"[: w.ndim - 1])  # the weight's axes after `layers`
    contracted, kept = idx[:n], idx[n:]
    delta = jnp.einsum(f"l{contracted}r,lr{kept}->l{idx}", a.astype(jnp.float32), b.astype(jnp.float32))
    return w.astype(jnp.float32) + (c.lora_alpha / c.lora_rank) * delta


def merge_lora(model: "Decoder") -> "Decoder":
    """The model with every adapter folded into its base weight (no adapters left, weights in
    `param_dtype`; a quantized base decoded): what export writes and what evaluation runs."""
    c = model.config
    base = c.without_lora()
    graphdef, state = nnx.split(nnx.eval_shape(lambda: create(base)))
    layers = {n: dequantized(w, c.param_dtype) for n, w in model.layers.arrays().items()}
    merged = {n: merged_weight(c, n, layers[n], layers[f"{n}_lora_a"], layers[f"{n}_lora_b"])
              for n in c.lora_targets}
    flat = []
    for key, var in nnx.to_flat_state(state):
        if key[0] == "layers":
            value = merged.get(key[1], layers.get(key[1]))
        else:
            value = getattr(model, key[0])[...]
        flat.append((key, var.replace(value.astype(var.dtype))))
    return nnx.merge(graphdef, nnx.from_flat_state(flat))


def qkv(p, h, cos, sin, c: DecoderConfig):
    """Queries [b, t, heads, d], keys and values [b, t, kv_heads, d] of one layer, rotated."""
    q = linear(p, "q_proj", "bte,ehd->bthd", h, c)
    k = linear(p, "k_proj", "bte,ekd->btkd", h, c)
    v = linear(p, "v_proj", "bte,ekd->btkd", h, c)
    if c.qkv_bias:
        q, k, v = q + p["q_bias"], k + p["k_bias"], v + p["v_bias"]
    if c.qk_norm:
        q = norm(q, p["q_norm"], c)
        k = norm(k, p["k_norm"], c)
    return apply_rope(q, cos, sin), apply_rope(k, cos, sin), v


def mlp_block(p, x, c: DecoderConfig, mask=None, stats=None):
    """The residual stream `x` after a layer's attention, through its gated MLP (or its routed
    experts; then with `stats` a list, the layer's `moe.balance_stats` over `mask` are appended)."""
    h = norm(x, p["post_attention_norm"], c)
    if c.num_experts:
        logits = project("bte,ex->btx", h, p["router"])
        weights, ids, probs = moe.route(logits, c.experts_per_token, c.norm_topk_prob)
        if stats is not None:
            stats.append(moe.balance_stats(ids, probs, mask))
        x = x + moe.experts(h, weights.astype(h.dtype), ids, p["expert_gate"], p["expert_up"], p["expert_down"])
        return parallel.constrain(x, ("batch", "length", "act_embed"))
    gate = linear(p, "gate_proj", "bte,em->btm", h, c)
    up = linear(p, "up_proj", "bte,em->btm", h, c)
    hidden = parallel.constrain(ACTIVATIONS[c.hidden_act](gate) * up, ("batch", "length", "act_mlp"))
    x = add_output(p, x, linear(p, "down_proj", "btm,me->bte", hidden, c), "mlp_out_norm", c)
    return parallel.constrain(x, ("batch", "length", "act_embed"))


def attention(p, h, cos, sin, allowed, kv, index, c: DecoderConfig):
    """GQA self-attention of one layer. With this layer's cache `kv = (k, v)`, the new
    keys/values are written at slot `index` and it attends over the cache; returns
    (output, kv)."""
    q, k, v = qkv(p, h, cos, sin, c)
    if kv is not None:
        k_cache, v_cache = kv
        k = write_at(k_cache, k.astype(k_cache.dtype), index)
        v = write_at(v_cache, v.astype(v_cache.dtype), index)
        kv = (k, v)
    b, t, heads, d = q.shape
    q = q.reshape(b, t, c.num_kv_heads, heads // c.num_kv_heads, d)
    keys, values = k.astype(q.dtype), v.astype(q.dtype)
    if kv is None:  # the tokens attend to themselves (training, scoring)
        out = causal_attention(q, keys, values, allowed, c.attention_chunk, attention_scale(c))
    else:  # a prefill: new tokens over the whole cache
        out = _attend(q, keys, values, allowed[:, None, None], "btkgd,bskd->bkgts", "bkgts,bskd->btkgd",
                      attention_scale(c))
    return linear(p, "o_proj", "bthd,hde->bte", out.reshape(b, t, heads, d), c), kv


QUERY_BLOCK = 64  # queries per block of `causal_attention` on sequences up to attention_chunk


def attention_scale(c: DecoderConfig) -> float:
    """What attention scores are multiplied by: head_dim^-0.5, or Gemma's query_pre_attn_scalar^-0.5."""
    return (c.query_pre_attn_scalar or c.head_dim) ** -0.5


def causal_attention(q, keys, values, allowed, chunk: int, scale: float):
    """Attention of a sequence over itself, one block of queries at a time.

    q [b, t, kv_heads, group, d]; keys, values [b, t, kv_heads, d]; allowed [b, t, t].
    Sequences longer than `chunk` (a multiple of it) go a block of `chunk` queries at a time
    over all keys in a loop, each block recomputed in the backward pass, so only one block's
    scores exist at once. Shorter ones use blocks of QUERY_BLOCK queries that score only the
    keys up to their end (causality masks the rest): about half of the [t, t] product. (The
    same skipping on long sequences, as a Python loop of recomputed blocks, raised the
    7B/4096-token plan's peak by 8 GiB: XLA kept several blocks' scores alive.)
    """
    b, t = q.shape[:2]
    # Heads first ([b, kv_heads, (group,) t, d]): each block is then a plain batched matmul
    # (on XLA:CPU the [b, t, heads, d] layout ran the whole attention ~1.5x slower).
    q, keys, values = q.transpose(0, 2, 3, 1, 4), keys.transpose(0, 2, 1, 3), values.transpose(0, 2, 1, 3)
    attend = functools.partial(_attend, scores_spec="bkgtd,bksd->bkgts", out_spec="bkgts,bksd->bkgtd", scale=scale)
    if _recomputed_blocks(t, chunk):
        n = t // chunk
        q_blocks = jnp.moveaxis(q.reshape(*q.shape[:3], n, chunk, q.shape[-1]), 3, 0)
        allowed_blocks = jnp.moveaxis(allowed.reshape(b, n, chunk, t), 1, 0)
        out = jax.lax.map(jax.checkpoint(lambda a: attend(a[0], keys, values, a[1][:, None, None])),
                          (q_blocks, allowed_blocks))
        out = jnp.moveaxis(out, 0, 3).reshape(q.shape)
    else:
        size = QUERY_BLOCK
        out = jnp.concatenate([attend(q[:, :, :, s:s + size], keys[:, :, :s + size], values[:, :, :s + size],
                                      allowed[:, None, None, s:s + size, :s + size]) for s in range(0, t, size)],
                              axis=3)
    return out.transpose(0, 3, 1, 2, 4)


def _recomputed_blocks(t: int, chunk: int) -> bool:
    """Whether `causal_attention` runs a `t`-token sequence in recomputed blocks of `chunk`."""
    return t > chunk and t % chunk == 0


def keys_per_query(t: int, chunk: int) -> float:
    """Mean keys each query of a `t`-token sequence scores in `causal_attention` (FLOP counts)."""
    if _recomputed_blocks(t, chunk):
        return float(t)
    return sum(min(QUERY_BLOCK, t - s) * min(s + QUERY_BLOCK, t) for s in range(0, t, QUERY_BLOCK)) / t


def _attend(q, keys, values, allowed, scores_spec: str, out_spec: str, scale: float):
    """softmax(q k^T x scale, where allowed) v, scores in fp32."""
    scores = jnp.einsum(scores_spec, q, keys, preferred_element_type=jnp.float32) * scale
    scores = jnp.where(allowed, scores, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(scores, axis=-1).astype(q.dtype)
    return jnp.einsum(out_spec, probs, values)


def write_at(buffer: jax.Array, update: jax.Array, index: jax.Array) -> jax.Array:
    """`update` [batch, t, ...] written into `buffer` [batch, slots, ...] from each row's slot
    `index` [batch]."""
    if update.shape[1] == 1:  # a decode step: one scatter of each row's token
        return buffer.at[jnp.arange(buffer.shape[0]), index].set(update[:, 0], mode="drop")
    row = lambda b, u, i: jax.lax.dynamic_update_slice(b, u, (i,) + (0,) * (b.ndim - 1))
    return jax.vmap(row)(buffer, update, index)


def rms_norm(x, scale, eps, plus_one: bool = False):
    """RMSNorm computed in fp32 and cast back, as HF does: Qwen and Llama cast, then multiply by
    the weight; Gemma (`plus_one`) multiplies by (1 + weight) in fp32, then casts."""
    x32 = x.astype(jnp.float32)
    normed = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)
    if plus_one:
        return (normed * (1.0 + scale.astype(jnp.float32))).astype(x.dtype)
    return scale * normed.astype(x.dtype)


def norm(x, scale, c: DecoderConfig):
    """`rms_norm` as the config's family computes it."""
    return rms_norm(x, scale, c.rms_norm_eps, c.norm_plus_one)


def positions_from_mask(segments: jax.Array) -> jax.Array:
    """Position of each token within its segment (left padding gives the first real token 0)."""
    t = jnp.arange(segments.shape[1])
    starts = jnp.concatenate(
        [jnp.ones_like(segments[:, :1], bool), segments[:, 1:] != segments[:, :-1]], axis=1)
    start_index = jax.lax.cummax(jnp.where(starts, t, 0), axis=1)
    return jnp.where(segments > 0, t - start_index, 0)


def rope_frequencies(c: DecoderConfig, local: bool = False) -> np.ndarray:
    """The rotary frequencies [head_dim / 2] (float32, as HF computes them): theta^(-2i/d); with
    `rope_type="linear"` all divided by `rope_factor`; with `rope_type="llama3"` the long
    wavelengths divided by `rope_factor`, blended smoothly between the low- and high-frequency
    cutoffs of the original context. `local`: a sliding-window layer's (`rope_local_theta`,
    unscaled)."""
    d = c.head_dim
    theta = c.rope_local_theta if local else c.rope_theta
    inv_freq = 1.0 / (theta ** (np.arange(0, d, 2, dtype=np.int64).astype(np.float32) / d))
    if local or c.rope_type == "default":
        return inv_freq.astype(np.float32)
    if c.rope_type == "linear":
        return (inv_freq / c.rope_factor).astype(np.float32)
    wavelength = 2 * math.pi / inv_freq
    low_cut = c.rope_original_max_position / c.rope_low_freq_factor  # longer: scaled
    high_cut = c.rope_original_max_position / c.rope_high_freq_factor  # shorter: kept
    scaled = np.where(wavelength > low_cut, inv_freq / c.rope_factor, inv_freq)
    smooth = (c.rope_original_max_position / wavelength - c.rope_low_freq_factor) / (
        c.rope_high_freq_factor - c.rope_low_freq_factor)
    blended = (1 - smooth) * scaled / c.rope_factor + smooth * scaled
    between = (wavelength >= high_cut) & (wavelength <= low_cut)
    return np.where(between, blended, scaled).astype(np.float32)


def rope_tables(positions, c: DecoderConfig, local: bool = False):
    """cos/sin [batch, length, 1, head_dim] for rotary embeddings at `positions` (`local`: a
    sliding-window layer's)."""
    inv_freq = jnp.asarray(rope_frequencies(c, local))
    angles = positions.astype(jnp.float32)[..., None] * inv_freq
    angles = jnp.concatenate([angles, angles], axis=-1)[:, :, None, :]
    return jnp.cos(angles), jnp.sin(angles)


def apply_rope(x, cos, sin):
    x1, x2 = jnp.split(x.astype(jnp.float32), 2, axis=-1)
    rotated = jnp.concatenate([-x2, x1], axis=-1)
    return (x.astype(jnp.float32) * cos + rotated * sin).astype(x.dtype)


def create(config: DecoderConfig, seed: int = 0) -> Decoder:
    """A randomly initialised model (parameters placed by `parallel.create_sharded` on a mesh).
    Adapters draw from their own stream, so the base weights are the same with or without them."""
    return Decoder(config, rngs=nnx.Rngs(params=seed, lora=seed + 1))

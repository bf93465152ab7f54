"""Hugging Face safetensors checkpoints <-> our decoder's parameters, for every model family.

Import reads one tensor at a time from memory-mapped safetensors files (never a pickle)
and places it straight into its device shards, so host memory stays near the largest
tensor. Export writes `model-0000x-of-0000y.safetensors` shards with an index, one
tensor at a time, loadable by `transformers.AutoModelForCausalLM.from_pretrained`.
"""

from __future__ import annotations

import json
import math
import os
import struct
from typing import Any, Callable

import jax
import ml_dtypes
import numpy as np
from flax import nnx
from etils import epath
from safetensors.numpy import save as safetensors_bytes

from fleming_jax import parallel, paths
from fleming_jax import tokenizer as toklib
from fleming_jax.models import decoder

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
FLOAT_DTYPES = {"F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16}
SAFETENSORS_DTYPES = FLOAT_DTYPES | {
    "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8, "BOOL": np.bool_,
}
MAX_HEADER_BYTES = 100 * 1024**2  # the safetensors library's own bound

# Our parameter -> (HF tensor name, True when HF stores it as a [out, in] linear weight).
# Layer tensors are `model.layers.{i}.<name>`; our copies are stacked over i.
LAYER_TENSORS = {
    "input_norm": ("input_layernorm.weight", False),
    "q_proj": ("self_attn.q_proj.weight", True),
    "k_proj": ("self_attn.k_proj.weight", True),
    "v_proj": ("self_attn.v_proj.weight", True),
    "q_bias": ("self_attn.q_proj.bias", False),
    "k_bias": ("self_attn.k_proj.bias", False),
    "v_bias": ("self_attn.v_proj.bias", False),
    "q_norm": ("self_attn.q_norm.weight", False),
    "k_norm": ("self_attn.k_norm.weight", False),
    "o_proj": ("self_attn.o_proj.weight", True),
    "post_attention_norm": ("post_attention_layernorm.weight", False),
    "attn_out_norm": ("post_attention_layernorm.weight", False),  # Gemma 3 (see GEMMA3_TENSORS)
    "mlp_out_norm": ("post_feedforward_layernorm.weight", False),
    "gate_proj": ("mlp.gate_proj.weight", True),
    "up_proj": ("mlp.up_proj.weight", True),
    "down_proj": ("mlp.down_proj.weight", True),
    # Qwen3-MoE: the router, and one tensor per expert `{x}` (stacked over layers and experts here)
    "router": ("mlp.gate.weight", True),
    "expert_gate": ("mlp.experts.{x}.gate_proj.weight", True),
    "expert_up": ("mlp.experts.{x}.up_proj.weight", True),
    "expert_down": ("mlp.experts.{x}.down_proj.weight", True),
}
# Gemma 3 names its pre-MLP norm pre_feedforward_layernorm; its post_attention_layernorm is
# the norm on the attention's output
GEMMA3_TENSORS = {"post_attention_norm": ("pre_feedforward_layernorm.weight", False)}
TOP_TENSORS = {
    "embed_tokens": ("model.embed_tokens.weight", False),
    "final_norm": ("model.norm.weight", False),
    "lm_head": ("lm_head.weight", True),
}


class SafetensorsCheckpoint:
    """Lazy, memory-mapped view of a directory's safetensors files (single or sharded).

    Nothing in a file is trusted: the index may name only files inside the directory, each
    header is bounded and checked (known dtypes, offsets that match the shapes and lie inside
    the file) before a byte of data is mapped, and every error names the file."""

    def __init__(self, path: str, single: str = "model.safetensors"):
        self.path = path
        path = paths.local_dir(path)  # gs:// and hub ids: a local copy to memory-map
        index = os.path.join(path, "model.safetensors.index.json")
        single = os.path.join(path, single)
        if os.path.exists(index):
            files = _shard_names(index)
        elif os.path.exists(single):
            files = [os.path.basename(single)]
        else:
            pickles = [f for f in sorted(os.listdir(path)) if f.endswith(PICKLE_SUFFIXES)]
            if pickles:
                raise ValueError(
                    f"{path} holds only pickle checkpoints ({', '.join(pickles)}); fleming-jax "
                    "reads safetensors only and never unpickles. Convert it once in a trusted "
                    "environment with transformers: model.save_pretrained(out, "
                    "safe_serialization=True).")
            raise FileNotFoundError(
                f"{path}: no {os.path.basename(single)} or model.safetensors.index.json found")
        # name -> (file, entry, offset of the file's data section)
        self.tensors: dict[str, tuple[str, dict, int]] = {}
        for name in files:
            file = os.path.join(path, name)
            if not os.path.isfile(file):
                raise FileNotFoundError(f"{index}: names shard {name}, which is not in {path}; "
                                        "download the missing shard or fix the index")
            header, data_start = _read_header(file)
            for key, entry in header.items():
                self.tensors[key] = (file, entry, data_start)

    @classmethod
    def adapter(cls, path: str) -> "SafetensorsCheckpoint":
        """A PEFT adapter directory's `adapter_model.safetensors`."""
        return cls(path, single="adapter_model.safetensors")

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._entry(name)[1]["shape"])

    def get(self, name: str) -> np.ndarray:
        """The tensor as a read-only memory map (no copy until it is used); weights are floats."""
        file, entry, data_start = self._entry(name)
        if entry["dtype"] not in FLOAT_DTYPES:
            raise ValueError(f"{file}: tensor {name!r} is {entry['dtype']}, not a float dtype "
                             f"({', '.join(FLOAT_DTYPES)}); the file is corrupt or not this model's weights")
        start, end = entry["data_offsets"]
        dtype = FLOAT_DTYPES[entry["dtype"]]
        return np.memmap(file, dtype=dtype, mode="r", offset=data_start + start,
                         shape=tuple(entry["shape"])) if end > start else np.zeros(entry["shape"], dtype)

    def _entry(self, name):
        if name not in self.tensors:
            raise KeyError(f"{self.path}: missing tensor {name!r}")
        return self.tensors[name]


def _shard_names(index: str) -> list[str]:
    """The shard files an index's weight_map names, each a plain name inside its directory."""
    try:
        with open(index) as f:
            weight_map = json.load(f)["weight_map"]
        names = sorted(set(weight_map.values()))
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        raise ValueError(f"{index}: not a safetensors index with a weight_map ({e}); re-download it") from None
    for name in names:
        norm = os.path.normpath(name) if isinstance(name, str) else ""
        if not norm or os.path.isabs(norm) or norm.split(os.sep)[0] in ("..", ".") or norm != name:
            raise ValueError(f"{index}: weight_map names shard {name!r}, which is not a file name inside the "
                             "model directory; fix the index")
    return names


def _read_header(file: str) -> tuple[dict, int]:
    """(tensor entries, data offset) of a safetensors file, checked against the file's size."""
    size = os.path.getsize(file)
    with open(file, "rb") as f:
        if size < 8:
            raise ValueError(f"{file}: {size} bytes, too short for a safetensors file; re-download it")
        (n,) = struct.unpack("<Q", f.read(8))
        if n > min(MAX_HEADER_BYTES, size - 8):
            raise ValueError(f"{file}: header length {n} is beyond the file ({size} bytes) or the "
                             f"{MAX_HEADER_BYTES}-byte limit; the file is truncated or not safetensors")
        try:
            header = json.loads(f.read(n))
        except ValueError:
            header = None
    if not isinstance(header, dict):
        raise ValueError(f"{file}: the header is not a JSON object; the file is corrupt or not safetensors")
    header.pop("__metadata__", None)
    data_size = size - 8 - n
    for name, entry in header.items():
        dtype = entry.get("dtype") if isinstance(entry, dict) else None
        if dtype not in SAFETENSORS_DTYPES:
            hint = ("8-bit float weights are not supported: dequantize the checkpoint to bf16 first"
                    if str(dtype).startswith("F8") else "known: " + ", ".join(SAFETENSORS_DTYPES))
            raise ValueError(f"{file}: tensor {name!r} has dtype {dtype!r}; {hint}")
        shape, offsets = entry.get("shape"), entry.get("data_offsets")
        if not (isinstance(shape, list) and all(isinstance(d, int) and d >= 0 for d in shape)
                and isinstance(offsets, list) and len(offsets) == 2 and all(isinstance(o, int) for o in offsets)):
            raise ValueError(f"{file}: tensor {name!r} has a malformed shape {shape!r} or data_offsets {offsets!r}")
        start, end = offsets
        nbytes = math.prod(shape) * np.dtype(SAFETENSORS_DTYPES[dtype]).itemsize
        if not 0 <= start <= end <= data_size or end - start != nbytes:
            raise ValueError(f"{file}: tensor {name!r} ({dtype} {shape}, {nbytes} bytes) has data_offsets "
                             f"[{start}, {end}] in a data section of {data_size} bytes; the file is truncated "
                             "or corrupt: re-download it")
    return header, 8 + n


def read_config(path: str, **overrides) -> decoder.DecoderConfig:
    """Our config from `path/config.json` (overrides such as dtype win); `path` may be local,
    gs:// or a hub id."""
    # gs:// is read in place: no copy of a whole model directory for one small file
    file = paths.join(paths.local_dir(path) if paths.is_hub_id(path) else path, "config.json")
    if not paths.exists(file):
        raise FileNotFoundError(f"{path}: no config.json (is this an HF model directory?)")
    return decoder.DecoderConfig.from_hf(json.loads(paths.read_text(file)), source=file, **overrides)


def hf_tensor_names(config: decoder.DecoderConfig) -> dict[str, np.ndarray]:
    """Our parameter path ('layers/q_proj', 'embed_tokens', …) -> its HF tensor names, an array
    shaped like the axes our copy stacks them on ([layers], [layers, experts]; [] for one)."""
    names = {}
    table = LAYER_TENSORS | (GEMMA3_TENSORS if config.model_type == "gemma3_text" else {})
    for ours in decoder.layer_param_shapes(config):
        hf = table[ours][0]
        per_layer = [[f"model.layers.{i}.{hf}".format(x=x) for x in range(config.num_experts)] if "{x}" in hf
                     else f"model.layers.{i}.{hf}" for i in range(config.num_layers)]
        names[f"layers/{ours}"] = np.array(per_layer, dtype=object)
    for ours, (hf, _) in TOP_TENSORS.items():
        if ours == "lm_head" and config.tie_embeddings:
            continue
        names[ours] = np.array(hf, dtype=object)
    return names


def _is_linear(path: str) -> bool:
    key = path.split("/")[-1]
    return (LAYER_TENSORS.get(key) or TOP_TENSORS[key])[1]


def hf_shape(path: str, shape: tuple[int, ...]) -> tuple[int, ...]:
    """Shape HF stores one (unstacked) parameter of ours in."""
    key = path.split("/")[-1]
    if _is_linear(path):
        n_in = decoder.LINEAR_IN_AXES.get(key, 1)
        return (math.prod(shape[n_in:]), math.prod(shape[:n_in]))
    return (math.prod(shape),) if key.endswith("bias") else tuple(shape)


def to_ours(path: str, hf_tensor: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """One HF tensor in our layout: [out, in] linears are transposed, heads split out."""
    x = hf_tensor.T if _is_linear(path) else hf_tensor
    return x.reshape(shape)


def to_hf(path: str, ours: np.ndarray) -> np.ndarray:
    """Inverse of `to_ours` for one (unstacked) parameter."""
    shape = hf_shape(path, ours.shape)
    return ours.reshape(shape[::-1]).T if _is_linear(path) else ours.reshape(shape)


def load(path: str, dtype: str | None = None, mesh: jax.sharding.Mesh | None = None, **overrides):
    """Imports an HF Qwen2/Qwen3/Qwen3-MoE/Llama/Gemma 3 (text) directory: returns `(model, config)`.

    `dtype` (e.g. "bfloat16") sets both the parameter and the compute dtype, like HF's
    `from_pretrained(dtype=...)`; `overrides` set single config fields (`param_dtype`,
    `compute_dtype`, `remat`). With a `mesh`, each tensor goes straight into its shards as
    `parallel.RULES` says.
    """
    if dtype is not None:
        overrides = {"param_dtype": dtype, "compute_dtype": dtype} | overrides
    config = read_config(path, **overrides)
    ckpt = SafetensorsCheckpoint(path)
    names = hf_tensor_names(config)
    missing = [n for ns in names.values() for n in ns.flat if n not in ckpt.tensors]
    if missing:
        shown = ", ".join(missing[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
        raise ValueError(f"{path}: checkpoint is missing tensors the config needs: {shown}")

    def read(path_key: str, var: nnx.Variable) -> jax.Array:
        shape, dtype, hf_names = var.shape, var.dtype, names[path_key]
        lead = hf_names.ndim  # our axes that stack HF tensors
        unit = shape[lead:]
        expected = hf_shape(path_key, unit)
        for n in hf_names.flat:
            if ckpt.shape(n) != expected:
                raise ValueError(f"{ckpt.tensors[n][0]}: tensor {n!r} has shape {ckpt.shape(n)}, the "
                                 f"config expects {expected} (from {path}/config.json)")

        def shard(index: tuple[slice, ...]) -> np.ndarray:
            picked = np.asarray(hf_names[index[:lead]], dtype=object)
            pieces = [np.asarray(to_ours(path_key, ckpt.get(n), unit)[index[lead:]], dtype) for n in picked.flat]
            return np.stack(pieces).reshape(picked.shape + pieces[0].shape)

        return jax.make_array_from_callback(shape, parallel.sharding_for(var, mesh), shard)

    model = fill_params(config, read)
    return model, config


def fill_params(config: decoder.DecoderConfig, make: Callable[[str, Any], jax.Array]) -> decoder.Decoder:
    """Builds a model whose every parameter comes from `make(path, abstract_variable)`."""
    abstract = nnx.eval_shape(lambda: decoder.create(config))
    graphdef, state = nnx.split(abstract)
    flat = nnx.to_flat_state(state)
    leaves = []
    for key, var in flat:
        path = "/".join(str(k) for k in key)
        leaves.append((key, var.replace(make(path, var))))
    return nnx.merge(graphdef, nnx.from_flat_state(leaves))


def save(model: decoder.Decoder, config: decoder.DecoderConfig, out_dir: str, tokenizer=None,
         dtype: str | None = None, max_shard_bytes: int = 2 * 1024**3,
         generation_config: dict | None = None) -> str:
    """Writes `model` as an HF directory: safetensors shards + index + config.json, and the
    tokenizer files and generation_config.json when given. `out_dir` may be a `gs://` path.

    `dtype` is the stored dtype (default: the parameter dtype). Shards are planned from the
    shapes first, then filled one at a time, so host memory stays below one shard. Every
    process must call this (gathering a multi-host array is collective); only process 0 writes.
    """
    out = epath.Path(out_dir)
    write = parallel.is_main_process()
    if write:
        paths.makedirs(out_dir)
    dtype = dtype or config.param_dtype
    store_dtype = np.dtype(ml_dtypes.bfloat16 if dtype == "bfloat16" else dtype)
    state = nnx.state(model, nnx.Param)
    params = {"/".join(str(k) for k in key): var for key, var in nnx.to_flat_state(state)}

    plan: list[list[tuple[str, str, tuple]]] = [[]]  # shards of (HF name, our path, its index in our copy)
    size = 0
    for path, hf_names in hf_tensor_names(config).items():
        nbytes = math.prod(params[path].shape[hf_names.ndim:]) * store_dtype.itemsize
        for index, name in np.ndenumerate(hf_names):
            if plan[-1] and size + nbytes > max_shard_bytes:
                plan.append([])
                size = 0
            plan[-1].append((name, path, index))
            size += nbytes

    weight_map, total = {}, 0
    for n, entries in enumerate(plan):
        file = f"model-{n + 1:05d}-of-{len(plan):05d}.safetensors"
        shard = {}
        for name, path, index in entries:
            value = params[path][...][index]
            shard[name] = np.ascontiguousarray(to_hf(path, parallel.to_host(value)).astype(store_dtype))
            weight_map[name] = file
            total += shard[name].nbytes
        if write:
            (out / file).write_bytes(safetensors_bytes(shard, metadata={"format": "pt"}))
    if not write:
        return out_dir
    _write_json(out / "model.safetensors.index.json",
                {"metadata": {"total_size": total}, "weight_map": weight_map})
    hf_config = config.to_hf() | {"dtype": "bfloat16" if dtype == "bfloat16" else str(store_dtype)}
    if tokenizer is not None:
        hf_config.update(bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id)
        toklib.save(tokenizer, str(out))
    _write_json(out / "config.json", hf_config)
    if generation_config is not None:
        _write_json(out / "generation_config.json", generation_config)
    return out_dir


def peft_tensor(target: str, layer: int, which: str) -> str:
    """PEFT's name of layer `layer`'s adapter matrix `which` ("A" or "B") on projection `target`."""
    module = LAYER_TENSORS[target][0].removesuffix(".weight")
    return f"base_model.model.model.layers.{layer}.{module}.lora_{which}.weight"


def save_adapter(model: decoder.Decoder, config: decoder.DecoderConfig, out_dir: str, base: str = "") -> str:
    """Writes `model`'s LoRA adapters in PEFT's format (`adapter_config.json` +
    `adapter_model.safetensors`, fp32), which `peft.PeftModel.from_pretrained` loads onto the
    transformers base named `base`. Every process must call this; process 0 writes."""
    layers = model.layers.arrays()
    tensors = {}
    for target in config.lora_targets:
        a, b = (parallel.to_host(layers[f"{target}_lora_{x}"]) for x in "ab")
        for i in range(config.num_layers):
            tensors[peft_tensor(target, i, "A")] = np.ascontiguousarray(a[i].reshape(-1, config.lora_rank).T, np.float32)
            tensors[peft_tensor(target, i, "B")] = np.ascontiguousarray(b[i].reshape(config.lora_rank, -1).T, np.float32)
    if not parallel.is_main_process():
        return out_dir
    paths.makedirs(out_dir)
    out = epath.Path(out_dir)
    (out / "adapter_model.safetensors").write_bytes(safetensors_bytes(tensors, metadata={"format": "pt"}))
    _write_json(out / "adapter_config.json", dict(
        peft_type="LORA", task_type="CAUSAL_LM", base_model_name_or_path=base, r=config.lora_rank,
        lora_alpha=config.lora_alpha, lora_dropout=config.lora_dropout, target_modules=sorted(config.lora_targets), bias="none",
        fan_in_fan_out=False, use_rslora=False, use_dora=False, init_lora_weights=True, inference_mode=True))
    return out_dir


def read_adapter_config(path: str) -> dict | None:
    """A PEFT LoRA adapter directory's settings as a LoRA checkpoint records them
    (`checkpoint.lora_meta`; base: its `base_model_name_or_path`) with `format="peft"`, or None if
    `path` is not one."""
    file = paths.join(path, "adapter_config.json")
    if not paths.exists(file):
        return None
    peft = json.loads(paths.read_text(file))
    targets = peft.get("target_modules") or []
    targets = [targets] if isinstance(targets, str) else list(targets)
    unsupported = {k: peft.get(k) for k in ("peft_type", "use_rslora", "use_dora", "fan_in_fan_out", "bias",
                                             "layers_to_transform", "rank_pattern", "alpha_pattern", "modules_to_save")
                   if peft.get(k) not in (None, False, "none", {}, [], "LORA")}
    unknown = sorted(set(targets) - set(decoder.LORA_TARGETS))
    if unsupported or unknown:
        raise ValueError(f"{file}: only plain LoRA on {', '.join(decoder.LORA_TARGETS)} imports; this adapter has "
                         f"{unsupported or ''}{' targets ' + ', '.join(unknown) if unknown else ''}")
    return dict(rank=peft["r"], alpha=float(peft["lora_alpha"]), targets=[t for t in decoder.LORA_TARGETS if t in targets],
                base=dict(init_from="", hf_path=peft.get("base_model_name_or_path") or "", seed=0), format="peft")


def load_adapter(path: str, abstract: nnx.State, config: decoder.DecoderConfig, mesh=None) -> nnx.State:
    """The LoRA adapters of a PEFT directory (`save_adapter`'s format) as the abstract adapter
    state `abstract` names them, each placed in its shards on `mesh`."""
    ckpt = SafetensorsCheckpoint.adapter(path)

    def read(key, var):
        target, which = key[1].rsplit("_lora_", 1)
        stacked = []
        for i in range(config.num_layers):
            x = ckpt.get(peft_tensor(target, i, which.upper()))
            stacked.append(np.asarray(x, np.float32).T.reshape(var.shape[1:]))
        value = np.stack(stacked).astype(var.dtype)
        return var.replace(jax.device_put(value, parallel.sharding_for(var, mesh)))

    flat = [(key, read(key, var)) for key, var in nnx.to_flat_state(abstract)]
    return nnx.from_flat_state(flat)


def _write_json(file: epath.Path, obj) -> None:
    file.write_text(json.dumps(obj, indent=2))


def export_task(config, workdir: str) -> str:
    """`task=export`: the model `config.model` names, written as an HF directory."""
    from absl import logging

    from fleming_jax import models

    model_cfg = config.model
    lora = models.saved_lora(model_cfg)
    if lora:  # a LoRA run's checkpoint: its base with its adapters, written merged and as a PEFT adapter
        model_cfg = model_cfg.copy_and_resolve_references()
        model_cfg.update(lora_rank=lora["rank"], lora_alpha=lora["alpha"], lora_targets=",".join(lora["targets"]),
                         lora_base_quant=lora.get("base_quant", ""))
    model, model_config = models.build(model_cfg, parallel.make_mesh(config.mesh))
    tokenizer = toklib.load(config.export.tokenizer) if config.export.tokenizer else None
    out_dir = config.export.out_dir or str(epath.Path(workdir) / "hf")
    if model_config.lora_rank:
        adapter_dir = config.export.adapter_dir or str(epath.Path(workdir) / "adapter")
        base = lora["base"] if lora else models.base_of(model_cfg)
        save_adapter(model, model_config, adapter_dir, base=base["hf_path"] or base["init_from"])
        print(f"PEFT adapter written to {adapter_dir}")
        model, model_config = decoder.merge_lora(model), model_config.without_lora()
    save(model, model_config, out_dir, tokenizer=tokenizer, dtype=config.export.dtype or None,
         max_shard_bytes=config.export.max_shard_mb * 1024**2)
    logging.info("exported %s to %s", config.model.init_from or config.model.hf_path
                 or f"random {config.model.preset}", out_dir)
    print(f"HF model written to {out_dir}")
    return out_dir

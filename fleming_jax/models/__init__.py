"""Model ports and the one place that turns `config.model` into a model."""

from __future__ import annotations

import dataclasses

from fleming_jax.models import qwen

_NOT_ARCH = ("preset", "hf_path", "init_from", "seed")
NUMERICS = ("param_dtype", "compute_dtype", "remat", "attention_chunk")


def config_from(model_cfg) -> qwen.QwenConfig:
    """Our QwenConfig from `config.model`; with `hf_path` set, the architecture comes from
    that directory's config.json and only the numerics come from `config.model`."""
    if model_cfg.hf_path:
        from fleming_jax.models import hf

        return hf.read_config(model_cfg.hf_path, **{k: model_cfg[k] for k in NUMERICS})
    fields = {f.name for f in dataclasses.fields(qwen.QwenConfig)}
    unknown = set(model_cfg.keys()) - fields - set(_NOT_ARCH)
    if unknown:
        raise ValueError(f"config.model has unknown keys {sorted(unknown)}; known: {sorted(fields)}")
    return qwen.QwenConfig(**{k: v for k, v in model_cfg.items() if k in fields})


def build(model_cfg, mesh=None) -> tuple[qwen.Qwen, qwen.QwenConfig]:
    """The model `config.model` asks for: our checkpoint (`init_from`), an HF import
    (`hf_path`), or a random init from `seed`, in that order of precedence."""
    config = config_from(model_cfg)
    if model_cfg.init_from:
        from fleming_jax.train import checkpoint

        return checkpoint.restore_model(model_cfg.init_from, config, mesh), config
    if model_cfg.hf_path:
        from fleming_jax.models import hf

        return hf.load(model_cfg.hf_path, mesh=mesh, **{k: model_cfg[k] for k in NUMERICS})
    return create_sharded(config, model_cfg.seed, mesh), config


def create_sharded(config: qwen.QwenConfig, seed: int, mesh=None) -> qwen.Qwen:
    """Random init under jit; on a mesh every parameter is created directly in its shards
    (no full copy on one device). Values are the same with or without a mesh."""
    import jax
    from flax import nnx

    from fleming_jax import parallel

    graphdef, abstract = nnx.split(nnx.eval_shape(lambda: qwen.create(config, seed)))
    shardings = None if mesh is None else parallel.tree_shardings(abstract, mesh)
    init = jax.jit(lambda: nnx.split(qwen.create(config, seed))[1], out_shardings=shardings)
    return nnx.merge(graphdef, init())

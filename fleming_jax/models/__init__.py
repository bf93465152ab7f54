"""Model ports and the one place that turns `config.model` into a model.

Every family (Qwen2 / Qwen2.5, Qwen3, Qwen3-MoE, Llama 3.x, Gemma 3) is the one decoder of
`decoder.py` with its `model_type`'s switches. A family is: its switches
(`DecoderConfig.from_hf` / `to_hf`), its HF tensor names where they differ (`hf.py`), its
presets (`configs/models.py`) and its tiny transformers twin in the tests; the trainer, the
engine, packing, the sharding rules and export never name one."""

from __future__ import annotations

import dataclasses

from fleming_jax.models import decoder

_NOT_ARCH = ("preset", "hf_path", "init_from", "seed")
NUMERICS = ("param_dtype", "compute_dtype", "remat", "attention_chunk")
LORA = ("lora_rank", "lora_alpha", "lora_targets", "lora_base_quant", "lora_dropout")


def config_from(model_cfg) -> decoder.DecoderConfig:
    """Our DecoderConfig from `config.model`; with `hf_path` set, the architecture comes from
    that directory's config.json and only the numerics and adapters come from `config.model`."""
    adapters = lora_fields(model_cfg)
    if model_cfg.hf_path:
        from fleming_jax.models import hf

        return hf.read_config(model_cfg.hf_path, **{k: model_cfg[k] for k in NUMERICS}, **adapters)
    fields = {f.name for f in dataclasses.fields(decoder.DecoderConfig)}
    unknown = set(model_cfg.keys()) - fields - set(_NOT_ARCH)
    if unknown:
        raise ValueError(f"config.model has unknown keys {sorted(unknown)}; known: {sorted(fields)}")
    return decoder.DecoderConfig(**({k: v for k, v in model_cfg.items() if k in fields} | adapters))


def lora_fields(model_cfg) -> dict:
    """The adapter fields of `config.model` as DecoderConfig takes them (`lora_targets` is a
    comma-separated string of PEFT module names there; none without a rank)."""
    rank = model_cfg.get("lora_rank", 0)
    targets = model_cfg.get("lora_targets", "")
    targets = tuple(t.strip() for t in targets.split(",") if t.strip()) if isinstance(targets, str) else tuple(targets)
    return dict(lora_rank=rank, lora_alpha=float(model_cfg.get("lora_alpha", 16.0)), lora_targets=targets if rank else (),
                lora_base_quant=model_cfg.get("lora_base_quant", "") if rank else "",
                lora_dropout=float(model_cfg.get("lora_dropout", 0.0)) if rank else 0.0)


def build(model_cfg, mesh=None) -> tuple[decoder.Decoder, decoder.DecoderConfig]:
    """The model `config.model` asks for: our checkpoint (`init_from`), an HF import
    (`hf_path`), or a random init from `seed`, in that order of precedence.

    With `lora_rank` > 0 the base comes from there and fresh adapters (B = 0) sit on it. A LoRA
    run's checkpoint holds only its adapters and names its base (`checkpoint.lora_meta`): as
    `init_from` it gives the base with those adapters, to train on with the same `lora_*`
    settings, or merged into the weights with `lora_rank=0` (export, evaluation)."""
    config = config_from(model_cfg)
    experts_split = 1 if mesh is None else mesh.shape["expert"]
    if config.num_experts % experts_split:
        raise ValueError(f"config.model has {config.num_experts} experts, not a multiple of the mesh's expert axis "
                         f"({experts_split} devices): set --config.mesh.expert to a divisor of {config.num_experts}")
    saved = saved_lora(model_cfg)
    if saved is None:
        if not config.lora_rank:
            return _base(model_cfg, config, mesh), config
        return _with_adapters(_base(model_cfg, base_config(config), mesh), config, model_cfg.seed, mesh), config
    lora_config = config.replace(lora_rank=saved["rank"], lora_alpha=saved["alpha"], lora_targets=tuple(saved["targets"]),
                                 lora_base_quant=saved.get("base_quant", ""))
    if config.lora_rank and config != lora_config:
        raise ValueError(
            f"config.model.init_from={model_cfg.init_from} holds LoRA adapters of rank {saved['rank']}, alpha "
            f"{saved['alpha']} on {','.join(saved['targets'])}, base quantized {saved.get('base_quant') or 'no'}; "
            f"config.model asks for rank {config.lora_rank}, alpha {config.lora_alpha} on "
            f"{','.join(config.lora_targets)}, base quantized {config.lora_base_quant or 'no'}: continue with the same "
            "lora_* settings, or set lora_rank=0 to load them merged into the base")
    base_cfg = model_cfg.copy_and_resolve_references()
    base_cfg.update(saved["base"])
    model = _with_adapters(_base(base_cfg, base_config(lora_config), mesh), lora_config, model_cfg.seed, mesh,
                           adapters=model_cfg.init_from, peft=saved.get("format") == "peft")
    return (model, lora_config) if config.lora_rank else (decoder.merge_lora(model), config)


def base_of(model_cfg) -> dict:
    """Where the base weights under `config.model`'s adapters come from, as a LoRA checkpoint
    records it: `init_from` / `hf_path` / `seed` (absolute paths), followed through an
    `init_from` that is itself a LoRA checkpoint or a PEFT adapter."""
    from fleming_jax import paths

    saved = saved_lora(model_cfg)
    if saved is not None:
        return saved["base"]
    absolute = lambda p: paths.absolute(p) if p and paths.exists(p) else p  # hub ids stay ids
    return dict(init_from=absolute(model_cfg.init_from), hf_path=absolute(model_cfg.hf_path), seed=model_cfg.seed)


def saved_lora(model_cfg) -> dict | None:
    """What `config.model.init_from` holds when it is LoRA adapters, `{rank, alpha, targets, base}`:
    a LoRA run's checkpoint, or a PEFT adapter directory (its base: `hf_path` when set, else the
    adapter's `base_model_name_or_path`); None for whole weights or no `init_from`."""
    if not model_cfg.init_from:
        return None
    from fleming_jax.models import hf
    from fleming_jax.train import checkpoint

    peft = hf.read_adapter_config(model_cfg.init_from)
    if peft is not None:
        peft["base"]["hf_path"] = model_cfg.hf_path or peft["base"]["hf_path"]
        if not peft["base"]["hf_path"]:
            raise ValueError(f"config.model.init_from={model_cfg.init_from} is a PEFT adapter that names no base "
                             "model: set config.model.hf_path to the HF directory of its base")
        return peft
    return checkpoint.lora_meta(model_cfg.init_from)


def checkpoint_meta(model_cfg) -> dict:
    """What a training run's checkpoints record of `config.model` beside its arrays: for LoRA
    (whose checkpoints hold only the adapters) the adapters' settings and their base."""
    config = config_from(model_cfg)
    if not config.lora_rank:
        return {}
    return {"lora": dict(rank=config.lora_rank, alpha=config.lora_alpha, targets=list(config.lora_targets),
                         base_quant=config.lora_base_quant, base=base_of(model_cfg))}


def base_config(config: decoder.DecoderConfig) -> decoder.DecoderConfig:
    """The config of the base under `config`'s adapters, as the adapted model holds it."""
    return config.without_lora().replace(param_dtype=config.weight_dtype)


def _base(model_cfg, config: decoder.DecoderConfig, mesh):
    """The weights `model_cfg` names (checkpoint, HF import or random init) as `config` holds them."""
    if model_cfg.init_from:
        from fleming_jax.train import checkpoint

        return checkpoint.restore_model(model_cfg.init_from, config, mesh)
    if model_cfg.hf_path:
        from fleming_jax.models import hf

        return hf.load(model_cfg.hf_path, mesh=mesh, **{k: getattr(config, k) for k in NUMERICS})[0]
    return create_sharded(config, model_cfg.seed, mesh)


def _with_adapters(base: decoder.Decoder, config: decoder.DecoderConfig, seed: int, mesh, adapters: str = "",
                   peft: bool = False) -> decoder.Decoder:
    """`base` (a model without adapters) with the adapters of `config`: fresh from `seed`, or
    read from `adapters`, a LoRA run's checkpoint or (`peft`) a PEFT adapter directory; each
    created in its shards. With `lora_base_quant` the base is quantized here (QLoRA)."""
    import jax
    from flax import nnx

    from fleming_jax import parallel

    graphdef, abstract, abstract_base = nnx.split(nnx.eval_shape(lambda: decoder.create(config, seed)), nnx.LoRAParam, ...)
    base_state = nnx.state(base)
    if config.lora_base_quant:
        base_state = _quantized(base_state, abstract_base, config.lora_base_quant, mesh)
    if adapters:
        from fleming_jax.models import hf
        from fleming_jax.train import checkpoint

        lora = (hf.load_adapter(adapters, abstract, config, mesh) if peft
                else checkpoint.restore_state(adapters, abstract, mesh))
    else:  # the rest of the model is dead code in this program: only the adapters are computed
        shardings = None if mesh is None else parallel.tree_shardings(abstract, mesh)
        lora = jax.jit(lambda: nnx.state(decoder.create(config, seed), nnx.LoRAParam), out_shardings=shardings)()
    return nnx.merge(graphdef, lora, base_state)


def _quantized(base_state, abstract, qtype: str, mesh):
    """The base's projection weights quantized to `qtype`, each created in its shards (the
    full-precision base is donated: its buffers are free once this returns)."""
    import jax
    from flax import nnx

    from fleming_jax import parallel

    def quantize(state):
        flat = [(key, var.replace(decoder.quantize_weight(key[1], var.get_value(), qtype))
                 if key[0] == "layers" and key[1] in decoder.LORA_TARGETS else var)
                for key, var in nnx.to_flat_state(state)]
        return nnx.from_flat_state(flat)

    shardings = None if mesh is None else parallel.tree_shardings(abstract, mesh)
    return jax.jit(quantize, out_shardings=shardings, donate_argnums=0)(base_state)


def create_sharded(config: decoder.DecoderConfig, seed: int, mesh=None) -> decoder.Decoder:
    """Random init under jit; on a mesh every parameter is created directly in its shards
    (no full copy on one device). Values are the same with or without a mesh."""
    import jax
    from flax import nnx

    from fleming_jax import parallel

    graphdef, abstract = nnx.split(nnx.eval_shape(lambda: decoder.create(config, seed)))
    shardings = None if mesh is None else parallel.tree_shardings(abstract, mesh)
    init = jax.jit(lambda: nnx.split(decoder.create(config, seed))[1], out_shardings=shardings)
    return nnx.merge(graphdef, init())

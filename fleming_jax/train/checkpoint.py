"""Orbax checkpoints of our models.

A model checkpoint is a directory of params written by `save_params`, or a training run's
CheckpointManager root whose newest step holds a `params` item; `restore_model` reads
either, straight into the shardings of the given mesh.
"""

from __future__ import annotations

import contextlib
import json

import jax
import orbax.checkpoint as ocp
from flax import nnx

from fleming_jax import parallel, paths
from fleming_jax.models import decoder


def manager(workdir: str, keep: int, use_async: bool = True, **extra_handlers) -> ocp.CheckpointManager:
    """A training run's checkpoints, `<workdir>/checkpoints/<step>/`: items `params` (a pure
    dict, what `restore_model` reads), `opt_state`, `meta` (JSON), plus `extra_handlers`.
    Unfinished saves (orbax tmp directories of a killed run) are removed when it opens."""
    return ocp.CheckpointManager(
        paths.absolute(paths.join(workdir, "checkpoints")),
        options=ocp.CheckpointManagerOptions(max_to_keep=keep, enable_async_checkpointing=use_async,
                                             cleanup_tmp_directories=True),
        item_handlers=item_handlers(**extra_handlers))


def item_handlers(**extra_handlers) -> dict:
    """The handlers of a training step's items (fresh instances each call)."""
    return {"params": ocp.StandardCheckpointHandler(), "opt_state": ocp.StandardCheckpointHandler(),
            "meta": ocp.JsonCheckpointHandler(), **extra_handlers}


def save_params(path: str, model: decoder.Decoder) -> str:
    """Writes the model's parameters (a pure dict pytree) to `path`; returns `path`."""
    path = paths.absolute(path)
    checkpointer = ocp.StandardCheckpointer()
    checkpointer.save(path, nnx.to_pure_dict(nnx.state(model, nnx.Param)), force=True)
    checkpointer.wait_until_finished()
    return path


def params_dir(path: str) -> str:
    """The params directory inside `path`: itself, or the newest step's `params` item."""
    path = paths.absolute(path)
    root = paths.path(path)
    with paths.storage_errors(path):
        if not root.is_dir():
            raise FileNotFoundError(f"checkpoint {path} does not exist")
        steps = sorted((int(d.name) for d in root.iterdir() if d.name.isdigit()), reverse=True)
        for step in steps:
            candidate = root / str(step) / "params"
            if candidate.is_dir():
                return str(candidate)
    return path


def restore_model(path: str, config: decoder.DecoderConfig, mesh=None) -> decoder.Decoder:
    """The model saved at `path` (see `params_dir`), placed as `parallel.RULES` says on `mesh`."""
    graphdef, state = nnx.split(nnx.eval_shape(lambda: decoder.create(config)))
    return nnx.merge(graphdef, restore_state(path, state, mesh, f"the model config ({config.model_type}, "
                                             f"{config.num_layers} layers, hidden {config.hidden_size})"))


def restore_state(path: str, abstract: nnx.State, mesh=None, what: str = "the model config") -> nnx.State:
    """The params saved at `path` (see `params_dir`) as the abstract state `abstract` names
    them (a whole model, or only its LoRA adapters), each read into its shards on `mesh`."""
    target = jax.tree.map(
        lambda v: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=parallel.sharding_for(v, mesh)),
        abstract, is_leaf=lambda x: isinstance(x, nnx.Variable))
    source = params_dir(path)
    checkpointer = ocp.StandardCheckpointer()
    with _no_step_metadata_warning():
        diff = shape_mismatch(checkpointer.metadata(source).item_metadata.tree, nnx.to_pure_dict(target))
    if diff:
        raise ValueError(f"checkpoint {source} does not match {what}: {diff}")
    with _no_step_metadata_warning():
        restored = checkpointer.restore(source, nnx.to_pure_dict(target))
    state = jax.tree.map(lambda x: x, abstract, is_leaf=lambda x: isinstance(x, nnx.Variable))
    nnx.replace_by_pure_dict(state, restored)
    return state


def lora_meta(path: str) -> dict | None:
    """What a LoRA run's checkpoint at `path` records of its adapters, `{rank, alpha, targets,
    base: {init_from, hf_path, seed}}` (its `params` hold only the adapters), or None for a
    checkpoint of whole weights."""
    params = paths.path(params_dir(path))
    meta = params.parent / "meta" / "metadata"
    if params.name != "params" or not meta.exists():
        return None
    return json.loads(meta.read_text()).get("lora")


@contextlib.contextmanager
def _no_step_metadata_warning():
    """A training run's `<step>/params` item has no step-level _CHECKPOINT_METADATA of its own
    (it sits one level up); orbax warns about that on every restore. Nothing is wrong: hide it."""
    import logging

    class Drop(logging.Filter):
        def filter(self, record):
            return not str(record.msg).startswith("Metadata file does not exist")

    logger, drop = logging.getLogger("absl"), Drop()
    logger.addFilter(drop)
    try:
        yield
    finally:
        logger.removeFilter(drop)


def shape_mismatch(saved, wanted) -> str | None:
    """`key: saved (…), config wants (…)` for up to 4 leaves whose shapes (or presence) differ
    between two params trees, or None when they agree."""
    saved, wanted = _flat_shapes(saved), _flat_shapes(wanted)
    diff = sorted(k for k in saved.keys() | wanted.keys() if saved.get(k) != wanted.get(k))
    return "; ".join(f"{k}: saved {saved.get(k)}, config wants {wanted.get(k)}" for k in diff[:4]) or None


def _flat_shapes(tree) -> dict[str, tuple[int, ...]]:
    flat = jax.tree_util.tree_flatten_with_path(tree)[0]
    return {jax.tree_util.keystr(path): tuple(leaf.shape) for path, leaf in flat}

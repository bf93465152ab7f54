"""What every generator shares: the interface RL, evaluation and the local teacher sample
through (`RolloutEngine`), how tokens are picked (greedy, temperature, top-k, top-p), what a
generation returns (`SampleOutput`), and the policy's decode layout (`rollout_model`).

The in-tree engine is `fleming_jax.engine`; an external OpenAI-compatible server is
`fleming_jax.remote_engine`; `engine.from_config` picks one from `config.rollout.engine`.
"""

from __future__ import annotations

import abc
import dataclasses
import itertools
import math
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from fleming_jax import parallel

MIN_BUCKET = 16
VOCAB_BLOCKS = 128  # the sampler's CDF is built per block of the vocabulary (`inverse_cdf_sample`)


@dataclasses.dataclass(frozen=True)
class SamplingParams:
    """How to pick tokens. temperature 0 is greedy; top_k 0 and top_p 1.0 disable those."""

    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    num_samples: int = 1
    max_new_tokens: int = 256

    def __post_init__(self):
        if self.temperature < 0 or not 0 < self.top_p <= 1 or self.top_k < 0 or self.num_samples < 1:
            raise ValueError(f"bad sampling params {self}: need temperature >= 0, 0 < top_p <= 1, "
                             "top_k >= 0, num_samples >= 1")


@dataclasses.dataclass
class SampleOutput:
    """Per prompt and sample: tokens [B, n, G] (pad after the stop token), log-probs of the
    sampled tokens under the sampling distribution and under the raw model, lengths (stop
    token included) and whether a stop token ended the sample."""

    tokens: np.ndarray
    logprobs: np.ndarray
    model_logprobs: np.ndarray
    lengths: np.ndarray
    done: np.ndarray

    def prompt(self, i: int) -> "SampleOutput":
        """Prompt i's samples alone (views, a leading axis of 1)."""
        return SampleOutput(**{f.name: getattr(self, f.name)[i:i + 1] for f in dataclasses.fields(self)})


class RolloutEngine(abc.ABC):
    """Token ids in, `SampleOutput` out, from the weights last synced. Every process calls each
    method at the same point, and every process gets the same output. `stats`: what the last
    `generate` measured (for the metrics), if the engine measures anything."""

    stats: dict = {}

    @abc.abstractmethod
    def sync(self, model) -> None:
        """Sample from `model`'s current weights from now on (after each policy update)."""

    @abc.abstractmethod
    def generate(self, prompts: Sequence[Sequence[int]], key, params: SamplingParams,
                 stop_ids: Sequence[int], on_prompt_done=None) -> SampleOutput:
        """`params.num_samples` completions of each prompt; `key` seeds the draws.
        `on_prompt_done(i, output)`: called once per prompt with its part of the output (a
        leading axis of 1) when its samples are all on the host (the local engine: while it
        decodes the rest)."""


def bucket(n: int, minimum: int = MIN_BUCKET) -> int:
    """The power of two (at least `minimum`) that holds n."""
    return max(minimum, 1 << max(0, n - 1).bit_length())


def filter_logits(logits: jax.Array, temperature: float, top_k: int, top_p: float) -> jax.Array:
    """Logits of the sampling distribution: scaled by 1/temperature, then everything outside
    the top-k and outside the smallest set whose probability reaches top_p set to -inf."""
    logits = logits.astype(jnp.float32) / temperature
    if top_k:
        kth = jax.lax.top_k(logits, top_k)[0][..., -1:]
        logits = jnp.where(logits < kth, -jnp.inf, logits)
    if top_p < 1.0:
        sorted_logits = jnp.sort(logits, axis=-1)[..., ::-1]
        probs = jax.nn.softmax(sorted_logits, axis=-1)
        before = jnp.cumsum(probs, axis=-1) - probs  # mass of strictly more likely tokens
        keep = before < top_p  # a token stays while the set before it is still short of p
        cutoff = jnp.min(jnp.where(keep, sorted_logits, jnp.inf), axis=-1, keepdims=True)
        logits = jnp.where(logits < cutoff, -jnp.inf, logits)
    return logits


def pick(key, logits, params: SamplingParams):
    """(token, log-prob under the sampling distribution, log-prob under the raw model)."""
    raw = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    if params.temperature == 0:
        token = jnp.argmax(logits, axis=-1)
        sampled_logprob = jnp.zeros(token.shape, jnp.float32)
    else:
        filtered = filter_logits(logits, params.temperature, params.top_k, params.top_p)
        token = inverse_cdf_sample(key, filtered)
        sampled_logprob = at_token(jax.nn.log_softmax(filtered, axis=-1), token)
    return token, sampled_logprob, at_token(raw, token)


def at_token(values, token):
    """values[row, token[row]] as a masked sum over the vocabulary: a reduction, which the
    partitioner splits across a vocabulary sharded over chips (an indexed read gathers it)."""
    return jnp.sum(jnp.where(jnp.arange(values.shape[-1]) == token[:, None], values, 0), axis=-1)


def inverse_cdf_sample(key, logits):
    """One categorical draw per row from a single uniform number: the first token whose
    cumulative probability reaches it. Exact, and ~6x cheaper on CPU than Gumbel-max, which
    needs a random number for every vocabulary entry. `key`: one key, or one per row.

    The CDF is a running sum within each of VOCAB_BLOCKS blocks plus the mass of the blocks
    before it: under tensor parallelism each chip sums its own blocks and only the block
    totals cross chips (one running sum over the whole vocabulary all-gathered the logits:
    18.6 MiB a token for Qwen3-32B on v5p:4x4x4)."""
    rows, vocab = logits.shape
    blocks = math.gcd(vocab, VOCAB_BLOCKS)
    within = jnp.cumsum(jax.nn.softmax(logits, axis=-1).reshape(rows, blocks, vocab // blocks), axis=-1)
    totals = within[..., -1]
    cdf = within + (jnp.cumsum(totals, axis=-1) - totals)[..., None]
    total = cdf[:, -1, -1]  # exactly the last entry: no draw lands past the vocabulary
    tiny = jnp.finfo(jnp.float32).tiny
    if key.ndim:  # one key per row (the engine: every sequence has its own stream)
        u = jax.vmap(lambda k: jax.random.uniform(k, (), minval=tiny))(key)
    else:
        u = jax.random.uniform(key, (rows,), minval=tiny)
    return jnp.sum(cdf < (u * total)[:, None, None], axis=(1, 2)).astype(jnp.int32)


_LAYOUTS: dict = {}  # (graphdef, mesh, dtype, source shardings) -> its SyncProgram, built once per run


def rollout_model(model, mesh: jax.sharding.Mesh, dtype: str | None = None, previous=None):
    """The policy in the decode layout: its params cast to `dtype` (default: the model's
    compute dtype, bf16 for the real presets) and resharded onto `mesh` (see
    `parallel.rollout_mesh`) by one jitted program. Synced once per RL step, so the decode
    loop reads weights where they are instead of gathering FSDP shards every token.
    `previous` (the last copy this returned) is donated: the new weights take its buffers,
    so a sync never holds two decode copies."""
    graphdef, state = nnx.split(model)
    return sync_program(graphdef, state, mesh, dtype or model.config.compute_dtype)(graphdef, state, previous)


def sync_program(graphdef, state, mesh: jax.sharding.Mesh, dtype: str) -> "SyncProgram":
    """The cast + reshard of `state` (arrays or abstract shapes with shardings) into the decode
    layout on `mesh`, built once per (model, mesh, dtype, training layout)."""
    key = (graphdef, mesh, dtype, tuple(x.sharding for x in jax.tree.leaves(state)))
    if key not in _LAYOUTS:
        _LAYOUTS[key] = SyncProgram(state, mesh, dtype)
    return _LAYOUTS[key]


class SyncProgram:
    """Training layout -> decode layout, moving only shards.

    Where each weight's training sharding is, on the decode mesh's devices, one split over
    `data` and `tensor` (FSDP over the same devices in the same order:
    `parallel.rollout_mesh`), a `shard_map` moves it layer by layer: an all-to-all inside
    each tensor group and an all-gather across the groups. A chip receives about its
    decode shard and holds one layer's pieces at a time (Qwen3-32B on v5p:4x4x4: 0.43 GiB of
    temporaries, 1.0x the decode shard all-gathered; the partitioner, left to move the
    stacked weights between the two meshes, replicated each layer through all-reduces: 9.45
    GiB of temporaries). Any other layout takes that partitioner path (`shards_move` False)."""

    def __init__(self, state, mesh: jax.sharding.Mesh, dtype: str):
        leaves, self.treedef = jax.tree.flatten(state)
        variables = jax.tree.leaves(state, is_leaf=lambda x: isinstance(x, nnx.Variable))
        variables = [v for v in variables for _ in jax.tree.leaves(v)]  # one per array (a quantized weight has 2)
        self.mesh, self.dtype = mesh, dtype
        self.targets = jax.tree.leaves(parallel.tree_shardings(state, mesh))
        self.sources = [_same_devices_on(mesh, x.sharding, x.ndim) for x in leaves]
        layered = [v.get_metadata().get("axes", ())[:1] == ("layers",) for v in variables]
        moves = [None if src is None else _shard_move(src.spec, dst.spec, mesh, layers)
                 for src, dst, layers in zip(self.sources, self.targets, layered)]
        self.shards_move = all(m is not None for m in moves)
        # what lands on each device: its decode shard of every weight split in training (None:
        # the partitioner's path, not counted)
        self.received_bytes = sum(parallel.nbytes(t.shard_shape(x.shape), jnp.dtype(self._dtype_of(x)))
                                  for x, t, src in zip(leaves, self.targets, self.sources)
                                  if any(_mesh_axes(a, mesh) for a in src.spec)) if self.shards_move else None
        cast = lambda x: x.astype(dtype) if jnp.issubdtype(x.dtype, jnp.floating) else x
        if not self.shards_move:
            self._program = jax.jit(lambda xs: [cast(x) for x in xs], out_shardings=self.targets)
            return

        def local(train, decode):
            out = []
            for x, buffer, move, layers in zip(train, decode, moves, layered):
                if layers:  # one layer at a time into the donated buffer
                    step = lambda i, b, x=x, move=move: jax.lax.dynamic_update_index_in_dim(b, move(cast(x[i])), i, 0)
                    out.append(jax.lax.fori_loop(0, x.shape[0], step, buffer))
                else:  # into the donated buffer too, so XLA reuses it
                    out.append(jax.lax.dynamic_update_slice(buffer, move(cast(x)), (0,) * x.ndim))
            return out

        specs = [t.spec for t in self.targets]
        self._program = jax.jit(jax.shard_map(local, mesh=mesh, in_specs=([s.spec for s in self.sources], specs),
                                              out_specs=specs, check_vma=False),
                                out_shardings=self.targets, donate_argnums=1)

    def _dtype_of(self, x):
        return self.dtype if jnp.issubdtype(x.dtype, jnp.floating) else x.dtype

    def _abstract_decode(self, leaves):
        return [jax.ShapeDtypeStruct(x.shape, self._dtype_of(x), sharding=t) for x, t in zip(leaves, self.targets)]

    def __call__(self, graphdef, state, previous=None):
        """The decode copy of the model (`graphdef`, `state`), in `previous`'s buffers if given."""
        return nnx.merge(graphdef, self.copy(state, None if previous is None else nnx.state(previous)))

    def copy(self, state, previous=None):
        """The decode copy of `state`, in the buffers of `previous` (its last copy) if given."""
        leaves = jax.tree.leaves(state)
        with jax.set_mesh(self.mesh):
            if not self.shards_move:
                return jax.tree.unflatten(self.treedef, self._program(leaves))
            # the same shards, addressed through the decode mesh (no copy)
            train = [jax.make_array_from_single_device_arrays(x.shape, src, [s.data for s in x.addressable_shards])
                     for x, src in zip(leaves, self.sources)]
            if previous is None:
                decode = jax.jit(lambda: [jnp.zeros(a.shape, a.dtype) for a in self._abstract_decode(leaves)],
                                 out_shardings=self.targets)()
            else:
                decode = jax.tree.leaves(previous)
            return jax.tree.unflatten(self.treedef, self._program(train, decode))

    def lower(self, state):
        """The program lowered for `state`'s shapes (for the TPU compiler's memory plan)."""
        leaves = jax.tree.leaves(state)
        if not self.shards_move:
            return self._program.lower(leaves)
        train = [jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s) for x, s in zip(leaves, self.sources)]
        return self._program.lower(train, self._abstract_decode(leaves))


def _same_devices_on(mesh: jax.sharding.Mesh, sharding, ndim: int):
    """A NamedSharding on `mesh` that puts the same shard on the same device as `sharding`
    (None where there is none): each of `mesh`'s axes longer than 1 on one dimension or
    none, in either order."""
    names = [n for n in mesh.axis_names if mesh.shape[n] > 1]
    for dims in itertools.product(range(ndim + 1), repeat=len(names)):
        for order in itertools.permutations(names):
            spec = [tuple(n for n in order if dims[names.index(n)] == d) for d in range(ndim)]
            candidate = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(*[a or None for a in spec]))
            if candidate.is_equivalent_to(sharding, ndim):
                return candidate
    return None


def _mesh_axes(entry, mesh: jax.sharding.Mesh) -> tuple[str, ...]:
    """The axes longer than 1 that one PartitionSpec entry splits its dimension over."""
    return tuple(n for n in ((entry,) if isinstance(entry, str) else (entry or ())) if mesh.shape[n] > 1)


def _shard_move(source, target, mesh: jax.sharding.Mesh, layers: bool):
    """The per-device function that turns a weight's local block under PartitionSpec
    `source` into its block under `target` (one layer's, for a stacked weight), or None where
    this layout is not one the shard path handles. Handled: the source split on at most one
    dimension (over `data`, `tensor` or both), the target on at most one, over `tensor`."""
    ndim = max(len(source), len(target))
    source, target = ([_mesh_axes(a, mesh) for a in tuple(spec) + (None,) * (ndim - len(spec))]
                      for spec in (source, target))
    if layers:
        if source[0] or target[0]:
            return None
        source, target = source[1:], target[1:]
    split = [d for d, a in enumerate(source) if a]
    spread = [d for d, a in enumerate(target) if a]
    if len(split) > 1 or len(spread) > 1 or (spread and target[spread[0]] != ("tensor",)):
        return None
    over = source[split[0]] if split else ()  # mesh axes the source splits its dimension over, major first
    if len(set(over)) != len(over) or not set(over) <= {"data", "tensor"} or (spread and over and spread == split):
        return None

    def move(x):
        gather = over
        if spread and "tensor" in over:  # trade blocks inside each tensor group, tensor the minor split
            at = over.index("tensor")
            if over[at + 1:]:
                x = jax.lax.all_gather(x, over[at + 1:], axis=split[0], tiled=True)
            x = jax.lax.all_to_all(x, "tensor", split_axis=spread[0], concat_axis=split[0], tiled=True)
            gather = over[:at]
        elif spread:  # this device's slice of a dimension it holds whole
            n = x.shape[spread[0]] // mesh.shape["tensor"]
            x = jax.lax.dynamic_slice_in_dim(x, jax.lax.axis_index("tensor") * n, n, spread[0])
        return jax.lax.all_gather(x, gather, axis=split[0], tiled=True) if gather else x
    return move

"""Meshes, the one table that maps logical axis names to mesh axes, and multi-host setup.

Model code names logical axes (`embed`, `heads`, …); this module alone decides which mesh
axis (`data`, `fsdp`, `tensor`) shards each of them. Changing the FSDP or tensor-parallel
degree is a config change (`config.mesh`), never a code change.
"""

from __future__ import annotations

import collections
import contextlib
import functools
import glob
import json
import math
import os
import threading
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

from fleming_jax.openai_api import ServerError

MESH_AXES = ("data", "fsdp", "expert", "tensor")

# Logical axis -> mesh axis (or tuple of mesh axes, or None = replicated).
# FSDP shards parameters over `fsdp`; tensor parallelism shards heads/mlp/vocab over
# `tensor`; expert parallelism (mixture-of-experts models) gives each device of the `expert`
# axis its own experts, and shards every other weight over it like FSDP; the batch is split
# over `data` x `fsdp` x `expert`.
RULES: dict[str, str | tuple[str, ...] | None] = {
    "batch": ("data", "fsdp", "expert"),
    "length": None,
    "vocab": "tensor",
    "embed": ("fsdp", "expert"),
    "expert": "expert",  # the stacked experts of a layer
    "expert_embed": "fsdp",  # an expert weight's features (its experts already split over `expert`)
    "router_in": None,  # the router: small, whole on every device
    "router_out": None,
    "heads": "tensor",
    "kv_heads": "tensor",
    "head_dim": None,
    "mlp": "tensor",
    "layers": None,
    "norm": None,
    "lora": None,  # an adapter's rank: small, whole on every device
    # Activations: features stay whole between blocks; MLP hidden units split like `mlp`.
    "act_embed": None,
    "act_mlp": "tensor",
}


def mesh_shape(mesh_cfg, n_devices: int) -> tuple[int, int, int, int]:
    """(data, fsdp, expert, tensor) sizes from `config.mesh` (an axis it lacks: 1); one entry may
    be -1 ("the rest")."""
    sizes = [int(mesh_cfg.get(a, 1)) for a in MESH_AXES]
    if sizes.count(-1) > 1 or any(s == 0 or s < -1 for s in sizes):
        raise ValueError(f"config.mesh {dict(zip(MESH_AXES, sizes))}: sizes must be positive, "
                         "with at most one -1")
    known = math.prod(s for s in sizes if s != -1)
    if -1 in sizes:
        if n_devices % known:
            raise ValueError(f"config.mesh {dict(zip(MESH_AXES, sizes))} cannot fill {n_devices} "
                             f"devices: {n_devices} is not a multiple of {known}")
        sizes[sizes.index(-1)] = n_devices // known
    if math.prod(sizes) != n_devices:
        raise ValueError(f"config.mesh {dict(zip(MESH_AXES, sizes))} needs {math.prod(sizes)} "
                         f"devices but {n_devices} are available; set one axis to -1 to use the rest")
    return tuple(sizes)


def default_devices() -> list:
    """All devices of all hosts, shuffled the same way on every host under
    `FLEMING_SHUFFLE_DEVICES=<seed>` (see `make_mesh`)."""
    devices = jax.devices()
    if os.environ.get("FLEMING_SHUFFLE_DEVICES"):
        order = np.random.default_rng(int(os.environ["FLEMING_SHUFFLE_DEVICES"])).permutation(len(devices))
        devices = [devices[i] for i in order]
    return list(devices)


def split_devices(rollout: int) -> tuple[list, list]:
    """(the trainer's devices, the rollout engine's): the last `rollout` / process_count of
    each host's default devices go to rollouts (RL's `rollout.devices`; 0: none, both use all).
    Every host keeps devices of both groups, so the weights reach the rollouts by host-local
    copies (`move`)."""
    devices = default_devices()
    if rollout == 0:
        return devices, []
    hosts, per_host = jax.process_count(), len(devices) // jax.process_count()
    if rollout % hosts or not 0 < rollout // hosts < per_host:
        raise ValueError(f"rollout.devices={rollout} must be a multiple of the {hosts} hosts that leaves the trainer "
                         f"at least one of each host's {per_host} devices (0: rollouts and training share all "
                         f"{len(devices)} of them)")
    taken = set()
    for p in range(hosts):
        taken.update([d for d in devices if d.process_index == p][-(rollout // hosts):])
    return [d for d in devices if d not in taken], [d for d in devices if d in taken]


def move(tree: Any, shardings: Any) -> Any:
    """`tree`'s arrays onto the devices of `shardings` (a tree of the same structure) whose
    shards have the arrays' own shard shapes: each shard is copied from a device of the same
    host holding the same piece. Host-local copies only (JAX moves an array between different
    device sets of several hosts only on TPU's runtime)."""
    leaves, treedef = jax.tree.flatten(tree)

    def one(x, sharding):
        key = lambda index: tuple(i.indices(n)[:2] for i, n in zip(index, x.shape))
        pieces = {key(shard.index): shard.data for shard in x.addressable_shards}
        wanted = sharding.addressable_devices_indices_map(x.shape)
        missing = [d for d, index in wanted.items() if key(index) not in pieces]
        if missing:
            raise ValueError(f"no device of this host holds the piece of a {x.shape} array that {missing[0]} needs: "
                             "both device groups must split weights the same way on every host")
        return jax.make_array_from_single_device_arrays(
            x.shape, sharding, [jax.device_put(pieces[key(index)], d) for d, index in wanted.items()])
    return jax.tree.unflatten(treedef, [one(x, s) for x, s in zip(leaves, jax.tree.leaves(shardings))])


def make_mesh(mesh_cfg, devices=None) -> jax.sharding.Mesh:
    """A (data, fsdp, expert, tensor) mesh over `devices` (default: all devices of all hosts).

    `FLEMING_SHUFFLE_DEVICES=<seed>` (the rehearsal sets it) shuffles the default devices, the
    same way on every host, across hosts: a TPU slice's mesh orders its chips along the torus,
    not by id or host, and code that assumes one order then fails on CPU too."""
    devices = list(default_devices() if devices is None else devices)
    shape = mesh_shape(mesh_cfg, len(devices))
    auto = (jax.sharding.AxisType.Auto,) * len(MESH_AXES)
    return jax.make_mesh(shape, MESH_AXES, axis_types=auto, devices=devices)


def rollout_mesh(tensor: int, num_kv_heads: int, over) -> jax.sharding.Mesh:
    """The decode layout's mesh over the devices of `over` (the mesh the policy is trained or
    built on, or a list of devices of the rollout's own), in `over`'s device order: tensor
    parallel over groups of `tensor` devices, data parallel over the groups (the `fsdp` and
    `expert` axes have size 1, so no weight is gathered per token; a group holds whole experts).

    One device order for both meshes is what lets a single program move the policy between
    them: JAX refuses a computation whose shardings order the same devices differently, and
    on a TPU `jax.make_mesh` orders chips along the torus, not by id. The groups are runs of
    consecutive devices of that order, or every (devices / tensor)-th, whichever keeps each
    group on one host (on GPUs and CPUs, ordered by id, the runs do); where neither does (a
    TPU ring that snakes across hosts), runs: torus neighbours, linked by ICI all the same.
    `tensor=-1` takes the largest count that divides both the host's device count and the KV
    heads (a v5p host's 4 chips for Qwen2.5-7B's 4 KV heads; 8 GPUs for Qwen3-32B's 8).
    """
    devices = np.array(list(over.devices.flat) if isinstance(over, jax.sharding.Mesh) else list(over), dtype=object)
    local = min(collections.Counter(d.process_index for d in devices).values())
    if tensor == -1:
        tensor = math.gcd(local, num_kv_heads)
    if tensor < 1 or local % tensor:
        raise ValueError(f"rollout.tensor={tensor} must divide the {local} devices of a host "
                         "(tensor parallelism stays inside a host); -1 picks it")
    groups = len(devices) // tensor
    one_host = lambda grid: all(len({d.process_index for d in g}) == 1 for g in grid)
    auto = (jax.sharding.AxisType.Auto,) * len(MESH_AXES)
    # runs: grid [data, fsdp, expert, tensor]; strided: grid [tensor, expert, fsdp, data]; both keep `over`'s order
    runs = devices.reshape(groups, tensor)
    if one_host(runs) or not one_host(devices.reshape(tensor, groups).T):
        return jax.sharding.Mesh(runs.reshape(groups, 1, 1, tensor), MESH_AXES, axis_types=auto)
    return jax.sharding.Mesh(devices.reshape(tensor, 1, 1, groups), MESH_AXES[::-1], axis_types=auto)


def logical_to_spec(axes: tuple[str | None, ...]) -> P:
    """PartitionSpec for a tuple of logical axis names, via RULES."""
    return P(*(None if a is None else RULES[a] for a in axes))


def constrain(x: jax.Array, axes: tuple[str, ...]) -> jax.Array:
    """Sharding constraint on an activation when a mesh is set (`jax.set_mesh`); else a no-op."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        return x
    return jax.lax.with_sharding_constraint(x, logical_to_spec(axes))


def sharding_for(var: nnx.Variable, mesh: jax.sharding.Mesh | None) -> jax.sharding.Sharding:
    """Where a parameter lives: its `axes` metadata through RULES on `mesh`, or device 0."""
    if mesh is None:
        return jax.sharding.SingleDeviceSharding(jax.devices()[0])
    return NamedSharding(mesh, logical_to_spec(var.get_metadata()["axes"]))


def tree_shardings(tree: Any, mesh: jax.sharding.Mesh) -> Any:
    """Shardings for a pytree of parameters or of optimizer state: every nnx Variable by its
    logical axes (optax keeps the Variables, so Adam moments shard like their params);
    other leaves (step counters, scalars) replicated. A Variable holding several arrays (a
    quantized weight: its values and their scales) keeps them, each split like the weight
    along the dims it divides."""
    def of(x):
        if not isinstance(x, nnx.Variable):
            return NamedSharding(mesh, P())
        value = x.get_value()
        if jax.tree.leaves(value) == [value]:  # one array
            return sharding_for(x, mesh)
        spec = logical_to_spec(x.get_metadata()["axes"])
        return x.replace(jax.tree.map(lambda leaf: NamedSharding(mesh, _dividing(spec, leaf.shape, mesh)), value))
    return jax.tree.map(of, tree, is_leaf=lambda x: isinstance(x, nnx.Variable))


def nbytes(shape: tuple[int, ...], dtype) -> int:
    """Bytes of an array of `shape` and `dtype` (an array's `.dtype`) on an accelerator (4-bit
    codes packed two a byte, as TPUs and GPUs hold them; XLA:CPU spends a byte on each)."""
    return math.prod(shape) * (4 if dtype.name in ("int4", "uint4") else 8 * dtype.itemsize) // 8


def placed(tree: Any, mesh: jax.sharding.Mesh, dtype=None) -> Any:
    """`tree` of abstract (or real) arrays as `jax.ShapeDtypeStruct`s in their `tree_shardings`,
    floating arrays as `dtype` when given (what a program is lowered for without the arrays)."""
    cast = lambda x: dtype if dtype is not None and jnp.issubdtype(x.dtype, jnp.floating) else x.dtype
    leaf = lambda x, s: jax.ShapeDtypeStruct(x.shape, cast(x), sharding=s)

    def place(x, s):
        if not isinstance(x, nnx.Variable):
            return leaf(x, s)
        value = x.get_value()
        shards = s.get_value() if isinstance(s, nnx.Variable) else jax.tree.map(lambda _: s, value)
        return x.replace(jax.tree.map(leaf, value, shards))
    return jax.tree.map(place, tree, tree_shardings(tree, mesh), is_leaf=lambda x: isinstance(x, nnx.Variable))


def _dividing(spec: P, shape: tuple[int, ...], mesh: jax.sharding.Mesh) -> P:
    """`spec` without the mesh axes that do not divide their dim of `shape`."""
    return P(*(None if axes is None or n % split_ways(axes, mesh) else axes for axes, n in zip(spec, shape)))


def split_ways(axes: str | tuple[str, ...], mesh: jax.sharding.Mesh) -> int:
    """Into how many pieces the mesh axis or axes of one PartitionSpec entry split a dim."""
    return math.prod(mesh.shape[a] for a in ((axes,) if isinstance(axes, str) else axes))


def batch_sharding(mesh: jax.sharding.Mesh, ndim: int = 1) -> NamedSharding:
    """Leading axis split over the data-parallel axes, the rest replicated."""
    return NamedSharding(mesh, logical_to_spec(("batch",) + (None,) * (ndim - 1)))


def batch_devices(mesh: jax.sharding.Mesh) -> int:
    """How many ways the batch axis is split on `mesh` (a batch's rows must divide by it)."""
    return split_ways(RULES["batch"], mesh)


def global_batch(mesh: jax.sharding.Mesh, batch: dict[str, np.ndarray], whole: bool = False
                 ) -> dict[str, jax.Array]:
    """Global arrays sharded over `batch`, from NumPy rows: the one way SFT and RL feed a step.

    whole=False: `batch` is this host's slice (SFT's per-host grain pipeline), and the global
    batch is the hosts' slices stacked. whole=True: `batch` is the whole global batch, the
    same on every host (an RL rollout batch); each host transfers only the rows its own
    devices hold, so the global batch has exactly `batch`'s rows on any number of hosts.
    """
    def put(v: np.ndarray) -> jax.Array:
        sharding = batch_sharding(mesh, v.ndim)
        if whole:
            return jax.make_array_from_callback(v.shape, sharding, lambda index: v[index])
        return jax.make_array_from_process_local_data(sharding, v)
    return {k: put(np.asarray(v)) for k, v in batch.items()}


def to_host(x: jax.Array) -> np.ndarray:
    """A (possibly multi-host sharded) array as one numpy array on this host."""
    if getattr(x, "is_fully_addressable", True):
        return np.asarray(jax.device_get(x))
    from jax.experimental import multihost_utils
    return np.asarray(multihost_utils.process_allgather(x, tiled=True))


_GOOGLE_PCI_VENDOR = "0x1ae0"
_TPU_METADATA = "http://metadata.google.internal/computeMetadata/v1/instance/attributes/"


def _gce_metadata(key: str) -> str:
    """A Cloud TPU VM's instance attribute ("" where there is none: not a TPU VM, no server)."""
    import urllib.request

    request = urllib.request.Request(_TPU_METADATA + key, headers={"Metadata-Flavor": "Google"})
    try:
        with urllib.request.urlopen(request, timeout=2) as response:
            return response.read().decode().strip()
    except OSError:
        return ""


def _google_pci_device() -> bool:
    """Whether this machine has a Google PCI device (TPU chips, gVNIC): a GCE VM, maybe a TPU VM."""
    for vendor in glob.glob("/sys/bus/pci/devices/*/vendor"):
        with open(vendor) as f:
            if f.read().strip() == _GOOGLE_PCI_VENDOR:
                return True
    return False


def tpu_worker_count(environ=os.environ, metadata=_gce_metadata) -> int:
    """How many workers (hosts) the Cloud TPU slice this process runs on has; 1 off a TPU VM.

    The TPU runtime names the workers in `TPU_WORKER_HOSTNAMES` / `TPU_PROCESS_ADDRESSES`
    (GKE, some images), else in the VM's `worker-network-endpoints` metadata attribute, which
    is asked only on a machine with a Google PCI device (so never on a laptop or GPU node).
    """
    hosts = environ.get("TPU_PROCESS_ADDRESSES") or environ.get("TPU_WORKER_HOSTNAMES")
    if not hosts:
        if not _google_pci_device():
            return 1
        hosts = metadata("worker-network-endpoints")
    return max(1, len([h for h in hosts.split(",") if h.strip()]))


def initialize_distributed(dist_cfg=None, environ=os.environ) -> None:
    """`jax.distributed.initialize` for multi-host runs; `config.distributed.enabled` picks.

    None (default, "auto"): GPU clusters pass the coordinator through config or the env
    (`FLEMING_COORDINATOR_ADDRESS`, `FLEMING_NUM_PROCESSES`, `FLEMING_PROCESS_ID`; see
    docs/scale.md, "Run on GPU clusters"); a multi-worker Cloud TPU slice initialises with no arguments (JAX
    finds the slice itself); anything else (one TPU worker, a CPU, one GPU node) stays a
    single process. True: initialise even where nothing is detected. False: never.
    """
    unset = {"coordinator_address": "", "num_processes": 0, "process_id": -1}
    enabled = dist_cfg.get("enabled") if dist_cfg is not None else None
    if enabled is False or jax.distributed.is_initialized():
        return

    def get(key, env):
        value = dist_cfg.get(key, unset[key]) if dist_cfg is not None else unset[key]
        return value if value != unset[key] else environ.get(env)
    address = get("coordinator_address", "FLEMING_COORDINATOR_ADDRESS")
    kwargs, workers = {}, 1
    if address:
        num, pid = get("num_processes", "FLEMING_NUM_PROCESSES"), get("process_id", "FLEMING_PROCESS_ID")
        if num in (None, "") or pid in (None, ""):
            raise ValueError(f"coordinator_address={address} is set, so num_processes and "
                             "process_id are needed too (config.distributed or "
                             "FLEMING_NUM_PROCESSES / FLEMING_PROCESS_ID)")
        kwargs = dict(coordinator_address=address, num_processes=int(num), process_id=int(pid))
    elif not enabled:
        workers = tpu_worker_count(environ)
        if workers == 1:
            return
    # JAX's own preemption notifier would take SIGTERM over from `fleming_jax.preemption`'s
    # handler (main.py listens before it joins), and a preempted slice would run on unwarned.
    jax.config.update("jax_enable_preemption_service", False)
    jax.distributed.initialize(**kwargs)
    if is_main_process():
        how = (f"coordinator {address}" if address else f"Cloud TPU slice of {workers} workers, detected"
               if workers > 1 else "config.distributed.enabled=True")
        print(f"[distributed] {how}: {jax.process_count()} processes, {jax.local_device_count()} local / "
              f"{jax.device_count()} global devices (--config.distributed.enabled=False turns this off)",
              flush=True)


def is_main_process() -> bool:
    """Only process 0 writes logs, reports and exports; every process writes its checkpoint shards."""
    return jax.process_index() == 0


# Errors process 0 hands to the other hosts by name (any other kind arrives as RuntimeError).
_SHARED_ERRORS = (ServerError, FileNotFoundError, ValueError, OSError)


def on_main(work: Callable[..., Any], *args) -> Any:
    """`work(*args)` on process 0 alone, its JSON-able result on every host (every host calls
    this at the same point; `work` starts no collective). Where it fails, every host raises, so
    none is left in a collective waiting for a process that has gone (jax's shutdown barrier
    would hold them 5 minutes, then abort them)."""
    if jax.process_count() == 1:
        return work(*args)
    outcome = None
    if is_main_process():
        try:
            outcome = {"value": work(*args)}
        except Exception as e:
            kind = next((c.__name__ for c in _SHARED_ERRORS if isinstance(e, c)), "RuntimeError")
            _from_main({"error": kind, "message": str(e)})
            raise
    outcome = _from_main(outcome)
    if "error" in outcome:
        kind = {c.__name__: c for c in _SHARED_ERRORS}.get(outcome["error"], RuntimeError)
        raise kind(f"process 0 stopped: {outcome['message']}")
    return outcome["value"]


def _from_main(value: Any) -> Any:
    """Process 0's JSON-able `value` on every host (a collective: `gather_hosts`)."""
    main = is_main_process()
    data = np.frombuffer(json.dumps(value).encode(), np.uint8) if main else np.zeros(0, np.uint8)
    size = int(gather_hosts(np.int32(data.size))[0])
    padded = np.zeros(max(64, 1 << (size - 1).bit_length()), np.uint8)  # few shapes, few compiles
    padded[:data.size] = data
    return json.loads(gather_hosts(padded)[0][:size].tobytes())


_agreeing = threading.local()  # the devices this thread's host agreements run on (`agreements_on`)


@contextlib.contextmanager
def agreements_on(devices: list | None):
    """This thread's host agreements (`gather_hosts`: preemption checks, process 0's
    broadcasts, checkpoint verdicts) run on `devices` for the duration (None: all devices).
    Why: a device runs programs in the order they are launched, and a collective waits for
    the same program on every host. Two threads launching onto the same devices interleave in
    a different order on each host and deadlock; each thread keeping to a device group of its
    own (RL's trainer and its rollouts sampled ahead) keeps one order everywhere."""
    previous = getattr(_agreeing, "devices", None)
    _agreeing.devices = None if devices is None else tuple(devices)
    try:
        yield
    finally:
        _agreeing.devices = previous


def gather_hosts(value: Any) -> np.ndarray:
    """Every process's `value` (the same shape and dtype on each) stacked in process order;
    on several hosts a collective over this thread's agreement group (`agreements_on`):
    every host calls it at the same point."""
    value = np.asarray(value)
    if jax.process_count() == 1:
        return value[None]
    mesh = _hosts_mesh(getattr(_agreeing, "devices", None) or tuple(jax.devices()))
    with jax.set_mesh(mesh):  # (the caller's may be another: the engine's, the trainer's)
        spread = jax.make_array_from_process_local_data(NamedSharding(mesh, P("hosts")), value[None])
        return np.asarray(_replicated(mesh)(spread))


@functools.cache
def _hosts_mesh(devices: tuple) -> jax.sharding.Mesh:
    """`devices` as a (hosts, devices of a host) mesh: a host's value is whole on each of its
    devices (every device of the group takes part, as in JAX's own `process_allgather`)."""
    by_host = collections.defaultdict(list)
    for d in devices:
        by_host[d.process_index].append(d)
    if len(by_host) != jax.process_count() or len({len(v) for v in by_host.values()}) != 1:
        raise ValueError(f"host agreements need the same number of devices on each of the {jax.process_count()} "
                         f"hosts; this device group has {dict(sorted((p, len(v)) for p, v in by_host.items()))}")
    return jax.sharding.Mesh(np.array([by_host[p] for p in sorted(by_host)]), ("hosts", "local"))


@functools.cache
def _replicated(mesh: jax.sharding.Mesh):
    return jax.jit(lambda x: x, out_shardings=NamedSharding(mesh, P()))

"""`task=plan`: will a config fit? Compile its train step ahead of time and print memory.

The step compiled is the task's own: the SFT loss on `train.batch_size` x `train.seq_len`
for `sft`; for the RL stages the GRPO loss of `rl.grpo` on the one update batch shape RL
runs (`packing.update_budget`, decided by the same function from `rl.*`, the mesh and the
longest prompt: `plan.prompt_len` here, the pool's in RL; equal power-of-two buckets give
the same shape). With `rl.grpo.beta > 0` the KL
reference copy (`rl.reference_dtype`, sharded like the params) is counted per device too.
For RL, `run` plans the whole step (`rl_step_plan`): every program an RL step runs, on the
meshes RL builds, and the memory of each of its phases.

Nothing is allocated: the step is lowered on abstract shapes with their shardings and
compiled for the mesh, either on fake CPU devices (`plan.devices`) or, with libtpu
installed, for a TPU slice described by `plan.topology` (e.g. "v5p:4x4x2").
"""

from __future__ import annotations

import functools
import json
import math
import os
import re

GIB = 1024**3


def device_memory(device) -> int:
    """Bytes a program may use on `device`: a TPU's as its compiler counts it (v5e 15.75 GiB,
    v6e 31.25, v5p 95.74: less than the chip's nominal 16 / 32 / 95, so a plan that fits is
    one the chip runs), read from the error of a program too large for any chip; 0 elsewhere
    (set plan.hbm_gb)."""
    import jax
    import jax.numpy as jnp

    if device.platform != "tpu":
        return 0
    try:
        jax.jit(lambda: jnp.zeros((2**40,), jnp.int8),
                out_shardings=jax.sharding.SingleDeviceSharding(device)).lower().compile()
    except jax.errors.JaxRuntimeError as e:
        found = re.search(r"available HBM \(([\d.]+)G\)", str(e))
        return int(float(found.group(1)) * GIB) if found else 0
    return 0


def is_rl(config) -> bool:
    """An RL stage's config (`configs/rl_stage*.py`), also under `--config.task=plan`."""
    return config.get("rl") is not None


def _devices(plan_cfg):
    """The devices to compile for: `plan.devices` fake CPU devices (made before JAX starts its
    backend), else the TPU slice `plan.topology` describes, else the devices present."""
    if plan_cfg.topology and not plan_cfg.devices:
        os.environ.setdefault("TPU_WORKER_HOSTNAMES", "localhost")
        # compiling for a described slice touches no chip: let it run beside another libtpu user
        os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
        from jax.experimental import topologies

        bounds = {} if not plan_cfg.get("host_bounds") else dict(
            chips_per_host_bounds=tuple(int(n) for n in plan_cfg.host_bounds.split(",")))
        try:
            return topologies.get_topology_desc(platform="tpu", topology_name=plan_cfg.topology, **bounds).devices
        except Exception as e:  # libtpu missing or an unknown topology name
            raise ValueError(f"plan.topology={plan_cfg.topology!r} cannot be described: {e}. It "
                             "needs libtpu (pip install 'jax[tpu]==0.10.2') and a name like "
                             "'v5p:4x4x2', 'v5e:8x8', 'v4:2x2x2', 'v6e:4x4'") from e
    if plan_cfg.devices:
        flag = f"--xla_force_host_platform_device_count={plan_cfg.devices}"
        os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {flag}".strip()
    import jax

    if plan_cfg.devices and jax.device_count() != plan_cfg.devices:
        raise ValueError(f"plan.devices={plan_cfg.devices} but JAX already started with "
                         f"{jax.device_count()} devices; set XLA_FLAGS={flag} before starting")
    return jax.devices()


def plan(config) -> dict:
    """Compiles the SFT/GRPO train step for `config` and returns the per-device memory plan."""
    devices = _devices(config.plan)
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from fleming_jax import models, parallel
    from fleming_jax.models import decoder
    from fleming_jax.train import state as train_state

    mesh = parallel.make_mesh(config.mesh, devices)
    model_config = models.config_from(config.model)
    abstract_model = nnx.eval_shape(lambda: decoder.create(model_config))
    graphdef, params, frozen = nnx.split(abstract_model, train_state.trainable(model_config), ...)
    tx = train_state.make_optimizer(config.optimizer)
    abstract = train_state.TrainState(step=jax.ShapeDtypeStruct((), jnp.int32), params=params,
                                      opt_state=jax.eval_shape(tx.init, params), frozen=frozen)
    shardings = train_state.state_shardings(abstract, mesh)
    placed = parallel.placed(abstract, mesh)
    loss, batch, reference_dtype = task_loss(config, mesh)
    accum = config.rl.grad_accum_steps if is_rl(config) else config.train.grad_accum_steps
    rows, length = batch["tokens"].shape
    step = train_state.make_train_step(graphdef, tx, loss, accum, mesh, shardings)
    with jax.set_mesh(mesh):
        compiled = compile_or_refuse(step.jitted.lower(placed.replace(frozen=None), placed.frozen, batch),
                                     "the train step", config)

    reference_bytes = 0
    if reference_dtype and not model_config.lora_rank:  # the KL reference: every param again, in its own
        # dtype and the same shards (with LoRA it is the frozen base itself: adapters off)
        itemsize = jnp.dtype(reference_dtype).itemsize
        reference_bytes = sum(math.prod(x.sharding.shard_shape(x.shape)) * itemsize
                              for x in jax.tree.leaves(placed.params))
    mem = compiled.memory_analysis()
    n_params = sum(math.prod(x.shape) for x in jax.tree.leaves((params, frozen)))
    kind = devices[0].device_kind
    hbm = int(config.plan.hbm_gb * GIB) or device_memory(devices[0])
    peak = mem.argument_size_in_bytes + mem.output_size_in_bytes - mem.alias_size_in_bytes + mem.temp_size_in_bytes
    peak += reference_bytes  # held beside the step for the whole run
    return dict(
        task=config.task, loss="grpo" if is_rl(config) else "sft", model=config.model.preset, params=n_params, device_kind=kind, devices=len(devices),
        mesh=dict(zip(parallel.MESH_AXES, parallel.mesh_shape(config.mesh, len(devices)))),
        batch_size=rows, seq_len=length, grad_accum_steps=accum,
        compute_dtype=model_config.compute_dtype, remat=model_config.remat,
        params_bytes=shard_bytes((placed.params, placed.frozen)),
        trained_params=sum(math.prod(x.shape) for x in jax.tree.leaves(params)),
        optimizer_bytes=shard_bytes(placed.opt_state), reference_bytes=reference_bytes,
        reference_dtype=reference_dtype,
        arguments_bytes=mem.argument_size_in_bytes, outputs_bytes=mem.output_size_in_bytes,
        aliased_bytes=mem.alias_size_in_bytes, temp_bytes=mem.temp_size_in_bytes,
        peak_bytes=peak, hbm_bytes=hbm, fits=None if not hbm else peak <= hbm,
        flops_per_step=train_flops(model_config, rows, length),
    )


def task_loss(config, mesh):
    """(loss_fn, abstract microbatch, reference dtype or None) of the config's task."""
    import jax
    import jax.numpy as jnp

    from fleming_jax import parallel
    from fleming_jax.train import grpo, packing, sft

    spec = lambda shape, dtype: jax.ShapeDtypeStruct(shape, dtype, sharding=parallel.batch_sharding(mesh, len(shape)))
    if not is_rl(config):
        t = config.train
        shape = (t.batch_size, t.seq_len)
        batch = dict(tokens=spec(shape, jnp.int32), segments=spec(shape, jnp.int32), loss_weights=spec(shape, jnp.float32))
        return (lambda model, b: sft.sft_loss(model, b, chunk_size=t.logprob_chunk,
                                                router_aux_loss_coef=t.router_aux_loss_coef)), batch, None
    c = config.rl  # the update batch RL runs: its budget for prompts of plan.prompt_len tokens
    budget = packing.update_budget(c, config.plan.prompt_len, parallel.batch_devices(mesh))
    shapes = packing.batch_shapes(budget.rows, budget.length, budget.scored, packing.update_arrays(c))
    batch = {name: spec(shape, dtype) for name, (shape, dtype) in shapes.items()}
    loss = functools.partial(grpo.grpo_loss, cfg=c.grpo, chunk_size=c.logprob_chunk, tis_cap=c.tis_cap)
    return loss, batch, (c.reference_dtype if c.grpo.beta else None)


def shard_bytes(tree) -> int:
    """Bytes a device holds of the placed arrays in `tree` (4-bit codes packed two a byte, as on TPU)."""
    import jax

    from fleming_jax import parallel

    return sum(parallel.nbytes(x.sharding.shard_shape(x.shape), x.dtype) for x in jax.tree.leaves(tree))


def compile_or_refuse(lowered, what: str, config):
    """`lowered.compile()`; a program the TPU compiler finds larger than the chip's memory is
    refused in one line (ValueError) naming the program and the compiler's numbers."""
    import jax

    try:
        return lowered.compile()
    except jax.errors.JaxRuntimeError as e:
        if "RESOURCE_EXHAUSTED" not in str(e):
            raise
        said = str(e)[str(e).find("RESOURCE_EXHAUSTED"):].split("\n")[0][:240]
        raise ValueError(f"{config.model.preset} does not fit: {what} alone needs more than a device's memory on "
                         f"{config.plan.topology or 'these devices'} ({said}); use "
                         "a larger slice (more chips shard the state), fewer rollout slots (rollout.slots) or a "
                         "smaller update batch") from None


def rl_step_plan(config) -> dict:
    """Every program of one RL step compiled for the meshes RL itself builds (the training
    mesh and `parallel.rollout_mesh` over it): the sync into the decode layout, the engine's
    prefill, insert and decode at the configured slots, the reference / recompute forward and
    the update (`plan`). Returns `plan`'s dict plus each phase's per-device memory, from the
    compiled programs: what stays resident all step (train state, KL reference) plus what the
    phase holds (its arguments, outputs and temporaries), and the largest of them as the
    step's peak."""
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from fleming_jax import engine, models, parallel, sampler
    from fleming_jax.models import decoder
    from fleming_jax.train.logprobs import PACKED_BATCH, packed_logprobs

    p = plan(config)
    devices = _devices(config.plan)
    c, r = config.rl, config.rollout
    model_config = models.config_from(config.model)
    mesh = parallel.make_mesh(config.mesh, devices)
    rollout = parallel.rollout_mesh(r.tensor, model_config.num_kv_heads, mesh)
    abstract_model = nnx.eval_shape(lambda: decoder.create(model_config))
    graphdef, abstract = nnx.split(abstract_model)
    mem = lambda compiled: compiled.memory_analysis()
    holds = lambda m: m.argument_size_in_bytes + m.output_size_in_bytes - m.alias_size_in_bytes + m.temp_size_in_bytes
    dtype = r.dtype or model_config.compute_dtype
    trained = parallel.placed(abstract, mesh)
    whole = jax.sharding.NamedSharding(rollout, jax.sharding.PartitionSpec())
    spec = lambda shape, dt, sharding=whole: jax.ShapeDtypeStruct(shape, dt, sharding=sharding)
    group = c.group_size
    dp = parallel.batch_devices(rollout)
    sequences = c.prompts_per_step * group
    cache = engine.CacheLayout.plan(
        model_config, sequences, group, config.plan.prompt_len, c.max_new_tokens, dp, r.slots or sequences,
        r.kv_cache_gib, r.page_size, dtype, "cpu")  # no free memory known ahead: half the slots at full length
    slots, width = cache.slots, cache.width
    rows = -(-sampler.bucket(min(c.prompts_per_step, slots // group), minimum=1) // dp) * dp
    programs = {}
    with jax.set_mesh(rollout):
        sync = sampler.sync_program(graphdef, trained, rollout, dtype)
        programs["sync"] = compile_or_refuse(sync.lower(trained), "the sync", config)
        decode_state = jax.tree.unflatten(sync.treedef, [
            jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s) for x, s in
            zip(jax.tree.leaves(programs["sync"].out_info), jax.tree.leaves(programs["sync"].output_shardings))])
        empty = compile_or_refuse(engine._empty.lower(model_config, slots, cache.pages, cache.page_size,
                                                      cache.pages_per_sequence, c.max_new_tokens, dtype, cache.shards),
                                  f"the rollout's KV cache ({cache.pages} pages of {cache.page_size} tokens)", config)
        table = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                             empty.out_info, empty.output_shardings)
        batch = parallel.batch_sharding(rollout)
        programs["prefill"] = compile_or_refuse(engine._prefill.lower(
            graphdef, decode_state, spec((rows, width), jnp.int32, parallel.batch_sharding(rollout, 2)),
            spec((rows,), jnp.int32, batch), cache_dtype=dtype, split_layers=engine.splits_layers(devices[0])),
            "the prefill", config)
        prefilled, logits = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                                         programs["prefill"].out_info, programs["prefill"].output_shardings)
        admitted = rows * group  # the largest admission: whole groups into every prefilled row
        key = jax.ShapeDtypeStruct((), jax.eval_shape(lambda: jax.random.key(0)).dtype)
        programs["insert"] = compile_or_refuse(engine._insert.lower(
            table, prefilled, logits, spec((rows,), jnp.int32, batch), spec((admitted,), jnp.int32, batch),
            spec((admitted,), jnp.int32, batch), key, spec((admitted,), jnp.int32, batch),
            spec((admitted, width // cache.page_size), jnp.int32, parallel.batch_sharding(rollout, 2)),
            config=model_config), "the insert", config)
        scalar = spec((), jnp.int32)
        params = sampler.SamplingParams(temperature=c.temperature, top_p=c.top_p, num_samples=group, max_new_tokens=0)
        programs["decode"] = compile_or_refuse(engine._decode.lower(
            graphdef, decode_state, table, spec((slots, cache.pages_per_sequence), jnp.int32,
                                                parallel.batch_sharding(rollout, 2)),
            spec((slots,), jnp.bool_, batch), spec((slots,), jnp.int32, batch), spec((2,), jnp.int32), scalar,
            scalar, params=params, split_layers=engine.splits_layers(devices[0]),
            kernel=engine.uses_kernel(devices[0], model_config, cache.page_size)),
            "the decode loop", config)
    loss, update_batch, _ = task_loss(config, mesh)
    forward = c.grpo.beta or c.recompute_old_logprobs or c.tis_cap
    if forward:  # the reference's (bf16 copy) or the trainer's own log-probs of the rollout
        param_graphdef, param_state = nnx.split(abstract_model, nnx.Param)
        forward_params = parallel.placed(param_state, mesh, c.reference_dtype if c.grpo.beta else None)
        layout = {k: update_batch.get(k) for k in PACKED_BATCH}
        fwd = packed_logprobs(param_graphdef, c.logprob_chunk)
        with jax.set_mesh(mesh):
            programs["forward"] = compile_or_refuse(fwd.lower((forward_params,), layout), "the reference forward", config)
    resident = p["params_bytes"] + p["optimizer_bytes"] + p["reference_bytes"]
    decode_bytes, table_bytes = shard_bytes(decode_state), shard_bytes(table)
    # what each engine program holds beyond the decode copy and the slots (counted once)
    engine_peak = max(holds(mem(programs["prefill"])) - decode_bytes, holds(mem(programs["insert"])) - table_bytes,
                      holds(mem(programs["decode"])) - decode_bytes - table_bytes)
    phases = dict(
        sync=resident + mem(programs["sync"]).output_size_in_bytes + mem(programs["sync"]).temp_size_in_bytes,
        rollout=resident + decode_bytes + table_bytes + max(0, engine_peak),
        update=p["peak_bytes"],  # the step's own state + batch + temporaries, and the reference
    )
    if forward:
        phases["forward"] = resident + holds(mem(programs["forward"])) - shard_bytes(forward_params)
    if c.max_staleness:  # rollouts sampled ahead run beside the update, on the same devices
        if r.devices:
            raise ValueError(f"task=plan does not plan rollout.devices={r.devices} (a device group of the engine's "
                             "own) yet; plan max_staleness on shared devices (rollout.devices=0)")
        # the update's peak plus the engine's: the copy it samples from and one per launched rollout
        phases["overlap"] = (p["peak_bytes"] + (c.max_staleness + 1) * decode_bytes + table_bytes
                             + max(0, engine_peak))
    peak = max(phases.values())
    return p | dict(
        programs=sorted(programs) + ["update"], rollout_mesh=dict(rollout.shape), rollout_dtype=dtype, slots=slots,
        prompt_len=width, cache_pages=cache.pages // dp, page_size=cache.page_size, decode_bytes=decode_bytes, cache_bytes=table_bytes,
        sync_temp_bytes=mem(programs["sync"]).temp_size_in_bytes, sync_received_bytes=sync.received_bytes,
        phases=phases, update_peak_bytes=p["peak_bytes"],
        peak_bytes=peak, fits=None if not p["hbm_bytes"] else peak <= p["hbm_bytes"])


def train_flops(c, batch_size: int, seq_len: int) -> float:
    """Matmul FLOPs of one forward+backward step (XLA's own count sees a scanned layer
    once, so it is not used): 6 x weights x tokens, plus attention scores and values
    (12 x layers x heads x head_dim x the keys a query scores, per token: about half of
    seq_len up to `attention_chunk`, where query blocks skip the keys after them, all of it
    above), plus one more forward under full rematerialisation. A mixture-of-experts layer
    counts the experts a token is routed to, not all of them."""
    from fleming_jax.models import decoder

    routed = c.experts_per_token / c.num_experts if c.num_experts else 1.0
    weights = sum(math.prod(s) * (routed if name.startswith("expert_") else 1.0)
                  for name, s in decoder.layer_param_shapes(c).items())
    weights += c.hidden_size * c.vocab_size  # the output projection
    tokens = batch_size * seq_len
    keys = decoder.keys_per_query(seq_len, c.attention_chunk)
    flops = 6.0 * weights * tokens + 12.0 * c.num_layers * c.num_heads * c.head_dim * keys * tokens
    return flops * (4 / 3 if c.remat == "full" else 1.0)


def _reference_line(p: dict, gib) -> str:
    if not p["reference_dtype"]:
        return "none (beta = 0)" if p["loss"] == "grpo" else "none (SFT)"
    if p["trained_params"] < p["params"]:
        return "0 (LoRA: the frozen base, adapters off)"
    return f"{gib(p['reference_bytes'])} ({p['reference_dtype']} copy)"


def format_plan(p: dict) -> str:
    gib = lambda b: f"{b / GIB:,.2f} GiB"
    rows = [
        ("model", f"{p['model']} ({p['params'] / 1e9:.2f}B params, {p['compute_dtype']} compute, remat={p['remat']})"),
        ("devices", f"{p['devices']} x {p['device_kind']}, mesh {p['mesh']}"),
        ("step", f"{p['loss']} loss, batch {p['batch_size']} x {p['seq_len']} tokens, "
                 f"grad_accum {p['grad_accum_steps']}"),
        ("params / device", gib(p["params_bytes"])),
        ("optimizer / device", gib(p["optimizer_bytes"])),
        ("KL reference / device", _reference_line(p, gib)),
        ("trained", f"{p['trained_params'] / 1e6:.0f}M of the {p['params'] / 1e9:.2f}B params (LoRA adapters)")
        if p["trained_params"] < p["params"] else None,
        ("temporaries / device", gib(p["temp_bytes"]) + "  (activations, gradients, XLA buffers)"),
        ("peak / device", gib(p["peak_bytes"]) + "  (arguments + outputs - donated + temporaries + reference)"),
        ("device memory", gib(p["hbm_bytes"]) if p["hbm_bytes"] else "unknown (set plan.hbm_gb)"),
        ("fits", {True: "yes", False: "NO", None: "?"}[p["fits"]]),
        ("FLOPs / step", f"{p['flops_per_step']:.3e} in all, "
                         f"{p['flops_per_step'] / p['devices']:.3e} per device"),
    ]
    rows = [row for row in rows if row]
    if "phases" in p:  # the whole RL step
        rows[-3:-3] = [
            ("rollout", f"{p['slots']} slots, {p['cache_pages']} cache pages of {p['page_size']} tokens a device "
                        f"(prompt bucket {p['prompt_len']}), {p['rollout_dtype']} decode copy, mesh {p['rollout_mesh']}"),
            ("decode copy / device", gib(p["decode_bytes"])),
            ("KV cache + slots / device", gib(p["cache_bytes"])),
            ("sync temporaries / device", gib(p["sync_temp_bytes"])),
            ("sync received / device", "partitioner's path, not counted" if p["sync_received_bytes"] is None
             else gib(p["sync_received_bytes"]) + "  (shards moved into the last decode copy's buffers)"),
        ] + [(f"{name} phase / device", gib(b)) for name, b in p["phases"].items()] + [
            ("peak / device", gib(p["peak_bytes"]) + f"  (the largest phase; compiled: {', '.join(p['programs'])})")]
        rows = [row for row in rows if not (row[0] == "peak / device" and "arguments" in row[1])]
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)


def run(config, workdir: str) -> dict:
    """`task=plan`: prints the memory table and writes it to `<workdir>/plan.json`; refuses
    (one line) a config whose step does not fit the device's memory."""
    p = rl_step_plan(config) if is_rl(config) else plan(config)
    print(format_plan(p))
    from etils import epath

    (epath.Path(workdir) / "plan.json").write_text(json.dumps(p, indent=2))
    if p["fits"] is False:
        worst = max(p.get("phases", {"step": p["peak_bytes"]}).items(), key=lambda kv: kv[1])
        raise ValueError(f"{p['model']} does not fit: the {worst[0]} phase needs {worst[1] / GIB:,.1f} GiB per device "
                         f"of {p['hbm_bytes'] / GIB:,.1f} GiB on {p['devices']} x {p['device_kind']}; use a larger "
                         "slice (more chips shard the state), fewer rollout slots (rollout.slots) or a shorter "
                         "update batch (train.batch_size / rl.max_new_tokens)")
    return p


COLLECTIVES = ("all-gather", "all-reduce", "all-to-all", "collective-permute", "reduce-scatter")


DTYPE_BYTES = {"pred": 1, "s8": 1, "u8": 1, "bf16": 2, "f16": 2, "s16": 2, "f32": 4, "s32": 4, "u32": 4,
               "f64": 8, "s64": 8, "u64": 8}


def loop_collectives(hlo_text: str) -> dict[str, int]:
    """Collectives inside the decode loop of a compiled sampler (the body of its `while` and
    every computation that body calls): how many of each, and `all_gather_bytes`, the bytes
    all-gathered per decoded token (weights gathered per token show up here in MiBs; the
    sampler's own vocab-sharded reductions gather a few KiB)."""
    computations, name = {}, None
    for line in hlo_text.splitlines():
        head = re.match(r"^(?:ENTRY )?%?([\w.\-]+) .*\{$", line)
        if head:
            name = head.group(1)
            computations[name] = []
        elif name is not None:
            computations[name].append(line)
    bodies = [m.group(1) for lines in computations.values() for line in lines
              for m in [re.search(r"\bwhile\(.*body=%?([\w.\-]+)", line)] if m]
    seen, todo, counts = set(), list(bodies), dict.fromkeys(COLLECTIVES + ("all_gather_bytes",), 0)
    while todo:
        comp = todo.pop()
        if comp in seen or comp not in computations:
            continue
        seen.add(comp)
        for line in computations[comp]:
            todo += re.findall(r"(?:calls|to_apply|body|condition|branch_computations)=\{?%?([\w.\-]+)", line)
            op = re.search(r"=\s*(.+?)\s+(" + "|".join(COLLECTIVES) + r")(?:-start)?\(", line)
            if op:
                counts[op.group(2)] += 1
                if op.group(2) == "all-gather":  # the largest array of the result (async: a tuple)
                    counts["all_gather_bytes"] += max(
                        DTYPE_BYTES.get(t, 4) * math.prod(int(d) for d in dims.split(",") if d)
                        for t, dims in re.findall(r"(\w+)\[([\d,]*)\]", op.group(1)))
    return counts


def decode_plan(config, layout: str = "rollout", prompts: int = 8, samples: int = 2,
                prompt_len: int = 16, budget: int = 16) -> dict:
    """Compiles the rollout engine's decode program (`engine._decode`: a chunk of tokens in
    every slot, `prompts x samples` slots) for `config.model` on abstract shapes: in the
    rollout layout (`parallel.rollout_mesh`, params in the compute dtype) or, with
    `layout="train"`, on the training mesh with the master weights. Returns per-device
    memory (the arguments hold the weights and the slots' KV cache, `cache_bytes` of it) and
    the collectives per decoded token (see `loop_collectives`), and `attention_kernels`: how
    many Pallas paged-attention calls it holds (one a layer on TPU, none elsewhere)."""
    devices = _devices(config.plan)
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from fleming_jax import engine, models, parallel, sampler
    from fleming_jax.models import decoder

    model_config = models.config_from(config.model)
    graphdef, abstract = nnx.split(nnx.eval_shape(lambda: decoder.create(model_config)))
    if layout == "rollout":
        mesh = parallel.rollout_mesh(config.rollout.tensor, model_config.num_kv_heads,
                                    parallel.make_mesh(config.mesh, devices))
        dtype = config.rollout.dtype or model_config.compute_dtype
    else:
        mesh, dtype = parallel.make_mesh(config.mesh, devices), model_config.param_dtype
    state = parallel.placed(abstract, mesh, dtype)
    dp = parallel.batch_devices(mesh)
    cache = engine.CacheLayout.plan(model_config, prompts * samples, samples, prompt_len, budget, dp,
                                    prompts * samples, page_size=config.rollout.page_size, dtype=dtype)
    slots = cache.slots
    whole = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    with jax.set_mesh(mesh):
        empty = engine._empty.lower(model_config, slots, cache.pages, cache.page_size, cache.pages_per_sequence,
                                    budget, dtype).compile()  # the slots' shapes and layout
        table = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                             empty.out_info, empty.output_shardings)
        scalar = jax.ShapeDtypeStruct((), jnp.int32, sharding=whole)
        params = sampler.SamplingParams(temperature=1.0, num_samples=samples, max_new_tokens=0)
        every = jax.ShapeDtypeStruct((slots,), jnp.int32, sharding=parallel.batch_sharding(mesh, 1))
        held = jax.ShapeDtypeStruct((slots,), jnp.bool_, sharding=parallel.batch_sharding(mesh, 1))
        tables = jax.ShapeDtypeStruct((slots, cache.pages_per_sequence), jnp.int32,
                                      sharding=parallel.batch_sharding(mesh, 2))
        stops = jax.ShapeDtypeStruct((2,), jnp.int32, sharding=whole)
        compiled = engine._decode.lower(graphdef, state, table, tables, held, every, stops, scalar, scalar,
                                        params=params, split_layers=engine.splits_layers(devices[0]),
                                        kernel=engine.uses_kernel(devices[0], model_config, cache.page_size)).compile()
    mem = compiled.memory_analysis()
    return dict(model=config.model.preset, layout=layout, mesh=dict(mesh.shape), dtype=dtype,
                device_kind=devices[0].device_kind, rows=slots, cache_pages=cache.pages // dp,
                page_size=cache.page_size, attention_kernels=len(re.findall(r"%paged_attention\S* = .*custom-call\(", compiled.as_text())),
                cache_bytes=sum(map(shard_bytes, table.cache.k + table.cache.v)),
                arguments_bytes=mem.argument_size_in_bytes, temp_bytes=mem.temp_size_in_bytes,
                output_bytes=mem.output_size_in_bytes,
                per_token=loop_collectives(compiled.as_text()))

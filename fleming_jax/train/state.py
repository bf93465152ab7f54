"""Training state (params + optimizer) and the one sharded, jitted train step.

Every trainer (SFT, GRPO) supplies a loss `loss_fn(model, microbatch) -> (numerator,
denominator, metrics)`; the step's loss is Σnumerator / Σdenominator over the gradient
accumulation microbatches, so accumulating N microbatches gives the same update as one
big batch for every aggregation (token mean, sequence mean, constant normaliser).
"""

from __future__ import annotations

import contextlib
from typing import Any, Callable

import flax.struct
import jax
import jax.numpy as jnp
import optax
from flax import nnx

from fleming_jax import parallel

LossFn = Callable[[Any, dict[str, jax.Array]], tuple[jax.Array, jax.Array, dict[str, jax.Array]]]


@flax.struct.dataclass
class TrainState:
    step: jax.Array
    params: nnx.State  # what trains, in the model's param_dtype: every weight, or only the LoRA adapters
    opt_state: Any  # the optimizer's state of `params`
    frozen: nnx.State  # the base weights under LoRA adapters (empty without): read by every step, never updated

    def model(self, graphdef):
        return nnx.merge(graphdef, self.params, self.frozen)


def make_optimizer(opt) -> optax.GradientTransformation:
    """AdamW with linear warmup + cosine decay and global-norm clipping, from `config.optimizer`.

    Weight decay skips vectors (norm scales, biases), as is usual for transformers.
    """
    schedule = optax.warmup_cosine_decay_schedule(
        init_value=0.0, peak_value=opt.learning_rate, warmup_steps=opt.warmup_steps,
        decay_steps=max(opt.total_steps, opt.warmup_steps + 1),
        end_value=opt.learning_rate * opt.final_lr_fraction)
    decay_mask = lambda params: jax.tree.map(lambda x: x.ndim >= 2, params)
    return optax.chain(
        optax.clip_by_global_norm(opt.max_grad_norm),
        optax.adamw(schedule, b1=opt.b1, b2=opt.b2, eps=opt.eps, weight_decay=opt.weight_decay,
                    mask=decay_mask))


def init_state(model, tx: optax.GradientTransformation, mesh=None):
    """(graphdef, TrainState); with a mesh the optimizer state is created in its shards.

    A model with LoRA adapters trains only them (`nnx.LoRAParam`); its other weights go to
    `frozen`. Every leaf is committed where the train step's outputs land (the default
    device, or the state's shardings): jit keys its cache on that, so a mix would compile twice.
    """
    graphdef, params, frozen = nnx.split(model, trainable(model.config), ...)
    if mesh is None:
        state = TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params), frozen=frozen)
        return graphdef, jax.device_put(state, jax.devices()[0])
    abstract = jax.eval_shape(tx.init, params)
    init_opt = jax.jit(tx.init, out_shardings=parallel.tree_shardings(abstract, mesh))
    state = TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=init_opt(params), frozen=frozen)
    return graphdef, jax.device_put(state, state_shardings(state, mesh))


def trainable(config) -> type[nnx.Variable]:
    """The variables a model trains: its LoRA adapters when it has them, else every weight."""
    return nnx.LoRAParam if config.lora_rank else nnx.Param


def state_shardings(state: TrainState, mesh) -> TrainState:
    """Shardings of a TrainState (or of its abstract shape) on `mesh`."""
    return parallel.tree_shardings(state, mesh)


def microbatches(batch: dict[str, jax.Array], n: int) -> dict[str, jax.Array]:
    """[B, ...] -> [n, B/n, ...], microbatch i taking rows i, i+n, … so each device's rows
    stay on that device."""
    def split(x):
        if x.shape[0] % n:
            raise ValueError(f"batch size {x.shape[0]} is not divisible by grad_accum_steps={n}")
        return x.reshape(x.shape[0] // n, n, *x.shape[1:]).swapaxes(0, 1)
    return jax.tree.map(split, batch)


def make_train_step(graphdef, tx: optax.GradientTransformation, loss_fn: LossFn,
                    grad_accum_steps: int = 1, mesh=None, shardings: TrainState | None = None):
    """The jitted `step(state, batch) -> (state, metrics)`; the trained buffers (params,
    optimizer state) are donated, the frozen base is read in place."""

    def micro_grads(params, frozen, micro):
        def loss(p):
            num, den, metrics = loss_fn(nnx.merge(graphdef, p, frozen), micro)
            return num, (den, metrics)
        (num, (den, metrics)), grads = jax.value_and_grad(loss, has_aux=True)(params)
        return grads, num, den, metrics

    def step(state: TrainState, frozen, batch):
        micros = microbatches(batch, grad_accum_steps)
        # each microbatch's key of the adapters' dropout (lora_dropout; unused without it):
        # from the step number, so a resumed run draws the same masks
        micros["dropout_key"] = jax.random.split(jax.random.fold_in(jax.random.key(0), state.step), grad_accum_steps)
        zeros = jax.tree.map(jnp.zeros_like, state.params)

        def accumulate(carry, micro):
            grads, num, den, metrics = micro_grads(state.params, frozen, micro)
            acc_grads, acc_num, acc_den, acc_metrics = carry
            acc_metrics = jax.tree.map(jnp.add, acc_metrics, metrics)
            return (jax.tree.map(jnp.add, acc_grads, grads), acc_num + num, acc_den + den,
                    acc_metrics), None

        first = jax.tree.map(lambda x: x[0], micros)
        metrics0 = jax.tree.map(jnp.zeros_like, jax.eval_shape(micro_grads, state.params, frozen, first)[3])
        init = (zeros, jnp.zeros((), jnp.float32), jnp.zeros((), jnp.float32), metrics0)
        (grads, num, den, metrics), _ = jax.lax.scan(accumulate, init, micros)
        den = jnp.maximum(den, 1e-8)
        grads = jax.tree.map(lambda g: g / den, grads)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        metrics = {k: v / grad_accum_steps for k, v in metrics.items()}
        metrics.update(loss=num / den, grad_norm=optax.tree.norm(grads))
        return TrainState(step=state.step + 1, params=params, opt_state=opt_state, frozen=None), metrics

    if mesh is None:
        jitted = jax.jit(step, donate_argnums=0)
    else:
        trained = None if shardings is None else shardings.replace(frozen=None)
        jitted = jax.jit(step, in_shardings=(trained, None if shardings is None else shardings.frozen,
                                             parallel.batch_sharding(mesh)),
                         out_shardings=(trained, None), donate_argnums=0)

    def run(state: TrainState, batch):
        """The step on `state`: its trained part donated, `frozen` passed through."""
        with jax.set_mesh(mesh) if mesh is not None else contextlib.nullcontext():
            new, metrics = jitted(state.replace(frozen=None), state.frozen, batch)
        return new.replace(frozen=state.frozen), metrics
    run.jitted = jitted  # (trained state without `frozen`, frozen, batch): what `plan` lowers
    return run

"""Supervised fine-tuning (the CoT cold start): the loss on assistant tokens, and the `sft`
task that trains on the chats `distill` writes.

Checkpoints and the loop are `train/loop.py`'s, shared with RL: `params`, `opt_state`,
`meta` (step) and `data` (each host's grain iterator state). SFT draws no random numbers
after init (no dropout; the data order is the seeded pipeline's), so there is no RNG item.
A rerun resumes from the newest checkpoint that restores; SIGTERM saves one and exits (one
arriving during an eval skips the rest of it: the step before it is finished and saved).
"""

from __future__ import annotations

import functools
import json
import sys
import time

import grain
import jax
import jax.numpy as jnp
from flax import nnx

from fleming_jax import models, parallel, paths, preemption
from fleming_jax import tokenizer as toklib
from fleming_jax.data import inputs, pipeline
from fleming_jax.models import moe
from fleming_jax.train import loop
from fleming_jax.train import state as statelib
from fleming_jax.train.logprobs import token_logprobs


def sft_loss(model, batch, chunk_size: int = 256, router_aux_loss_coef: float = 0.0):
    """Cross-entropy summed over tokens whose `loss_weights` are set, and that weight sum.

    batch: `tokens` [B, T], `segments` [B, T] (0 = padding, k = k-th packed example),
    `loss_weights` [B, T] (1 on assistant tokens, aligned with the token being predicted).
    A mixture-of-experts model with `router_aux_loss_coef` > 0 adds that times the
    load-balancing loss (`moe.balance_loss`) to each token's loss, as transformers does.
    """
    stats = [] if router_aux_loss_coef and model.config.num_experts else None
    logprobs = token_logprobs(model, batch["tokens"], batch["segments"], chunk_size=chunk_size,
                              dropout_key=batch.get("dropout_key"), router_stats=stats)
    weights = batch["loss_weights"].astype(logprobs.dtype)
    loss, metrics = -(logprobs * weights).sum(), {}
    if stats:
        routed = jnp.sum(batch["segments"] > 0) * model.config.num_layers
        metrics["router_balance"] = moe.balance_loss(stats[0], routed)
        loss = loss + router_aux_loss_coef * metrics["router_balance"] * weights.sum()
    return loss, weights.sum(), metrics


def read_chats(path: str, key: str) -> list[dict]:
    """The checked chats of `config.data.<key>` (see `fleming_jax.data.inputs`)."""
    return inputs.read_chats(path, f"data.{key}", (
        "run `python main.py --config=configs/distill.py --workdir=runs/distill` first (it writes "
        f"train.jsonl and validation.jsonl), or point --config.data.{key} at an SFT JSONL file of "
        "{id, messages, meta} records"))


def load_tokenizer(config, workdir: str, train_rows: list[dict]):
    """`config.tokenizer` if set, else the HF model's own, else the small offline BPE built
    from the training chats into `<workdir>/tokenizer` (reused on resume: same chats, same
    fingerprint; rebuilt when the chats or the vocab size changed)."""
    path = config.tokenizer or config.model.hf_path
    if path:
        return toklib.load(path)
    texts = [m["content"] for row in train_rows for m in row["messages"]]
    return toklib.build_once(texts, paths.join(workdir, "tokenizer"), config.model.vocab_size)


class _Snapshot:
    """A grain iterator state taken now, so an async save never sees a later position."""

    def __init__(self, iterator):
        self.state = json.dumps(iterator.get_state()).encode()

    def get_state(self):
        return self.state


class Trainer:
    """Builds everything once; `train()` runs (or resumes) to `optimizer.total_steps`."""

    def __init__(self, config, workdir: str):
        self.config, self.workdir = config, workdir
        self.main = parallel.is_main_process()
        train_rows = read_chats(config.data.train, "train")
        eval_rows = read_chats(config.data.eval, "eval") if config.data.eval else []
        self.tokenizer = load_tokenizer(config, workdir, train_rows)
        t = config.train
        self.mesh = parallel.make_mesh(config.mesh)
        if len(self.tokenizer) > config.model.vocab_size and not config.model.hf_path:
            raise ValueError(f"the tokenizer has {len(self.tokenizer)} tokens but config.model.vocab_size "
                             f"is {config.model.vocab_size}")
        examples, self.data_stats = pipeline.tokenize(train_rows, self.tokenizer, t.seq_len)
        if not examples:
            raise ValueError(f"config.data.train={config.data.train}: no chat has an assistant token within "
                             f"train.seq_len={t.seq_len} ({self.data_stats}); raise --config.train.seq_len")
        eval_examples, _ = pipeline.tokenize(eval_rows, self.tokenizer, t.seq_len)
        pid, count = jax.process_index(), jax.process_count()
        self.train_ds = pipeline.train_dataset(examples, t.seq_len, t.batch_size, config.data.seed, pid, count)
        self.eval_data = pipeline.eval_batches(eval_examples, t.seq_len, t.batch_size)  # the same on every host

        model, _ = models.build(config.model, self.mesh)
        self.model_meta = models.checkpoint_meta(config.model)  # what every checkpoint records of the model
        self.tx = statelib.make_optimizer(config.optimizer)
        self.graphdef, self.state = statelib.init_state(model, self.tx, self.mesh)
        self.shardings = statelib.state_shardings(self.state, self.mesh)
        loss = functools.partial(sft_loss, chunk_size=t.logprob_chunk, router_aux_loss_coef=t.router_aux_loss_coef)
        self.step_fn = statelib.make_train_step(self.graphdef, self.tx, loss, t.grad_accum_steps,
                                                self.mesh, self.shardings)
        eval_jit = jax.jit(lambda params, frozen, batch: loss(nnx.merge(self.graphdef, params, frozen), batch)[:2])

        def eval_fn(params, batch):
            with jax.set_mesh(self.mesh):
                return eval_jit(params, self.state.frozen, batch)
        self.eval_fn = eval_fn
        c = config.checkpoint
        self.ckpt = loop.Checkpoints(workdir, c.keep, self.shardings, self._log, c.use_async,
                                     data=grain.checkpoint.CheckpointHandler())

    # ------------------------------------------------------------------ checkpoints
    def save(self, step: int, iterator):
        self.ckpt.save(step, self.state, self.model_meta, data=grain.checkpoint.CheckpointSave(_Snapshot(iterator)))

    def restore(self, iterator) -> int:
        step, self.state, _ = self.ckpt.restore(
            self.state, lambda: dict(data=grain.checkpoint.CheckpointRestore(iterator)))
        return step

    # ------------------------------------------------------------------ loop
    def evaluate(self) -> float:
        """The held-out loss. Every host runs the same batches (feeding its rows of each) and
        checks for preemption before each, so a SIGTERM is seen within one batch."""
        num = den = 0.0
        for i, batch in enumerate(self.eval_data):
            preemption.check(f"eval batch {i + 1}/{len(self.eval_data)}")
            n, d = self.eval_fn(self.state.params, parallel.global_batch(self.mesh, batch, whole=True))
            num, den = num + float(n), den + float(d)
        return num / max(den, 1e-8)

    def _log(self, message: str):
        if self.main:
            print(f"[sft] {message}", flush=True)

    def train(self, on_step=None) -> list[dict]:
        """Trains to `optimizer.total_steps`; returns the metrics rows logged by this run.
        `on_step(step)` runs after each step (tests use it to interrupt a run)."""
        t = self.config.train
        total = self.config.optimizer.total_steps
        iterator = iter(self.train_ds)
        step = self.restore(iterator)
        self._log(f"{self.data_stats}; steps {step} -> {total}; {len(self.eval_data)} eval batches")
        clock = dict(tokens=0, t0=time.perf_counter())

        def one_step(step: int) -> dict | None:
            local = next(iterator)  # this host's rows
            clock["tokens"] += int((local["segments"] > 0).sum()) * jax.process_count()
            self.state, metrics = self.step_fn(self.state, parallel.global_batch(self.mesh, local))
            done = step + 1
            if done % t.log_every and done != total:
                return None
            row = {k: float(v) for k, v in metrics.items()}
            row["tokens_per_s"] = clock["tokens"] / (time.perf_counter() - clock["t0"])
            if self.eval_data and (done % t.eval_every == 0 or done == total):
                try:
                    row["eval_loss"] = self.evaluate()
                except preemption.Preempted as e:  # the step is done: train_loop saves it at its next check
                    self._log(f"{e}: skipped the eval of step {done}")
            self._log(f"step {done}/{total} loss {row['loss']:.4f}"
                      + (f" eval {row['eval_loss']:.4f}" if "eval_loss" in row else "")
                      + f" {row['tokens_per_s']:,.0f} tok/s")
            clock.update(tokens=0, t0=time.perf_counter())
            return row
        return loop.train_loop(start=step, total=total, one_step=one_step, save=lambda s: self.save(s, iterator),
                               every=self.config.checkpoint.every, ckpt=self.ckpt, workdir=self.workdir,
                               log=self._log, on_step=on_step, config=self.config)


def run(config, workdir: str) -> list[dict]:
    """The `sft` task."""
    rows = Trainer(config, workdir).train()
    if rows and parallel.is_main_process():
        print(f"[sft] done: {json.dumps(rows[-1])}; checkpoints in {workdir}/checkpoints "
              f"(--config.model.init_from={workdir}/checkpoints)", file=sys.stdout, flush=True)
    return rows

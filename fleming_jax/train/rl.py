"""The RL stages (task `rl`): rollout -> reward -> GRPO update, stage 1 and stage 2.

Per step: draw prompts from the stage's pool (`mining.make_pool`: stage 1's graded blend,
stage 2's hard-sample miner), sample G completions each with the continuous-batching engine
on the policy's decode copy (`policy`: cast and resharded once per update, `config.rollout`),
score them with the verifiable rewards, turn rewards into group advantages, then `mu`
epochs of optimizer steps over minibatches of the rollout's sequences, each packed into rows
(`train.packing`, `rl.pack_length`). Every host builds the same batches and feeds only its
own rows (`parallel.global_batch(whole=True)`).
With `beta > 0` the KL reference is its own copy of the starting weights
(`rl.reference_dtype`, bf16 by default), never an alias of the donated train state.
Checkpoints (`loop.Checkpoints`) hold params, optimizer state, the step, the NumPy RNG, the
pool's state (stage-1 grades, stage-2 statistics) and the stage's counters; the rollout
key is derived from the step, so a resumed run continues exactly as the uninterrupted one.
"""

from __future__ import annotations

import collections
import concurrent.futures
import contextlib
import dataclasses
import functools
import json
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from fleming_jax import engine, models, parallel, paths, preemption, progress, rewards, sampler
from fleming_jax import tokenizer as toklib
from fleming_jax.data import inputs
from fleming_jax.data.records import QARecord
from fleming_jax.evaluate import evaluate_records, fits_context
from fleming_jax.prompts import completion_texts, record_prompts
from fleming_jax.train import grpo, loop, mining, packing
from fleming_jax.train import state as statelib
from fleming_jax.train.logprobs import PACKED_BATCH, packed_logprobs


# The random stream of the pool's stage-start pass, apart from the per-step rollout keys
# (fold_in(key, step)).
PREPARE_STREAM = 1 << 30


def read_records(path: str, key: str, producer: str, accept=None) -> list[QARecord]:
    """The checked QA records of `config.<key>` (see `fleming_jax.data.inputs`)."""
    return inputs.read_records(path, key, f"run `{producer}` first, or point --config.{key} at a "
                               "QA-record JSONL file", accept)


def rollout_batch(prompts: list[list[int]], out: sampler.SampleOutput, advantages: np.ndarray,
                  keep: np.ndarray, rows: int, pack_length: int = 0, share_prompts: bool = False) -> dict[str, np.ndarray]:
    """The groups in `keep` of a rollout as one update batch (`train.packing`'s format): one
    sequence per row (`pack_length` 0) or packed (with shared prompts or not), in `rows` rows
    (or a multiple of `rows` when those do not hold the sequences)."""
    seqs = packing.Sequences.from_rollout(prompts, out, advantages, keep, share_prompts)
    return packing.build(seqs, *packing.lay_out(seqs, pack_length, rows))


@dataclasses.dataclass
class Rollout:
    """One step's sampled and scored groups, as `produce` hands them to `consume`: the step's
    metrics row so far, the sequences to train on (None: no group had signal), whether its
    first draw was sparse (the plateau counter) and `version`, the step whose starting
    weights sampled it."""

    step: int
    version: int
    row: dict
    seqs: packing.Sequences | None
    sparse: bool

    def to_json(self) -> dict:
        return dict(dataclasses.asdict(self), seqs=self.seqs and self.seqs.to_text())

    @classmethod
    def from_json(cls, saved: dict) -> "Rollout":
        return cls(**dict(saved, seqs=saved["seqs"] and packing.Sequences.from_text(saved["seqs"])))


def finished(value) -> concurrent.futures.Future:
    done = concurrent.futures.Future()
    done.set_result(value)
    return done


def concat_outputs(a: sampler.SampleOutput, b: sampler.SampleOutput) -> sampler.SampleOutput:
    """Two rollouts' outputs (same sampling budget) as one, prompts of `a` first."""
    return sampler.SampleOutput(*(np.concatenate([getattr(a, f.name), getattr(b, f.name)])
                                  for f in dataclasses.fields(sampler.SampleOutput)))


class RLTrainer:
    """One RL stage; `train()` runs (or resumes) to `rl.steps` or stage 1's plateau."""

    def __init__(self, config, workdir: str):
        self.config, self.workdir, self.main = config, workdir, parallel.is_main_process()
        c = config.rl
        if not (config.model.init_from or config.model.hf_path):
            raise ValueError(f"rl stage {c.stage} needs a starting model: --config.model.init_from=<checkpoints> "
                             "or --config.model.hf_path=<HF dir>")
        if config.model.init_from:
            paths.require(config.model.init_from, "config.model.init_from", f"run `{config.init_from_producer}` first")
        self.rewards = rewards.load_components(c.rewards, c.solved_by)  # (a bad entry stops here, before any model)
        self.tokenizer = toklib.load(config.tokenizer or config.model.hf_path)
        model_config = models.config_from(config.model)
        if len(self.tokenizer) > model_config.vocab_size:
            raise ValueError(f"the tokenizer at {config.tokenizer or config.model.hf_path} has {len(self.tokenizer)} "
                             f"tokens but the model's vocab_size is {model_config.vocab_size}; use the tokenizer the "
                             "starting model was trained with (config.tokenizer)")
        fits = fits_context(self.tokenizer, c.max_new_tokens, model_config.max_position_embeddings)
        self.records = read_records(config.data.train, "data.train", config.data.producer, fits)
        if c.max_pool:  # a seeded subset bounds stage 2's scoring pass and stage 1's grading
            keep = np.random.default_rng(c.seed).permutation(len(self.records))[:c.max_pool]
            self.records = [self.records[i] for i in sorted(keep)]
        self.eval_records = (read_records(config.data.eval, "data.eval", config.data.producer, fits)[:c.eval_size]
                             if config.data.eval else [])
        self.stop_ids = toklib.stop_ids(self.tokenizer)
        self.prompts = record_prompts(self.tokenizer, self.records)
        self.ahead = c.max_staleness  # how many steps ahead of the update rollouts are sampled
        if (self.ahead or config.rollout.devices) and config.rollout.engine != "local":
            raise ValueError("rl.max_staleness > 0 and rollout.devices need the in-tree engine "
                             f"(rollout.engine='local', not {config.rollout.engine!r})")
        if self.ahead and jax.process_count() > 1 and not config.rollout.devices:
            raise ValueError(f"rl.max_staleness={self.ahead} on {jax.process_count()} hosts needs a device group of the "
                             "rollouts' own: set rollout.devices (e.g. half of the devices). Sharing the devices, the "
                             "two threads would launch programs in a different order on each host, and deadlock")
        train_devices, rollout_devices = parallel.split_devices(config.rollout.devices)
        # the devices each thread's host agreements run on (`parallel.agreements_on`): its own group
        self.groups = (train_devices, rollout_devices) if rollout_devices else (None, None)
        # Rollouts sampled ahead run on a thread beside the update, except on several CPU processes:
        # XLA's CPU client launches a process's collectives one at a time in one queue for all its
        # devices, so two threads would queue them in a different order on each host and deadlock
        # (XLA's GPU client orders them per device; a TPU chip runs its own queue: not run here
        # on either). There they run in the main thread at their launch: the same samples,
        # versions and updates, without the overlap.
        self.overlap = self.ahead and not (jax.process_count() > 1 and jax.devices()[0].platform == "cpu")
        self.mesh = parallel.make_mesh(config.mesh, train_devices)
        model, model_config = models.build(config.model, self.mesh)
        self.model_meta = models.checkpoint_meta(config.model)  # what every checkpoint records of the model
        kv_heads = model_config.num_kv_heads
        rollout_mesh = parallel.rollout_mesh(config.rollout.tensor, kv_heads, rollout_devices or self.mesh)
        mirror = parallel.rollout_mesh(rollout_mesh.shape["tensor"], kv_heads, self.mesh) if rollout_devices else None
        self.engine = engine.from_config(config.rollout, rollout_mesh, self.tokenizer.pad_token_id or 0, workdir,
                                         mirror)
        self.synced, self.sync_seconds = False, 0.0  # whether the engine samples from the current policy
        # Step t's rollout is sampled from the weights at the start of step t - max_staleness;
        # with max_staleness > 0 on a worker thread while the main thread updates (0: in the
        # step, the synchronous run). `inflight`: each launched step's future Rollout, oldest first;
        # `snapshot`: a decode copy of the current weights for the rollouts launched ahead.
        self.worker = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="rollout")
        self.inflight, self.next_launch, self.snapshot = collections.deque(), 0, None
        self.worker_free_since = time.perf_counter()
        self.tx = statelib.make_optimizer(config.optimizer)
        self.graphdef, self.state = statelib.init_state(model, self.tx, self.mesh)
        shardings = statelib.state_shardings(self.state, self.mesh)
        self.reference = reference_weights(self.state, c.reference_dtype, shardings) if c.grpo.beta else None
        loss = functools.partial(grpo.grpo_loss, cfg=c.grpo, chunk_size=c.logprob_chunk, tis_cap=c.tis_cap)
        self.step_fn = statelib.make_train_step(self.graphdef, self.tx, loss, c.grad_accum_steps, self.mesh,
                                                shardings)
        logprobs = packed_logprobs(self.graphdef, c.logprob_chunk)
        # log-probs of `params` at a (global) batch's scored positions: the reference
        # policy's for the KL, the trainer's own for recompute_old_logprobs / TIS
        self.logprobs_of = lambda weights, b: self._on_mesh(logprobs, weights, {k: b[k] for k in PACKED_BATCH})
        self.pool = mining.make_pool(self.records, c)
        self.rng = np.random.default_rng(c.seed)
        # At max_staleness 0 the picks and the update's shuffles take turns on one stream; with
        # rollouts sampled ahead they would interleave by timing, so the update gets its own.
        self.shuffle_rng = self.rng if not self.ahead else np.random.default_rng([c.seed, 1])
        self.key = jax.random.key(c.seed)
        self.sparse_steps = 0
        self.ckpt = loop.Checkpoints(workdir, config.checkpoint.keep, shardings, self._log)

    def _on_mesh(self, fn, *args):
        with jax.set_mesh(self.mesh):
            return fn(*args)

    def _log(self, message: str):
        if self.main:
            print(f"[rl stage {self.config.rl.stage}] {message}", flush=True)

    # ------------------------------------------------------------------ checkpoints
    def save(self, step: int):
        self.ckpt.save(step, self.state, dict(
            self.host_state(), stage=self.config.rl.stage,
            reference=self.config.model.init_from or self.config.model.hf_path, **self.model_meta))

    def restore(self) -> int | None:
        """The step resumed from, or None when there is no checkpoint (a step-0 checkpoint,
        saved when preempted in the first step, already holds the pool's stage-start pass)."""
        step, self.state, got = self.ckpt.restore(self.state)
        if not got:
            return None
        self.load_host_state(got["meta"])
        return step

    def host_state(self) -> dict:
        """What a checkpoint holds besides the arrays: the RNGs, the pool, the counters, an
        update preempted between optimizer steps (`one_step`) and the rollouts sampled ahead
        (waited for: the pool and the RNG have moved past them)."""
        self.drain()
        pending = self.pending and dict(self.pending, seqs=self.pending["seqs"].to_text())
        return dict(rng=self.rng.bit_generator.state, pool=self.pool.state_dict(), sparse_steps=self.sparse_steps,
                    pending=pending, shuffle_rng=self.shuffle_rng.bit_generator.state,
                    inflight=[future.result().to_json() for future in self.inflight], next_launch=self.next_launch)

    def load_host_state(self, meta: dict) -> None:
        self.rng.bit_generator.state = meta["rng"]
        self.shuffle_rng.bit_generator.state = meta["shuffle_rng"]
        self.pool.load_state_dict(meta["pool"])
        self.sparse_steps = meta["sparse_steps"]
        pending = meta.get("pending")
        self.pending = pending and dict(pending, seqs=packing.Sequences.from_text(pending["seqs"]))
        self.inflight = collections.deque(finished(Rollout.from_json(r)) for r in meta["inflight"])
        self.next_launch = meta["next_launch"]

    # ------------------------------------------------------------------ rollouts
    def model(self):
        return self.state.model(self.graphdef)

    def policy(self) -> sampler.RolloutEngine:
        """The engine, synced with the current weights (once after each update, not per sampler
        call), for the main thread's own sampling: no rollout runs meanwhile."""
        self.drain()
        if not self.synced:
            t0 = time.perf_counter()
            if self.snapshot is not None:  # the current weights' copy, made for a rollout ahead
                self.engine.use(self.snapshot)
            else:
                self.engine.sync(self.model())
                self.snapshot = (self.engine.model, self.engine.sync_stats) if self.ahead else None
            self.sync_seconds, self.synced = self.sync_seconds + time.perf_counter() - t0, True
        return self.engine

    def drain(self) -> None:
        """Waits for every rollout in flight (raising what one raised)."""
        for future in self.inflight:
            future.result()

    def launch(self, step: int) -> None:
        """Hands the worker the rollouts of the steps up to `step` + max_staleness not yet
        launched, each sampled from the weights as they are now (step t's from the weights at
        the start of step t - max_staleness)."""
        while self.next_launch <= min(step + self.ahead, self.config.rl.steps - 1):
            weights = None  # max_staleness 0: the engine synced in place (nothing samples meanwhile)
            if self.ahead:
                t0 = time.perf_counter()
                if self.snapshot is None:
                    self.snapshot = self.engine.decode_copy(self.model())
                    jax.block_until_ready(nnx.state(self.snapshot[0]))
                self.sync_seconds += time.perf_counter() - t0
                weights, self.synced = self.snapshot, False  # the worker installs it
            else:
                self.policy()
            t = self.next_launch  # (max_staleness 0: sampled here, on the thread SIGTERM's handler runs in)
            self.inflight.append(self.worker.submit(self.produce, t, step, weights) if self.overlap else finished(
                self.produce(t, step, weights)))
            self.next_launch += 1

    def sampling(self, samples: int, temperature: float | None = None) -> sampler.SamplingParams:
        c = self.config.rl
        return sampler.SamplingParams(temperature=c.temperature if temperature is None else temperature,
                                      top_p=c.top_p, num_samples=samples, max_new_tokens=c.max_new_tokens)

    def rollout(self, indices: list[int], key, samples: int):
        """Samples `samples` completions per prompt from the engine's weights; returns
        (output, {reward component or "reward": values [n, g]}, what the components reported).
        On one process each prompt's replies are scored as soon as they are all finished, on a
        thread, while the engine decodes the rest (an LLM judge's requests overlap the decoding);
        on several, after the rollout in one batch (the judge's broadcast from process 0 must not
        interleave with the decode's collectives)."""
        prompts, params = [self.prompts[i] for i in indices], self.sampling(samples)
        if jax.process_count() > 1:
            out = self.engine.generate(prompts, key, params, self.stop_ids)
            texts = [t for row in completion_texts(self.tokenizer, out) for t in row]
            records = [self.records[i] for i in indices for _ in range(samples)]
            scores, reported = rewards.score_components(self.rewards, texts, records)
            return out, {k: np.array(v).reshape(len(indices), samples) for k, v in scores.items()}, reported
        scoring, groups = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="rewards"), {}

        def score_group(j, group):
            (texts,) = completion_texts(self.tokenizer, group)
            groups[j] = scoring.submit(rewards.score_components, self.rewards, texts, [self.records[indices[j]]] * samples)
        try:
            out = self.engine.generate(prompts, key, params, self.stop_ids, on_prompt_done=score_group)
            done = [groups[j].result() for j in range(len(indices))]
        finally:
            scoring.shutdown(cancel_futures=True)
        scores = {k: np.array([values[k] for values, _ in done]) for k in done[0][0]}
        reported = {k: sum(r.get(k, 0.0) for _, r in done) for k in {k for _, r in done for k in r}}
        return out, scores, reported

    def score_pool(self, indices: list[int], k: int) -> list[list[bool]]:
        """k samples per question, as many rows per sampler call as a training rollout has;
        whether each was correct (the pool's stage-start pass: grading or mining). When
        preempted, the chunks already scored are kept in `<workdir>/pool_pass.json` (process 0
        writes it: a multi-host workdir is shared storage) and a rerun of the same pass starts
        after them; each chunk's key depends only on its start, so the outcomes are the same."""
        c = self.config.rl
        key = jax.random.fold_in(self.key, PREPARE_STREAM)
        per_call = max(1, c.prompts_per_step * c.group_size // k)
        saved_file = paths.join(self.workdir, "pool_pass.json")
        which = dict(indices=list(indices), k=k, per_call=per_call)
        saved = json.loads(paths.read_text(saved_file)) if paths.exists(saved_file) else {}
        outcomes = saved["outcomes"] if all(saved.get(n) == v for n, v in which.items()) else []
        if outcomes:
            self._log(f"pool pass: {len(outcomes)}/{len(indices)} questions scored before the preemption, "
                      f"read from {saved_file}")
        shown = progress.Progress(len(indices), f"questions scored x {k}", self._log, start=len(outcomes))
        self.policy()
        try:
            for start in range(len(outcomes), len(indices), per_call):
                chunk = indices[start:start + per_call]
                _, scores, _ = self.rollout(chunk, jax.random.fold_in(key, start), k)
                outcomes += self.solved(scores).tolist()
                shown.update(len(outcomes))
        except preemption.Preempted:
            if self.main:
                paths.write_text(saved_file, json.dumps(dict(which, outcomes=outcomes)))
            self._log(f"pool pass preempted: {len(outcomes)}/{len(indices)} questions scored, kept in {saved_file}")
            raise
        return outcomes

    def pick(self, n: int) -> list[int]:
        return self.pool.sample(self.rng, n)

    # ------------------------------------------------------------------ loop
    def train(self, on_step=None) -> list[dict]:
        c = self.config.rl
        with preemption.listening(), parallel.agreements_on(self.groups[0]):  # from the stage-start pass on
            step = self.restore()
            if step is None:
                step = 0
                message = self.pool.prepare(self.score_pool, self._log)
                if message:
                    self._log(message)
            self.started = (step, time.perf_counter())  # (first step, when) of this run, for the ETA

            def plateau(step):
                if self.pool.stops_on_plateau and self.sparse_steps >= c.sparsity_patience:
                    return (f"reward sparsity above {c.sparsity_threshold} for {self.sparse_steps} steps: "
                            f"stage {c.stage} has plateaued")
            try:
                return loop.train_loop(start=step, total=c.steps, one_step=self.logged_step, save=self.save,
                                       every=self.config.checkpoint.every, ckpt=self.ckpt, workdir=self.workdir,
                                       log=self._log, on_step=on_step, stop_early=plateau, config=self.config)
            finally:
                self.worker.shutdown(cancel_futures=True)

    def logged_step(self, step: int) -> dict:
        c = self.config.rl
        row = self.one_step(step)
        if self.eval_records and ((step + 1) % c.eval_every == 0 or step + 1 == c.steps):
            greedy = self.sampling(1, temperature=0.0)
            try:
                row["eval_accuracy"] = evaluate_records(self.policy(), self.tokenizer, self.eval_records, greedy,
                                                        self.stop_ids)["accuracy"]
            except preemption.Preempted:
                pass  # the step itself is done: train_loop saves it at the next check
        first, t0 = self.started
        left = progress.eta(step + 1 - first, c.steps - first, time.perf_counter() - t0)
        self._log(f"step {step + 1}/{c.steps} reward {row['reward_mean']:.3f} acc {row['accuracy']:.3f} "
                  f"len {row['completion_length']:.0f} zero-adv {row['zero_advantage_groups']:.2f} drawn E/M/D "
                  f"{row['drawn_easy']}/{row['drawn_moderate']}/{row['drawn_difficult']}"
                  + (f" kl {row['kl_ref']:.2e}" if "kl_ref" in row else "")
                  + (f" mismatch {row['mismatch_abs']:.1e}" if "mismatch_abs" in row else "")
                  + (f" eval {row['eval_accuracy']:.3f}" if "eval_accuracy" in row else "")
                  + f" ({row['time_generate']:.1f}s gen, {row['time_update']:.1f}s update)" + (f" {left}" if left else ""))
        return row

    def solved(self, scores: dict) -> np.ndarray:
        """Which replies count as solved (the pool's grading and mining, the `accuracy` metric):
        component `rl.solved_by` at `rl.solved_at` or more."""
        c = self.config.rl
        return np.asarray(scores[c.solved_by]) >= c.solved_at

    def sample_groups(self, indices: list[int], key):
        """Rollout of `indices` -> (output, {reward component or "reward": values [n, G]}, what
        the components reported); the pool observes every outcome (`solved`)."""
        out, scores, reported = self.rollout(indices, key, self.config.rl.group_size)
        self.pool.observe(indices, self.solved(scores).tolist())
        return out, scores, reported

    # An update's progress while it runs (None between steps): the step, its metrics row so
    # far, the sequences, their minibatch rows, the optimizer steps done and their metric sums.
    pending: dict | None = None

    def one_step(self, step: int) -> dict:
        """One RL step. Preempted during its rollout (max_staleness 0: the rollout checks), it
        puts the host state back as it was at the step's start (nothing else has changed yet).
        Preempted between two optimizer steps of its update (the state has moved), it keeps
        the update's progress (`pending`) in the host state and replaces a checkpoint of the
        step's start, so the checkpoint `train_loop` saves holds the partly updated state and
        what is left of the update, and the rerun finishes the step from there. Rollouts
        sampled ahead finish first and go into the checkpoint (`host_state`). Either way the
        resumed run is the uninterrupted one."""
        boundary = None if self.ahead else self.host_state()  # (ahead, only the update checks)
        try:
            return self._one_step(step) if self.pending is None else self.finish_update(step)
        except preemption.Preempted:
            if self.pending is None:
                self.load_host_state(boundary)
                raise
            self.drain()  # orbax's barriers are collectives over every device: no rollout may run beside them
            if self.ckpt.latest_step() == step:
                self.ckpt.wait()
                self.ckpt.manager.delete(step)
            raise

    def finish_update(self, step: int) -> dict:
        """The rest of an update resumed from a checkpoint saved between its optimizer steps."""
        if self.pending["step"] != step:
            raise ValueError(f"the checkpoint of step {step} in {self.ckpt.directory} holds an unfinished update of "
                             f"step {self.pending['step']}; it was not written by this code: move it aside and rerun")
        t = time.perf_counter()
        metrics = self.optimizer_steps(self.pending)
        row = self.pending["row"]
        self.pending = None
        return row | dict(time_update=time.perf_counter() - t) | metrics

    def _one_step(self, step: int) -> dict:
        self.sync_seconds, t0 = 0.0, time.perf_counter()
        self.launch(step)
        rollout = self.inflight[0].result()  # what the worker raised comes up here
        return self.consume(step, rollout, time.perf_counter() - t0 - self.sync_seconds)

    def produce(self, step: int, version: int, weights) -> Rollout:
        """Step `step`'s rollout (on the worker thread): draw prompts, sample and score their
        groups (refilled under dynamic sampling), the advantages and the groups to train on;
        `weights`: the decode copy to sample from (None: the engine's)."""
        c = self.config.rl
        with (preemption.deferred() if self.ahead else contextlib.nullcontext()), parallel.agreements_on(self.groups[1]):
            t0 = time.perf_counter()
            idle = t0 - self.worker_free_since
            if weights is not None:
                self.engine.use(weights)
            key = jax.random.fold_in(self.key, step)
            indices = self.pick(c.prompts_per_step)
            out, scores, reported = self.sample_groups(indices, key)
            reward = scores["reward"]
            engine_stats = {f"rollout_{k}": v for k, v in self.engine.stats.items()}  # the first rollout's
            zero = np.all(reward == reward[:, :1], axis=1)
            sparse = bool(zero.mean() > c.sparsity_threshold)
            refills = 0
            # Dynamic sampling (DAPO): top the batch up with fresh prompts until it holds
            # prompts_per_step groups with signal, or max_refills rounds have run.
            while c.dynamic_sampling and (~zero).sum() < c.prompts_per_step and refills < c.max_refills:
                refills += 1
                more = self.pick(c.prompts_per_step - int((~zero).sum()))
                extra = self.sample_groups(more, jax.random.fold_in(key, refills))
                indices = indices + more
                out = concat_outputs(out, extra[0])
                scores = {k: np.concatenate([v, extra[1][k]]) for k, v in scores.items()}
                reported = {k: v + extra[2].get(k, 0.0) for k, v in reported.items()}
                reward = scores["reward"]
                zero = np.all(reward == reward[:, :1], axis=1)
            advantages = np.asarray(grpo.group_advantages(jnp.asarray(reward), c.grpo.advantage))
            keep = ~zero if c.drop_zero_advantage_groups or c.dynamic_sampling else np.ones_like(zero)
            keep &= np.cumsum(keep) <= c.prompts_per_step  # refills may overshoot
            lengths = out.lengths.astype(float)
            levels = self.pool.levels()
            components = {f"reward_{c.name}{tail}": float(f(scores[c.name])) for c in self.rewards
                          for tail, f in (("", np.mean), ("_positive", lambda v: np.mean(v > 0)))}
            components |= {f"reward_{k}": v for k, v in reported.items()}  # summed over the step's rollouts
            row = dict(reward_mean=float(reward.mean()), reward_std=float(reward.std()),
                       accuracy=float(np.mean(self.solved(scores))), **components,
                       advantage_abs_mean=float(np.abs(advantages).mean()), zero_advantage_groups=float(zero.mean()),
                       refills=refills, trained_groups=int(keep.sum()),
                       completion_length=float(lengths.mean()), completion_length_max=float(lengths.max()),
                       **{"histogram/reward": reward.ravel().tolist(), "histogram/completion_length": out.lengths.ravel().tolist()},
                       stopped=float(out.done.mean()), time_generate=time.perf_counter() - t0, time_rollout_idle=idle,
                       **engine_stats, **mining.level_counts([levels[i] for i in indices]), **self.pool.summary())
            seqs = packing.Sequences.from_rollout([self.prompts[i] for i in indices], out, advantages, keep,
                                                  share_prompts=c.share_prompts) if keep.any() else None
            self.worker_free_since = time.perf_counter()
            return Rollout(step, version, row, seqs, sparse)

    def consume(self, step: int, rollout: Rollout, waited: float) -> dict:
        """Step `step`'s update on its rollout (on the main thread): the plateau counter, the
        reference / recomputed log-probs, the optimizer steps; the step's metrics row.
        `waited`: how long the trainer waited for the rollout (its idle time; all of the
        rollout's at max_staleness 0)."""
        c = self.config.rl
        self.sparse_steps = self.sparse_steps + 1 if rollout.sparse else 0
        row = rollout.row | dict(time_sync=self.sync_seconds, time_rollout_wait=waited,
                                 policy_version=rollout.version, staleness=step - rollout.version)
        t1 = time.perf_counter()
        metrics, seqs = {}, rollout.seqs
        self.inflight.popleft()
        if seqs is not None:
            recompute = c.recompute_old_logprobs or c.tis_cap
            if c.grpo.beta or recompute:  # forwards over the rollout in the update's batch shape
                ref, own = self.forward_logprobs(seqs, c.grpo.beta, recompute)
                if c.grpo.beta:
                    seqs.per_token["ref_logprobs"] = ref
                if recompute:
                    seqs.per_token.update(rollout_logprobs=seqs.per_token["old_logprobs"], old_logprobs=own)
            self.pending = dict(step=step, row=row)  # the update keeps its progress in it (`one_step`)
            metrics = self.update(seqs)
            self.pending = None
        return row | dict(time_update=time.perf_counter() - t1) | metrics

    @functools.cached_property
    def budget(self) -> packing.Budget:
        """The fixed shape of the update's minibatches and of the reference / recompute
        forward (`packing.update_budget`, from the config and the pool's longest prompt)."""
        c = self.config.rl
        b = packing.update_budget(c, max(map(len, self.prompts), default=1), parallel.batch_devices(self.mesh))
        per_device = b.rows // b.multiple * b.length
        self._log(f"update batches: {b.rows} rows x {b.length} tokens ({per_device} tokens a device a microbatch), "
                  f"{b.scored} scored a row; a rollout that needs more rows runs 2x, 4x, ... the microbatches")
        return b

    def train_step(self, accum: int):
        """The train step over `accum` microbatches of the budget's size: `step_fn` for the
        configured grad_accum_steps, one more program for each larger count a long rollout
        needs (`packing.Budget`)."""
        c = self.config.rl
        if accum == c.grad_accum_steps:
            return self.step_fn
        steps = self.__dict__.setdefault("_steps_by_accum", {})
        if accum not in steps:
            loss = functools.partial(grpo.grpo_loss, cfg=c.grpo, chunk_size=c.logprob_chunk, tis_cap=c.tis_cap)
            steps[accum] = statelib.make_train_step(self.graphdef, self.tx, loss, accum, self.mesh,
                                                    statelib.state_shardings(self.state, self.mesh))
        return steps[accum]

    def forward_logprobs(self, seqs: packing.Sequences, reference: bool, own: bool):
        """(the KL reference's, the trainer's own) log-probs [N, budget] of the rollout's
        replies (None where not asked), over `rl.minibatches` slices of it laid out as the
        update lays a minibatch, run `budget.rows` rows at a time: one program, in the update's
        batch shape, whatever the rollout."""
        b = self.budget
        out = [np.zeros(seqs.completions.shape, np.float32) if want else None for want in (reference, own)]
        for part in np.array_split(np.arange(len(seqs)), self.config.rl.minibatches):
            laid = b.fit(seqs, part) if len(part) else []
            for rows in (laid[i:i + b.rows] for i in range(0, len(laid), b.rows)):
                batch = parallel.global_batch(self.mesh, packing.build(seqs, rows, b.length, b.scored), whole=True)
                for total, weights in zip(out, (self.reference, (self.state.params, self.state.frozen))):
                    if total is not None:
                        total += packing.unpack(seqs, rows, parallel.to_host(self.logprobs_of(weights, batch)))
        return tuple(out)

    def update(self, seqs: packing.Sequences) -> dict:
        """mu epochs, each over the sequences shuffled into `rl.minibatches` minibatches; each
        minibatch is laid into rows of the budget's shape (`rl.pack_length`,
        `rl.update_budget`) and is one optimizer step. All of an update's minibatches have the
        same shape. Every host builds the same rows and feeds its own."""
        c = self.config.rl
        parts = [part for _ in range(c.mu) for part in np.array_split(self.shuffle_rng.permutation(len(seqs)),
                                                                     c.minibatches)
                 if len(part)]  # (fewer sequences than minibatches: fewer steps)
        budget = self.budget
        laid = packing.minibatch_rows(seqs, parts, budget)
        work = self.pending if self.pending is not None else {}
        work.update(seqs=seqs, laid=laid, length=budget.length, scored=budget.scored, done=0, sums={}, first={},
                    accum=c.grad_accum_steps * len(laid[0]) // budget.rows)
        return self.optimizer_steps(work)

    def optimizer_steps(self, work: dict) -> dict:
        """The optimizer steps of an update from `work['done']` on, keeping the progress in
        `work`; the metrics averaged over all of its steps. Preemption is checked before each."""
        step_fn = self.train_step(work["accum"])
        while work["done"] < len(work["laid"]):
            preemption.check(f"the update (before optimizer step {work['done'] + 1} of {len(work['laid'])})")
            mini = packing.build(work["seqs"], work["laid"][work["done"]], work["length"], work["scored"])
            self.state, metrics = step_fn(self.state, parallel.global_batch(self.mesh, mini, whole=True))
            self.synced, self.snapshot = False, None  # the next rollout re-syncs
            loss, grad_norm = float(metrics["loss"]), float(metrics["grad_norm"])
            if not (np.isfinite(loss) and np.isfinite(grad_norm)):
                raise FloatingPointError(
                    f"non-finite loss {loss} / grad norm {grad_norm}; nothing was saved after the last "
                    f"good checkpoint in {self.ckpt.directory}. Lower optimizer.learning_rate or "
                    "check the data, then rerun to resume from it")
            for k, v in metrics.items():
                work["sums"][k] = work["sums"].get(k, 0.0) + float(v)
            # the mismatch as the first optimizer step saw it (later ones have moved the trainer)
            work["first"] = work["first"] or {k: float(v) for k, v in metrics.items() if k.startswith("mismatch_")}
            work["done"] += 1
        return {k: v / work["done"] for k, v in work["sums"].items()} | work["first"]


def reference_weights(state: statelib.TrainState, dtype: str, shardings: statelib.TrainState) -> tuple:
    """The KL reference's weights (what `packed_logprobs` merges): a copy of the starting
    `params` in `dtype` ("bfloat16" or "float32") in their shardings, in buffers of its own (the
    train step donates the state's); with LoRA the frozen base itself under zero adapters (the
    model with its adapters off: no second copy of the weights)."""
    if dtype not in ("bfloat16", "float32"):
        raise ValueError(f"rl.reference_dtype={dtype!r}; choose 'bfloat16' (half the memory) or 'float32'")
    if jax.tree.leaves(state.frozen):  # LoRA: B = 0 turns every adapter off exactly
        zeros = jax.jit(lambda p: jax.tree.map(jnp.zeros_like, p), out_shardings=shardings.params)
        return zeros(state.params), state.frozen
    cast = jax.jit(lambda p: jax.tree.map(lambda x: jnp.copy(x.astype(dtype)), p), out_shardings=shardings.params)
    return (cast(state.params),)


def run(config, workdir: str) -> list[dict]:
    """The `rl` task (both stages)."""
    rows = RLTrainer(config, workdir).train()
    if rows and parallel.is_main_process():
        last = {k: v for k, v in rows[-1].items() if not isinstance(v, list)}
        print(f"[rl stage {config.rl.stage}] done: {json.dumps(last)}; checkpoints in {workdir}/checkpoints")
    return rows

"""One GRPO step: fleming-jax vs TRL's `GRPOTrainer` (PyTorch, CPU), with a phase breakdown.

One step = generate G=8 completions for each of 8 QA prompts (temperature 1.0, budget 256
new tokens), score them with RL's default reward (`rl.rewards`: correctness + format), group
advantages, and one optimizer step (AdamW, clipped token-mean GRPO loss, no KL) on the 64
sequences. Reply lengths are
long-tailed by default, as RL replies are: a reply ends at any of `vocab x 4 / budget` fixed
stop tokens (`benchmarks/rollout.py`'s set; the random model's next-token distribution is
nearly uniform, so lengths are geometric with a mean of about a quarter of the budget,
capped), on both sides (TRL gets them as the model's `eos_token_id` list, so it masks after
them too). `--lengths equal`: no early stop, every reply runs to the budget. Both sides start
from the same ~100M-parameter Qwen2-shaped model (`--family llama`: a Llama 3 one of that shape)
with random weights (built with transformers, saved, loaded into ours with `hf.load`) and the same
tokenizer (`fleming_jax.tokenizer.build`, saved beside it). Each side runs one warm-up step
and then one timed step (ours: the warm-up is the same step from the same state, so it
compiles every shape the timed step runs; compilation is excluded).

Phases:
- generation: ours `engine.generate` with RL's defaults (paged cache, slots from memory); TRL
  `transformers.generate` (its `_generate_single_turn`) on the 64 rows at once.
- old log-probs: ours none (the sampler returns the rollout's log-probs); TRL skips its own
  forward when generation and optimizer steps are aligned (this config), so both are ~0.
- scoring: the reward calls. other rollout work: decoding, chat template / tokenization,
  advantages, padding into the train batch.
- update: forward + backward + clipping + AdamW (ours: one call of the jitted train step on
  the `rl.rollout_batch` batch, packed as RL packs it, `rl.pack_length` -1: the 64 sequences
  laid into as few rows as hold them, balanced over the microbatches; `--pack_length 0`: one
  sequence per row; a group's replies share one copy of their prompt in a row, as RL's
  default `rl.share_prompts` lays them (`--no-share_prompts`: each reply after its own copy);
  TRL: the rest of the Trainer's step, one padded row per sequence). Both
  accumulate gradients over 4 microbatches (all 64 sequences in one needs ~27 GB here);
  TRL's gradient checkpointing (on by default) is off, as ours has no remat.
Rewards are all 0 with random weights (no group has signal); both sides still do the full
update (ours keeps the zero-advantage groups here).

pip install -r benchmarks/requirements.txt   # trl
python benchmarks/grpo.py [--prompts 8] [--group 8] [--new_tokens 256] [--grad_accum 4] [--lengths equal]
                          [--pack_length 0] [--no-share_prompts] [--family llama]

Takes 10-20 minutes on 2 CPU cores (two steps per side); the sides run one after the other,
so other jobs on the machine skew the ratio.
"""

import argparse
import collections
import os
import sys
import tempfile
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from benchmarks.rollout import long_tail_stops  # noqa: E402
from fleming_jax.data.records import QARecord  # noqa: E402
from fleming_jax.prompts import user_prompt  # noqa: E402

SHAPE = dict(vocab_size=32768, hidden_size=768, intermediate_size=2048, num_hidden_layers=12,
             num_attention_heads=12, num_key_value_heads=2, tie_word_embeddings=True,
             max_position_embeddings=1024)
PHASES = ("generation", "old log-probs", "scoring", "other rollout work", "update")

QUESTIONS = [
    ("First-line drug for uncomplicated hypertension in a 45-year-old without comorbidities?",
     {"A": "Thiazide diuretic", "B": "Minoxidil", "C": "Clonidine", "D": "Hydralazine"}, "A"),
    ("Which vitamin deficiency causes Wernicke encephalopathy?",
     {"A": "Vitamin B12", "B": "Thiamine", "C": "Folate", "D": "Niacin"}, "B"),
    ("Antidote for acetaminophen overdose?",
     {"A": "Naloxone", "B": "Flumazenil", "C": "N-acetylcysteine", "D": "Atropine"}, "C"),
    ("Most common cause of community-acquired pneumonia in adults?",
     {"A": "Klebsiella", "B": "Legionella", "C": "Mycoplasma", "D": "Streptococcus pneumoniae"}, "D"),
    ("Which electrolyte disturbance gives peaked T waves on ECG?",
     {"A": "Hyperkalemia", "B": "Hypokalemia", "C": "Hypocalcemia", "D": "Hypernatremia"}, "A"),
    ("Drug of choice for anaphylaxis?",
     {"A": "Diphenhydramine", "B": "Intramuscular epinephrine", "C": "Prednisone", "D": "Salbutamol"}, "B"),
    ("Which test confirms the diagnosis of type 2 diabetes?",
     {"A": "Random urine glucose", "B": "Serum insulin", "C": "HbA1c of 6.5% or more", "D": "C-peptide"}, "C"),
    ("Does aspirin reduce the risk of recurrent myocardial infarction?", None, "yes"),
]


def make_records(n: int) -> list[QARecord]:
    return [QARecord(id=str(i), source="bench", question=q, options=o, answer=a)
            for i, (q, o, a) in enumerate(QUESTIONS[i % len(QUESTIONS)] for i in range(n))]


def build_checkpoint(path: str, records: list[QARecord], family: str = "qwen2") -> int:
    """The random model of `family` (an HF model_type, built by transformers) and the
    tokenizer, saved into `path`; returns #params."""
    import torch
    import transformers

    from fleming_jax import tokenizer as toklib

    torch.manual_seed(0)
    config = transformers.AutoConfig.for_model(family, **SHAPE)
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.save_pretrained(path)
    texts = [user_prompt(r) for r in records] * 4
    toklib.build(texts, path, vocab_size=2048)
    return sum(p.numel() for p in model.parameters())


def ours(path: str, records: list[QARecord], group: int, new_tokens: int, accum: int,
         stops: list[int], pack_length: int, share_prompts: bool) -> dict[str, float]:
    """Seconds per phase of our second (post-compilation) GRPO step."""
    from flax import nnx

    from configs import models as presets
    from configs import rl_stage1
    from fleming_jax import engine, rewards, sampler
    from fleming_jax import tokenizer as toklib
    from fleming_jax.models import hf
    from fleming_jax.prompts import completion_texts, record_prompts
    from fleming_jax.train import grpo, rl
    from fleming_jax.train import state as statelib

    c = rl_stage1.get_config().rl  # our GRPO defaults: clipped 0.2/0.28, token mean, no KL
    c.pack_length, c.share_prompts = pack_length, share_prompts
    components = rewards.load_components(c.rewards)  # the default reward: correctness + format
    tok = toklib.load(path)
    prompts = record_prompts(tok, records)
    model, _ = hf.load(path)
    opt = presets.optimizer(1e-6, 0, 10_000)
    opt.weight_decay = 0.0
    tx = statelib.make_optimizer(opt)
    graphdef, ts = statelib.init_state(model, tx)
    step_fn = statelib.make_train_step(graphdef, tx, lambda m, b: grpo.grpo_loss(m, b, c.grpo, c.logprob_chunk),
                                      grad_accum_steps=accum)
    params = sampler.SamplingParams(temperature=1.0, num_samples=group, max_new_tokens=new_tokens)

    def one_step(ts, key):
        t = {}
        start = time.perf_counter()
        out = engine.generate(nnx.merge(graphdef, ts.params), prompts, key, params,
                              stop_ids=stops + (toklib.stop_ids(tok) if stops else []),
                              pad_id=tok.pad_token_id or 0)
        t["generation"] = time.perf_counter() - start
        assert stops or out.lengths.min() == new_tokens
        t["old log-probs"] = 0.0  # out.model_logprobs: the sampler's own
        start = time.perf_counter()
        texts = completion_texts(tok, out)
        t0 = time.perf_counter()
        reward = np.array(rewards.score_components(
            components, [x for row in texts for x in row], [r for r, row in zip(records, texts) for _ in row])[0]["reward"]
        ).reshape(len(texts), -1)
        t1 = time.perf_counter()
        advantages = np.asarray(grpo.group_advantages(jnp.asarray(reward), c.grpo.advantage))
        batch = rl.rollout_batch(prompts, out, advantages, np.ones(len(prompts), bool), accum, c.pack_length,
                                 c.share_prompts)
        t["scoring"] = t1 - t0
        t["other rollout work"] = time.perf_counter() - start - t["scoring"]
        start = time.perf_counter()
        ts, metrics = step_fn(ts, batch)
        float(metrics["loss"])  # waits for the step
        t["update"] = time.perf_counter() - start
        return ts, t, batch["tokens"].shape, out.lengths

    fresh = jax.tree.map(jnp.copy, ts)  # the train step donates its state
    one_step(ts, jax.random.key(1))  # warm-up: the same step, so it compiles every shape the timed one runs
    _, times, shape, lengths = one_step(fresh, jax.random.key(1))
    print(f"ours: reply lengths mean {lengths.mean():.0f}, median {np.median(lengths):.0f}, max {lengths.max()}, "
          f"{np.mean(lengths == new_tokens):.0%} at the budget; train batch {shape[0]} x {shape[1]} tokens "
          f"({int(lengths.sum())} with a loss); "
          + ", ".join(f"{k} {v:.2f}s" for k, v in times.items()), flush=True)
    return times


def trl_side(path: str, records: list[QARecord], group: int, new_tokens: int, accum: int,
             stops: list[int]) -> dict[str, float]:
    """Seconds per phase of TRL's second GRPO step, from timers wrapped around its methods."""
    import datasets
    import torch
    import transformers
    import trl

    from configs import rl_stage1
    from fleming_jax import rewards

    components = rewards.load_components(rl_stage1.get_config().rl.rewards)  # ours' reward: correctness + format
    torch.set_num_threads(os.cpu_count())
    times: dict[str, float] = collections.defaultdict(float)
    in_rollout = []

    def timed(obj, name, phase):
        """Adds the seconds of every call of `obj.name` to times[phase()]."""
        method = getattr(obj, name)

        def wrapper(*args, **kwargs):
            key = phase()
            in_rollout.append(key == "rollout")
            start = time.perf_counter()
            try:
                return method(*args, **kwargs)
            finally:
                times[key] += time.perf_counter() - start
                in_rollout.pop()
        setattr(obj, name, wrapper)

    class StepClock(transformers.TrainerCallback):
        def on_step_begin(self, *args, **kwargs):
            times.clear()
            self.start = time.perf_counter()

        def on_step_end(self, *args, **kwargs):
            times["step"] = time.perf_counter() - self.start

    def reward(completions, index, **kwargs):
        texts = [c[-1]["content"] if isinstance(c, list) else c for c in completions]
        return rewards.score_components(components, texts, [records[i] for i in index])[0]["reward"]

    data = datasets.Dataset.from_list([{"prompt": [{"role": "user", "content": user_prompt(r)}], "index": i}
                                       for i, r in enumerate(records)])
    with tempfile.TemporaryDirectory() as out_dir:
        args = trl.GRPOConfig(
            output_dir=out_dir, use_cpu=True, bf16=False, fp16=False, gradient_checkpointing=False,
            num_generations=group, per_device_train_batch_size=len(records) * group // accum,
            gradient_accumulation_steps=accum, max_completion_length=new_tokens,
            generation_kwargs=None if stops else {"min_new_tokens": new_tokens}, temperature=1.0, top_p=1.0, top_k=0,
            loss_type="dapo", epsilon=0.2, epsilon_high=0.28, beta=0.0, scale_rewards="group",
            learning_rate=1e-6, weight_decay=0.0, adam_beta2=0.95, max_grad_norm=1.0,
            max_steps=2, logging_strategy="no", save_strategy="no", report_to="none",
            disable_tqdm=True, log_completions=False, shuffle_dataset=False, seed=0)
        model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
        if stops:  # GRPOTrainer stops and masks at the model's eos ids (and the tokenizer's)
            model.generation_config.eos_token_id = stops
        tok = transformers.AutoTokenizer.from_pretrained(path)
        trainer = trl.GRPOTrainer(model=model, reward_funcs=reward, args=args, train_dataset=data,
                                  processing_class=tok, callbacks=[StepClock()])
        timed(trainer, "_prepare_inputs", lambda: "rollout")  # generate + score + batch
        timed(trainer, "_generate_single_turn", lambda: "generation")
        timed(trainer, "_calculate_rewards", lambda: "scoring")
        timed(trainer, "_get_per_token_logps_and_entropies",
              lambda: "old log-probs" if any(in_rollout) else "loss forward")
        trainer.train()  # step 1 warms up; `times` holds step 2
    times = dict(times)
    t = {p: times.get(p, 0.0) for p in ("generation", "old log-probs", "scoring")}
    t["other rollout work"] = times["rollout"] - sum(t.values())
    t["update"] = times["step"] - times["rollout"]
    print(f"trl {trl.__version__}: transformers.generate, eager fp32, no gradient checkpointing; "
          f"loss forward inside the update {times.get('loss forward', 0.0):.2f}s")
    return t


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--prompts", type=int, default=8)
    parser.add_argument("--group", type=int, default=8)
    parser.add_argument("--new_tokens", type=int, default=256, help="the generation budget")
    parser.add_argument("--grad_accum", type=int, default=4, help="microbatches of the one optimizer step")
    parser.add_argument("--lengths", choices=("long_tailed", "equal"), default="long_tailed")
    parser.add_argument("--pack_length", type=int, default=-1, help="ours: rl.pack_length (0: one sequence a row)")
    parser.add_argument("--share_prompts", action=argparse.BooleanOptionalAction, default=True,
                        help="ours: rl.share_prompts")
    parser.add_argument("--family", choices=("qwen2", "llama"), default="qwen2",
                        help="the model's HF model_type (llama: the same shape without q/k/v biases)")
    args = parser.parse_args()
    records = make_records(args.prompts)
    with tempfile.TemporaryDirectory() as path:
        n_params = build_checkpoint(path, records, args.family)
        stops = (long_tail_stops(SHAPE["vocab_size"], args.new_tokens, np.random.default_rng(0))
                 if args.lengths == "long_tailed" else [])
        work = (path, records, args.group, args.new_tokens, args.grad_accum, stops)
        rows = {"fleming-jax": ours(*work, args.pack_length, args.share_prompts), "trl": trl_side(*work)}
    a, b = rows["fleming-jax"], rows["trl"]
    total_a, total_b = sum(a.values()), sum(b.values())
    print(f"{n_params / 1e6:.0f}M-param {args.family} (Qwen2 shape, fp32), {args.prompts} prompts x G={args.group} x "
          f"{args.new_tokens} new tokens ({args.lengths.replace('_', '-')} lengths), update in {args.grad_accum} microbatches, {os.cpu_count()} CPU cores; "
          "seconds of the step after one warm-up")
    print(f"| {'phase':<20} | fleming-jax | trl (torch) | trl / ours |")
    print(f"|{'-' * 22}|-------------|-------------|------------|")
    for phase in PHASES:
        ratio = f"{b[phase] / a[phase]:10.2f}" if min(a[phase], b[phase]) > 0.01 else f"{'-':>10}"
        print(f"| {phase:<20} | {a[phase]:11.2f} | {b[phase]:11.2f} | {ratio} |")
    print(f"| {'step':<20} | {total_a:11.2f} | {total_b:11.2f} | {total_b / total_a:10.2f} |")
    print(f"ratio={total_b / total_a:.2f}")


if __name__ == "__main__":
    main()

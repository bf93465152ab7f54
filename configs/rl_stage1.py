"""RL stage 1 (GRPO on the broad mix): the tiny default, and the 7B / 32B recipes.

python main.py --config=configs/rl_stage1.py --workdir=runs/rl_stage1        # tiny: after configs/sft.py
python main.py --config=configs/rl_stage1.py:qwen2.5-7b@v5p-32 --config.model.init_from=gs://b/sft/checkpoints \
  --config.tokenizer=/models/Qwen2.5-7B-Instruct --config.data.train=gs://b/synthesize/train.jsonl
python main.py --config=configs/rl_stage1.py:qwen3-32b@v5p-128 --config.model.hf_path=/models/Qwen3-32B

The paper states the loss (Eq. 1-3), the rewards (correctness + format, no length term),
the stage-1 blend (Hard:Simple = 1:1 over Easy and Moderate) and the plateau signal (reward
sparsity). It does not state group size, learning rate, KL, clip, lengths or temperature:
the defaults below are documented choices (DAPO-style clipping 0.2 / 0.28, no KL as in the
paper's formula, temperature 1.0, group size 8).
"""

import ml_collections

from configs import models

SFT_RUN = "runs/sft"  # where `python main.py --config=configs/sft.py` writes by default
DATA = "runs/synthesize"


def get_config(preset: str = "tiny") -> ml_collections.ConfigDict:
    preset, target = models.split_target(preset)
    tiny = preset == "tiny"
    config = ml_collections.ConfigDict()
    config.task = "rl"
    config.compile_cache = ""  # persistent XLA cache: "" = <workdir>/../xla_cache, a dir (local or gs://), or "none"
    config.model = models.get(preset)
    if not tiny:
        config.model.update(compute_dtype="bfloat16", remat="full")
    # The 7B recipe starts from the cold-start SFT; the 32B one from the HF base (no cold start).
    config.model.init_from = f"{SFT_RUN}/checkpoints" if tiny else ""
    config.init_from_producer = "python main.py --config=configs/sft.py --workdir=runs/sft"
    config.tokenizer = f"{SFT_RUN}/tokenizer" if tiny else ""  # "" = model.hf_path's tokenizer
    config.mesh = models.mesh_for(preset, target)
    config.distributed = models.distributed()
    config.rollout = models.rollout()
    config.data = ml_collections.ConfigDict(dict(
        train=f"{DATA}/train.jsonl", eval=f"{DATA}/validation.jsonl",
        producer="python main.py --config=configs/synthesize.py --workdir=runs/synthesize"))
    config.rl = ml_collections.ConfigDict(dict(
        stage=1,
        steps=40 if tiny else 500,
        prompts_per_step=16 if tiny else 64,
        group_size=8,  # G completions per prompt
        temperature=1.0, top_p=1.0,
        max_new_tokens=96 if tiny else 4096,
        mu=1,  # optimisation epochs over each rollout
        minibatches=1,  # optimizer steps per epoch
        grad_accum_steps=1 if tiny else 8,
        logprob_chunk=256,
        # Update batches: the rollout's sequences packed into rows with segment ids (the same
        # loss and gradient as one sequence per row, ~3x fewer tokens on long-tailed replies).
        # -1: rows of the power of two that holds the longest prompt + reply; N (a power of
        # two): rows of N tokens (longer if a sequence needs it); 0: one sequence per row.
        # tiny: 512 holds a prompt and ~5 replies, so shared prompts pay (demo-like 16 x 8
        # update 8.4 s at -1 unshared, 5.0 s at 512 shared, 6.5 s at 1024 shared, on 2 cores).
        pack_length=512 if tiny else -1,
        # Packed rows: the replies of one group in a row follow a single copy of their prompt
        # (each runs once per row instead of once per reply); the same loss and gradient.
        share_prompts=True,
        # Packed update batches have one shape for the whole run (one compiled update; the
        # reference / recompute forward uses it too): rows that hold this share of a
        # minibatch's longest possible tokens (every reply max_new_tokens long). A rollout
        # that needs more rows runs 2x, 4x, ... the microbatches (one more program each, the
        # same memory a microbatch); a lower share wastes less on short replies, and falls
        # back more often.
        update_budget=0.5,
        drop_zero_advantage_groups=True,  # groups whose rewards are all equal teach nothing
        dynamic_sampling=False,  # DAPO: refill dropped groups with fresh prompts...
        max_refills=2,  # ...for at most this many extra rollout rounds per step
        seed=0,
        max_pool=0,  # train on a seeded subset of this many questions (0: all)
        stage1_mix={"Easy": 1.0, "Moderate": 1.0},  # the paper's 1:1 blend
        # Grade ungraded records by the start policy's pass rate over k tries before step 1 (the
        # paper grades before stage 1; 4 tries: Easy = 4/4, Moderate = 2-3/4, Difficult = 0-1/4).
        # It generates pool x k sequences, printed before the pass: a pool of 64,000 costs as
        # much as the 7B stage's own rollouts (500 x 64 x 8); rl.max_pool bounds it. 0: off.
        grade_k=4,
        score_k=0,  # stage 2's scoring pass
        sparsity_threshold=0.9,  # share of all-equal-reward groups that signals a plateau...
        sparsity_patience=5,  # ...for this many consecutive steps
        eval_every=10, eval_size=64 if tiny else 512,
        # The reward: a weighted sum of components, each a batched function named
        # 'module:function' (fn(completions, records, **its other keys) -> a float each; see
        # fleming_jax.rewards). The paper's: correctness and format adherence, no length term.
        rewards=dict(correctness=dict(fn="fleming_jax.rewards:correctness", weight=1.0),
                     format=dict(fn="fleming_jax.rewards:format_adherence", weight=0.1)),
        # What counts as solved (the pool's grading and mining, the `accuracy` metric): a reply
        # whose component `solved_by` is `solved_at` or more. Open-ended records scored by an
        # LLM judge: solved_by="judge" (its component's name), solved_at=0.8 (8/10 and up).
        solved_by="correctness", solved_at=1.0,
        # the KL reference (beta > 0): its own copy of the starting weights, bf16 (2 bytes a
        # parameter, sharded like the params) or "float32" (exact, twice that)
        reference_dtype="bfloat16",
        # Rollout/trainer mismatch (the engine decodes in its own layout and dtype; mismatch_*
        # metrics measure it every step). recompute_old_logprobs: the trainer's own log-probs
        # of the rollout (one extra forward) as pi_old; needed for mu > 1 or minibatches > 1
        # when the rollout's numerics differ (bf16 decode). tis_cap: truncated importance
        # sampling, each token's policy term x min(pi_trainer / pi_rollout, tis_cap) (0: off;
        # ~2 when the mismatch metrics show a far share above ~1e-3); it recomputes pi_old.
        recompute_old_logprobs=False,
        tis_cap=0.0,
        # Rollouts sampled ahead of the update (asynchronous GRPO): step t trains on a rollout of
        # the weights at the start of step t - max_staleness, sampled on a worker thread while
        # the updates before it run (on rollout.devices of its own, or interleaved on the same
        # devices). 0: the synchronous run. Stale samples are corrected by the ratio to their
        # behaviour log-probs (clipped), or with tis_cap by TIS against recomputed pi_old.
        max_staleness=0,
        # importance_sampling_level "sequence": GSPO (one ratio per reply, the exp of its tokens'
        # mean log-ratio, clipped to [1 - seq_eps_low, 1 + seq_eps_high], GSPO's range)
        grpo=dict(loss_mode="clipped", advantage="std", eps_low=0.2, eps_high=0.28, beta=0.0,
                  importance_sampling_level="token", seq_eps_low=3e-4, seq_eps_high=4e-4,
                  entropy_coef=0.0, log_entropy=False, aggregation="token_mean",
                  loss_normalizer=96.0 if tiny else 4096.0),
        miner=dict(wrong_below=0.5, retire_after=8, hopeless_after=16, retry_rate=0.05,
                   right_to_wrong=(1.0, 2.0), difficult_weight=2.0),
    ))
    config.metrics = models.metrics()
    config.checkpoint = ml_collections.ConfigDict(dict(every=10 if tiny else 50, keep=3))
    config.optimizer = models.optimizer(2e-4 if tiny else 1e-6, 0, 10_000)
    config.optimizer.weight_decay = 0.0
    config.plan = models.plan(preset, target)
    return config

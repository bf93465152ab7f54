"""The whole pipeline on the tiny default (the README's main job) and a template for real runs.

python main.py --config=configs/demo.py --workdir=runs/demo
python main.py --config=configs/demo.py:ci --workdir=/tmp/demo   # a couple of minutes, for CI
python main.py --config=configs/demo.py:full_weights --workdir=runs/demo_fw   # both RL stages train every weight
python main.py --config=configs/demo.py:qlora --workdir=runs/demo_qlora   # the RL adapters on an NF4 base (QLoRA)
python main.py --config=configs/demo.py:ci@gemma3-27b --workdir=/tmp/demo_gemma  # any budget, another model family

`BUDGET@PRESET` runs it with a random model of that preset's family (Qwen3-MoE, Llama 3.x,
Gemma 3, ...) at the tiny default's dimensions (`configs/models.py`, `PRESET@tiny`) in place
of the tiny Qwen2; its recipe is tuned for the latter, so only `ci` is expected to be quick.
Each stage's full config sits under `config.stages.<stage>`, so any knob can be changed
from the command line, e.g. `--config.stages.sft.optimizer.total_steps=400`. Inputs and
outputs are wired to `<workdir>/<stage>/` by the demo itself.
"""

import ml_collections

from configs import distill, export, models, rl_stage1, rl_stage2, sft, synthesize

# Budgets: "full" takes 14 min 27 s on 2 CPU cores from a cold compile cache (quiet Xeon,
# 2026-12-05, as 2 JAX devices: config.cpu_devices); "ci" only checks that everything connects.
# 40 diseases keep the graph small enough that the tiny model learns which disease fits
# which findings within the SFT budget (held-out questions ask about the same diseases).
# The cold start trains every weight (a random init has nothing to adapt); both RL stages
# train rank-16 adapters on all seven projections (alpha 32, a learning rate 10x a full-weight
# one's: adapters start at B = 0 and move the model through a rank-16 product). On five seeds
# (docs/demo_rl.md) adapters lost no seed where full-weight RL lost two, and the steps the
# 2-device layout saves went to RL: 36 steps of stage 1, 16 of stage 2 (24 and 12 before).
# RL stage 1 grades a 512-question pool with 2 tries each before it starts (the paper's
# grading pass: 1,024 sequences, ~30 s) and draws the 1:1 Easy:Moderate blend from it. Stage 2
# scores a 256-question subset (2 tries each) to seed its miner, at a third of stage 1's
# learning rate (its mined pool is skewed toward the letters the policy under-picks; a full
# rate over-corrected that prior in a trial). "full_weights" is the same demo with full-weight
# RL (lr 1e-4 / 3e-5, 24 + 12 steps: the default until 2026-12-05), "qlora" the adapters on
# the cold start's NF4 copy. The ci budget does not grade: its 6-step SFT model solves
# nothing, so every question would grade Difficult and the blend would have nothing to draw.
_FULL = dict(diseases=40, questions=3600, held_out=0.17, sft_steps=260, rl1_steps=36, rl2_steps=16, eval_size=600,
             new_tokens=128, eval_new_tokens=160, rl1_pool=512, grade_k=2, rl2_pool=256, score_k=2, rl1_lr=1e-3,
             rl2_lr=3e-4, lora_rank=16, lora_alpha=32.0)
BUDGETS = {
    "full": _FULL,
    "full_weights": _FULL | dict(rl1_steps=24, rl2_steps=12, rl1_lr=1e-4, rl2_lr=3e-5, lora_rank=0),
    "qlora": _FULL | dict(lora_base_quant="nf4"),
    "ci": _FULL | dict(questions=300, held_out=0.05, sft_steps=6, rl1_steps=2, rl2_steps=2, eval_size=8, new_tokens=24,
                       eval_new_tokens=24, rl1_pool=32, grade_k=0, rl2_pool=32),
}


def get_config(budget: str = "full") -> ml_collections.ConfigDict:
    budget, _, family = (budget or "full").partition("@")
    if budget not in BUDGETS:
        raise ValueError(f"configs/demo.py:{budget}: unknown budget; budgets: {', '.join(BUDGETS)} (each also as "
                         "BUDGET@PRESET, e.g. ci@gemma3-27b)")
    b = BUDGETS[budget]
    config = ml_collections.ConfigDict()
    config.task = "demo"
    config.compile_cache = ""  # persistent XLA cache: "" = <workdir>/../xla_cache, a dir (local or gs://), or "none"
    config.cpu_devices = 2  # a CPU-only host as 2 JAX devices (both cores busy; 0: JAX's default of one)
    config.seed = 0  # training seed of every stage; the synthesised data does not depend on it
    config.demo = ml_collections.ConfigDict(dict(eval_size=b["eval_size"], eval_max_new_tokens=b["eval_new_tokens"]))
    stages = ml_collections.ConfigDict()
    stages.synthesize = synthesize.get_config()
    stages.synthesize.kg.max_diseases = b["diseases"]  # a manageable disease subset
    stages.synthesize.synthesis.num_questions = b["questions"]
    stages.synthesize.validation_fraction = b["held_out"]  # 600 held-out questions: a standard error of ~0.02
    stages.distill = distill.get_config()
    stages.sft = sft.get_config("tiny")
    stages.sft.optimizer.update(total_steps=b["sft_steps"], warmup_steps=min(20, b["sft_steps"] // 2))
    stages.sft.train.update(seq_len=512, batch_size=8, eval_every=100)
    stages.sft.checkpoint.every = 100
    for name, module, steps, pool, lr in (("rl_stage1", rl_stage1, b["rl1_steps"], b["rl1_pool"], b["rl1_lr"]),
                                          ("rl_stage2", rl_stage2, b["rl2_steps"], b["rl2_pool"], b["rl2_lr"])):
        stage = module.get_config("tiny")
        stage.rl.update(dict(steps=steps, max_new_tokens=b["new_tokens"], eval_every=max(steps, 1),
                             eval_size=min(64, b["eval_size"]), max_pool=pool))
        stage.optimizer.learning_rate = lr  # full weights: 1e-3 wrecked the SFT policy in a trial (0.41 -> 0.09 in 4 steps)
        stage.model.update(lora_rank=b.get("lora_rank", 0), lora_alpha=b.get("lora_alpha", 16.0),
                           lora_base_quant=b.get("lora_base_quant", ""))
        stages[name] = stage
    stages.rl_stage1.rl.grade_k = b["grade_k"]
    stages.rl_stage2.rl.score_k = b["score_k"]
    stages.export = export.get_config("tiny")
    if family:
        for name in ("sft", "rl_stage1", "rl_stage2", "export"):
            stages[name].model = _family_model(stages[name].model, family)
    config.stages = stages
    return config


def _family_model(tiny: ml_collections.ConfigDict, family: str) -> ml_collections.ConfigDict:
    """`tiny` (a stage's model) as the preset `family`'s architecture at tiny's dimensions,
    keeping the stage's weights source, numerics and adapter settings (not the adapters'
    targets: a mixture of experts has no dense MLP to adapt)."""
    model = models.get(f"{family}@{models.TINY}")
    model.update({k: v for k, v in tiny.items() if k not in model or k in (
        "init_from", "hf_path", "seed", "param_dtype", "compute_dtype", "remat", "attention_chunk", "lora_rank",
        "lora_alpha", "lora_dropout", "lora_base_quant")})
    return model

"""Evaluate a checkpoint on benchmark files (task `eval`): the tiny default and the paper's list.

python main.py --config=configs/eval.py --workdir=runs/eval          # tiny: after configs/rl_stage2.py
python main.py --config=configs/eval.py:qwen2.5-7b --config.model.init_from=gs://b/rl_stage2/checkpoints \
  --config.tokenizer=/models/Qwen2.5-7B-Instruct --workdir=runs/eval_7b
python main.py --config=configs/eval.py:qwen2.5-7b --config.model.hf_path=/models/Qwen2.5-7B-Instruct

The tiny default scores stage 2's model on the held-out split of `configs/synthesize.py`.
Real presets read the paper's nine benchmarks from `data/benchmarks/` (put each published
test split there, in any container `fleming_jax/data/sources.py` reads, or change `path`,
e.g. to `hf:NAME[:CONFIG]` with `split=`). Greedy decoding by default; `eval.samples=k`
with a temperature reports pass@1 averaged over the k samples and the majority vote.
"""

import ml_collections

from configs import models

RL_RUN, SFT_RUN = "runs/rl_stage2", "runs/sft"
BENCHMARKS = "data/benchmarks"

# The paper's evaluation sets (PAPER.md "Evaluation"): 9 columns, MMLU-Pro split in two.
PAPER_BENCHMARKS = [
    dict(format="medxpertqa", path=f"{BENCHMARKS}/medxpertqa_text_test.jsonl", name="MedXpertQA"),
    dict(format="medqa", path=f"{BENCHMARKS}/medqa_usmle_4_options_test.jsonl", name="MedQA"),
    dict(format="medmcqa", path=f"{BENCHMARKS}/medmcqa_dev.jsonl", name="MedMCQA", cop_base=0),
    dict(format="mmlu_pro", path=f"{BENCHMARKS}/mmlu_pro_test.jsonl", name="MMLU-Pro-Bio", categories=("biology",)),
    dict(format="mmlu_pro", path=f"{BENCHMARKS}/mmlu_pro_test.jsonl", name="MMLU-Pro-Health", categories=("health",)),
    dict(format="careqa", path=f"{BENCHMARKS}/careqa_en_test.jsonl", name="CareQA"),
    dict(format="jmed", path=f"{BENCHMARKS}/jmed.jsonl", name="JMED"),
    dict(format="pubmedqa", path=f"{BENCHMARKS}/pubmedqa_labeled.json", name="PubMedQA"),
    dict(format="medbullets", path=f"{BENCHMARKS}/medbullets_op5.csv", name="Medbullets"),
]


def get_config(preset: str = "tiny") -> ml_collections.ConfigDict:
    preset, target = models.split_target(preset)
    tiny = preset == "tiny"
    config = ml_collections.ConfigDict()
    config.task = "eval"
    config.compile_cache = ""  # persistent XLA cache: "" = <workdir>/../xla_cache, a dir (local or gs://), or "none"
    config.model = models.get(preset)  # init_from (ours) or hf_path (HF dir); neither: random init
    if not tiny:
        config.model.compute_dtype = "bfloat16"
    config.model.init_from = f"{RL_RUN}/checkpoints" if tiny else ""
    config.init_from_producer = f"python main.py --config=configs/rl_stage2.py --workdir={RL_RUN}"
    config.tokenizer = f"{SFT_RUN}/tokenizer" if tiny else ""  # "" = model.hf_path's tokenizer
    config.tokenizer_producer = f"python main.py --config=configs/sft.py --workdir={SFT_RUN}"
    config.mesh = models.mesh_for(preset, target)
    config.distributed = models.distributed()
    # each: format (a sources.READERS name), path, name (the table's column), reader options,
    # and optionally `producer`, the command that writes the file (named when it is missing)
    config.benchmarks = [dict(format="jsonl", path="runs/synthesize/validation.jsonl", name="held-out",
                              producer="python main.py --config=configs/synthesize.py --workdir=runs/synthesize")
                         ] if tiny else [dict(b) for b in PAPER_BENCHMARKS]
    config.eval = ml_collections.ConfigDict(dict(
        samples=1,  # k completions per question; >1 needs temperature > 0
        temperature=0.0,  # 0 = greedy
        top_p=1.0,
        max_new_tokens=96 if tiny else 4096,
        batch_size=64,  # questions per engine call (each with k samples, one decode slot per sample)
        limit=0,  # at most this many questions per benchmark (0 = all)
        seed=0,
        model_name="",  # the table's row label (default: the checkpoint path)
        # An LLM judge also scores every sample (open-ended answers: `fleming_jax.judge.score`'s
        # keys; base_url "" = off): the table adds the judge's mean score (0-1).
        judge=dict(base_url="", model="", api_key_env="", cache="", max_concurrency=8, timeout_s=120.0),
    ))
    return config

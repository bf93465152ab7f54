"""RL stage 2: GRPO on mined hard samples, from stage 1's checkpoint.

python main.py --config=configs/rl_stage2.py --workdir=runs/rl_stage2        # tiny: after rl_stage1
python main.py --config=configs/rl_stage2.py:qwen2.5-7b@v5p-32 --config.model.init_from=gs://b/rl_stage1/checkpoints ...

A scoring pass over the whole pool (score_k samples per question) seeds the miner; each
step draws Right:Wrong = 1:2 (the paper's figure), Difficult items first, with more
rollouts per prompt than stage 1 (the paper says more; 16 is our documented choice).
Questions solved in every one of `retire_after` tries leave the pool; never-solved ones
are retried at `retry_rate`. Every threshold is under `rl.miner`.
"""

from configs import rl_stage1

STAGE1_RUN = "runs/rl_stage1"


def get_config(preset: str = "tiny"):
    config = rl_stage1.get_config(preset)
    tiny = config.model.preset == "tiny"
    config.model.init_from = f"{STAGE1_RUN}/checkpoints" if tiny else ""
    config.model.hf_path = ""
    config.init_from_producer = "python main.py --config=configs/rl_stage1.py --workdir=runs/rl_stage1"
    config.rl.update(dict(stage=2, group_size=16, prompts_per_step=8 if tiny else 32, grade_k=0,
                          score_k=4 if tiny else 8, steps=30 if tiny else 500))
    return config

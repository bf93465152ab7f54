"""Supervised fine-tuning (the CoT cold start) and its memory plan.

python main.py --config=configs/sft.py                      # tiny default (reads runs/distill/)
python main.py --config=configs/sft.py:qwen2.5-7b --config.model.hf_path=/models/Qwen2.5-7B-Instruct
python main.py --config=configs/sft.py:qwen2.5-7b@v5p-32 --config.task=plan --config.plan.topology=v5p:2x2x4
"""

import ml_collections

from configs import models

# Per-preset defaults for real runs: sequence length, global batch, learning rate.
REAL_RUN = dict(seq_len=4096, batch_size=64, learning_rate=1e-5, warmup_steps=50, total_steps=2000)
TINY_RUN = dict(seq_len=256, batch_size=16, learning_rate=3e-3, warmup_steps=20, total_steps=300)
DATA = "runs/distill"  # where `python main.py --config=configs/distill.py` writes by default


def get_config(preset: str = "tiny") -> ml_collections.ConfigDict:
    preset, target = models.split_target(preset)
    run = TINY_RUN if preset == "tiny" else REAL_RUN
    config = ml_collections.ConfigDict()
    config.task = "sft"
    config.compile_cache = ""  # persistent XLA cache: "" = <workdir>/../xla_cache, a dir (local or gs://), or "none"
    config.model = models.get(preset)
    if preset != "tiny":
        config.model.update(compute_dtype="bfloat16", remat="full")
    config.mesh = models.mesh_for(preset, target)
    config.distributed = models.distributed()
    config.train = ml_collections.ConfigDict(dict(
        seq_len=run["seq_len"],  # packed sequence length
        batch_size=run["batch_size"],  # global, in packed sequences
        grad_accum_steps=1,
        logprob_chunk=256,  # tokens per chunk of the vocab projection
        # mixture-of-experts models: this times the router's load-balancing loss is added to the
        # loss (transformers' Qwen3-MoE value; 0 = off); dense models ignore it
        router_aux_loss_coef=0.001,
        log_every=10, eval_every=50,  # steps; eval also at the end
    ))
    # SFT JSONL ({id, messages, meta}); eval="" skips the held-out loss
    config.data = ml_collections.ConfigDict(dict(
        train=f"{DATA}/train.jsonl", eval=f"{DATA}/validation.jsonl", seed=0))
    # an HF tokenizer directory; "" = model.hf_path's, else a small BPE built from the train chats
    config.tokenizer = ""
    config.metrics = models.metrics()
    config.checkpoint = ml_collections.ConfigDict(dict(every=100, keep=3, use_async=True))
    config.optimizer = models.optimizer(run["learning_rate"], run["warmup_steps"], run["total_steps"])
    config.plan = models.plan(preset, target)
    return config

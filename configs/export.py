"""Export a model to a Hugging Face directory.

python main.py --config=configs/export.py --config.model.init_from=runs/rl_stage2/checkpoints
A LoRA run's checkpoint is written merged (a plain HF model) and as a PEFT adapter for its base.
Without `init_from`/`hf_path` it exports a randomly initialised model of the preset
(`configs/export.py:qwen2.5-7b` picks the preset), which is what the tiny default does.
"""

import ml_collections

from configs import models


def get_config(preset: str = "tiny") -> ml_collections.ConfigDict:
    config = ml_collections.ConfigDict()
    config.task = "export"
    config.compile_cache = ""  # persistent XLA cache: "" = <workdir>/../xla_cache, a dir (local or gs://), or "none"
    config.model = models.get(preset or "tiny")
    # built sharded over every host's devices (each process reads its shards), gathered per tensor
    config.mesh = models.mesh_for(*models.split_target(preset or "tiny"))
    config.export = ml_collections.ConfigDict(dict(
        out_dir="",  # default: <workdir>/hf
        dtype="",  # stored dtype; default: the model's param_dtype (bfloat16 halves the size)
        max_shard_mb=2048,
        tokenizer="",  # a local tokenizer directory to ship beside the weights
        adapter_dir="",  # a LoRA model's adapter in PEFT's format; default: <workdir>/adapter
    ))
    return config

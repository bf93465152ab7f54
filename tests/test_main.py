"""The command line: task dispatch, overrides and the export task end to end."""

import json
import os
import subprocess
import sys

import torch
import transformers

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_main(*args):
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="")
    return subprocess.run([sys.executable, "main.py", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)


def test_unknown_task_names_the_tasks_that_exist(tmp_path):
    result = run_main("--config=configs/export.py", "--config.task=nope", f"--workdir={tmp_path}")
    assert result.returncode != 0
    assert "config.task='nope' is not a task; tasks: export, synthesize" in result.stderr


def test_export_task_writes_a_transformers_model(tmp_path):
    out = tmp_path / "hf"
    result = run_main("--config=configs/export.py", f"--workdir={tmp_path}",
                      "--config.export.dtype=bfloat16", "--config.model.num_layers=2",
                      f"--config.export.out_dir={out}")
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"HF model written to {out}" in result.stdout
    with open(out / "config.json") as f:
        cfg = json.load(f)
    assert (cfg["num_hidden_layers"], cfg["dtype"], cfg["model_type"]) == (2, "bfloat16", "qwen2")
    model = transformers.AutoModelForCausalLM.from_pretrained(out)
    assert model.dtype == torch.bfloat16
    assert sum(p.numel() for p in model.parameters()) > 2_000_000

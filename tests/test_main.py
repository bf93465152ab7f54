"""The command line: task dispatch, overrides and the export task end to end."""

import json
import os
import subprocess
import sys

import pytest
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


def test_every_config_has_a_compile_cache_key_and_its_default_sits_beside_the_workdir():
    import glob
    import importlib

    import ml_collections

    import main

    for file in sorted(glob.glob(os.path.join(ROOT, "configs", "*.py"))):
        module = importlib.import_module(f"configs.{os.path.basename(file)[:-3]}")
        if hasattr(module, "get_config"):
            assert module.get_config().compile_cache == "", file
    at = lambda value, workdir: main.compile_cache_dir(ml_collections.ConfigDict(dict(compile_cache=value)), workdir)
    assert at("", "gs://b/run/sft") == at("", "gs://b/run/rl_stage1/") == "gs://b/run/xla_cache"  # shared
    assert at("", "gs://b") == at("", "gs://b/") == "gs://b/xla_cache"  # a bucket root: inside it
    assert at("", "runs/sft") == os.path.abspath("runs/xla_cache")
    assert at("gs://c/xla", "runs/sft") == "gs://c/xla" and at("none", "runs/sft") is at("None", "x") is None


@pytest.mark.slow
def test_two_cpu_processes_run_without_the_persistent_compile_cache(tmp_path):
    """Only process 0 writes the cache and the processes' keys differ: on the rerun process 0
    loaded programs the other compiled, missed XLA:CPU's 30 s collective start, and rl_stage2
    hung (3 of 3 runs). So several CPU processes turn the cache off, say so, and write nothing."""
    from tests.test_parallel import free_port

    port, cache = free_port(), tmp_path / "cache"
    procs = [subprocess.Popen(
        [sys.executable, "main.py", "--config=configs/export.py", "--config.model.num_layers=2",
         f"--workdir={tmp_path}/export", f"--config.compile_cache={cache}"],
        cwd=ROOT, text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        env=dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=2",
                 FLEMING_COORDINATOR_ADDRESS=f"127.0.0.1:{port}", FLEMING_NUM_PROCESSES="2", FLEMING_PROCESS_ID=str(i)))
        for i in range(2)]
    outs = [p.communicate(timeout=300) for p in procs]
    for p, (out, err) in zip(procs, outs):
        assert p.returncode == 0, err[-3000:]
        assert "[main] compile cache off (2 CPU processes" in out
        assert "loaded from the cache" not in out
    assert not cache.exists() or not any(cache.iterdir())

"""The whole pipeline at a CI budget: every stage's artifacts and the report exist and parse."""

import json
import os
import subprocess
import sys

import transformers

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_demo_pipeline_connects_every_stage(tmp_path):
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="")
    command = [sys.executable, "main.py", "--config=configs/demo.py:ci", f"--workdir={tmp_path}"]
    result = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    for stage in ("synthesize", "distill", "sft", "rl_stage1", "rl_stage2", "export"):
        assert os.path.exists(tmp_path / stage / "DONE"), stage
        assert f"] {stage} -> " in result.stdout
    with open(tmp_path / "report.json") as f:
        report = json.load(f)
    assert set(report["held_out"]) == {"init", "sft", "rl_stage1", "rl_stage2"}
    for stage, r in report["held_out"].items():
        assert 0.0 <= r["accuracy"] <= 1.0 and r["n"] == 8, stage
    assert (tmp_path / "report.md").read_text().count("| rl_stage2 |") == 1
    assert os.path.getsize(tmp_path / "accuracy.png") > 0 and os.path.getsize(tmp_path / "rl_curves.png") > 0
    model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "export" / "hf")
    tokenizer = transformers.AutoTokenizer.from_pretrained(tmp_path / "export" / "hf")
    assert model.config.vocab_size >= len(tokenizer)
    # A rerun skips every finished stage.
    again = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0 and again.stdout.count("done already, skipped") == 6

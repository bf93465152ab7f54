"""The whole pipeline at a CI budget: every stage's artifacts and the report exist and parse."""

import json
import os
import subprocess
import sys

import pytest
import transformers

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.slow
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
    assert report["devices"] == "2 cpu"  # the demo's config.cpu_devices
    for stage, r in report["held_out"].items():
        assert 0.0 <= r["accuracy"] <= 1.0 and r["n"] == 8, stage
    assert (tmp_path / "report.md").read_text().count("| rl_stage2 |") == 1
    for plot in ("accuracy.png", "rl_curves.png", "rl_timeline.png"):
        assert os.path.getsize(tmp_path / plot) > 0, plot
    # every training stage's curves in TensorBoard (`tensorboard --logdir <workdir>` shows them all)
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    for stage, tag, steps in (("sft", "loss", 6), ("rl_stage1", "reward_mean", 2), ("rl_stage2", "reward_mean", 2)):
        # (the ci budget: 6 SFT steps, 2 + 2 RL steps)
        events = EventAccumulator(str(tmp_path / stage / "tensorboard"))
        events.Reload()
        assert events.Scalars(tag)[-1].step == steps, stage  # up to the stage's last step
    assert_export_answers_like_our_sampler(tmp_path, max_new_tokens=24)  # the ci budget's eval length
    # A rerun skips every finished stage.
    again = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0 and again.stdout.count("done already, skipped") == 6


@pytest.mark.slow
@pytest.mark.parametrize("family", ["qwen3-30b-a3b", "gemma3-27b", "llama3.1-8b"])
def test_demo_runs_with_a_tiny_model_of_another_family(tmp_path, family):
    """`configs/demo.py:ci@PRESET`: every stage with a random model of the preset's family at
    the tiny dimensions, and its export answers in transformers as our evaluation did."""
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="")
    command = [sys.executable, "main.py", f"--config=configs/demo.py:ci@{family}", f"--workdir={tmp_path}"]
    result = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    for stage in ("sft", "rl_stage1", "rl_stage2", "export"):
        assert os.path.exists(tmp_path / stage / "DONE"), stage
    with open(tmp_path / "export" / "hf" / "config.json") as f:
        assert json.load(f)["model_type"] == {"qwen3-30b-a3b": "qwen3_moe", "gemma3-27b": "gemma3_text"}.get(family, "llama")
    assert_export_answers_like_our_sampler(tmp_path, max_new_tokens=24)


def assert_export_answers_like_our_sampler(workdir, max_new_tokens):
    """The exported model, in transformers with the exported tokenizer, writes the same
    greedy text for a held-out question as our evaluation did on the final checkpoint."""
    import torch

    from fleming_jax.data.records import QARecord, read_jsonl
    from fleming_jax.prompts import user_prompt

    ours = next(iter(read_jsonl(str(workdir / "held_out" / "rl_stage2.jsonl"))))
    record = next(QARecord.from_dict(r) for r in read_jsonl(str(workdir / "synthesize" / "validation.jsonl"))
                  if r["id"] == ours["id"])
    model = transformers.AutoModelForCausalLM.from_pretrained(workdir / "export" / "hf", dtype=torch.float32)
    tokenizer = transformers.AutoTokenizer.from_pretrained(workdir / "export" / "hf")
    ids = tokenizer.apply_chat_template([{"role": "user", "content": user_prompt(record)}],
                                        add_generation_prompt=True, return_tensors="pt", return_dict=True)
    stops = [tokenizer.eos_token_id, tokenizer.convert_tokens_to_ids("<|im_end|>")]
    out = model.generate(**ids, do_sample=False, max_new_tokens=max_new_tokens, eos_token_id=stops,
                         pad_token_id=tokenizer.pad_token_id)
    reply = out[0, ids["input_ids"].shape[1]:].tolist()
    text = tokenizer.decode(reply[:-1] if reply[-1] in stops else reply)  # our texts drop the stop token
    assert text == ours["completions"][0], (text, ours["completions"][0])


def test_report_gives_each_stage_an_interval_and_rls_paired_gain(tmp_path):
    from fleming_jax import demo

    def stage(right):  # 600 questions, the first `right` answered correctly
        per_question = [1.0] * right + [0.0] * (600 - right)
        return dict(n=600, accuracy=right / 600, per_question=per_question, format_error_rate=0.0, mean_length=50.0,
                    interval=list(demo.bootstrap_interval(per_question)[1:]))

    report = {"stages": {"sft": {"seconds": 1.0}}, "held_out": {"sft": stage(240), "rl_stage1": stage(240),
                                                               "rl_stage2": stage(270)}}
    demo.save_report(report, str(tmp_path))
    saved = json.loads((tmp_path / "report.json").read_text())
    gain, low, high = saved["rl_gain"]["rl_stage2"]
    assert gain == pytest.approx(0.05) and 0.02 < low < 0.05 < high < 0.08  # 30 more right, none lost
    assert saved["rl_gain"]["rl_stage1"] == [0.0, 0.0, 0.0]  # the same answers: no gain, no spread
    low, high = saved["held_out"]["sft"]["interval"]
    assert 0.36 < low < 0.4 < high < 0.44  # 0.4 +- 1.96 x 0.02
    text = (tmp_path / "report.md").read_text()
    assert "| sft | 0.400 [0.3" in text and "rl_stage2 - sft on the same questions: +0.050 [+0.0" in text

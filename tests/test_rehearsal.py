"""`PRESET@rehearsal` and the rehearsal (tests/rehearsal.py): the whole pipeline as 2 hosts x 2
CPU devices on the GCS emulator with a real preset's defaults."""

import importlib

import pytest

from configs import models

CONFIGS = ("sft", "rl_stage1", "rl_stage2", "export", "eval")


def flat(config) -> dict:
    out = {}
    for key, value in config.items():
        if hasattr(value, "items"):
            out |= {f"{key}.{k}": v for k, v in flat(value).items()}
        else:
            out[key] = value
    return out


@pytest.mark.parametrize("preset", ["qwen2.5-7b", "qwen3-32b", "llama3.1-8b", "qwen3-30b-a3b", "gemma3-27b"])
@pytest.mark.parametrize("name", CONFIGS)
def test_rehearsal_config_differs_from_the_real_one_only_in_model_dimensions(name, preset):
    module = importlib.import_module(f"configs.{name}")
    real, rehearsal = flat(module.get_config(preset)), flat(module.get_config(f"{preset}@rehearsal"))
    differ = {k for k in real.keys() | rehearsal.keys() if real.get(k) != rehearsal.get(k)}
    shape = models.rehearsal_shape(preset)
    assert differ == {"model.preset"} | {f"model.{k}" for k in shape}
    assert rehearsal["model.preset"] == f"{preset}@rehearsal"
    assert {k: rehearsal[f"model.{k}"] for k in shape} == shape


def test_rehearsal_keeps_the_family_switches_and_is_refused_for_tiny():
    for preset in ("qwen2.5-7b", "qwen3-32b", "llama3.1-8b", "qwen3-30b-a3b", "gemma3-27b"):
        real, small = models.get(preset), models.get(f"{preset}@rehearsal")
        for key in ("model_type", "qkv_bias", "qk_norm", "tie_embeddings", "rope_theta", "rms_norm_eps",
                    "norm_topk_prob", "lora_targets", "norm_plus_one", "sandwich_norms", "query_pre_attn_scalar"):
            if key not in models.rehearsal_shape(preset):
                assert small.get(key) == real.get(key), (preset, key)
    with pytest.raises(ValueError, match="unknown model preset 'tiny@rehearsal'"):
        models.get("tiny@rehearsal")
    with pytest.raises(ValueError, match="targets: .*, or rehearsal"):
        models.split_target("qwen2.5-7b@v9")


@pytest.mark.slow
@pytest.mark.parametrize("preset,lora,base_quant,ahead", [
    ("qwen2.5-7b", False, "", 0), ("qwen2.5-7b", True, "", 0), ("qwen2.5-7b", True, "nf4", 0),
    ("llama3.1-8b", False, "", 0), ("qwen2.5-7b", True, "", 1), ("qwen3-30b-a3b", False, "", 0),
    ("gemma3-27b", False, "", 0)])
def test_rehearsal_runs_every_task_as_two_hosts_on_gcs(tmp_path, preset, lora, base_quant, ahead):
    from tests import rehearsal

    times = rehearsal.rehearse(preset, processes=2, devices=2, tmp=str(tmp_path), lora=lora, base_quant=base_quant,
                               ahead=ahead)
    assert {s.name for s in rehearsal.stages("", "gs://b", "")} <= set(times)

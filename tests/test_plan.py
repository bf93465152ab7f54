"""`task=plan`: ahead-of-time compilation and the per-device memory it reports."""

import importlib.util
import math
import os
import re
import subprocess
import sys

import pytest
from flax import nnx

from configs import sft as sft_config
from fleming_jax import models, plan
from fleming_jax.models import qwen

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def tiny_config(**mesh):
    config = sft_config.get_config("tiny")
    config.mesh.update(mesh or dict(data=1, fsdp=8, tensor=1))
    config.train.update(batch_size=8, seq_len=64)
    return config


def test_plan_reports_the_sharded_bytes_of_params_and_adam_state():
    config = tiny_config(data=1, fsdp=8, tensor=1)
    config.plan.hbm_gb = 0.01
    p = plan.plan(config)
    model = nnx.eval_shape(lambda: qwen.create(models.config_from(config.model)))
    expected = 0  # by hand: parameters with an `embed` axis are split 8 ways over fsdp
    for _, var in nnx.to_flat_state(nnx.state(model, nnx.Param)):
        n = math.prod(var.shape) * 4
        expected += n // 8 if "embed" in var.get_metadata()["axes"] else n
    assert p["params_bytes"] == expected
    assert 2 * expected <= p["optimizer_bytes"] <= 2 * expected + 64  # Adam mu, nu + counters
    assert p["peak_bytes"] > p["params_bytes"] + p["optimizer_bytes"]
    assert p["fits"] is False and p["mesh"] == dict(data=1, fsdp=8, tensor=1)


def test_tensor_parallelism_shrinks_params_per_device():
    fsdp_only = plan.plan(tiny_config(data=2, fsdp=4, tensor=1))
    with_tp = plan.plan(tiny_config(data=1, fsdp=4, tensor=2))
    assert with_tp["params_bytes"] < fsdp_only["params_bytes"]


def test_plan_7b_on_sixteen_fake_devices_prints_a_table(tmp_path):
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="")
    result = subprocess.run(
        [sys.executable, "main.py", "--config=configs/sft.py:qwen2.5-7b", "--config.task=plan",
         "--config.plan.devices=16", "--config.plan.hbm_gb=80", f"--workdir={tmp_path}"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "qwen2.5-7b (7.62B params" in result.stdout
    assert "16 x cpu, mesh {'data': 1, 'fsdp': 16, 'tensor': 1}" in result.stdout
    # 7.62B fp32 params over 16 devices (norms replicated): 1.77 GiB; Adam doubles it.
    assert re.search(r"params / device\s+1\.77 GiB", result.stdout)
    assert re.search(r"optimizer / device\s+3\.55 GiB", result.stdout)
    assert os.path.exists(tmp_path / "plan.json")


@pytest.mark.parametrize("beta,dtype,share", [(0.0, "bfloat16", 0), (0.04, "bfloat16", 0.5), (0.04, "float32", 1)])
def test_rl_plan_compiles_the_grpo_loss_and_counts_the_reference(beta, dtype, share):
    from configs import rl_stage1

    config = rl_stage1.get_config("tiny")
    config.mesh.update(data=1, fsdp=8, tensor=1)
    config.train.update(batch_size=8, seq_len=64)
    config.rl.update(max_new_tokens=16, reference_dtype=dtype)
    config.rl.grpo.beta = beta
    p = plan.plan(config)
    assert p["loss"] == "grpo" and p["reference_bytes"] == share * p["params_bytes"]
    sft_plan = plan.plan(tiny_config(data=1, fsdp=8, tensor=1))
    assert sft_plan["loss"] == "sft" and sft_plan["reference_bytes"] == 0
    # a reference is held beside the step: it adds to the peak
    assert (p["peak_bytes"] >= p["reference_bytes"] + p["params_bytes"] + p["optimizer_bytes"])
    assert "KL reference / device" in plan.format_plan(p)


def test_bad_device_count_is_explained():
    config = tiny_config(data=3, fsdp=1, tensor=1)
    with pytest.raises(ValueError, match="needs 3 devices but 8 are available"):
        plan.plan(config)


@pytest.mark.skipif(importlib.util.find_spec("libtpu") is None, reason="libtpu not installed")
def test_plan_compiles_for_a_described_tpu_slice():
    config = tiny_config(data=1, fsdp=4, tensor=1)
    config.plan.topology = "v5e:2x2"
    p = plan.plan(config)
    assert p["device_kind"] == "TPU v5 lite" and p["devices"] == 4
    assert p["hbm_bytes"] == 16 * 1024**3 and p["fits"] is True

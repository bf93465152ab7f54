"""`task=plan`: ahead-of-time compilation and the per-device memory it reports."""

import importlib.util
import math
import os
import re
import subprocess
import sys

import jax.numpy as jnp
import pytest
from flax import nnx

from configs import sft as sft_config
from fleming_jax import models, plan
from fleming_jax.models import decoder
from tests.test_rl import toy_run  # noqa: F401 (a fixture)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def tiny_config(**mesh):
    config = sft_config.get_config("tiny")
    config.mesh.update(mesh or dict(data=1, fsdp=8, tensor=1))
    config.train.update(batch_size=8, seq_len=64)
    return config


@pytest.mark.slow
def test_plan_reports_the_sharded_bytes_of_params_and_adam_state():
    config = tiny_config(data=1, fsdp=8, tensor=1)
    config.plan.hbm_gb = 0.01
    p = plan.plan(config)
    model = nnx.eval_shape(lambda: decoder.create(models.config_from(config.model)))
    expected = 0  # by hand: parameters with an `embed` axis are split 8 ways over fsdp
    for _, var in nnx.to_flat_state(nnx.state(model, nnx.Param)):
        n = math.prod(var.shape) * 4
        expected += n // 8 if "embed" in var.get_metadata()["axes"] else n
    assert p["params_bytes"] == expected
    assert 2 * expected <= p["optimizer_bytes"] <= 2 * expected + 64  # Adam mu, nu + counters
    assert p["peak_bytes"] > p["params_bytes"] + p["optimizer_bytes"]
    assert p["fits"] is False and p["mesh"] == dict(data=1, fsdp=8, expert=1, tensor=1)


@pytest.mark.slow
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
    assert "16 x cpu, mesh {'data': 1, 'fsdp': 16, 'expert': 1, 'tensor': 1}" in result.stdout
    # 7.62B fp32 params over 16 devices (norms replicated): 1.77 GiB; Adam doubles it.
    assert re.search(r"params / device\s+1\.77 GiB", result.stdout)
    assert re.search(r"optimizer / device\s+3\.55 GiB", result.stdout)
    assert os.path.exists(tmp_path / "plan.json")


@pytest.mark.parametrize("beta,dtype,share", [(0.0, "bfloat16", 0), (0.04, "bfloat16", 0.5), (0.04, "float32", 1)])
@pytest.mark.slow
def test_rl_plan_compiles_the_grpo_loss_and_counts_the_reference(beta, dtype, share):
    from configs import rl_stage1

    config = rl_stage1.get_config("tiny")
    config.mesh.update(data=1, fsdp=8, tensor=1)
    config.rl.update(max_new_tokens=16, reference_dtype=dtype)
    config.rl.grpo.beta = beta
    p = plan.plan(config)
    assert p["loss"] == "grpo" and p["reference_bytes"] == share * p["params_bytes"]
    sft_plan = plan.plan(tiny_config(data=1, fsdp=8, tensor=1))
    assert sft_plan["loss"] == "sft" and sft_plan["reference_bytes"] == 0
    # a reference is held beside the step: it adds to the peak
    assert (p["peak_bytes"] >= p["reference_bytes"] + p["params_bytes"] + p["optimizer_bytes"])
    assert "KL reference / device" in plan.format_plan(p)


@pytest.mark.slow
def test_lora_plan_holds_the_adapters_state_and_no_reference():
    """With adapters the plan's state is the base in compute dtype plus the adapters and their
    Adam moments, by hand; a KL term adds no reference (it is the base, adapters off)."""
    from configs import rl_stage1

    config = rl_stage1.get_config("tiny")
    config.mesh.update(data=1, fsdp=8, tensor=1)
    config.model.update(lora_rank=8, lora_alpha=16.0, compute_dtype="bfloat16")
    config.rl.update(max_new_tokens=16)
    config.rl.grpo.beta = 0.04
    p = plan.plan(config)
    model = nnx.eval_shape(lambda: decoder.create(models.config_from(config.model)))
    adapters = base = 0
    for _, var in nnx.to_flat_state(nnx.state(model, nnx.Param)):
        split = 8 if "embed" in var.get_metadata()["axes"] else 1
        n = math.prod(var.shape) * var.dtype.itemsize // split
        if isinstance(var, nnx.LoRAParam):
            assert var.dtype == jnp.float32
            adapters += n
        else:
            assert var.dtype == jnp.bfloat16
            base += n
    assert p["params_bytes"] == base + adapters
    assert 2 * adapters <= p["optimizer_bytes"] <= 2 * adapters + 64
    assert p["reference_bytes"] == 0 and p["trained_params"] < p["params"] / 10
    assert "0 (LoRA: the frozen base, adapters off)" in plan.format_plan(p)


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
    # the compiler's own limit (a v5e chip's 16 GiB less what the runtime keeps), not the nominal size
    assert p["hbm_bytes"] == int(15.75 * 1024**3) and p["fits"] is True


@pytest.mark.slow  # 1-3 minutes of TPU compiler a slice
@pytest.mark.skipif(importlib.util.find_spec("libtpu") is None, reason="libtpu not installed")
@pytest.mark.parametrize("topology", ["v5p:2x2x1", "v5p:2x2x4", "v5p:4x4x4"])
def test_every_program_of_an_rl_step_compiles_for_a_v5p_slice(topology):
    """The RL step's programs on the meshes RL builds (the training mesh in the torus's order,
    the rollout mesh over it), with Qwen2.5-7B's config (mesh rule, KV heads, rollout and
    update settings) and small layer shapes (the meshes are the point; 7B's shapes take the
    compiler 4x longer), a KL reference and recomputed old log-probs so every program runs."""
    from configs import rl_stage1

    config = rl_stage1.get_config("qwen2.5-7b")
    config.model.update(num_layers=1, hidden_size=256, num_heads=4, head_dim=64, intermediate_size=512,
                        vocab_size=4096)
    config.plan.update(topology=topology, prompt_len=200)
    config.rl.update(prompts_per_step=8, max_new_tokens=256, recompute_old_logprobs=True)
    config.rl.grpo.beta = 0.04
    p = plan.rl_step_plan(config)
    assert p["programs"] == ["decode", "forward", "insert", "prefill", "sync", "update"]
    assert p["slots"] == 64 and p["prompt_len"] == 256
    # K and V of the one layer by hand: 64 slots over the data groups, 4 KV heads over `tensor`,
    # pages for half the slots' prompt bucket + budget (512 tokens; engine.OVERCOMMIT)
    data, tensor = p["rollout_mesh"]["data"], p["rollout_mesh"]["tensor"]
    full = -(-64 // (2 * data))  # sequences a shard's pool holds at full length
    assert data * tensor == p["devices"] and p["cache_pages"] * p["page_size"] == full * 512
    kv = 2 * full * 512 * (4 // tensor) * 64 * 2
    # + each slot's logits, outputs, segment ids and counters: the engine keeps these on every
    # device (only the K/V buffers are sharded over the data groups)
    assert kv < p["cache_bytes"] <= kv + 64 * (4096 + 3 * 256 + 512 + 8) * 4
    resident = p["params_bytes"] + p["optimizer_bytes"] + p["reference_bytes"]
    assert min(p["phases"].values()) >= resident and p["peak_bytes"] == max(p["phases"].values())
    assert p["phases"]["rollout"] >= resident + p["decode_bytes"] + p["cache_bytes"]


@pytest.mark.slow
def test_rollouts_sampled_ahead_add_their_decode_copies_to_the_update():
    """rl.max_staleness=1 on shared devices: an "overlap" phase holds the update's peak plus
    two decode copies (the one sampling, the one launched) and the KV cache, and is the step's
    peak; a device group of the engine's own is refused (not planned yet)."""
    from configs import rl_stage1

    config = rl_stage1.get_config("tiny")
    config.mesh.update(data=1, fsdp=8, tensor=1)
    config.rl.update(max_new_tokens=16, prompts_per_step=4, max_staleness=1)
    p = plan.rl_step_plan(config)
    assert p["phases"]["overlap"] >= p["update_peak_bytes"] + 2 * p["decode_bytes"] + p["cache_bytes"]
    assert p["peak_bytes"] == p["phases"]["overlap"] > p["phases"]["rollout"]
    assert "overlap phase / device" in plan.format_plan(p)
    config.rollout.devices = 4
    with pytest.raises(ValueError, match="rollout.devices=4"):
        plan.rl_step_plan(config)


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("libtpu") is None, reason="libtpu not installed")
def test_plan_refuses_a_preset_on_a_slice_too_small_for_it(tmp_path):
    """Qwen2.5-7B's RL step on a v5e-4 (4 chips of 16 GiB): its fp32 weights and Adam state
    alone are 22.8 GB a chip. One line, before any machine is rented."""
    result = subprocess.run(
        [sys.executable, "main.py", "--config=configs/rl_stage1.py:qwen2.5-7b", "--config.task=plan",
         "--config.plan.topology=v5e:2x2", f"--workdir={tmp_path}"],
        cwd=ROOT, env=dict(os.environ, JAX_PLATFORMS="cpu"), capture_output=True, text=True, timeout=900)
    assert result.returncode == 1, result.stdout[-2000:] + result.stderr[-2000:]
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("error: qwen2.5-7b does not fit") and "v5e:2x2" in last, last


@pytest.mark.slow
def test_rl_plan_compiles_the_update_batch_rl_runs(toy_run, tmp_path):
    """A real RL step (KL reference, recomputed old log-probs, 2 accumulation steps) and
    `task=plan` for the same config decide the update batch with one function: the same
    arrays, shapes and dtypes, whatever each rollout's lengths."""
    from fleming_jax.train import rl
    from tests.test_rl import toy_config

    config = toy_config(toy_run, steps=1, recompute_old_logprobs=True, grad_accum_steps=2, drop_zero_advantage_groups=False,
                        grpo=dict(beta=0.04), reference_dtype="float32")
    trainer = rl.RLTrainer(config, str(tmp_path))
    seen, step_fn = [], trainer.step_fn
    trainer.step_fn = lambda state, batch: seen.append(batch) or step_fn(state, batch)
    trainer.one_step(0)
    ran = {k: (v.shape, v.dtype) for k, v in seen[0].items()}
    config.plan.prompt_len = max(map(len, trainer.prompts))
    _, planned, _ = plan.task_loss(config, trainer.mesh)
    assert {k: (v.shape, v.dtype) for k, v in planned.items()} == ran
    assert ran["tokens"][0] == (trainer.budget.rows, trainer.budget.length) and ran["targets"][0][1] == 512
    p = plan.plan(config)
    assert (p["batch_size"], p["seq_len"], p["grad_accum_steps"]) == (trainer.budget.rows, trainer.budget.length, 2)

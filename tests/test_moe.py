"""Qwen3-MoE: routing and the load-balancing loss against transformers, expert parallelism
against one device, and the configs it refuses. (Logits, greedy decoding and export against
transformers: test_models, test_sampler, test_hf.)"""

import json
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from flax import nnx

from configs import models
from fleming_jax import parallel
from fleming_jax.models import build, config_from, hf, moe
from fleming_jax.train import sft
from tests.test_models import padded_batch


@pytest.mark.parametrize("normalize", [True, False])
def test_route_equals_transformers_router(normalize):
    config = transformers.Qwen3MoeConfig(hidden_size=16, num_experts=8, num_experts_per_tok=3, norm_topk_prob=normalize)
    router = transformers.models.qwen3_moe.modeling_qwen3_moe.Qwen3MoeTopKRouter(config)
    torch.manual_seed(0)
    with torch.no_grad():
        router.weight.normal_()
        h = torch.randn(40, 16)
        _, ref_weights, ref_ids = router(h)
    logits = jnp.asarray(h.numpy() @ router.weight.detach().numpy().T)
    weights, ids, probs = moe.route(logits, 3, normalize)
    np.testing.assert_array_equal(np.asarray(ids), ref_ids.numpy())
    np.testing.assert_allclose(np.asarray(weights), ref_weights.numpy(), atol=1e-6)
    assert len({tuple(sorted(r)) for r in np.asarray(ids)}) > 10  # routing differs from token to token


def test_load_balancing_loss_equals_transformers(hf_dir):
    """`sft_loss`'s router term against the aux_loss transformers' model returns with
    `output_router_logits` (left-padded batch: padding excluded on both sides)."""
    path = hf_dir("qwen3_moe")
    ids, mask = padded_batch()
    reference = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    with torch.no_grad():
        expected = reference(torch.tensor(ids), attention_mask=torch.tensor(mask), output_router_logits=True,
                             position_ids=torch.tensor(np.clip(mask.cumsum(1) - 1, 0, None))).aux_loss.item()
    model, _ = hf.load(path)
    batch = dict(tokens=jnp.asarray(ids), segments=jnp.asarray(mask), loss_weights=jnp.asarray(mask))
    plain, tokens, _ = sft.sft_loss(model, batch)
    with_aux, _, metrics = sft.sft_loss(model, batch, router_aux_loss_coef=0.01)
    assert float(metrics["router_balance"]) == pytest.approx(expected, rel=1e-5)
    assert float(with_aux - plain) == pytest.approx(0.01 * expected * float(tokens), rel=1e-4)


@pytest.mark.slow
@pytest.mark.parametrize("shape", [dict(data=1, fsdp=2, expert=4, tensor=1), dict(data=2, fsdp=1, expert=2, tensor=2)])
def test_expert_parallel_gradients_equal_one_device(hf_dir, shape):
    """Loss and every gradient with the experts split over an `expert` mesh axis (each device
    computing only its own experts) equal the same step on one device."""
    path = hf_dir("qwen3_moe")
    ids, mask = padded_batch(batch=8)
    mask[4:] = mask[:4]
    batch = dict(tokens=ids, segments=mask, loss_weights=mask)
    loss = lambda model, b: sft.sft_loss(model, b, router_aux_loss_coef=0.01)[0]
    model, _ = hf.load(path)
    ref_loss, ref_grads = nnx.value_and_grad(loss)(model, {k: jnp.asarray(v) for k, v in batch.items()})
    mesh = parallel.make_mesh(shape)
    model, _ = hf.load(path, mesh=mesh)
    assert model.layers.expert_gate[...].sharding.spec[1] == "expert"
    with jax.set_mesh(mesh):
        sharded = parallel.global_batch(mesh, batch, whole=True)
        value, grads = jax.jit(nnx.value_and_grad(loss))(model, sharded)
    assert float(value) == pytest.approx(float(ref_loss), rel=1e-5)
    ours = dict(nnx.to_flat_state(nnx.state(grads)))
    for key, ref in nnx.to_flat_state(nnx.state(ref_grads)):
        ref = np.asarray(ref[...])
        np.testing.assert_allclose(np.asarray(ours[key][...]), ref, atol=1e-5 * np.abs(ref).max(), err_msg=str(key))


def test_experts_must_divide_the_expert_axis():
    mesh = parallel.make_mesh(dict(data=1, fsdp=1, expert=8, tensor=1))
    model_cfg = models.get("qwen3-30b-a3b@rehearsal")
    model_cfg.num_experts = 4
    with pytest.raises(ValueError, match=r"has 4 experts, not a multiple of the mesh's expert axis \(8 devices\).*"
                                         r"--config.mesh.expert"):
        build(model_cfg, mesh)


def test_refuses_what_the_port_does_not_compute(hf_dir, tmp_path):
    path = str(tmp_path / "m")
    shutil.copytree(hf_dir("qwen3_moe"), path)
    with open(os.path.join(path, "config.json")) as f:
        cfg = json.load(f)
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(cfg | dict(mlp_only_layers=[0]), f)
    with pytest.raises(ValueError, match=r"config.json: qwen3_moe with dense layers.*every layer must have experts"):
        hf.load(path)
    model_cfg = models.get("qwen3-30b-a3b")
    model_cfg.lora_rank = 8
    assert config_from(model_cfg).lora_targets == ("q_proj", "k_proj", "v_proj", "o_proj")  # the preset's default
    model_cfg.lora_targets = "q_proj,gate_proj,up_proj,down_proj"
    with pytest.raises(ValueError, match=r"no dense gate_proj, up_proj, down_proj.*lora_targets=q_proj,k_proj"):
        config_from(model_cfg)


def test_presets_split_experts_over_an_expert_axis():
    assert dict(models.mesh_for("qwen3-30b-a3b", "v5p-128")) == dict(data=1, fsdp=4, expert=16, tensor=1)
    assert dict(models.mesh_for("qwen3-30b-a3b@rehearsal")) == dict(data=1, fsdp=1, expert=-1, tensor=1)
    assert dict(models.mesh_for("qwen3-32b", "v5p-128")) == dict(data=1, fsdp=64, expert=1, tensor=1)

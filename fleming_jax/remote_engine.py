"""An external OpenAI-compatible server as the rollout engine (`sampler.RolloutEngine`): vLLM,
SGLang or tpu-inference serving the policy while fleming_jax trains it.

`sync` saves the policy as an HF directory (`models.hf.save`, in the model's compute dtype)
to `weights_dir`, a path the server can read, and POSTs `reload_url` {"model_path":
weights_dir} (SGLang's /update_weights_from_disk by default; point it at your server's
equivalent). `generate` sends one /v1/completions request per prompt: the prompt's token ids,
n = samples, a seed drawn from the key, and asks for the sampled tokens' ids and log-probs
(vLLM's `return_token_ids` and `logprobs=0`). Process 0 talks to the server and hands the
result to the other hosts.

The server's log-probs are the raw model's (vLLM's default logprobs mode): they fill
`model_logprobs`, which RL's importance ratio uses, and `logprobs` alike.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import os
from typing import Sequence

import jax
import numpy as np

from fleming_jax import openai_api, parallel
from fleming_jax.sampler import RolloutEngine, SampleOutput, SamplingParams


@dataclasses.dataclass
class OpenAIEngine(RolloutEngine):
    """base_url: up to and including /v1; model: the name the server serves the policy as;
    weights_dir: where `sync` saves the policy (local or gs://, readable by the server);
    reload_url: "" = <base_url without /v1>/update_weights_from_disk."""

    base_url: str
    model: str
    weights_dir: str
    reload_url: str = ""
    api_key_env: str | None = None
    max_concurrency: int = 16
    timeout_s: float = 600.0

    def __post_init__(self):
        if not self.base_url or not self.model:
            raise ValueError("config.rollout.engine='openai' needs config.rollout.server.base_url (up to /v1) and "
                             "config.rollout.server.model (the name the server serves the policy as)")
        root = self.base_url.rstrip("/")
        self.url = root + "/completions"
        self.reload_url = self.reload_url or root.removesuffix("/v1") + "/update_weights_from_disk"
        self.client = openai_api.Client(api_key_env=self.api_key_env, timeout_s=self.timeout_s,
                                        config_key="config.rollout.server")

    @classmethod
    def from_config(cls, server, workdir: str) -> "OpenAIEngine":
        return cls(server.base_url, server.model, server.weights_dir or os.path.join(workdir, "rollout_weights"),
                   server.reload_url, server.api_key_env or None, server.max_concurrency, server.timeout_s)

    def sync(self, model) -> None:
        from fleming_jax.models import hf

        hf.save(model, model.config, self.weights_dir, dtype=model.config.compute_dtype)
        parallel.on_main(self.client.post, self.reload_url, {"model_path": self.weights_dir})

    def generate(self, prompts: Sequence[Sequence[int]], key, params: SamplingParams,
                 stop_ids: Sequence[int], on_prompt_done=None) -> SampleOutput:
        seeds = [int(s) for s in jax.random.randint(key, (len(prompts),), 0, 2**31 - 1)]
        replies = parallel.on_main(self._complete_all, [list(map(int, p)) for p in prompts], seeds, params,
                                   list(map(int, stop_ids)))
        budget, group = params.max_new_tokens, params.num_samples
        out = SampleOutput(tokens=np.zeros((len(prompts), group, budget), np.int32),
                           logprobs=np.zeros((len(prompts), group, budget), np.float32),
                           model_logprobs=np.zeros((len(prompts), group, budget), np.float32),
                           lengths=np.zeros((len(prompts), group), np.int32),
                           done=np.zeros((len(prompts), group), bool))
        for i, choices in enumerate(replies):
            for g, (tokens, logprobs, stopped) in enumerate(choices):
                n = len(tokens)
                out.tokens[i, g, :n], out.model_logprobs[i, g, :n] = tokens, logprobs
                out.lengths[i, g], out.done[i, g] = n, stopped
        out.logprobs[:] = out.model_logprobs
        for i in range(len(prompts) if on_prompt_done else 0):  # the server answered every prompt at once
            on_prompt_done(i, out.prompt(i))
        return out

    def _complete_all(self, prompts, seeds, params: SamplingParams, stop_ids) -> list:
        with concurrent.futures.ThreadPoolExecutor(self.max_concurrency) as pool:
            return list(pool.map(lambda a: self._complete(*a, params, stop_ids), zip(prompts, seeds)))

    def _complete(self, prompt: list[int], seed: int, params: SamplingParams, stop_ids: list[int]) -> list:
        """[(token ids, their log-probs, whether a stop token ended it)] for one prompt's samples."""
        body = dict(model=self.model, prompt=prompt, n=params.num_samples, max_tokens=params.max_new_tokens,
                    temperature=params.temperature, top_p=params.top_p, top_k=params.top_k or -1, seed=seed,
                    stop_token_ids=stop_ids, logprobs=0, return_token_ids=True, skip_special_tokens=False)
        reply = self.client.post(self.url, body)
        try:
            choices = sorted(reply["choices"], key=lambda c: c.get("index", 0))
            samples = [(list(map(int, c["token_ids"])), [float(x) for x in c["logprobs"]["token_logprobs"]],
                        c.get("finish_reason")) for c in choices]
        except (KeyError, TypeError, ValueError) as e:
            raise openai_api.ServerError(
                f"POST {self.url}: the reply lacks choices[].token_ids or choices[].logprobs.token_logprobs ({e!r}); "
                "the server must return token ids and log-probs (vLLM >= 0.10.2: return_token_ids, logprobs)") from None
        if len(samples) != params.num_samples:
            raise openai_api.ServerError(f"POST {self.url}: asked for n={params.num_samples} completions, got "
                                         f"{len(samples)}")
        result = []
        for tokens, logprobs, finish in samples:
            stopped = finish == "stop"
            if len(tokens) != len(logprobs) or len(tokens) > params.max_new_tokens or (
                    stopped and (not tokens or tokens[-1] not in stop_ids)):
                raise openai_api.ServerError(
                    f"POST {self.url}: a completion of {len(tokens)} tokens with {len(logprobs)} log-probs, "
                    f"finish_reason={finish!r}, last token {tokens[-1:]}: expected at most max_tokens="
                    f"{params.max_new_tokens} tokens, one log-prob each, ending in one of stop_token_ids when "
                    "finish_reason is 'stop'")
            result.append((tokens, logprobs, stopped))
        return result

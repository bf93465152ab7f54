"""A vLLM-like OpenAI-compatible server on 127.0.0.1 for `remote_engine.OpenAIEngine` tests.

It serves an HF directory with our own engine (so what it samples is checkable): POST
/update_weights_from_disk {"model_path"} reloads the weights, as SGLang's endpoint does; POST
/v1/completions takes token-id prompts and answers as vLLM does with `return_token_ids` and
`logprobs=0`: each choice's token ids (a stop token included), their log-probs under the raw
model, and finish_reason "stop" or "length". `mangle(choice)` lets a test break the replies.
"""

from __future__ import annotations

import http.server
import json
import threading

import jax

from fleming_jax import engine
from fleming_jax.models import hf
from fleming_jax.sampler import SamplingParams


class FakeServer(http.server.ThreadingHTTPServer):
    def __init__(self, model_path: str | None = None, mangle=None):
        super().__init__(("127.0.0.1", 0), _Handler)
        self.lock, self.mangle, self.reloads, self.requests = threading.Lock(), mangle, [], 0
        self.engine = None if model_path is None else engine.LocalEngine.of(hf.load(model_path)[0])
        self.url = f"http://127.0.0.1:{self.server_address[1]}"
        threading.Thread(target=self.serve_forever, daemon=True).start()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.shutdown()
        self.server_close()


class _Handler(http.server.BaseHTTPRequestHandler):
    def log_message(self, *args):
        pass

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        server: FakeServer = self.server
        with server.lock:  # one request at a time on the model
            if self.path == "/update_weights_from_disk":
                server.engine = engine.LocalEngine.of(hf.load(body["model_path"])[0])
                server.reloads.append(body["model_path"])
                return self._reply(200, {"success": True})
            if self.path != "/v1/completions":
                return self._reply(404, {"error": {"message": f"no route {self.path}"}})
            server.requests += 1
            params = SamplingParams(temperature=body["temperature"], top_p=body["top_p"],
                                    top_k=max(body["top_k"], 0), num_samples=body["n"],
                                    max_new_tokens=body["max_tokens"])
            out = server.engine.generate([body["prompt"]], jax.random.key(body["seed"]), params,
                                         body["stop_token_ids"])
        choices = []
        for g in range(body["n"]):
            n = int(out.lengths[0, g])
            choice = dict(index=g, token_ids=out.tokens[0, g, :n].tolist(),
                          logprobs=dict(token_logprobs=out.model_logprobs[0, g, :n].tolist()),
                          finish_reason="stop" if out.done[0, g] else "length")
            choices.append(server.mangle(choice) if server.mangle else choice)
        self._reply(200, {"choices": choices})

    def _reply(self, status: int, payload: dict):
        data = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

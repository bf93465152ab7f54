"""HttpTeacher against a real HTTP server on 127.0.0.1 that answers from a per-test script."""

import http.server
import json
import logging
import socket
import threading
import time

import pytest

from fleming_jax.distill.teachers import HttpTeacher, Teacher, TeacherError

KEY = "sk-test-secret-4242"


class FakeServer:
    """Answers each POST with the next scripted action: ("ok",) (n echo completions),
    ("sleep", s) (then ok), or (status, payload[, headers]); "ok" once the script runs out.
    Records every request and the most requests it ever had in flight."""

    def __init__(self, script, delay):
        self.script, self.delay = list(script), delay
        self.requests, self.inflight, self.max_inflight = [], 0, 0
        self.lock = threading.Lock()
        outer = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self):
                outer.handle(self)

            def log_message(self, *args):
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.handle_error = lambda *args: None  # a client that timed out hung up first
        threading.Thread(target=self.httpd.serve_forever, args=(0.01,), daemon=True).start()
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"

    def handle(self, h):
        body = json.loads(h.rfile.read(int(h.headers["Content-Length"])))
        with self.lock:
            self.requests.append(dict(path=h.path, headers=dict(h.headers), body=body))
            action = self.script.pop(0) if self.script else ("ok",)
            self.inflight += 1
            self.max_inflight = max(self.max_inflight, self.inflight)
        try:
            time.sleep(self.delay)
            if action[0] == "sleep":
                time.sleep(action[1])
                action = ("ok",)
            if action[0] == "ok":
                prompt = body["messages"][-1]["content"]
                choices = [dict(index=i, message=dict(role="assistant", content=f"{prompt} #{i}"))
                           for i in reversed(range(body["n"]))]
                action = (200, dict(choices=choices))
            status, payload, headers = (*action, {}) if len(action) == 2 else action
            data = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
            h.send_response(status)
            for name, value in headers.items():
                h.send_header(name, value)
            h.send_header("Content-Length", str(len(data)))
            h.end_headers()
            h.wfile.write(data)
        finally:
            with self.lock:
                self.inflight -= 1


@pytest.fixture
def server(monkeypatch):
    monkeypatch.setenv("no_proxy", "127.0.0.1")
    monkeypatch.setenv("NO_PROXY", "127.0.0.1")
    started = []

    def start(*script, delay=0.0):
        started.append(FakeServer(script, delay))
        return started[-1]

    yield start
    for s in started:
        s.httpd.shutdown()
        s.httpd.server_close()


def teacher(url, **kw):
    return HttpTeacher(**dict(base_url=url, model="teacher-model", backoff_s=0.01, max_backoff_s=0.05,
                              timeout_s=2.0, max_retries=3) | kw)


def chat(text):
    return [dict(role="user", content=text)]


def test_n_completions_in_index_order(server):
    srv = server()
    t = teacher(srv.url + "/")
    assert isinstance(t, Teacher)
    assert t.complete(chat("why?"), n=3, temperature=0.7, max_tokens=64) == ["why? #0", "why? #1", "why? #2"]
    (request,) = srv.requests
    assert request["path"] == "/v1/chat/completions"
    assert request["body"] == dict(model="teacher-model", messages=chat("why?"), n=3, temperature=0.7,
                                   max_tokens=64)
    assert "Authorization" not in request["headers"]


def test_retries_5xx_and_429_then_succeeds(server, caplog):
    srv = server((500, dict(error=dict(message="overloaded"))), (503, b"busy"),
                 (429, dict(error="slow down"), {"Retry-After": "0.2"}))
    start = time.monotonic()
    assert teacher(srv.url, max_backoff_s=1.0).complete(chat("q"), n=2) == ["q #0", "q #1"]
    assert len(srv.requests) == 4
    assert time.monotonic() - start >= 0.2  # Retry-After, not the 10 ms backoff
    retries = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(retries) == 3 and "HTTP 500: overloaded; retry 1/3" in retries[0]
    assert "HTTP 503: busy" in retries[1] and "HTTP 429: slow down; retry 3/3 in 0.20s" in retries[2]


def test_retry_after_is_capped_by_max_backoff(server, caplog):
    srv = server((429, dict(error="slow down"), {"Retry-After": "30"}))
    assert teacher(srv.url, max_backoff_s=0.05).complete(chat("q")) == ["q #0"]
    assert "retry 1/3 in 0.05s" in caplog.records[0].getMessage()


def test_timeout_is_retried(server):
    srv = server(("sleep", 0.5), ("sleep", 0.5))
    assert teacher(srv.url, timeout_s=0.1).complete(chat("q")) == ["q #0"]
    assert len(srv.requests) == 3


def test_timeouts_until_out_of_retries_give_a_clear_error(server):
    srv = server(*[("sleep", 0.5)] * 3)
    with pytest.raises(TeacherError, match=r"/v1/chat/completions failed after 3 attempts, last: .*timed out"):
        teacher(srv.url, timeout_s=0.1, max_retries=2).complete(chat("q"))
    assert len(srv.requests) == 3


def test_connection_refused_is_retried_then_reported():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # nothing listens once closed
    with pytest.raises(TeacherError, match=r"failed after 2 attempts, last: .*Connection refused.*server is up"):
        teacher(f"http://127.0.0.1:{port}/v1", max_retries=1).complete(chat("q"))


@pytest.mark.parametrize("status,payload,message", [
    (400, dict(error=dict(message="max_tokens is too large: 99999")), "max_tokens is too large: 99999"),
    (404, dict(detail="Not Found"), "Not Found"),
    (422, b"model 'teacher-model' does not exist", "model 'teacher-model' does not exist"),
])
def test_other_4xx_fail_at_once_naming_status_url_and_message(server, status, payload, message):
    srv = server((status, payload))
    with pytest.raises(TeacherError) as e:
        teacher(srv.url).complete(chat("q"))
    assert f"POST {srv.url}/chat/completions returned HTTP {status}: {message}; check" in str(e.value)
    assert len(srv.requests) == 1


def test_api_key_is_sent_but_never_logged_shown_or_raised(server, monkeypatch, caplog):
    caplog.set_level(logging.DEBUG)
    monkeypatch.setenv("FLEMING_TEST_KEY", KEY)
    srv = server((500, dict(error=dict(message=f"upstream rejected {KEY}"))),
                 (401, dict(error=dict(message=f"Incorrect API key provided: {KEY}"))))
    t = teacher(srv.url, api_key_env="FLEMING_TEST_KEY")
    with pytest.raises(TeacherError, match=r"HTTP 401: Incorrect API key provided: \*\*\*; check the API key") as e:
        t.complete(chat("q"))
    assert [r["headers"]["Authorization"] for r in srv.requests] == [f"Bearer {KEY}"] * 2
    assert caplog.records and KEY not in caplog.text
    assert KEY not in str(e.value) and KEY not in repr(e.value)
    assert KEY not in repr(t) and KEY not in repr(teacher(srv.url, api_key=KEY))


def test_complete_many_keeps_order_within_the_concurrency_bound(server):
    srv = server(delay=0.1)
    prompts = [f"q{i}" for i in range(12)]
    got = teacher(srv.url, max_concurrency=3).complete_many([chat(p) for p in prompts], n=2)
    assert got == [[f"{p} #0", f"{p} #1"] for p in prompts]
    assert srv.max_inflight == 3


def test_complete_many_stops_at_the_first_failure(server):
    srv = server((400, dict(error=dict(message="bad request"))), delay=0.05)
    with pytest.raises(TeacherError, match="HTTP 400: bad request"):
        teacher(srv.url, max_concurrency=1).complete_many([chat(f"q{i}") for i in range(10)])
    assert len(srv.requests) <= 2  # the rest were cancelled, not sent


@pytest.mark.parametrize("payload,match", [
    (dict(choices=[dict(index=0, message=dict(content="only one"))]), "asked for n=2 completions, got 1"),
    (dict(object="error"), "the reply has no choices"),
    (b"<html>gateway</html>", "returned a reply that is not JSON: '<html>gateway</html>'"),
])
def test_malformed_success_replies_are_reported(server, payload, match):
    srv = server((200, payload))
    with pytest.raises(TeacherError, match=match):
        teacher(srv.url).complete(chat("q"), n=2)


def test_settings_are_checked():
    with pytest.raises(ValueError, match="max_concurrency >= 1"):
        HttpTeacher(base_url="http://127.0.0.1:1/v1", model="m", max_concurrency=0)

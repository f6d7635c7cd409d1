"""OpenAI-compatible backend against a loopback server: caching, retries, timeouts, malformed replies."""

import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import pytest

from lightning_modules.probes.honesty.backends import BackendError, OpenAIChatBackend

MESSAGES = [{"role": "system", "content": "s"}, {"role": "user", "content": "Pick A or B."}]


def _ok(body: dict) -> tuple[int, bytes]:
    n = body.get("n", 1)
    reply = {
        "choices": [
            {
                "index": i,
                "message": {"role": "assistant", "content": f"B is my answer {i}"},
                "logprobs": {
                    "content": [
                        {
                            "token": "B",
                            "logprob": -0.2,
                            "top_logprobs": [
                                {"token": "B", "logprob": -0.2},
                                {"token": " A", "logprob": -1.8},
                                {"token": "A", "logprob": -3.0},
                                {"token": "Z", "logprob": -4.0},
                            ],
                        }
                    ]
                }
                if body.get("logprobs")
                else None,
            }
            for i in range(n)
        ]
    }
    return 200, json.dumps(reply).encode()


class _Server:
    """A scripted chat-completions server on 127.0.0.1; each request pops the next behaviour."""

    def __init__(self) -> None:
        self.script: list[str] = []
        self.requests: list[dict] = []
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):  # keep test output clean
                pass

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                outer.requests.append(
                    {"path": self.path, "auth": self.headers.get("Authorization"), "body": body}
                )
                mode = outer.script.pop(0) if outer.script else "ok"
                if mode == "slow":
                    time.sleep(1.0)
                    status, data = _ok(body)
                elif mode == "not_json":
                    status, data = 200, b"<html>gateway</html>"
                elif mode == "no_choices":
                    status, data = 200, b'{"error": null, "choices": []}'
                elif mode in ("500", "400", "429"):
                    status, data = int(mode), b'{"error": "scripted"}'
                else:
                    status, data = _ok(body)
                try:
                    self.send_response(status)
                    if mode == "429":
                        self.send_header("Retry-After", "1")
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(data)))
                    self.end_headers()
                    self.wfile.write(data)
                except (BrokenPipeError, ConnectionResetError):
                    pass  # the client gave up (timeout test)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_port}/v1"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.guard = threading.Timer(120, self.httpd.shutdown)  # never outlive a hung test
        self.guard.daemon = True

    def __enter__(self):
        self.thread.start()
        self.guard.start()
        return self

    def __exit__(self, *exc):
        self.guard.cancel()
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join(5)


@pytest.fixture
def server():
    with _Server() as s:
        yield s


def _backend(server, tmp_path, **kw):
    kw = {"timeout_s": 0.3, "max_retries": 1, "backoff_s": 0.01, "cache_dir": tmp_path / "cache"} | kw
    return OpenAIChatBackend("test-model", base_url=server.url, **kw)


def test_letters_from_top_logprobs_and_cache_avoids_paying_twice(server, tmp_path, monkeypatch):
    monkeypatch.setenv("MY_KEY", "sk-secret")
    be = _backend(server, tmp_path, api_key_env="MY_KEY")
    lp = be.letter_logprobs(MESSAGES, ["A", "B", "C"])
    assert lp[1] == pytest.approx(-0.2) and lp[0] == pytest.approx(np.logaddexp(-1.8, -3.0))
    assert np.isneginf(lp[2])
    assert server.requests[0]["path"] == "/v1/chat/completions"
    assert server.requests[0]["auth"] == "Bearer sk-secret"
    assert (
        server.requests[0]["body"]["model"] == "test-model" and server.requests[0]["body"]["logprobs"] is True
    )
    # same request again, and from a fresh backend (a rerun): answered from the cache
    np.testing.assert_array_equal(be.letter_logprobs(MESSAGES, ["A", "B", "C"]), lp)
    np.testing.assert_array_equal(_backend(server, tmp_path).letter_logprobs(MESSAGES, ["A", "B", "C"]), lp)
    assert len(server.requests) == 1
    assert "sk-secret" not in "".join(p.read_text() for p in (tmp_path / "cache").rglob("*.json"))
    texts = be.generate(MESSAGES, n=2, temperature=0.7, max_new_tokens=5)
    assert texts == ["B is my answer 0", "B is my answer 1"] and len(server.requests) == 2
    assert len(be.cache) == 2


def test_timeout_is_retried_then_clear_error_and_cache_kept(server, tmp_path):
    be = _backend(server, tmp_path)
    be.generate(MESSAGES)  # one good reply in the cache
    server.script = ["slow", "slow"]
    start = time.perf_counter()
    with pytest.raises(BackendError, match=r"failed after 2 attempts: timed out after 0.3 s"):
        be.generate(MESSAGES, max_new_tokens=7)
    assert time.perf_counter() - start < 3
    assert len(server.requests) == 3 and len(be.cache) == 1
    assert be.generate(MESSAGES) == ["B is my answer 0"] and len(server.requests) == 3  # still cached


@pytest.mark.parametrize("mode", ["not_json", "no_choices"])
def test_malformed_reply_clear_error_nothing_lost(server, tmp_path, mode):
    be = _backend(server, tmp_path)
    be.letter_logprobs(MESSAGES, ["A", "B"])
    server.script = [mode, mode]
    with pytest.raises(BackendError, match="malformed reply"):
        be.generate(MESSAGES, max_new_tokens=3)
    assert len(be.cache) == 1
    server.script = []
    assert be.generate(MESSAGES, max_new_tokens=3) == ["B is my answer 0"]  # recovers, now cached too
    assert len(be.cache) == 2


def test_server_error_retried_client_error_not(server, tmp_path):
    be = _backend(server, tmp_path)
    server.script = ["500"]
    assert be.generate(MESSAGES) == ["B is my answer 0"] and len(server.requests) == 2
    server.script = ["400"]
    with pytest.raises(BackendError, match="refused the request.*HTTP 400"):
        be.generate(MESSAGES, max_new_tokens=99)
    assert len(server.requests) == 3


def test_corrupted_cache_entry_is_refetched(server, tmp_path):
    be = _backend(server, tmp_path)
    be.generate(MESSAGES)
    (entry,) = (tmp_path / "cache").rglob("*.json")
    entry.write_text(entry.read_text().replace("answer", "ANSWER"))
    assert be.generate(MESSAGES) == ["B is my answer 0"] and len(server.requests) == 2


def test_unreachable_and_unsupported(tmp_path, monkeypatch):
    monkeypatch.delenv("OPENAI_BASE_URL", raising=False)
    with pytest.raises(ValueError, match="base_url"):
        OpenAIChatBackend("m", cache_dir=tmp_path)
    be = OpenAIChatBackend(
        "m", base_url="http://127.0.0.1:9", timeout_s=0.2, max_retries=0, cache_dir=tmp_path
    )
    with pytest.raises(BackendError, match="failed after 1 attempts"):
        be.generate(MESSAGES)
    with pytest.raises(BackendError, match="use method 'letter' or 'generate'"):
        be.option_logprobs(MESSAGES, ["x"])


def test_retry_after_is_honoured(server, tmp_path):
    be = _backend(server, tmp_path, backoff_s=0.0)
    server.script = ["429"]
    start = time.perf_counter()
    assert be.generate(MESSAGES) == ["B is my answer 0"]
    assert time.perf_counter() - start >= 0.9  # waited as the server asked, not the 0 s backoff
    assert len(server.requests) == 2
    server.script = ["429", "429"]
    with pytest.raises(BackendError, match=r"failed after 2 attempts: HTTP 429"):
        be.generate(MESSAGES, max_new_tokens=11)

"""A fake Anthropic Messages API on 127.0.0.1, for driving the real ``anthropic`` client offline.

It plays a script: each ``POST /v1/messages`` takes the next scripted reply.
A reply is a complete message JSON (with usage), or an HTTP error with an
Anthropic-shaped error body and an optional ``retry-after`` header. Every
request is recorded (path, headers, JSON body) so tests can assert what the
client sent.

>>> with FakeAnthropic([text_reply("hello")]) as fake:          # doctest: +SKIP
...     client = anthropic.Anthropic(api_key="test-key", base_url=fake.url)
...     client.messages.create(model="m", max_tokens=10, messages=[...])
...     fake.requests[0].body["max_tokens"]
10

Keep ``retry-after`` small (0 or 0.1): anthropic >= 1 honours any positive
value, so a large one hangs the client.
"""
from __future__ import annotations

import json
import os
import socket
import struct
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Callable

_ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error", 404: "not_found_error",
                429: "rate_limit_error", 500: "api_error", 529: "overloaded_error"}


@dataclass
class Reply:
    """One scripted HTTP reply."""

    status: int = 200
    body: dict = field(default_factory=dict)
    headers: dict = field(default_factory=dict)
    reset: bool = False  # no reply at all: the connection is reset (TCP RST), as a dropped network does


@dataclass
class Recorded:
    """One request the fake received."""

    method: str
    path: str
    headers: dict
    body: Any


def text_reply(*texts: str, stop_reason: str = "end_turn", model: str = "claude-fake-1",
               input_tokens: int = 120, output_tokens: int | None = None, thinking: str | None = None,
               cache_read: int = 0, cache_write: int = 0) -> Reply:
    """A complete 200 message whose content is one text block per ``texts`` (after an optional thinking block)."""
    content: list[dict] = []
    if thinking is not None:
        content.append({"type": "thinking", "thinking": thinking, "signature": "fake-signature"})
    content += [{"type": "text", "text": t} for t in texts]
    out = output_tokens if output_tokens is not None else max(1, sum(len(t) for t in texts) // 4)
    return Reply(200, {
        "id": "msg_fake_0001", "type": "message", "role": "assistant", "model": model,
        "content": content, "stop_reason": stop_reason, "stop_sequence": None,
        "usage": {"input_tokens": input_tokens, "output_tokens": out,
                  "cache_creation_input_tokens": cache_write, "cache_read_input_tokens": cache_read},
    })


def error_reply(status: int, message: str = "fake error", retry_after: float | None = None) -> Reply:
    """An Anthropic-shaped error (429 rate limit, 529 overloaded, ...)."""
    headers = {"request-id": f"req_fake_{status}"}
    if retry_after is not None:
        headers["retry-after"] = str(retry_after)
    body = {"type": "error", "error": {"type": _ERROR_TYPES.get(status, "api_error"), "message": message}}
    return Reply(status, body, headers)


def reset_reply() -> Reply:
    """The server resets the connection instead of answering (the client sees ``ECONNRESET``)."""
    return Reply(reset=True)


class FakeAnthropic:
    """A threaded HTTP server playing ``script`` in order (then asking ``responder``); use as a context manager."""

    def __init__(self, script: list[Reply] | None = None, responder: "Callable[[Recorded], Reply] | None" = None):
        self.script: list[Reply] = list(script or [])
        # Once the script is played, ``responder`` (if given) answers each request by what it asks:
        # for concurrent callers (e.g. several ideas in flight) whose order a script cannot know.
        self.responder = responder
        self.requests: list[Recorded] = []
        self._lock = threading.Lock()
        fake = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):  # keep test output clean
                pass

            def do_POST(self):
                raw = self.rfile.read(int(self.headers.get("content-length") or 0))
                try:
                    body = json.loads(raw or b"null")
                except ValueError:
                    body = raw.decode("utf-8", "replace")
                rec = Recorded("POST", self.path, {k.lower(): v for k, v in self.headers.items()}, body)
                with fake._lock:
                    fake.requests.append(rec)
                    reply = fake._next(rec)
                self._send(reply)

            def _send(self, reply: Reply):
                if reply.reset:
                    # SO_LINGER 0: close() sends RST, not FIN. The fd is detached first, so that the
                    # server's own shutdown(SHUT_WR) afterwards cannot send a FIN before it.
                    self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                    os.close(self.connection.detach())
                    self.close_connection = True
                    return
                data = json.dumps(reply.body).encode()
                self.send_response(reply.status)
                self.send_header("content-type", "application/json")
                self.send_header("content-length", str(len(data)))
                for k, v in reply.headers.items():
                    self.send_header(k, v)
                self.end_headers()
                self.wfile.write(data)

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True, name="fake-anthropic")

    def _next(self, rec: Recorded) -> Reply:
        auth = rec.headers.get("x-api-key") or rec.headers.get("authorization", "").removeprefix("Bearer ").strip()
        if not auth:
            return error_reply(401, "fake: no x-api-key or Authorization: Bearer header")
        if rec.path.split("?")[0] == "/v1/messages/count_tokens":
            return Reply(200, {"input_tokens": len(json.dumps(rec.body)) // 4})
        if rec.path.split("?")[0] != "/v1/messages":
            return error_reply(404, f"fake: no route POST {rec.path}")
        if not self.script and self.responder is not None:
            return self.responder(rec)
        if not self.script:
            # 400 is not retried, so an unscripted call fails fast and loudly
            return error_reply(400, "fake: script exhausted (the test made more calls than it scripted)")
        return self.script.pop(0)

    @property
    def url(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    @property
    def message_requests(self) -> list[Recorded]:
        return [r for r in self.requests if r.path.split("?")[0] == "/v1/messages"]

    def add(self, *replies: Reply) -> None:
        with self._lock:
            self.script.extend(replies)

    def __enter__(self) -> "FakeAnthropic":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._server.shutdown()
        self._server.server_close()

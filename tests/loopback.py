"""A real HTTP server on 127.0.0.1 for edge tests: scripted replies, every request recorded.

    with LoopbackServer() as server:
        server.reply(Reply(503), Reply(200, body={"ok": True}))
        ...  # point the client at server.url
        assert server.requests[0].header("Idempotency-Key") == "..."

Replies are taken from a queue in order; when it is empty, ``responder(request)`` (default:
``200`` with an empty body) answers. Errors raised inside the handler are kept and re-raised
by :meth:`LoopbackServer.close`, so a broken stand-in fails the test instead of hiding.
"""

from __future__ import annotations

import collections
import itertools
import json
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Callable, Mapping
from urllib.parse import parse_qs

__all__ = ["Reply", "Recorded", "LoopbackServer", "SlackAPI"]


@dataclass(frozen=True)
class Reply:
    status: int = 200
    headers: Mapping[str, str] = field(default_factory=dict)
    body: bytes | str | Mapping[str, Any] | list[Any] = b""
    delay: float = 0.0  # seconds to wait before answering (to provoke client timeouts)

    def encoded(self) -> tuple[bytes, dict[str, str]]:
        headers = dict(self.headers)
        body = self.body
        if isinstance(body, (dict, list)) or isinstance(body, Mapping):
            body = json.dumps(body).encode("utf-8")
            headers.setdefault("Content-Type", "application/json; charset=utf-8")
        elif isinstance(body, str):
            body = body.encode("utf-8")
            headers.setdefault("Content-Type", "text/plain; charset=utf-8")
        return body, headers


@dataclass(frozen=True)
class Recorded:
    method: str
    path: str
    headers: Mapping[str, str]  # keys lower-cased
    body: bytes

    def header(self, name: str) -> str | None:
        return self.headers.get(name.lower())

    def json(self) -> Any:
        return json.loads(self.body)

    def form(self) -> dict[str, str]:
        return {k: v[-1] for k, v in parse_qs(self.body.decode("utf-8")).items()}


class LoopbackServer:
    """A ``ThreadingHTTPServer`` on an ephemeral loopback port, served from a thread."""

    def __init__(self, responder: Callable[[Recorded], Reply] | None = None) -> None:
        self.responder = responder or (lambda _req: Reply())
        self.requests: list[Recorded] = []
        self.errors: list[BaseException] = []
        self._queue: collections.deque[Reply] = collections.deque()
        self._lock = threading.Lock()
        self._closing = threading.Event()
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler_class())
        self._server.daemon_threads = True
        self._thread = threading.Thread(
            target=self._server.serve_forever, kwargs={"poll_interval": 0.02}, name="loopback-http", daemon=True
        )
        self._thread.start()

    @property
    def port(self) -> int:
        return self._server.server_address[1]

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def reply(self, *replies: Reply) -> None:
        with self._lock:
            self._queue.extend(replies)

    def close(self) -> None:
        self._closing.set()
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)
        if self.errors:
            raise AssertionError(f"loopback handler failed: {self.errors[0]!r}") from self.errors[0]

    def __enter__(self) -> "LoopbackServer":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _next_reply(self, request: Recorded) -> Reply:
        with self._lock:
            self.requests.append(request)
            queued = self._queue.popleft() if self._queue else None
        return queued if queued is not None else self.responder(request)

    def _handler_class(self) -> type[BaseHTTPRequestHandler]:
        owner = self

        class Handler(BaseHTTPRequestHandler):
            def _handle(self) -> None:
                try:
                    length = int(self.headers.get("Content-Length") or 0)
                    body = self.rfile.read(length) if length else b""
                    request = Recorded(
                        method=self.command,
                        path=self.path,
                        headers={k.lower(): v for k, v in self.headers.items()},
                        body=body,
                    )
                    reply = owner._next_reply(request)
                    if reply.delay and owner._closing.wait(reply.delay):
                        return
                    payload, headers = reply.encoded()
                    self.send_response(reply.status)
                    for name, value in headers.items():
                        self.send_header(name, value)
                    self.send_header("Content-Length", str(len(payload)))
                    self.end_headers()
                    self.wfile.write(payload)
                except (BrokenPipeError, ConnectionResetError):
                    pass  # the client gave up (timeout test); nothing to report
                except BaseException as exc:  # surfaced by close()
                    owner.errors.append(exc)
                    raise

            do_GET = do_POST = do_PUT = do_PATCH = do_DELETE = _handle

            def log_message(self, format: str, *args: Any) -> None:
                pass

        return Handler


class SlackAPI:
    """A responder standing in for the Slack Web API's ``chat.postMessage``.

    Answers ``{"ok": true, "channel": ..., "ts": ...}`` with increasing ``ts`` values, or
    ``ok: false`` / ``invalid_auth`` when the bearer token is not ``token``.
    """

    def __init__(self, token: str, channel_id: str = "C0LOOPBACK") -> None:
        self.token = token
        self.channel_id = channel_id
        self._ts = itertools.count(1)

    def __call__(self, request: Recorded) -> Reply:
        if request.header("Authorization") != f"Bearer {self.token}":
            return Reply(200, body={"ok": False, "error": "invalid_auth"})
        if not request.path.endswith("/chat.postMessage"):
            return Reply(200, body={"ok": False, "error": "unknown_method"})
        ts = f"1700000000.{next(self._ts):06d}"
        return Reply(200, body={"ok": True, "channel": self.channel_id, "ts": ts})

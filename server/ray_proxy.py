"""OpenAI-shaped errors from Ray Serve's HTTP proxy, installed through Ray's own hook
(RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH=server.ray_proxy:middlewares; server/ray_cli.py
sets it for a local Ray, deploy/ray/ sets it on every node).

The proxy answers some failures itself, as plain text, or not at all: a replica that died with
the request in flight (nothing, then the server's generic 500), no replica available (503),
backpressure (503), an unknown route (404), a proxy timeout (408). Clients of this server
expect `{"error": {...}}` bodies, and a stream cut by a dead replica should end in an error
event, as the plain server ends a failed stream. Imports no Ray.
"""

from __future__ import annotations

import contextlib
import json

from starlette.middleware import Middleware
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from server.errors import error_body

# status -> (type, code) for bodies the proxy writes itself
_KINDS = {
    404: ("invalid_request_error", "not_found"),
    408: ("timeout", "request_timeout"),
    429: ("server_overloaded", "too_many_requests"),
    500: ("internal_error", "replica_failed"),
    503: ("server_unavailable", "no_replica_available"),
}


def middlewares() -> list[Middleware]:
    """What Ray's proxy callback returns: the middlewares wrapped around the proxy."""
    return [Middleware(OpenAIErrors)]


def _openai_error(status: int, message: str) -> bytes:
    type_, code = _KINDS.get(status, ("internal_error", None))
    return json.dumps(error_body(status, message, type_, None, code)).encode()


class OpenAIErrors:
    """Rewrites the proxy's own non-JSON error responses into OpenAI-shaped ones, answers 500
    when nothing was sent, and closes a cut event stream with an error event (what the plain
    server sends when a stream fails)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start: Message | None = None  # held back while the body may need rewriting
        held = b""
        started = ended = event_stream = False

        async def guarded(message: Message) -> None:
            nonlocal start, held, started, ended, event_stream
            if message["type"] == "http.response.start":
                # The app and the proxy both add x-request-id (the same id): send it once.
                raw = message.get("headers", [])
                ids = [i for i, (k, _) in enumerate(raw) if k.lower() == b"x-request-id"]
                message["headers"] = [h for i, h in enumerate(raw) if i not in ids[1:]]
                headers = {k.decode().lower(): v.decode("latin-1")
                           for k, v in message["headers"]}
                ctype = headers.get("content-type", "")
                event_stream = ctype.startswith("text/event-stream")
                if message["status"] >= 400 and "json" not in ctype:
                    start = message  # the proxy's plain-text error: rewrite at its end
                    return
                started = True
                await send(message)
            elif message["type"] == "http.response.body":
                if start is not None:
                    held += message.get("body", b"")
                    if not message.get("more_body", False):
                        status = start["status"]
                        text = held.decode("utf-8", "replace").strip() or "request failed"
                        await _send_json(send, status, _openai_error(status, text),
                                         [(k, v) for k, v in start.get("headers", [])
                                          if k.lower() not in (b"content-type",
                                                               b"content-length")])
                        started = ended = True
                    return
                ended = not message.get("more_body", False)
                await send(message)
            else:
                await send(message)

        with contextlib.suppress(Exception):  # the proxy has logged it; the client is told below
            await self.app(scope, receive, guarded)
        with contextlib.suppress(Exception):  # the client may have gone too
            if not started:
                # The replica died (or the proxy failed) before a response started.
                await _send_json(send, 500, _openai_error(
                    500, "the replica serving this request failed; retry"), [])
            elif not ended and event_stream:
                event = _openai_error(500, "the replica serving this stream failed mid-stream")
                await send({"type": "http.response.body",
                            "body": b"data: " + event + b"\n\ndata: [DONE]\n\n",
                            "more_body": False})  # framed as the server ends a failed stream


async def _send_json(send: Send, status: int, body: bytes,
                     headers: list[tuple[bytes, bytes]]) -> None:
    await send({"type": "http.response.start", "status": status,
                "headers": [*headers, (b"content-type", b"application/json"),
                            (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})

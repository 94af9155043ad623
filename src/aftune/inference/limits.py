"""What one server accepts at once (`aftune serve --max-request-bytes N --max-concurrent N`, SPEC.md
8.10.2): a request body larger than the limit is refused with 413 before any of it is parsed, and
a request beyond the number in flight with 429. An ASGI middleware, inside the API-key check.

    app.add_middleware(RequestLimits, limits=ServingLimits(max_request_bytes=1 << 20, max_concurrent=8))

The body limit holds whatever the client declares: a `Content-Length` over it is refused without
reading a byte; a body sent without one (chunked) is read up to the limit and refused as soon as
it passes it. A body within the limit is handed to the application unchanged.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

from ..errors import InputError
from .openai_routes import OPENAI_PATHS

DEFAULT_MAX_REQUEST_BYTES = 4 << 20  # a prompt of MAX_PROMPT_CHARS (1 Mi characters) of ASCII, JSON-encoded, fits
DEFAULT_MAX_CONCURRENT = 64


@dataclass(frozen=True)
class ServingLimits:
    max_request_bytes: int = DEFAULT_MAX_REQUEST_BYTES  # the largest request body accepted
    max_concurrent: int = DEFAULT_MAX_CONCURRENT  # requests in flight at once (a stream until its last event)

    def validate(self) -> "ServingLimits":
        problems = []
        if not isinstance(self.max_request_bytes, int) or not 1024 <= self.max_request_bytes <= 1 << 30:
            problems.append(f"--max-request-bytes: must be in [1024, 2^30], got {self.max_request_bytes!r}")
        if not isinstance(self.max_concurrent, int) or not 1 <= self.max_concurrent <= 4096:
            problems.append(f"--max-concurrent: must be in [1, 4096], got {self.max_concurrent!r}")
        if problems:
            raise InputError("; ".join(problems))
        return self


def _error(path: str, status: int, message: str, code: str) -> bytes:
    if path.startswith(OPENAI_PATHS):
        body = {"error": {"message": message, "type": "invalid_request_error", "param": None, "code": code}}
    else:
        body = {"error": message}
    return json.dumps(body).encode("utf-8")


class RequestLimits:
    """The ASGI middleware enforcing `ServingLimits` on every HTTP request."""

    def __init__(self, app, limits: ServingLimits = ServingLimits()):
        self.app, self.limits = app, limits.validate()
        self.in_flight = 0  # touched only on the event loop's thread

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path, cap = scope.get("path", ""), self.limits.max_request_bytes
        if self.in_flight >= self.limits.max_concurrent:
            return await _respond(send, 429, _error(path, 429, f"too many requests in flight (this server answers "
                                                    f"{self.limits.max_concurrent} at once): retry shortly",
                                                    "rate_limit_exceeded"), [(b"retry-after", b"1")])
        declared = dict(scope.get("headers") or ()).get(b"content-length")
        too_large = _error(path, 413, f"the request body is larger than this server's limit of {cap} bytes",
                           "request_too_large")
        if declared is not None:
            try:
                size = int(declared)
            except ValueError:
                size = -1
            if size < 0:
                return await _respond(send, 400, _error(path, 400, "bad Content-Length", "invalid_value"))
            if size > cap:
                return await _respond(send, 413, too_large)
        self.in_flight += 1
        try:
            chunks, total, more = [], 0, True
            while more:  # the whole body, never more than the limit of it
                message = await receive()
                if message["type"] == "http.disconnect":
                    return
                chunk = message.get("body", b"")
                total += len(chunk)
                if total > cap:
                    return await _respond(send, 413, too_large)
                chunks.append(chunk)
                more = message.get("more_body", False)
            body, replayed = b"".join(chunks), False

            async def replay():
                nonlocal replayed
                if not replayed:
                    replayed = True
                    return {"type": "http.request", "body": body, "more_body": False}
                return await receive()  # after the body: the disconnect, when it comes

            await self.app(scope, replay, send)
        finally:
            self.in_flight -= 1


async def _respond(send, status: int, body: bytes, headers: list | None = None) -> None:
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                            *(headers or [])]})
    await send({"type": "http.response.body", "body": body})

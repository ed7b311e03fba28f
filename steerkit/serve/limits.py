"""What keeps ``steerkit serve`` safe on a network: its limits (``ServeConfig``), the API key, and the guard in
front of the app.

``Guard`` is plain ASGI middleware, so it answers before FastAPI parses anything: a missing or wrong
``Authorization: Bearer KEY`` is a 401 (compared in constant time; ``/health`` needs no key), a declared body over
the limit a 413, a body that arrives slower than ``body_timeout`` a 408, and it counts every response by route and
status for ``/metrics``. ``HeadTimeout`` is uvicorn's h11 protocol with a deadline on the request head, which
uvicorn lacks: a client that has not sent a whole request line and headers ``header_timeout`` seconds after
connecting (or after its last response) gets a 408 and is closed (slowloris).
"""

from __future__ import annotations

import hmac
import ipaddress
import json
from dataclasses import dataclass

from steerkit._config import option

OPEN_PATHS = ("/health",)  # answered without a key: load balancers and orchestrators probe them


@dataclass
class ServeConfig:
    """The limits and security of ``steerkit serve``: the options of ``serve`` and of ``steerkit serve``."""

    max_batch: int = option(16, "Requests decoded together.")
    max_queue: int = option(64, "Requests waiting beyond the batch before 429.")
    api_key: str | None = option(None, "Require 'Authorization: Bearer KEY' on every route but /health.",
                                 envvar="STEERKIT_API_KEY")  # fmt: skip
    allowed_origins: str | None = option(None, "Comma-separated origins allowed by CORS (default: no CORS).")
    max_body_bytes: int = option(4 * 2**20, "Largest request body, in bytes (413 beyond).")
    max_messages: int = option(256, "Most messages in one chat request.")
    max_stop: int = option(4, "Most stop sequences in one request (OpenAI's limit).")
    max_steering: int = option(16, "Most steering entries in one request.")
    header_timeout: float = option(10.0, "Seconds a client has to send a whole request head (408 beyond).")
    body_timeout: float = option(30.0, "Seconds a client has to send a whole request body (408 beyond).")
    request_timeout: float = option(600.0, "Seconds a request may run before it is ended (504, or an error event).")
    shutdown_timeout: float = option(30.0, "Seconds running requests may finish after SIGTERM before they end.")

    def checked(self) -> ServeConfig:
        """ValueError naming the first option out of range."""
        for name in ("max_batch", "max_queue", "max_body_bytes", "max_messages", "max_stop", "max_steering"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name}={value!r}: expected a positive int")
        for name in ("header_timeout", "body_timeout", "request_timeout", "shutdown_timeout"):
            value = getattr(self, name)
            if not isinstance(value, int | float) or not 0 < value < 1e6:
                raise ValueError(f"{name}={value!r}: expected seconds above 0")
        if self.api_key is not None and len(self.api_key) < 8:
            raise ValueError("api_key: expected at least 8 characters")
        return self

    def origins(self) -> list[str]:
        return [o.strip() for o in (self.allowed_origins or "").split(",") if o.strip()]


def is_loopback(host: str) -> bool:
    """True for addresses only this machine reaches (127.0.0.0/8, ::1, localhost)."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


async def _answer(send, status: int, message: str, kind: str, headers: tuple = ()) -> None:
    body = json.dumps({"error": {"message": message, "type": kind}}).encode()
    head = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()), *headers]
    await send({"type": "http.response.start", "status": status, "headers": head})
    await send({"type": "http.response.body", "body": body})


class Guard:
    """ASGI middleware: API key, body size and body time, and a response count per (route, status)."""

    def __init__(self, app, config: ServeConfig, metrics):
        self.app, self.config, self.metrics = app, config, metrics
        self.key = config.api_key.encode() if config.api_key else None

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path = scope["path"]
        status = {"code": 500}

        async def counted(message):
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
            await send(message)

        try:
            refusal = self._refusal(scope)
            if refusal is None:
                body, refusal = await self._body(receive)
            if refusal is not None:
                status["code"] = refusal[0]
                return await _answer(send, *refusal)
            await self.app(scope, _replay(body, receive), counted)
        finally:
            self.metrics.response(path, status["code"])

    def _refusal(self, scope) -> tuple | None:
        """(status, message, kind, headers) for a request refused on its head, or None."""
        headers = dict(scope["headers"])
        if self.key is not None and scope["path"] not in OPEN_PATHS and scope["method"] != "OPTIONS":
            given = headers.get(b"authorization", b"")
            if not hmac.compare_digest(given, b"Bearer " + self.key):
                return (401, "missing or wrong API key: send 'Authorization: Bearer KEY'", "authentication_error",
                        ((b"www-authenticate", b"Bearer"),))  # fmt: skip
        declared = headers.get(b"content-length")
        if declared is not None and (not declared.isdigit() or int(declared) > self.config.max_body_bytes):
            return self._too_large()
        return None

    def _too_large(self) -> tuple:
        return (413, f"the request body is larger than the server's limit of {self.config.max_body_bytes} bytes "
                "(max_body_bytes)", "invalid_request_error", ((b"connection", b"close"),))  # fmt: skip

    async def _body(self, receive) -> tuple[bytes, tuple | None]:
        """The whole body, read within ``body_timeout`` and ``max_body_bytes`` (or a refusal)."""
        import asyncio

        chunks, size = [], 0
        try:
            async with asyncio.timeout(self.config.body_timeout):
                while True:
                    message = await receive()
                    if message["type"] != "http.request":
                        return b"", (400, "the client went away", "invalid_request_error", ())
                    chunks.append(message.get("body", b""))
                    size += len(chunks[-1])
                    if size > self.config.max_body_bytes:
                        return b"", self._too_large()
                    if not message.get("more_body", False):
                        return b"".join(chunks), None
        except TimeoutError:
            return b"", (408, f"the request body took longer than {self.config.body_timeout:g} s (body_timeout)",
                         "timeout_error", ((b"connection", b"close"),))  # fmt: skip


def _replay(body: bytes, receive):
    """An ASGI ``receive`` that gives the app the body already read, then the client's own messages (a
    disconnect)."""
    sent = {"body": False}

    async def replayed():
        if not sent["body"]:
            sent["body"] = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return replayed


def head_timeout_protocol(seconds: float):
    """uvicorn's h11 protocol class with a deadline on each request head (see the module docstring)."""
    from uvicorn.protocols.http.h11_impl import H11Protocol

    class HeadTimeout(H11Protocol):
        def connection_made(self, transport) -> None:
            super().connection_made(transport)
            self._arm()

        def _arm(self) -> None:
            self._waiting_after = self.cycle  # the head is in once a new cycle replaces this one
            self._started = False  # whether any byte of the next head has come
            self._head_timer = self.loop.call_later(seconds, self._head_late)

        def data_received(self, data: bytes) -> None:
            self._started = True
            super().data_received(data)
            if self._head_timer is not None and self.cycle is not self._waiting_after:  # a whole head arrived
                self._head_timer.cancel()
                self._head_timer = None

        def on_response_complete(self) -> None:
            super().on_response_complete()
            if self._head_timer is None and not self.transport.is_closing():
                self._arm()

        def connection_lost(self, exc) -> None:
            if self._head_timer is not None:
                self._head_timer.cancel()
            super().connection_lost(exc)

        def _head_late(self) -> None:
            """A head begun and not finished gets a 408; a connection that sent nothing is closed quietly (an
            idle keep-alive connection, which a client might be about to reuse)."""
            self._head_timer = None
            if (self.cycle is None or self.cycle.response_complete) and not self.transport.is_closing():
                if not self._started:
                    self.transport.close()
                    return
                body = b'{"error": {"message": "the request head took too long", "type": "timeout_error"}}'
                head = (b"HTTP/1.1 408 Request Timeout\r\ncontent-type: application/json\r\nconnection: close\r\n"
                        b"content-length: " + str(len(body)).encode() + b"\r\n\r\n")  # fmt: skip
                self.transport.write(head + body)
                self.transport.close()

    return HeadTimeout

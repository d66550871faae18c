"""Request bodies, read whole under a size limit and a time limit before any route sees them.

An ASGI middleware (:class:`BodyGuard`) wraps the app, so the limits hold for every route and
for every way a client can send a body:

- **size**: a declared ``Content-Length`` over the limit is refused (413) before a byte is
  read; a body without one (``Transfer-Encoding: chunked``) or one that lies is counted while it
  arrives and refused the moment it passes the limit, so the server never holds more than the
  limit (plus one chunk) of a body;
- **time**: the whole body must arrive within ``timeout_s`` seconds (408 otherwise), so a client
  that declares 100 kB and sends a byte a second gives its connection back;
- **type**: the routes take JSON only, so a body is read as JSON whatever ``Content-Type`` it
  declares: ``curl -d '{...}'`` (which declares ``application/x-www-form-urlencoded``) works
  as written; a body that is not JSON gets a 400 saying so.

The answers are the server's usual one-line JSON errors. The bytes read are handed to the app
as one message, exactly as they arrived.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

JSON_TYPES = (b"application/json",)


def _is_json(content_type: bytes) -> bool:
    main = content_type.split(b";", 1)[0].strip().lower()
    return main in JSON_TYPES or main.endswith(b"+json")


async def send_error(send: Send, status: int, message: str, *, close: bool = False) -> None:
    """A one-line JSON error (``{"error": ...}``), the body of every refusal of the server."""
    body = json.dumps({"error": " ".join(message.split())}).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    if close:  # the rest of the body is not read: the connection cannot carry another request
        headers.append((b"connection", b"close"))
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body, "more_body": False})


class BodyGuard:
    """Read each HTTP request's body whole, within ``limit`` bytes and ``timeout_s`` seconds,
    then call ``app`` with it (see the module docstring). ``exempt(scope)``: requests the guard
    lets through untouched (none by default)."""

    def __init__(self, app: ASGIApp, *, limit: int, timeout_s: float,
                 exempt: Callable[[Scope], bool] | None = None) -> None:
        self.app = app
        self.limit = int(limit)
        self.timeout_s = float(timeout_s)
        self.exempt = exempt

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or (self.exempt is not None and self.exempt(scope)):
            await self.app(scope, receive, send)
            return
        headers = scope.get("headers") or []
        declared = next((v for k, v in headers if k.lower() == b"content-length"), None)
        if declared is not None and declared.strip().isdigit() and int(declared) > self.limit:
            await send_error(send, 413, f"request body is {int(declared)} bytes, over the limit of {self.limit}",
                             close=True)
            return
        body = await self._read(receive, send)
        if body is None:
            return
        if body and not _is_json(next((v for k, v in headers if k.lower() == b"content-type"), b"")):
            # the routes take JSON: read it as JSON whatever the client declared (curl -d, no header...)
            scope = dict(scope)
            scope["headers"] = [(k, v) for k, v in headers if k.lower() != b"content-type"] + [
                (b"content-type", b"application/json")]
        delivered = False

        async def replay() -> Message:
            nonlocal delivered
            if not delivered:
                delivered = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()  # after the body: only the client's disconnect is left

        await self.app(scope, replay, send)

    async def _read(self, receive: Receive, send: Send) -> bytes | None:
        """The whole body, or None after answering 408/413 (or 400 when the client left)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.timeout_s
        chunks: list[bytes] = []
        size = 0
        while True:
            try:
                async with asyncio.timeout(max(0.0, deadline - loop.time())):
                    message = await receive()
            except TimeoutError:
                await send_error(send, 408, f"the request body did not arrive within {self.timeout_s:g} s "
                                             f"({size} bytes received)", close=True)
                return None
            if message["type"] == "http.disconnect":  # answered for the record (logs, metrics): nobody reads it
                await send_error(send, 400, f"the client closed the connection after {size} bytes of the body")
                return None
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.limit:
                await send_error(send, 413, f"request body is over the limit of {self.limit} bytes "
                                             f"(refused after {size} bytes)", close=True)
                return None
            if chunk:
                chunks.append(chunk)
            if not message.get("more_body", False):
                return b"".join(chunks)

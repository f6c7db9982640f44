"""ASGI middleware: the upload's size limit and idle timeout (while the body streams in), security headers,
and the Host / Origin checks."""

from __future__ import annotations

import asyncio
import tempfile
from typing import TYPE_CHECKING

from fastapi.responses import JSONResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from boneage.serve.schemas import _PAGE_CSP, MULTIPART_OVERHEAD

MB = 1 << 20
UPLOAD_IDLE_TIMEOUT_S = 30.0  # docs/api.md: a stalled upload gets 408 after this

if TYPE_CHECKING:
    from boneage.serve.service import Service


# --- upload size limit, enforced while the body streams in -----------------------------------------


class UploadLimitMiddleware:
    """The upload route's body, read in full before the app sees it, with three limits that answer in JSON:

    - over the size limit: 413, at once if Content-Length says so, else as soon as the streamed (or chunked)
      bytes pass it; nothing beyond the limit is read;
    - a client that stops sending (Content-Length larger than what arrives): 408 after ``idle_timeout_s``
      seconds without a byte, so a stalled upload never holds a connection and a worker slot forever;
    - the body is spooled to a temporary file past 1 MiB, then replayed to the app.
    """

    def __init__(self, app: ASGIApp, *, service: Service, paths: tuple[str, ...],
                 idle_timeout_s: float = UPLOAD_IDLE_TIMEOUT_S) -> None:
        self.app, self.service, self.paths, self.idle_timeout_s = app, service, paths, idle_timeout_s

    async def _refuse(self, scope: Scope, receive: Receive, send: Send, status: int, detail: str) -> None:
        await JSONResponse({"detail": detail}, status_code=status, headers={"Connection": "close"})(
            scope, receive, send)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] not in self.paths:
            await self.app(scope, receive, send)
            return
        limit = self.service.max_upload_bytes + MULTIPART_OVERHEAD
        length = dict(scope["headers"]).get(b"content-length")
        if length is not None and length.isdigit() and int(length) > limit:
            await self._refuse(scope, receive, send, 413, self.service.too_large_message())
            return
        spool = tempfile.SpooledTemporaryFile(max_size=MB)
        try:
            received = 0
            while True:
                try:
                    message = await asyncio.wait_for(receive(), timeout=self.idle_timeout_s)
                except asyncio.TimeoutError:
                    await self._refuse(scope, receive, send, 408,
                                       f"the upload stalled: no data for {self.idle_timeout_s:g} s; send it again")
                    return
                if message["type"] == "http.disconnect":
                    return
                chunk = message.get("body", b"")
                received += len(chunk)
                if received > limit:
                    await self._refuse(scope, receive, send, 413, self.service.too_large_message())
                    return
                spool.write(chunk)
                if not message.get("more_body", False):
                    break
            spool.seek(0)
            done = False

            async def replay() -> Message:
                nonlocal done
                if done:
                    return await receive()  # after the body: the disconnect, when it comes
                chunk = spool.read(MB)
                done = spool.tell() >= received
                return {"type": "http.request", "body": chunk, "more_body": not done}

            await self.app(scope, replay, send)
        finally:
            spool.close()


class SecurityHeadersMiddleware:
    """nosniff and no-referrer everywhere; a strict CSP for the page (no inline script, no CDN)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path = scope["path"]

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = list(message.get("headers", []))
                names = {k.lower() for k, _ in headers}
                headers += [(b"x-content-type-options", b"nosniff"), (b"referrer-policy", b"no-referrer")]
                if b"content-security-policy" not in names and (path == "/" or path.startswith("/static/")):
                    headers.append((b"content-security-policy", _PAGE_CSP.encode()))
                message = {**message, "headers": headers}
            await send(message)

        await self.app(scope, receive, send_with_headers)


# --- DNS rebinding and cross-site requests ---------------------------------------------------------


LOOPBACK_NAMES = ("127.0.0.1", "localhost", "::1")
_UNSAFE_METHODS = frozenset({"POST", "PUT", "PATCH", "DELETE"})


def _host_name(value: str) -> str:
    """'Host' header or origin netloc -> lower-case host name without the port ('[::1]:8000' -> '::1')."""
    value = value.strip().lower()
    if value.startswith("["):
        return value[1:value.find("]")] if "]" in value else value
    return value.rsplit(":", 1)[0] if value.count(":") == 1 else value


class HostOriginMiddleware:
    """Refuses (421/403, JSON) what a browser tricked by another site would send.

    - ``Host``: must name one of ``allowed_hosts`` (for a loopback bind: 127.0.0.1, localhost, ::1). A
      DNS-rebinding page reaches a loopback server under its own domain name, so its requests carry that
      name; they get 421 and never reach the API. ``allowed_hosts=None`` (a public bind) skips this check.
    - Cross-site writes: a POST/PUT/PATCH/DELETE whose ``Origin`` is not this server, or that the browser marks
      ``Sec-Fetch-Site: cross-site``, gets 403. Clients that send no ``Origin`` (curl, scripts) are unaffected.
    """

    def __init__(self, app: ASGIApp, *, allowed_hosts: tuple[str, ...] | None) -> None:
        self.app = app
        self.allowed = None if allowed_hosts is None else {h.strip("[]").lower() for h in allowed_hosts}

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = {k.lower(): v.decode("latin-1") for k, v in scope["headers"]}
        host = headers.get(b"host", "")
        if self.allowed is not None and _host_name(host) not in self.allowed:
            await JSONResponse({"detail": "this server answers only to " + ", ".join(sorted(self.allowed))
                                + " (Host header refused: DNS-rebinding protection)"}, status_code=421)(
                scope, receive, send)
            return
        if scope["method"] in _UNSAFE_METHODS:
            origin = headers.get(b"origin")
            cross = headers.get(b"sec-fetch-site") == "cross-site"
            if cross or (origin is not None and (origin == "null" or _host_name(origin.split("://", 1)[-1])
                                                 != _host_name(host))):
                await JSONResponse({"detail": "cross-site request refused: upload from this server's own page "
                                              "or without an Origin header (curl, scripts)"}, status_code=403)(
                    scope, receive, send)
                return
        await self.app(scope, receive, send)

"""ASGI middleware: the upload size limit (enforced while the body streams in) and security headers."""

from __future__ import annotations

from typing import TYPE_CHECKING


from fastapi import HTTPException
from fastapi.responses import JSONResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from boneage.serve.schemas import _PAGE_CSP, MULTIPART_OVERHEAD

if TYPE_CHECKING:
    from boneage.serve.service import Service


# --- upload size limit, enforced while the body streams in -----------------------------------------


class UploadLimitMiddleware:
    """413 for request bodies over the limit on the upload route: at once if Content-Length says so,
    else as soon as the streamed bytes pass it (nothing beyond the limit is read)."""

    def __init__(self, app: ASGIApp, *, service: Service, paths: tuple[str, ...]) -> None:
        self.app, self.service, self.paths = app, service, paths

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] not in self.paths:
            await self.app(scope, receive, send)
            return
        limit = self.service.max_upload_bytes + MULTIPART_OVERHEAD
        length = dict(scope["headers"]).get(b"content-length")
        if length is not None and length.isdigit() and int(length) > limit:
            response = JSONResponse({"detail": self.service.too_large_message()}, status_code=413,
                                    headers={"Connection": "close"})
            await response(scope, receive, send)
            return
        received = 0

        async def limited_receive() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    raise HTTPException(413, self.service.too_large_message(), headers={"Connection": "close"})
            return message

        await self.app(scope, limited_receive, send)


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

"""Who may talk to the annotation server.

* Bound to loopback (the default) with no token: only requests addressed to a loopback name
  (``Host: 127.0.0.1:PORT``, ``localhost``, ``[::1]``) are served, so a web page elsewhere
  cannot reach the server through DNS rebinding.
* Bound to any other address, a token is required (``samkit annotate`` generates and prints one
  if none is given) and checked on every request: the ``X-Samkit-Token`` header, an
  ``Authorization: Bearer`` header, or the ``samkit_token`` cookie that visiting
  ``/?token=T`` sets (HttpOnly, SameSite=Strict) before redirecting to ``/``.
* Either way, a state-changing request whose ``Origin`` is not the server itself is refused
  (no cross-site form posts).
"""

from __future__ import annotations

import ipaddress
import secrets
from urllib.parse import urlsplit

from starlette.requests import Request
from starlette.responses import JSONResponse, RedirectResponse, Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from samkit.errors import SamkitError

TOKEN_COOKIE = "samkit_token"
TOKEN_HEADER = "x-samkit-token"
SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})


def is_loopback(host: str) -> bool:
    """``localhost`` or a loopback IP address (127.0.0.0/8, ::1)."""
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def resolve_token(host: str, token: str | None) -> tuple[str | None, bool]:
    """The token the server will require (None: none) and whether it was generated here."""
    if token is not None:
        if len(token) < 16:
            raise SamkitError("--token must be at least 16 characters (or leave it out and "
                              "one is generated)")
        return token, False
    if is_loopback(host):
        return None, False
    return secrets.token_urlsafe(24), True


class AccessMiddleware:
    """Pure ASGI middleware (no per-request task or body buffering: decode latency matters)."""

    def __init__(self, app: ASGIApp, token: str | None) -> None:
        self.app = app
        self.token = token

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            denial = self.check(Request(scope))
            if denial is not None:
                await denial(scope, receive, send)
                return
        await self.app(scope, receive, send)

    def check(self, request: Request) -> Response | None:
        """None when ``request`` may proceed, else the response that refuses it."""
        host = request.headers.get("host", "")
        if self.token is None:
            hostname = urlsplit(f"//{host}").hostname or ""
            if not is_loopback(hostname):
                return _deny(403, f"this server only answers requests addressed to 127.0.0.1 "
                                  f"or localhost, not {host!r}")
        else:
            given = request.query_params.get("token") if request.url.path == "/" else None
            if given is not None:
                return self._login(given)
            if not self._valid(_supplied_token(request)):
                return _deny(401, "access token required: open the URL `samkit annotate` "
                                  "printed (ending in /?token=...) or send the X-Samkit-Token "
                                  "header")
        if request.method not in SAFE_METHODS:
            origin = request.headers.get("origin")
            if origin is not None and urlsplit(origin).netloc != host:
                return _deny(403, f"cross-origin request from {origin!r} refused")
        return None

    def _valid(self, supplied: str | None) -> bool:
        assert self.token is not None
        return supplied is not None and secrets.compare_digest(supplied.encode(),
                                                               self.token.encode())

    def _login(self, given: str) -> Response:
        """``/?token=T``: set the cookie and drop the token from the address bar."""
        if not self._valid(given):
            return _deny(401, "wrong access token")
        response = RedirectResponse("/", status_code=303)
        response.set_cookie(TOKEN_COOKIE, given, httponly=True, samesite="strict")
        return response


def _supplied_token(request: Request) -> str | None:
    header = request.headers.get(TOKEN_HEADER)
    if header:
        return header
    scheme, _, credentials = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() == "bearer" and credentials:
        return credentials
    return request.cookies.get(TOKEN_COOKIE)


class BodyLimitMiddleware:
    """Refuses (413) a request body over ``max_bytes``, by its Content-Length or, when that
    is absent or false, as it arrives. The JSON endpoints' bodies are read here (they are
    small, and the app reads them whole anyway) and handed on; paths in ``exempt`` (the image
    upload, which streams to disk under its own, larger limit) pass through untouched."""

    def __init__(self, app: ASGIApp, max_bytes: int, exempt: tuple[str, ...] = ()) -> None:
        self.app = app
        self.max_bytes = max_bytes
        self.exempt = exempt

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if (scope["type"] != "http" or scope["path"] in self.exempt
                or scope["method"] in ("GET", "HEAD", "OPTIONS")):
            await self.app(scope, receive, send)
            return
        too_large = _deny(413, f"request body over the {self.max_bytes // 1024} KiB limit")
        declared = dict(scope["headers"]).get(b"content-length", b"")
        if declared.isdigit() and int(declared) > self.max_bytes:
            await too_large(scope, receive, send)
            return
        body, more = b"", True
        while more:
            message = await receive()
            if message["type"] != "http.request":  # the client left
                return
            body += message.get("body", b"")
            if len(body) > self.max_bytes:
                await too_large(scope, receive, send)
                return
            more = message.get("more_body", False)
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if replayed:
                return await receive()  # after the body: disconnect notices
            replayed = True
            return {"type": "http.request", "body": body, "more_body": False}

        await self.app(scope, replay, send)


class IsolationMiddleware:
    """Makes the page cross-origin isolated (``Cross-Origin-Opener-Policy: same-origin``,
    ``Cross-Origin-Embedder-Policy: require-corp``), which browsers require before they give
    a page SharedArrayBuffer, and so wasm threads for the page's decoder. The page loads
    nothing from other origins, so nothing it uses is blocked."""

    HEADERS = [(b"cross-origin-opener-policy", b"same-origin"),
               (b"cross-origin-embedder-policy", b"require-corp"),
               (b"cross-origin-resource-policy", b"same-origin")]

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                message = {**message, "headers": [*message.get("headers", []), *self.HEADERS]}
            await send(message)

        await self.app(scope, receive, with_headers)


def _deny(status: int, message: str) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status)

"""HTTP guards of `cxrlab serve`, in front of the app and in the uvicorn connection itself.

``RequestGuard`` (ASGI) answers before the app sees a request: 400 for a Host name that is not ours
(DNS rebinding), 403 for a state-changing request from another origin, 413 for a body over the limit
(by Content-Length, or counted as it streams, before the multipart parser spools anything), 408 for a
body that does not arrive in time. ``guarded_protocol`` is uvicorn's h11 protocol with a deadline for
request headers, which uvicorn itself does not have: a slowloris client trickling header bytes is dropped.
"""

from __future__ import annotations

import asyncio
import ipaddress
import re
from urllib.parse import urlsplit

import h11
from fastapi import HTTPException
from starlette.datastructures import Headers
from starlette.responses import JSONResponse
from uvicorn.protocols.http.h11_impl import H11Protocol

from .serve_limits import size_text

LOCAL_NAMES = frozenset({"localhost", "127.0.0.1", "::1"})
ANY_HOST = "*"
SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})
_SAME_SITE_FETCH = frozenset({"same-origin", "none"})
_DEFAULT_PORTS = {"http": 80, "https": 443}
_CLOSE = {"Connection": "close"}
_HOST_PORT = re.compile(r"(?:\[([0-9a-f:.]+)\]|([^\[\]:@/\\ ]+))(?::\d{1,5})?")


def host_name(value: str) -> str:
    """'Example.org.:8000' -> 'example.org', '[::1]:80' -> '::1' (a Host header or an address);
    anything malformed comes back whole, so it matches no allowed name."""
    value = value.strip().lower()
    if value.count(":") > 1 and not value.startswith("["):  # a bare IPv6 address
        return value
    m = _HOST_PORT.fullmatch(value)
    return (m.group(1) or m.group(2).rstrip(".")) if m else value


def check_host_pattern(name: str) -> str:
    """Normalise one --allowed-host value, or raise ValueError saying what is wrong with it."""
    cleaned = name.strip().lower()
    if cleaned == ANY_HOST:
        return cleaned
    if not cleaned or any(c in cleaned for c in "/?#@ ") or cleaned.startswith(".") or ".." in cleaned:
        raise ValueError(f"{name!r} is not a host name or address (give e.g. myhost.lan or 192.168.1.20)")
    return host_name(cleaned)


def allowed_hosts_for(bind_host: str, extra=()) -> frozenset[str]:
    """The Host names a server bound to ``bind_host`` answers: loopback names, the bound address
    (unless it is a wildcard, which names no host), and ``extra``."""
    names = set(LOCAL_NAMES) | {check_host_pattern(h) for h in extra}
    if not is_wildcard(bind_host):
        names.add(host_name(bind_host))
    return frozenset(names)


def is_wildcard(bind_host: str) -> bool:
    """True for an address that binds every interface (0.0.0.0, ::, or empty)."""
    bound = host_name(bind_host)
    try:
        return ipaddress.ip_address(bound).is_unspecified
    except ValueError:
        return bound == ""


class BodyRefused(HTTPException):
    """Raised from ``receive``; FastAPI passes HTTPException from body parsing through unchanged."""

    def __init__(self, status: int, detail: str):
        super().__init__(status, detail, headers=dict(_CLOSE))


class RequestGuard:
    """ASGI middleware; ``allowed_hosts`` containing '*' turns the Host check off."""

    def __init__(self, app, *, allowed_hosts, max_body: int, body_timeout: float, body_hint: str = ""):
        self.app, self.max_body, self.body_timeout = app, max_body, body_timeout
        self.allowed_hosts = frozenset(allowed_hosts)
        self.too_large = f"request body is larger than the limit of {size_text(max_body)}{body_hint}"

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = Headers(scope=scope)
        refusal = self._refuse_host(headers) or self._refuse_origin(scope["method"], headers) \
            or self._refuse_length(headers)
        if refusal:
            status, detail, extra = refusal
            return await JSONResponse({"detail": detail}, status, headers=extra)(scope, receive, send)
        await self.app(scope, self._guarded_receive(receive), send)

    def _refuse_host(self, headers: Headers):
        host = headers.get("host")
        if ANY_HOST in self.allowed_hosts:
            return None
        if not host:
            return 400, "request has no Host header", None
        if host_name(host) not in self.allowed_hosts:
            return (400, f"Host {host!r} is not served here (DNS rebinding guard); "
                         f"start the server with --allowed-host {host_name(host)} to allow it", None)
        return None

    def _refuse_origin(self, method: str, headers: Headers):
        """A browser page from another site may POST here (no CORS preflight for a form); refuse it."""
        if method in SAFE_METHODS:
            return None
        origin = headers.get("origin")
        if origin is not None:
            if not _same_origin(origin, headers.get("host", "")):
                return 403, f"cross-origin request refused: Origin {origin!r} is not this server", None
            return None
        site = headers.get("sec-fetch-site")
        if site is not None and site.lower() not in _SAME_SITE_FETCH:
            return 403, f"cross-origin request refused (Sec-Fetch-Site: {site})", None
        return None  # no browser markers: a script or command-line client

    def _refuse_length(self, headers: Headers):
        length = headers.get("content-length", "")
        if length.strip().isdigit() and int(length) > self.max_body:
            return 413, self.too_large, dict(_CLOSE)
        return None

    def _guarded_receive(self, receive):
        """Count body bytes as they arrive and give up on a body still incomplete at the deadline;
        once the body is complete, ``receive`` is passed through (it then waits for a disconnect)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.body_timeout
        seen, complete = 0, False

        async def guarded():
            nonlocal seen, complete
            if complete:
                return await receive()
            try:
                message = await asyncio.wait_for(receive(), max(0.0, deadline - loop.time()))
            except asyncio.TimeoutError:
                raise BodyRefused(408, f"the request body did not arrive within {self.body_timeout:g} s "
                                       f"(slow or stalled client)") from None
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.max_body:
                    raise BodyRefused(413, self.too_large)
                complete = not message.get("more_body", False)
            else:
                complete = True
            return message

        return guarded


def _same_origin(origin: str, host: str) -> bool:
    try:
        parts = urlsplit(origin.strip().lower())
        port = parts.port or _DEFAULT_PORTS.get(parts.scheme)
        host_parts = urlsplit(f"{parts.scheme}://{host.strip().lower()}")
        host_port = host_parts.port or _DEFAULT_PORTS.get(parts.scheme)
    except ValueError:  # a malformed port
        return False
    return (parts.scheme in _DEFAULT_PORTS and bool(parts.hostname)
            and parts.hostname == host_parts.hostname and port == host_port)


def guarded_protocol(header_timeout: float) -> type[H11Protocol]:
    """uvicorn's h11 protocol where a connection must deliver complete request headers within
    ``header_timeout`` seconds of being ready for a request, and is closed when the app answered
    without reading the whole body (instead of receiving and discarding the rest indefinitely)."""

    class GuardedH11Protocol(H11Protocol):
        _header_timer: asyncio.TimerHandle | None = None

        def connection_made(self, transport):
            super().connection_made(transport)
            self._arm_header_timer()

        def connection_lost(self, exc):
            self._cancel_header_timer()
            super().connection_lost(exc)

        def on_response_complete(self):
            if self.conn.their_state is h11.SEND_BODY and not self.transport.is_closing():
                self.conn.send(h11.ConnectionClosed())
                self.transport.close()  # asyncio still flushes the response before closing
            super().on_response_complete()
            if not self.transport.is_closing():
                self._arm_header_timer()

        def _arm_header_timer(self):
            self._cancel_header_timer()
            self._header_timer = self.loop.call_later(header_timeout, self._header_deadline)

        def _cancel_header_timer(self):
            if self._header_timer is not None:
                self._header_timer.cancel()
                self._header_timer = None

        def _header_deadline(self):
            self._header_timer = None
            if self.conn.their_state is h11.IDLE and not self.transport.is_closing():
                self.logger.info("closing a connection that sent no complete request headers in %g s",
                                 header_timeout)
                try:
                    self.conn.send(h11.ConnectionClosed())
                except h11.LocalProtocolError:
                    pass
                self.transport.close()

    return GuardedH11Protocol

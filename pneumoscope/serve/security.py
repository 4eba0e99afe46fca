"""What the web app trusts, as ASGI middleware: the Host header, the access token, a
per-client rate limit, and the security headers of every response.

* Host: a page on another site can reach a server on localhost by DNS rebinding (its
  name re-resolved to 127.0.0.1), but its requests still carry that site's name in the
  Host header; only the names this server was bound to (and ``--allowed-hosts``) pass.
* Token: a server bound beyond the loopback interface must be given one (``--token`` or
  ``PNEUMOSCOPE_TOKEN``); every request but the page and its static files then needs
  ``Authorization: Bearer TOKEN`` (compared in constant time).
* Rate limit: a token bucket per client address on everything but the page and its
  static files (the API, /healthz, /openapi.json), 429 when empty.
* Headers: a Content-Security-Policy (the page's own, or one forbidding everything for
  JSON answers), ``X-Content-Type-Options: nosniff`` and no framing, on every response.

Standard library and Starlette only.
"""

from __future__ import annotations

import hmac
import ipaddress
import os
import socket
import threading
import time

from starlette.datastructures import Headers, MutableHeaders
from starlette.responses import JSONResponse

from pneumoscope.errors import OptionError

TOKEN_ENV = "PNEUMOSCOPE_TOKEN"
LOOPBACK_NAMES = ("localhost", "127.0.0.1", "::1")
WILDCARD_HOSTS = ("0.0.0.0", "::", "")
# Requests per minute per client address (the page and its files not counted); the
# bucket holds as many, so a burst of that size passes at once.
DEFAULT_RATE_LIMIT = 120
# Paths anyone may fetch without the token: the page itself and its files (no data in them).
OPEN_PATHS = ("/", "/favicon.ico")
OPEN_PREFIXES = ("/static/",)
# The CSP of every response that is not the page: nothing may load or run from it.
API_CSP = "default-src 'none'; frame-ancestors 'none'; base-uri 'none'; form-action 'none'"


def is_loopback(host: str) -> bool:
    """True for an address or name that only this machine can reach."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def serving_token(bind_host: str, given: str | None) -> str | None:
    """The token the server will require: --token, else $PNEUMOSCOPE_TOKEN, else none; a
    bind beyond the loopback interface without one is refused."""
    token = given or os.environ.get(TOKEN_ENV) or None
    if token is None and not is_loopback(bind_host):
        raise OptionError(
            f"--host {bind_host} lets other machines reach the server: give it an access token "
            f"(set {TOKEN_ENV}, or --token TOKEN), or serve on 127.0.0.1"
        )
    return token


def allowed_host_names(bind_host: str, extra: tuple[str, ...] = ()) -> frozenset[str]:
    """The Host header names a server bound to `bind_host` answers to: the bind address
    itself, the loopback names for a loopback or wildcard bind, this machine's name and
    addresses for a wildcard bind, and `extra` (--allowed-hosts)."""
    names = {bind_host.strip("[]").lower(), *(h.strip().lower() for h in extra if h.strip())}
    if is_loopback(bind_host) or bind_host in WILDCARD_HOSTS:
        names.update(LOOPBACK_NAMES)
    if bind_host in WILDCARD_HOSTS:
        names.update(_this_machine())
    names.discard("")
    return frozenset(names)


def _this_machine() -> set[str]:
    """This machine's host name, FQDN and the addresses its name resolves to."""
    names = {socket.gethostname().lower(), socket.getfqdn().lower()}
    try:
        names.update(info[4][0] for info in socket.getaddrinfo(socket.gethostname(), None))
    except OSError:  # a name without an address: the names still count
        pass
    return names


def host_name(header: str) -> str:
    """The name part of a Host header: 'Example.org:8000' -> 'example.org', '[::1]:80' -> '::1'."""
    header = header.strip().lower()
    if header.startswith("["):  # IPv6 literal: '[addr]' or '[addr]:port', nothing else after it
        end = header.find("]")
        rest = header[end + 1 :] if end > 0 else None
        if rest is None or not (rest == "" or (rest.startswith(":") and rest[1:].isdigit())):
            return (
                header  # not a Host a browser sends ('[::1].evil.example'): matches no allowed name
            )
        return header[1:end]
    return header.rsplit(":", 1)[0] if header.count(":") == 1 else header


def _refuse(status: int, detail: str, headers: dict | None = None) -> JSONResponse:
    return JSONResponse({"detail": detail}, status_code=status, headers=headers)


class HostCheck:
    """400 for a request whose Host header names no host this server answers to."""

    def __init__(self, app, allowed: frozenset[str]):
        self.app, self.allowed = app, allowed

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] == "http":
            header = Headers(scope=scope).get("host", "")
            if host_name(header) not in self.allowed:
                response = _refuse(
                    400,
                    f"Host header {header!r} is not a name of this server (a page of another "
                    "site reaching it by DNS rebinding?); serve with --allowed-hosts to add it",
                )
                await response(scope, receive, send)
                return
        await self.app(scope, receive, send)


def is_open_path(path: str) -> bool:
    return path in OPEN_PATHS or path.startswith(OPEN_PREFIXES)


class TokenCheck:
    """401 unless the request carries ``Authorization: Bearer TOKEN`` (the page and its
    static files excepted: they hold no data, and the page asks for the token)."""

    def __init__(self, app, token: str):
        self.app, self.token = app, token.encode("utf-8")

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] == "http" and not is_open_path(scope["path"]):
            given = Headers(scope=scope).get("authorization", "")
            scheme, _, value = given.partition(" ")
            # compare_digest: the time taken does not tell how much of a guess was right
            if scheme.lower() != "bearer" or not hmac.compare_digest(
                value.strip().encode("utf-8"), self.token
            ):
                response = _refuse(
                    401,
                    "this server needs its access token: send Authorization: Bearer TOKEN",
                    headers={"WWW-Authenticate": "Bearer"},
                )
                await response(scope, receive, send)
                return
        await self.app(scope, receive, send)


class TokenBuckets:
    """One token bucket per client: `per_minute` requests a minute, bursts of as many."""

    def __init__(self, per_minute: int):
        self.capacity = float(per_minute)
        self.rate = per_minute / 60.0
        self.buckets: dict[str, tuple[float, float]] = {}  # client -> (tokens, at)
        self.lock = threading.Lock()

    def take(self, client: str) -> float:
        """0 when the request may go, else the seconds until it could."""
        now = time.monotonic()
        with self.lock:
            if client not in self.buckets and len(self.buckets) >= 10_000:
                self._forget_full(now)  # memory bounded under many clients, each sending once
            tokens, at = self.buckets.get(client, (self.capacity, now))
            tokens = min(self.capacity, tokens + (now - at) * self.rate)
            if tokens >= 1.0:
                self.buckets[client] = (tokens - 1.0, now)
                return 0.0
            self.buckets[client] = (tokens, now)
            return (1.0 - tokens) / self.rate

    def _forget_full(self, now: float) -> None:
        """Drop the buckets that have refilled: a client seen again starts full anyway."""
        self.buckets = {
            c: (tokens, at)
            for c, (tokens, at) in self.buckets.items()
            if tokens + (now - at) * self.rate < self.capacity
        }


class RateLimit:
    """429 with Retry-After when a client (by its address) exceeds the rate; the page
    and its static files are not counted."""

    def __init__(self, app, per_minute: int):
        self.app, self.buckets = app, TokenBuckets(per_minute)

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] == "http" and not is_open_path(scope["path"]):
            client = (scope.get("client") or ("?", 0))[0]
            wait = self.buckets.take(client)
            if wait > 0:
                retry = max(1, round(wait + 0.5))
                response = _refuse(
                    429,
                    f"too many requests from {client}: the limit is "
                    f"{self.buckets.capacity:.0f} a minute; retry in {retry} s",
                    headers={"Retry-After": str(retry)},
                )
                await response(scope, receive, send)
                return
        await self.app(scope, receive, send)


class SecurityHeaders:
    """A Content-Security-Policy, nosniff and no framing on every response; a response
    that set its own CSP (the page) keeps it."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def with_headers(message) -> None:
            if message["type"] == "http.response.start":
                headers = MutableHeaders(scope=message)
                headers.setdefault("Content-Security-Policy", API_CSP)
                headers.setdefault("X-Content-Type-Options", "nosniff")
                headers.setdefault("X-Frame-Options", "DENY")
                headers.setdefault("Referrer-Policy", "no-referrer")
            await send(message)

        await self.app(scope, receive, with_headers)

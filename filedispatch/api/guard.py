"""Who may ask the web app what: the middlewares that run before any handler.

1. ``host_guard``: only a ``Host`` header naming this service is answered, so a page whose
   own name was made to resolve to this machine (DNS rebinding) reads nothing.
2. ``write_guard``: a request that changes state (retry, forget) must come from a page of
   this service (``Origin``, ``Sec-Fetch-Site``) and say ``Content-Type: application/json``,
   which a page on another site cannot send without a CORS preflight this app never grants.
3. ``auth_guard``: the bearer token, when one is set.

Each refusal is a JSON error; nothing here reads the journal.
"""

from __future__ import annotations

import hmac
from dataclasses import dataclass

from aiohttp import hdrs, web

from ..config import ApiConfig, canonical_ip, is_loopback, split_host
from .state import token_key
from .views import Handler, json_error

#: methods that change nothing here (every other method is held to the write rules)
SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS", "TRACE"})
LOOPBACK_NAMES = frozenset({"localhost", "127.0.0.1", "::1"})
DEFAULT_PORTS = {"http": 80, "https": 443}


@dataclass(frozen=True, slots=True)
class HostNames:
    """The ``Host`` header values the app answers to, beside the address a request reached."""

    #: ``api.host`` as configured (canonical form for an IP address)
    bound: str
    #: ``api.allowed_hosts`` entries with a port
    exact: frozenset[tuple[str, int]]
    #: ``api.allowed_hosts`` entries without one: any port
    any_port: frozenset[str]

    @classmethod
    def of(cls, config: ApiConfig) -> HostNames:
        entries = [split_host(h) for h in config.allowed_hosts]  # validated at load
        return cls(
            canonical_ip(config.host) or config.host.lower(),
            frozenset((n, p) for n, p in entries if p is not None),
            frozenset(n for n, p in entries if p is None),
        )

    def allow(self, name: str, port: int | None, local: tuple[str, int] | None) -> bool:
        """Whether ``name:port`` names this service for a request that reached ``local``.

        Accepted: the address the connection reached, or ``api.host``, on the port it
        reached; ``localhost``, ``127.0.0.1`` and ``[::1]`` when that address is loopback;
        and ``api.allowed_hosts``.
        """
        if name in self.any_port or (port is not None and (name, port) in self.exact):
            return True
        if local is None:
            return False
        address, local_port = canonical_ip(local[0]) or local[0], local[1]
        if (port if port is not None else DEFAULT_PORTS["http"]) != local_port:
            return False
        accepted = {address, self.bound}
        if is_loopback(address):
            accepted |= LOOPBACK_NAMES
        return name in accepted


hosts_key = web.AppKey("hosts", HostNames)


def _local_address(request: web.Request) -> tuple[str, int] | None:
    sockname = request.transport.get_extra_info("sockname") if request.transport else None
    if isinstance(sockname, tuple) and len(sockname) >= 2:
        return str(sockname[0]), int(sockname[1])
    return None


def _host(request: web.Request) -> tuple[str, int | None] | None:
    values = request.headers.getall(hdrs.HOST, [])
    if len(values) != 1:
        return None
    try:
        return split_host(values[0])
    except ValueError:
        return None


@web.middleware
async def host_guard(request: web.Request, handler: Handler) -> web.StreamResponse:
    host = _host(request)
    if host is None or not request.app[hosts_key].allow(*host, _local_address(request)):
        given = request.headers.getall(hdrs.HOST, [])
        return json_error(
            421,
            "misdirected request",
            f"this service does not answer to the Host header {', '.join(given) or '(none)'!r}; "
            "reach it by its address, or list the name in api.allowed_hosts",
        )
    return await handler(request)


def cross_origin(request: web.Request) -> str | None:
    """Why a state-changing request does not come from a page of this service (None: it
    does, or it comes from a client that is not a browser, which sends no ``Origin``)."""
    site = request.headers.get("Sec-Fetch-Site", "").strip().lower()
    if site in ("cross-site", "same-site"):
        return f"the browser says the request comes from another site (Sec-Fetch-Site: {site})"
    origins = request.headers.getall(hdrs.ORIGIN, [])
    if not origins:
        return None
    origin = origins[0].strip()
    scheme, sep, rest = origin.partition("://")
    host = _host(request)
    try:
        name, port = split_host(rest) if sep and scheme in DEFAULT_PORTS else ("", None)
    except ValueError:
        name, port = "", None
    if host is not None and len(origins) == 1 and name:
        default = DEFAULT_PORTS[scheme]
        if name == host[0] and (port or default) == (host[1] or default):
            return None
    return f"the request comes from a page of another origin (Origin: {origin[:200]!r})"


@web.middleware
async def write_guard(request: web.Request, handler: Handler) -> web.StreamResponse:
    if request.method in SAFE_METHODS or request.match_info.http_exception is not None:
        return await handler(request)  # reads, and 404/405 answered as such
    problem = cross_origin(request)
    if problem:
        return json_error(
            403, "cross-origin request", f"{problem}; only this service's own pages may change it"
        )
    if request.content_type != "application/json":
        return json_error(
            415,
            "unsupported media type",
            f"{request.method} needs the header 'Content-Type: application/json' (an empty "
            "body is fine); a page on another site cannot send that type unasked",
        )
    return await handler(request)


def _protected(path: str) -> bool:
    """The token guards the API and the metrics; /health and the dashboard's files stay open."""
    return path.startswith("/api/") or path == "/metrics"


@web.middleware
async def auth_guard(request: web.Request, handler: Handler) -> web.StreamResponse:
    token = request.app[token_key]
    if token and _protected(request.path):
        scheme, _, given = request.headers.get(hdrs.AUTHORIZATION, "").partition(" ")
        expected = token.encode()
        if scheme.lower() != "bearer" or not hmac.compare_digest(
            given.strip().encode("utf-8", "surrogateescape"), expected
        ):
            return json_error(
                401,
                "unauthorized",
                "send the API token as the header 'Authorization: Bearer <token>'",
                headers={"WWW-Authenticate": 'Bearer realm="filedispatch"'},
            )
    return await handler(request)

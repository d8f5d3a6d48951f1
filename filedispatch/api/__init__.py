"""The web app: history REST API, Prometheus metrics and the dashboard, served by aiohttp.

``create_app`` builds the application; ``serve`` runs it inside the service (which owns the
signals) and refuses to listen beyond loopback without a token. The app only reads the journal,
except for the two history actions: retry a failed dispatch, forget one.
"""

from __future__ import annotations

import contextlib
import hmac
import ipaddress
import logging
import os
from collections.abc import AsyncIterator

from aiohttp import web

from ..config import ApiConfig
from ..errors import ServiceError
from ..journal import Journal
from .metrics import Outcomes, outcomes_key
from .state import Reader, ServiceLink, journal_key, link_key, reader_key, token_key
from .views import Handler, error_middleware, json_error, setup_routes

__all__ = ["ServiceLink", "create_app", "is_loopback", "resolve_token", "serve"]

log = logging.getLogger(__name__)


def resolve_token(config: ApiConfig) -> str | None:
    """``api.token``, else the environment variable named by ``api.token_env`` (None: no auth)."""
    if config.token is not None and config.token.get_secret_value():
        return config.token.get_secret_value()
    if config.token_env:
        return os.environ.get(config.token_env) or None
    return None


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _protected(path: str) -> bool:
    """The token guards the API and the metrics; /health and the dashboard's files stay open."""
    return path.startswith("/api/") or path == "/metrics"


@web.middleware
async def _auth_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    token = request.app[token_key]
    if token and _protected(request.path):
        scheme, _, given = request.headers.get("Authorization", "").partition(" ")
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


async def _security_headers(request: web.Request, response: web.StreamResponse) -> None:
    # the dashboard loads nothing from elsewhere, and this makes sure of it
    response.headers.setdefault(
        "Content-Security-Policy",
        "default-src 'self'; img-src 'self' data:; frame-ancestors 'none'; base-uri 'none'",
    )
    response.headers.setdefault("X-Content-Type-Options", "nosniff")
    response.headers.setdefault("Referrer-Policy", "no-referrer")


def create_app(
    journal: Journal, link: ServiceLink, *, token: str | None = None, readers: int = 2
) -> web.Application:
    """The application: routes, middlewares, and its journal readers (opened at startup)."""
    app = web.Application(
        middlewares=[error_middleware, _auth_middleware], client_max_size=64 * 1024
    )
    app[journal_key] = journal
    app[link_key] = link
    app[token_key] = token
    app[outcomes_key] = Outcomes()

    async def open_reader(app: web.Application) -> AsyncIterator[None]:
        async with Reader.open(journal.path, readers) as reader:
            app[reader_key] = reader
            yield

    app.cleanup_ctx.append(open_reader)
    app.on_response_prepare.append(_security_headers)
    setup_routes(app)
    return app


@contextlib.asynccontextmanager
async def serve(config: ApiConfig, journal: Journal, link: ServiceLink) -> AsyncIterator[str]:
    """Serve the web app until the block exits; yields its base URL.

    Raises ServiceError when the address cannot be used or would be open beyond this machine
    without a token.
    """
    token = resolve_token(config)
    if token is None and not is_loopback(config.host):
        raise ServiceError(
            f"refusing to serve the web app on {config.host} without a token: anyone who can "
            f"reach it could read the history and retry or forget dispatches. Set api.token or "
            f"the {config.token_env or 'FILEDISPATCH_API_TOKEN'} environment variable, or "
            "listen on 127.0.0.1 (-H 127.0.0.1)"
        )
    app = create_app(journal, link, token=token)
    runner = web.AppRunner(app, handle_signals=False, access_log=None, shutdown_timeout=5.0)
    await runner.setup()
    try:
        site = web.TCPSite(runner, config.host, config.port)
        try:
            await site.start()
        except OSError as exc:
            raise ServiceError(
                f"cannot serve the web app on {config.host}:{config.port}: "
                f"{exc.strerror or exc} (choose another port with -P/--port or api.port, or "
                "turn the web app off with --no-webapp)"
            ) from None
        host, port = runner.addresses[0][:2]
        url = f"http://{f'[{host}]' if ':' in host else host}:{port}/"
        log.info("web app on %s%s", url, " (token required)" if token else "")
        yield url
    finally:
        await runner.cleanup()

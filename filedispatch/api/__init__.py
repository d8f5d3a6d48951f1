"""The web app: history REST API, Prometheus metrics and the dashboard, served by aiohttp.

``create_app`` builds the application; ``serve`` runs it inside the service (which owns the
signals) and refuses to listen beyond loopback without a token. The app only reads the journal,
except for the two history actions: retry a failed dispatch, forget one.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from collections.abc import AsyncIterator
from http import HTTPStatus
from typing import Any

from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError

from ..config import ApiConfig, is_loopback
from ..errors import ServiceError
from ..journal import Journal
from .guard import HostNames, auth_guard, host_guard, hosts_key, write_guard
from .metrics import Outcomes, outcomes_key
from .state import ServiceLink, journal_key, link_key, reader_key, token_key
from .views import error_middleware, json_error, setup_routes

__all__ = ["ServiceLink", "create_app", "resolve_token", "serve"]

log = logging.getLogger(__name__)


def resolve_token(config: ApiConfig) -> str | None:
    """``api.token``, else the environment variable named by ``api.token_env`` (None: no auth)."""
    if config.token is not None and config.token.get_secret_value():
        return config.token.get_secret_value()
    if config.token_env:
        return os.environ.get(config.token_env) or None
    return None


async def _security_headers(request: web.Request, response: web.StreamResponse) -> None:
    # the dashboard loads nothing from elsewhere, and this makes sure of it
    response.headers.setdefault(
        "Content-Security-Policy",
        "default-src 'self'; img-src 'self' data:; frame-ancestors 'none'; base-uri 'none'",
    )
    response.headers.setdefault("X-Content-Type-Options", "nosniff")
    response.headers.setdefault("Referrer-Policy", "no-referrer")


def create_app(
    journal: Journal,
    link: ServiceLink,
    *,
    token: str | None = None,
    readers: int = 2,
    config: ApiConfig | None = None,
) -> web.Application:
    """The application: routes, middlewares, and its journal readers (opened at startup).

    ``config`` gives the host names it answers to (``api.host``, ``api.allowed_hosts``).
    """
    app = web.Application(
        middlewares=[error_middleware, host_guard, write_guard, auth_guard],
        client_max_size=64 * 1024,
    )
    app[hosts_key] = HostNames.of(config or ApiConfig())
    app[journal_key] = journal
    app[link_key] = link
    app[token_key] = token
    app[outcomes_key] = Outcomes()

    async def open_reader(app: web.Application) -> AsyncIterator[None]:
        async with journal.reader(readers) as reader:
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
    app = create_app(journal, link, token=token, config=config)
    runner = _Runner(app, handle_signals=False, access_log=None, shutdown_timeout=5.0)
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


# --------------------------------------------------------------------------- below the app
# What aiohttp's HTTP parser refuses (a malformed request line, bad headers, a body of the wrong
# length) never reaches the app or its middlewares: aiohttp's connection handler answers it in
# plain text and logs a traceback. These subclasses answer it in JSON and log one line; aiohttp
# offers no other hook for it.


def _refused(exc: BaseException | None, *, quote: bool = True) -> str | None:
    """What the HTTP parser refused, on one line (None: not the parser's doing).

    The parser's message quotes the bytes it refused (a header with a token in it, perhaps)
    with a caret under them: ``quote=False`` leaves them out.
    """
    while exc is not None and not isinstance(exc, HttpProcessingError):
        exc = exc.__cause__
    if exc is None:
        return None
    lines = [line.strip() for line in exc.message.splitlines()]
    lines = [x for x in lines if x.strip("^ ")]
    if not quote:
        lines = [x for x in lines if not x.startswith(("b'", 'b"', "bytearray("))]
    return " ".join(lines).removesuffix(":")[:500] or "bad request"


#: connections the web app keeps open at once; a client beyond them is disconnected at once,
#: so idle or slow clients cannot take the file descriptors the deliveries and the journal need
MAX_CONNECTIONS = 256


class _JsonErrors(web.RequestHandler):
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        server = self._manager
        if isinstance(server, _Server) and len(server.connections) > MAX_CONNECTIONS:
            if not server.full:  # one line per flood, not one per connection
                log.warning(
                    "web app: %d connections open; refusing more until some close",
                    MAX_CONNECTIONS,
                )
            server.full = True
            transport.close()
        elif isinstance(server, _Server):
            server.full = False

    async def finish_response(
        self, request: web.BaseRequest, resp: web.StreamResponse, start_time: float | None
    ) -> tuple[web.StreamResponse, bool]:
        # an HTTPException raised before the middlewares run (aiohttp's own answer to an
        # unknown ``Expect:``) would go out as text
        if isinstance(resp, web.HTTPException) and resp.content_type != "application/json":
            try:
                error = HTTPStatus(resp.status).phrase.lower()
            except ValueError:
                error = "error"
            resp = json_error(resp.status, error, resp.text or error)
        return await super().finish_response(request, resp, start_time)

    def log_exception(self, *args: Any, **kw: Any) -> None:
        # a body that cannot be read (a bad chunk, a bad gzip) after the answer went out
        refused = _refused(kw.get("exc_info"))
        if refused is None:
            super().log_exception(*args, **kw)
        else:
            log.warning("web app: the body of a request could not be read: %s", refused)

    def handle_error(
        self,
        request: web.BaseRequest,
        status: int = 500,
        exc: BaseException | None = None,
        message: str | None = None,
    ) -> web.StreamResponse:
        detail = _refused(exc) or message or "the request could not be answered"
        answer = _refused(exc, quote=False) or detail
        if status >= 500 and not isinstance(exc, asyncio.TimeoutError):
            log.error("web app: error answering a request from %s", request.remote, exc_info=exc)
        else:
            log.warning("web app: %d for a request from %s: %s", status, request.remote, detail)
        if request.writer.output_size > 0:  # aiohttp's own rule: too late for another answer
            raise ConnectionError("the response has started; no error can be sent")
        try:
            error = HTTPStatus(status).phrase.lower()
        except ValueError:
            error = "error"
        response = json_error(status, error, answer)
        response.force_close()
        return response


class _Server(web.Server):
    #: MAX_CONNECTIONS reached (a warning was logged)
    full = False

    def __call__(self) -> web.RequestHandler:
        return _JsonErrors(self, loop=self._loop, **self._kwargs)


class _Runner(web.AppRunner):
    async def _make_server(self) -> web.Server:
        plain = await super()._make_server()
        return _Server(
            plain.request_handler,
            request_factory=plain.request_factory,
            handler_cancellation=plain.handler_cancellation,
            loop=plain._loop,
            **plain._kwargs,
        )

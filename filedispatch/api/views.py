"""The HTTP handlers and the error middleware: requests in, JSON (or metrics text) out.

Handlers validate with ``queries``, read typed rows through the app's own journal reader and
write only through the journal's retry and forget. Every error leaves as JSON
``{"error", "detail"}``.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from collections.abc import Awaitable, Callable, Mapping
from pathlib import Path
from typing import Any

from aiohttp import web

from ..config import STEP_KINDS
from ..errors import JournalError
from ..journal import Detail
from ..models import Status
from . import metrics, queries
from .queries import BadParameter, parse_int
from .schema import openapi
from .state import journal_key, link_key, reader_key

log = logging.getLogger(__name__)
STATIC = Path(__file__).resolve().parent / "static"
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def json_error(
    status: int, error: str, detail: str, *, headers: Mapping[str, str] | None = None, **extra: Any
) -> web.Response:
    return web.json_response(
        {"error": error, "detail": detail, **extra}, status=status, headers=headers
    )


@web.middleware
async def error_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Bad parameters -> 400, HTTP errors -> JSON, anything unexpected -> a logged JSON 500."""
    try:
        return await handler(request)
    except BadParameter as exc:
        return json_error(400, "invalid parameter", str(exc), parameter=exc.name)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        headers = {k: v for k, v in exc.headers.items() if k.lower() == "allow"}
        return json_error(
            exc.status, exc.reason.lower(), f"{request.method} {request.path}", headers=headers
        )
    except JournalError as exc:
        log.warning("web app: %s", exc)
        return json_error(503, "journal unavailable", str(exc))
    except Exception:
        log.exception("web app: unexpected error answering %s %s", request.method, request.path)
        return json_error(500, "internal error", "the service log has the details")


def _id(request: web.Request) -> int:
    for name in request.query:  # these endpoints take no query parameters at all
        raise BadParameter(name, "unknown parameter; this endpoint takes none")
    return parse_int("id", request.match_info["id"], 1)


async def _detail_row(request: web.Request, dispatch_id: int) -> Detail | None:
    return await request.app[reader_key].detail(dispatch_id)


def _not_found(dispatch_id: int) -> web.Response:
    return json_error(404, "not found", f"no dispatch has the id {dispatch_id}")


# --------------------------------------------------------------------------- history


async def list_logs(request: web.Request) -> web.Response:
    q = queries.parse_log_query(request.query)
    reader = request.app[reader_key]
    counted, rows = await asyncio.gather(reader.count_entries(q.conditions), reader.page(q.page()))
    more = len(rows) > q.limit
    rows = rows[: q.limit]
    next_url = None
    if more:
        params = {k: v for k, v in q.given.items() if k != "offset"}
        params["cursor"] = q.cursor_after(rows[-1])
        next_url = str(request.url.with_query(params))
    return web.json_response(
        {"count": counted, "results": [queries.entry(r) for r in rows], "next": next_url}
    )


async def get_log(request: web.Request) -> web.Response:
    dispatch_id = _id(request)
    row = await _detail_row(request, dispatch_id)
    if row is None:
        return _not_found(dispatch_id)
    return web.json_response(queries.detail(row))


async def retry_log(request: web.Request) -> web.Response:
    dispatch_id = _id(request)
    row = await _detail_row(request, dispatch_id)
    if row is None:
        return _not_found(dispatch_id)
    if row.status != Status.FAILED:
        return json_error(
            409,
            "not failed",
            f"dispatch {dispatch_id} is {row.status}; only a FAILED dispatch can be retried",
        )
    link = request.app[link_key]
    if link.retry is not None:  # the file may need bringing back from failed_dir first
        answer = await link.retry(dispatch_id)
        if not answer.ok:
            return json_error(409, "cannot retry", answer.message)
        log.info("web app: %s", answer.message)
    elif not await request.app[journal_key].retry(dispatch_id):
        return json_error(409, "not failed", f"dispatch {dispatch_id} is no longer FAILED")
    link.wake()
    row = await _detail_row(request, dispatch_id)
    return web.json_response(queries.detail(row)) if row else _not_found(dispatch_id)


async def delete_log(request: web.Request) -> web.Response:
    dispatch_id = _id(request)
    row = await _detail_row(request, dispatch_id)
    if row is None:
        return _not_found(dispatch_id)
    if row.status == Status.IN_PROGRESS or not await request.app[journal_key].forget(dispatch_id):
        return json_error(
            409, "in progress", f"dispatch {dispatch_id} is being delivered; try again later"
        )
    log.info("web app: dispatch %d forgotten", dispatch_id)
    return web.Response(status=204)


async def stats(request: web.Request) -> web.Response:
    q = queries.parse_stats_query(request.query, time.time())
    rows = await request.app[reader_key].stats(q.filters(), q.period)
    since = queries.iso(q.since) if q.since is not None else None
    return web.json_response({"period": q.period, "since": since, **queries.rollup(rows, q.period)})


# --------------------------------------------------------------------------- service


async def _counts(request: web.Request) -> dict[str, int]:
    found = await request.app[reader_key].counts()
    return {s: found.get(s, 0) for s in ("PENDING", "IN_PROGRESS", "SUCCEEDED", "FAILED")}


async def _retry_waiting(request: web.Request) -> dict[str, Any]:
    """Dispatches that failed at least once and wait for their next attempt: how many, and
    when the first of them is due (ISO 8601 UTC; null when none waits)."""
    waiting = await request.app[reader_key].retry_waiting()
    return {"count": waiting.count, "next_attempt": queries.iso(waiting.first)}


async def _windows(request: web.Request, windows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Destinations with a ``window``: open or when it opens, and how many dispatches wait
    for it and until when (ISO 8601 UTC)."""
    if not windows:
        return []
    try:
        waits = await request.app[journal_key].waiting_by_destination(time.time())
    except JournalError:
        waits = []
    by_dest = {w.destination: w for w in waits}
    out = []
    for w in windows:
        held = by_dest.get(str(w["destination"]))
        out.append(
            {
                "destination": w["destination"],
                "window": w["window"],
                "open": w["open"],
                "opens": queries.iso(w["opens"]) if w["opens"] is not None else None,
                "waiting": held.count if held else 0,
                "until": queries.iso(held.until) if held else None,
            }
        )
    return out


def _scrubbed(value: Any) -> Any:
    if isinstance(value, str):
        return queries.redact_text(value)
    if isinstance(value, Mapping):
        return {_scrubbed(k): _scrubbed(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_scrubbed(v) for v in value]
    return value


async def status(request: web.Request) -> web.Response:
    snap = dict(request.app[link_key].status())
    journal = snap.get("journal") or {}
    try:
        counts: dict[str, int] | None = await _counts(request)
        waiting: dict[str, Any] | None = await _retry_waiting(request)
    except JournalError:
        if journal.get("state", "ok") == "ok":
            raise
        counts = waiting = None  # a removed journal may not even be read: the state answers
    uptime = float(snap.get("uptime_s", 0.0))
    body = {
        "version": snap.get("version"),
        "uptime_s": uptime,
        "started": queries.iso(time.time() - uptime),
        "paused": bool(snap.get("paused", False)),
        "pause_reason": snap.get("pause_reason"),
        "journal": journal,
        "node": snap.get("node"),
        "sources": snap.get("sources", []),
        "stopped_sources": snap.get("stopped_sources", []),
        "queue_depth": counts["PENDING"] if counts is not None else None,
        "in_flight": int(snap.get("in_flight", 0)),
        "counts": counts,
        "retry_waiting": waiting,
        "windows": await _windows(request, snap.get("windows", [])),
        "destinations": snap.get("destinations", {}),
    }
    return web.json_response(_scrubbed(body))


async def nodes(request: web.Request) -> web.Response:
    """The nodes sharing the journal: name, alive, lease age, sources listed, in flight."""
    found = await request.app[journal_key].nodes()
    return web.json_response(_scrubbed({"nodes": [n.as_dict() for n in found]}))


async def health(request: web.Request) -> web.Response:
    """200 while the journal can be read and written; 503 with the reason otherwise."""
    snap = request.app[link_key].status()
    body = {"status": "ok", "version": snap.get("version"), "uptime_s": snap.get("uptime_s")}
    journal = snap.get("journal") or {}
    if journal.get("state", "ok") != "ok":
        detail = f"journal {journal['state']}: {journal.get('error')}"
        return web.json_response(
            _scrubbed({**body, "status": "unavailable", "detail": detail, "journal": journal}),
            status=503,
        )
    try:
        await request.app[reader_key].ping()
    except JournalError as exc:
        return web.json_response({**body, "status": "unavailable", "detail": str(exc)}, status=503)
    return web.json_response(body)


async def prometheus(request: web.Request) -> web.Response:
    outcomes = request.app[metrics.outcomes_key]
    reader = request.app[reader_key]
    await outcomes.catch_up(reader, time.time())
    counts = await _counts(request)
    text = metrics.render(request.app[link_key].status(), counts.items(), outcomes)
    return web.Response(body=text.encode(), headers={"Content-Type": metrics.CONTENT_TYPE})


async def schema(request: web.Request) -> web.Response:
    return web.json_response(openapi())


MEDIA_TYPES = {".html": "text/html", ".js": "text/javascript", ".css": "text/css"}


@functools.cache
def static_files() -> Mapping[str, tuple[bytes, str]]:
    """The dashboard's files by name, read once: nothing else is ever served from disk, so
    no path in a request can name another file."""
    files = {
        p.name: (p.read_bytes(), MEDIA_TYPES[p.suffix])
        for p in STATIC.iterdir()
        if p.is_file() and p.suffix in MEDIA_TYPES
    }
    # the protocol filter offers every step kind (config.STEP_KINDS, the one list of them)
    page, media_type = files["index.html"]
    options = "".join(f"<option>{kind}</option>" for kind in STEP_KINDS)
    files["index.html"] = (page.replace(b"<!--protocol-options-->", options.encode()), media_type)
    return files


def _static(name: str) -> web.Response:
    found = static_files().get(name)
    if found is None:
        raise web.HTTPNotFound()
    body, media_type = found
    return web.Response(
        body=body, content_type=media_type, charset="utf-8", headers={"Cache-Control": "no-cache"}
    )


async def dashboard(request: web.Request) -> web.Response:
    return _static("index.html")


async def static_file(request: web.Request) -> web.Response:
    return _static(request.match_info["name"])


def setup_routes(app: web.Application) -> None:
    r = app.router
    r.add_get("/", dashboard)
    r.add_get("/static/{name}", static_file)
    r.add_get("/health", health)
    r.add_get("/metrics", prometheus)
    r.add_get("/api/v1/logs", list_logs)
    r.add_get("/api/v1/logs/{id}", get_log)
    r.add_post("/api/v1/logs/{id}/retry", retry_log)
    r.add_delete("/api/v1/logs/{id}", delete_log)
    r.add_get("/api/v1/stats", stats)
    r.add_get("/api/v1/status", status)
    r.add_get("/api/v1/nodes", nodes)
    r.add_get("/api/v1/schema", schema)

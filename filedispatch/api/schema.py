"""GET /api/v1/schema: the OpenAPI 3 document, generated from the same parameter tables the
views validate with, so the two cannot drift apart. Pure data; no I/O.
"""

from __future__ import annotations

import functools
from typing import Any

from .. import __version__
from ..journal import JournalState
from ..watcher import SKIP_REASONS
from .queries import (
    DEFAULT_LIMIT,
    LIST_PARAMS,
    MAX_INT,
    MAX_LIMIT,
    MAX_OFFSET,
    SORT_FIELDS,
    STATS_PARAMS,
    TIME_PATTERN,
    Param,
)

_STR = {"type": "string"}
_INT = {"type": "integer"}
_NULL_STR = {"type": "string", "nullable": True}
_NULL_TIME = {"type": "string", "format": "date-time", "nullable": True}
_NULL_INT = {"type": "integer", "nullable": True}
_ORDERING = f"-?({'|'.join(SORT_FIELDS)})"

ENTRY: dict[str, Any] = {
    "id": _INT,
    "created": {"type": "string", "format": "date-time"},
    "finished": _NULL_TIME,
    "created_ts": {"type": "number"},
    "finished_ts": {"type": "number", "nullable": True},
    "filename": _STR,
    "source": _STR,
    "destination": _STR,
    "extension": _STR,
    "protocol": _STR,
    "rule": _STR,
    "status": {"type": "string", "enum": ["PENDING", "IN_PROGRESS", "SUCCEEDED", "FAILED"]},
    "attempts": _INT,
    "byte_size": _INT,
    "size": _STR,
    "duration_ms": _NULL_INT,
    "reason": _NULL_STR,
    "sha256": _NULL_STR,
    "mtime": {"type": "string", "format": "date-time"},
    "mtime_ns": _INT,
    #: the file's birth time where its filesystem keeps one (null otherwise)
    "btime": _NULL_TIME,
    "btime_ns": _NULL_INT,
    "label": _NULL_STR,  #: the label a learned rule gave the file
    "marked": {"type": "boolean"},  #: recorded by mark-existing, never sent
}
DETAIL: dict[str, Any] = {
    **ENTRY,
    "relpath": _STR,
    "step": _INT,
    "location": _NULL_STR,
    "detail": _NULL_STR,
    "error_type": _NULL_STR,
    "started": _NULL_TIME,
    "started_ts": {"type": "number", "nullable": True},
    "next_attempt": _NULL_TIME,
    "node": _NULL_STR,
}


def _object(props: dict[str, Any], *, closed: bool = True) -> dict[str, Any]:
    out: dict[str, Any] = {"type": "object", "properties": props, "required": list(props)}
    if closed:
        out["additionalProperties"] = False
    return out


def _param_schema(p: Param) -> dict[str, Any]:
    if p.kind == "enum":  # any case is accepted; the schema lists the canonical spelling
        return {"type": "string", "enum": list(p.choices)}
    if p.kind == "int":
        return {"type": "integer", "minimum": 0, "maximum": MAX_INT}
    if p.kind == "limit":
        return {"type": "integer", "minimum": 1, "maximum": MAX_LIMIT, "default": DEFAULT_LIMIT}
    if p.kind == "offset":
        return {"type": "integer", "minimum": 0, "maximum": MAX_OFFSET, "default": 0}
    if p.kind == "time":
        return {"type": "string", "pattern": f"^{TIME_PATTERN}$", "example": "2026-11-23"}
    if p.kind == "ordering":
        return {
            "type": "string",
            "pattern": f"^{_ORDERING}(,{_ORDERING}){{0,3}}$",
            "default": "-created",
        }
    return {"type": "string", "minLength": 1}


def _params(params: tuple[Param, ...]) -> list[dict[str, Any]]:
    return [
        {
            "name": p.name,
            "in": "query",
            "required": False,
            "description": p.description,
            "schema": _param_schema(p),
        }
        for p in params
    ]


def _json(schema: dict[str, Any], description: str) -> dict[str, Any]:
    return {"description": description, "content": {"application/json": {"schema": schema}}}


_ERROR = {"$ref": "#/components/schemas/Error"}
_E400 = _json(_ERROR, "A parameter is invalid or unknown; `parameter` names it.")
_E401 = _json(_ERROR, "A token is configured and the request did not carry it.")
_E404 = _json(_ERROR, "No dispatch has this id.")
_E503 = _json(_ERROR, "The journal cannot be read right now.")
_E421 = _json(_ERROR, "The Host header names neither this service nor api.allowed_hosts.")
_E403 = _json(_ERROR, "The request comes from a page of another origin (Origin, Sec-Fetch-Site).")
_E415 = _json(_ERROR, "A change must say `Content-Type: application/json`.")
#: what a change (POST, DELETE) sends: nothing, or JSON that is ignored, but declared JSON
_CHANGE_BODY = {
    "required": False,
    "description": "Empty, or any JSON (ignored); the Content-Type must be application/json.",
    "content": {"application/json": {"schema": {}}},
}
_ID = {
    "name": "id",
    "in": "path",
    "required": True,
    "description": "The dispatch id (a whole number).",
    "schema": {"type": "integer", "minimum": 1, "maximum": MAX_INT},
}


def _op(
    summary: str,
    ok: dict[str, Any],
    *errors: tuple[str, dict[str, Any]],
    params: list[dict[str, Any]] | None = None,
    secure: bool = True,
    change: bool = False,
) -> dict[str, Any]:
    op: dict[str, Any] = {
        "summary": summary,
        "parameters": params or [],
        "responses": {**ok, **dict(errors), "421": _E421},
    }
    if change:
        op["requestBody"] = _CHANGE_BODY
        op["responses"] |= {"403": _E403, "415": _E415}
    if secure:
        op["responses"]["401"] = _E401
    else:
        op["security"] = []
    return op


@functools.cache
def openapi() -> dict[str, Any]:
    """The document (built once)."""
    tally = _object({"count": _INT, "bytes": _INT})
    breakdown = {"type": "object", "additionalProperties": {"$ref": "#/components/schemas/Tally"}}
    group = {
        "count": _INT,
        "bytes": _INT,
        "by_status": breakdown,
        "by_destination": breakdown,
        "by_extension": breakdown,
    }
    schemas = {
        "Error": {
            "type": "object",
            "properties": {"error": _STR, "detail": _STR, "parameter": _STR},
            "required": ["error", "detail"],
        },
        "Entry": _object(ENTRY),
        "Detail": _object(DETAIL),
        "Page": _object(
            {
                "count": _INT,
                "results": {"type": "array", "items": {"$ref": "#/components/schemas/Entry"}},
                "next": {"type": "string", "nullable": True},
            }
        ),
        "Tally": tally,
        "Bucket": _object({"start": {"type": "string", "format": "date"}, "label": _STR, **group}),
        "Stats": _object(
            {
                "period": {"type": "string", "enum": ["day", "week", "month"]},
                "since": _NULL_TIME,
                "results": {"type": "array", "items": {"$ref": "#/components/schemas/Bucket"}},
                "totals": _object(group),
            }
        ),
        "Nodes": _object(
            {
                "nodes": {
                    "type": "array",
                    "items": _object(
                        {
                            "name": _STR,
                            "alive": {"type": "boolean"},
                            "lease_s": {"type": "number"},
                            "lease_age_s": {"type": "number"},
                            "started": {"type": "number"},
                            "sources_listed": {"type": "array", "items": _STR},
                            "in_flight": _INT,
                            #: PENDING rows only this node may run (its unshared sources)
                            "waiting": _INT,
                        }
                    ),
                }
            }
        ),
        "Status": _object(
            {
                "version": _STR,
                "uptime_s": {"type": "number"},
                "started": {"type": "string", "format": "date-time"},
                "paused": {"type": "boolean"},
                "pause_reason": {
                    "type": "string",
                    "enum": ["operator", "journal"],
                    "nullable": True,
                },
                "journal": {"$ref": "#/components/schemas/Journal"},
                "node": {"type": "object", "nullable": True},
                "sources": {"type": "array", "items": {"$ref": "#/components/schemas/Source"}},
                "stopped_sources": {"type": "array", "items": _STR},
                "queue_depth": _NULL_INT,
                "in_flight": _INT,
                "counts": {"type": "object", "additionalProperties": _INT, "nullable": True},
                "retry_waiting": {
                    **_object(
                        {
                            "count": _INT,
                            "next_attempt": {
                                "type": "string",
                                "format": "date-time",
                                "nullable": True,
                            },
                        }
                    ),
                    "nullable": True,
                },
                "windows": {
                    "type": "array",
                    "items": _object(
                        {
                            "destination": _STR,
                            "window": _STR,
                            "open": {"type": "boolean"},
                            "opens": {"type": "string", "format": "date-time", "nullable": True},
                            "waiting": _INT,
                            "until": {"type": "string", "format": "date-time", "nullable": True},
                        }
                    ),
                },
                "destinations": {"type": "object", "additionalProperties": {"type": "object"}},
            }
        ),
        "Source": _object(
            {
                "name": _STR,
                "path": _STR,
                "polling": {"type": "boolean"},
                #: shared by the nodes of a cluster, and whether this node lists it now
                "shared": {"type": "boolean"},
                "listing": {"type": "boolean"},
                "ready": {"type": "boolean"},
                "last_error": _NULL_STR,
                "skipped": _object(dict.fromkeys(SKIP_REASONS, _INT)),
            }
        ),
        "Journal": _object(
            {
                "path": _STR,
                "state": {"type": "string", "enum": [s.value for s in JournalState]},
                "error": {"type": "string", "nullable": True},
                "since": {"type": "number", "nullable": True},
                "retries": _INT,
            }
        ),
        "Health": {
            "type": "object",
            "properties": {
                "status": {"type": "string", "enum": ["ok", "unavailable"]},
                "version": _STR,
                "uptime_s": {"type": "number"},
                "detail": _STR,
                "journal": {"$ref": "#/components/schemas/Journal"},
            },
            "required": ["status"],
        },
    }
    ref = "#/components/schemas/"
    paths = {
        "/api/v1/logs": {
            "get": _op(
                "The dispatch history, newest first unless `ordering` says otherwise.",
                {"200": _json({"$ref": ref + "Page"}, "A page of entries.")},
                ("400", _E400),
                ("503", _E503),
                params=_params(LIST_PARAMS),
            )
        },
        "/api/v1/logs/{id}": {
            "get": _op(
                "One dispatch, with the fields of the detail view.",
                {"200": _json({"$ref": ref + "Detail"}, "The dispatch.")},
                ("400", _E400),
                ("404", _E404),
                params=[_ID],
            ),
            "delete": _op(
                "Forget a dispatch: the file is sent there again at the next rescan, within "
                "`rescan` seconds (default 60), or at the next start.",
                {"204": {"description": "Forgotten."}},
                ("400", _E400),
                ("404", _E404),
                ("409", _json(_ERROR, "The dispatch is being delivered right now.")),
                params=[_ID],
                change=True,
            ),
        },
        "/api/v1/logs/{id}/retry": {
            "post": _op(
                "Re-queue a FAILED dispatch (and the later steps of its chain) now.",
                {"200": _json({"$ref": ref + "Detail"}, "The dispatch, PENDING again.")},
                ("400", _E400),
                ("404", _E404),
                ("409", _json(_ERROR, "The dispatch is not FAILED.")),
                params=[_ID],
                change=True,
            )
        },
        "/api/v1/stats": {
            "get": _op(
                "Counts and bytes per day, week (from Monday) or month, UTC, by status, "
                "destination and extension. Without a `created` bound: this day, week or "
                "month and the 30 days, 11 weeks or 12 months before it. Periods without "
                "dispatches are left out.",
                {"200": _json({"$ref": ref + "Stats"}, "The periods, oldest first.")},
                ("400", _E400),
                params=_params(STATS_PARAMS),
            )
        },
        "/api/v1/status": {
            "get": _op(
                "The service: version, uptime, sources, queue depth, in-flight, per-destination "
                "counts since the start and last error.",
                {"200": _json({"$ref": ref + "Status"}, "A snapshot.")},
                ("503", _E503),
            )
        },
        "/api/v1/nodes": {
            "get": _op(
                "The nodes sharing the journal (one with SQLite): name, whether its lease is "
                "held, the lease and its age in seconds, the shared sources it lists, its rows "
                "in flight.",
                {"200": _json({"$ref": ref + "Nodes"}, "The nodes, by name.")},
                ("503", _E503),
            )
        },
        "/api/v1/schema": {
            "get": _op(
                "This document.",
                {"200": _json({"type": "object"}, "The OpenAPI document.")},
            )
        },
        "/health": {
            "get": _op(
                "Liveness for load balancers and systemd: 200 while the journal can be read "
                "and written; 503 while it cannot (intake and delivery are then paused).",
                {"200": _json({"$ref": ref + "Health"}, "Up.")},
                (
                    "503",
                    _json(
                        {"$ref": ref + "Health"},
                        "The journal cannot be read or written (disk full, I/O error, "
                        "read-only, locked, removed or replaced): `detail` says why.",
                    ),
                ),
                secure=False,
            )
        },
        "/metrics": {
            "get": _op(
                "Prometheus text exposition format.",
                {
                    "200": {
                        "description": "Metrics.",
                        "content": {"text/plain": {"schema": {"type": "string"}}},
                    }
                },
                ("503", _E503),
            )
        },
    }
    return {
        "openapi": "3.0.3",
        "info": {
            "title": "filedispatch",
            "version": __version__,
            "description": "History and status of a filedispatch service. When a token is "
            "configured, /api/* and /metrics need `Authorization: Bearer <token>`. Only a "
            "Host header naming the service is answered; a change (POST, DELETE) must say "
            "`Content-Type: application/json` and must not come from a page of another origin.",
        },
        "paths": paths,
        "components": {
            "schemas": schemas,
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
        },
        "security": [{"bearer": []}],
    }

"""The history API against the real service: real files dispatched (and failing), a real journal,
queried over HTTP with aiohttp. Expectations are computed from the journal rows themselves.
"""

from __future__ import annotations

import datetime as dt
import socket
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yarl

import filedispatch

from .apiutil import (
    FTP_PASSWORD,
    TOKEN,
    Api,
    api_config,
    env_without_token,
    running_api,
    unblock,
)
from .conftest import ServiceProcess, free_port, run_cli, wait_until

ENTRY_FIELDS = {
    "id", "created", "finished", "filename", "source", "destination", "extension", "protocol",
    "rule", "status", "attempts", "byte_size", "size", "duration_ms", "reason",
    "sha256", "created_ts", "finished_ts", "mtime", "mtime_ns", "btime", "btime_ns", "label",
    "marked",
}  # fmt: skip


@pytest.fixture(scope="module", params=["sqlite", "postgres"])
def api(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Api]:
    """The service and its API, once with each journal backend."""
    url = None
    if request.param == "postgres":
        url = request.getfixturevalue("pg_cluster").database()
    with running_api(tmp_path_factory.mktemp("api"), database=url) as running:
        yield running


async def call(
    api: Api,
    method: str,
    path: str,
    params: Any = None,
    *,
    token: str | None = TOKEN,
    raw_query: str | None = None,
    headers: dict[str, str] | None = None,
) -> tuple[int, Any]:
    """One request; the body as JSON when it is JSON, else as text. A change (POST, DELETE)
    says it is JSON, as the dashboard does and as the service requires."""
    url: Any = api.url + path
    if raw_query is not None:
        url = yarl.URL(f"{url}?{raw_query}", encoded=True)
    headers = dict(headers or {})
    if token:
        headers["Authorization"] = f"Bearer {token}"
    if method not in ("GET", "HEAD"):
        headers.setdefault("Content-Type", "application/json")
    async with (
        aiohttp.ClientSession() as session,
        session.request(method, url, params=params, headers=headers) as resp,
    ):
        if resp.content_type == "application/json":
            return resp.status, await resp.json()
        return resp.status, await resp.text()


async def all_pages(api: Api, params: dict[str, str]) -> tuple[list[dict[str, Any]], int]:
    status, body = await call(api, "GET", "/api/v1/logs", params)
    assert status == 200, body
    results, count, pages = list(body["results"]), body["count"], 1
    while body["next"]:
        async with (
            aiohttp.ClientSession() as session,
            session.get(body["next"], headers={"Authorization": f"Bearer {TOKEN}"}) as resp,
        ):
            assert resp.status == 200
            body = await resp.json()
        assert body["count"] == count
        results += body["results"]
        pages += 1
        assert pages < 100
    return results, count


def today() -> dt.date:
    return dt.datetime.now(dt.UTC).date()


# --------------------------------------------------------------------------- listing


async def test_list_shows_every_dispatch_newest_first_with_the_documented_fields(
    api: Api,
) -> None:
    status, body = await call(api, "GET", "/api/v1/logs")
    assert status == 200
    rows = api.rows()
    assert body["count"] == len(rows) and body["next"] is None
    assert [e["id"] for e in body["results"]] == [
        r["id"] for r in sorted(rows, key=lambda r: (r["created"], r["id"]), reverse=True)
    ]
    by_id = {r["id"]: r for r in rows}
    for e in body["results"]:
        assert set(e) == ENTRY_FIELDS
        r = by_id[e["id"]]
        assert e["byte_size"] == r["size"] and e["filename"] == r["filename"]
        assert e["status"] == r["status"] and e["rule"] == r["rule"]
        assert e["created"].endswith("Z")
        created = dt.datetime.fromisoformat(e["created"].replace("Z", "+00:00"))
        assert abs(created.timestamp() - r["created"]) < 0.001
    sizes = {e["filename"]: e["size"] for e in body["results"]}
    assert sizes["a.txt"] == "5 B" and sizes["b.pdf"] == "2.9 KB"
    failed = {e["filename"]: e for e in body["results"] if e["status"] == "FAILED"}
    assert set(failed) == {"d.bin", "e.dat"}
    assert failed["d.bin"]["reason"] and failed["d.bin"]["finished"].endswith("Z")


def _filters(api: Api) -> list[tuple[dict[str, str], Callable[[dict[str, Any]], bool]]]:
    day = today()
    yesterday, tomorrow = day - dt.timedelta(days=1), day + dt.timedelta(days=1)
    hour_ago = dt.datetime.now(dt.UTC) - dt.timedelta(hours=1)
    in_paris = hour_ago.astimezone(dt.timezone(dt.timedelta(hours=2)))
    docs = str(api.docs)
    return [
        ({"status": "SUCCEEDED"}, lambda r: r["status"] == "SUCCEEDED"),
        ({"status": "FAILED"}, lambda r: r["status"] == "FAILED"),
        ({"status": "PENDING"}, lambda r: False),
        ({"destination": docs}, lambda r: r["destination"] == docs),
        ({"destination": api.ftp}, lambda r: r["protocol"] == "ftp"),
        ({"protocol": "file"}, lambda r: r["protocol"] == "file"),
        ({"protocol": "ftp"}, lambda r: r["protocol"] == "ftp"),
        ({"extension": "TXT"}, lambda r: r["extension"] == "txt"),
        ({"extension": ".pdf"}, lambda r: r["extension"] == "pdf"),
        ({"filename": "it's"}, lambda r: r["filename"] == "it's here.txt"),
        ({"filename": "A.T"}, lambda r: r["filename"] == "a.txt"),
        ({"filename": "%"}, lambda r: False),
        ({"filename": "_"}, lambda r: False),
        ({"source": "drop"}, lambda r: r["source"] == "drop"),
        ({"rule": "docs"}, lambda r: r["rule"] == "docs"),
        ({"byte_size": "3000"}, lambda r: r["size"] == 3000),
        ({"byte_size__gte": "64"}, lambda r: r["size"] >= 64),
        ({"byte_size__lte": "9"}, lambda r: r["size"] <= 9),
        ({"byte_size__gte": "6", "byte_size__lte": "64"}, lambda r: 6 <= r["size"] <= 64),
        ({"created": day.isoformat()}, lambda r: True),
        ({"created": yesterday.isoformat()}, lambda r: False),
        ({"created__gte": day.isoformat()}, lambda r: True),
        ({"created__gte": tomorrow.isoformat()}, lambda r: False),
        ({"created__lte": day.isoformat()}, lambda r: True),
        ({"created__lte": yesterday.isoformat()}, lambda r: False),
        ({"created__gte": hour_ago.strftime("%Y-%m-%dT%H:%M:%SZ")}, lambda r: True),
        ({"created__lte": in_paris.isoformat(timespec="seconds")}, lambda r: False),
        ({"created__gte": hour_ago.replace(tzinfo=None).isoformat()}, lambda r: True),
        (
            {"status": "SUCCEEDED", "source": "inbox", "extension": "txt"},
            lambda r: (
                r["status"] == "SUCCEEDED" and r["source"] == "inbox" and r["extension"] == "txt"
            ),
        ),
    ]


async def test_every_filter_matches_the_journal(api: Api) -> None:
    rows = api.rows()
    for params, keep in _filters(api):
        status, body = await call(api, "GET", "/api/v1/logs", params)
        assert status == 200, (params, body)
        expected = sorted((r["id"] for r in rows if keep(r)), reverse=True)
        assert [e["id"] for e in body["results"]] == expected, params
        assert body["count"] == len(expected), params
    # and every filter is used at least once above
    used = {k for params, _ in _filters(api) for k in params}
    from filedispatch.api.queries import FILTERS

    assert used == {p.name for p in FILTERS}


async def test_created_with_a_datetime_matches_that_second(api: Api) -> None:
    row = api.rows("filename = 'b.pdf'")[0]
    second = dt.datetime.fromtimestamp(int(row["created"]), dt.UTC).strftime("%Y-%m-%dT%H:%M:%S")
    status, body = await call(api, "GET", "/api/v1/logs", {"created": second})
    assert status == 200 and row["id"] in [e["id"] for e in body["results"]]
    expected = [r["id"] for r in api.rows() if int(r["created"]) == int(row["created"])]
    assert sorted(e["id"] for e in body["results"]) == expected


SORT_KEYS: dict[str, Callable[[dict[str, Any]], Any]] = {
    "created": lambda r: r["created"],
    "finished": lambda r: -1 if r["finished"] is None else r["finished"],
    "byte_size": lambda r: r["size"],
    "filename": lambda r: r["filename"],
    "id": lambda r: r["id"],
    "status": lambda r: r["status"],
    "duration_ms": lambda r: -1 if r["duration_ms"] is None else r["duration_ms"],
    "attempts": lambda r: r["attempts"],
    "destination": lambda r: r["destination"],
    "source": lambda r: r["source"],
    "extension": lambda r: r["extension"],
    "protocol": lambda r: r["protocol"],
    "rule": lambda r: r["rule"],
}


@pytest.mark.parametrize("field", sorted(SORT_KEYS))
async def test_ordering_by_each_field_both_ways(api: Api, field: str) -> None:
    rows = api.rows()
    for desc in (False, True):
        status, body = await call(
            api, "GET", "/api/v1/logs", {"ordering": f"{'-' if desc else ''}{field}"}
        )
        assert status == 200, body
        key = SORT_KEYS[field]
        expected = sorted(rows, key=lambda r: (key(r), r["id"]), reverse=desc)
        assert [e["id"] for e in body["results"]] == [r["id"] for r in expected], (field, desc)


async def test_ordering_by_several_fields(api: Api) -> None:
    status, body = await call(api, "GET", "/api/v1/logs", {"ordering": "status,-byte_size"})
    assert status == 200
    rows = sorted(api.rows(), key=lambda r: (-r["size"], -r["id"]))
    rows.sort(key=lambda r: r["status"])
    assert [e["id"] for e in body["results"]] == [r["id"] for r in rows]


@pytest.mark.parametrize(
    "params",
    [
        {"limit": "2"},
        {"limit": "3", "ordering": "byte_size"},
        {"limit": "1", "ordering": "status,-filename", "protocol": "file"},
        {"limit": "2", "ordering": "-duration_ms"},
        {"limit": "2", "offset": "1", "ordering": "-finished"},
    ],
)
async def test_pages_follow_next_to_the_end_without_gaps_or_repeats(
    api: Api, params: dict[str, str]
) -> None:
    whole = {k: v for k, v in params.items() if k not in ("limit", "offset")}
    status, body = await call(api, "GET", "/api/v1/logs", whole)
    assert status == 200
    skip = int(params.get("offset", 0))
    expected = [e["id"] for e in body["results"]][skip:]
    paged, count = await all_pages(api, params)
    assert [e["id"] for e in paged] == expected
    assert count == body["count"]


async def test_limit_and_offset(api: Api) -> None:
    _, whole = await call(api, "GET", "/api/v1/logs")
    ids = [e["id"] for e in whole["results"]]
    status, body = await call(api, "GET", "/api/v1/logs", {"limit": "2", "offset": "2"})
    assert status == 200 and [e["id"] for e in body["results"]] == ids[2:4]
    assert body["count"] == len(ids) and "cursor=" in body["next"]
    _, body = await call(api, "GET", "/api/v1/logs", {"offset": str(len(ids))})
    assert body["results"] == [] and body["next"] is None
    _, body = await call(api, "GET", "/api/v1/logs", {"limit": "1000"})
    assert len(body["results"]) == len(ids)


async def test_a_cursor_is_bound_to_its_ordering(api: Api) -> None:
    _, body = await call(api, "GET", "/api/v1/logs", {"limit": "1", "ordering": "filename"})
    cursor = yarl.URL(body["next"]).query["cursor"]
    status, err = await call(api, "GET", "/api/v1/logs", {"cursor": cursor})
    assert status == 400 and err["parameter"] == "cursor" and "ordering" in err["detail"]
    status, err = await call(
        api, "GET", "/api/v1/logs", {"cursor": cursor, "ordering": "filename", "offset": "1"}
    )
    assert status == 400 and err["parameter"] == "offset"


# --------------------------------------------------------------------------- bad requests


BAD = [
    ("status=DONE", "status"),
    ("status=done", "status"),
    ("status=FAILED'%20OR%20'1'='1", "status"),
    ("status=FAILED&status=PENDING", "status"),
    ("status=", "status"),
    ("protocol=gopher", "protocol"),
    ("limit=0", "limit"),
    ("limit=-1", "limit"),
    ("limit=1001", "limit"),
    ("limit=99999999999999999999999", "limit"),
    ("limit=abc", "limit"),
    ("limit=1e3", "limit"),
    ("limit=%201", "limit"),
    ("offset=-5", "offset"),
    ("offset=1000000001", "offset"),
    ("ordering=size", "ordering"),
    ("ordering=created;DROP%20TABLE%20dispatches", "ordering"),
    ("ordering=created%20DESC", "ordering"),
    ("ordering=-", "ordering"),
    ("ordering=created,", "ordering"),
    ("ordering=a,b,c,d,e", "ordering"),
    ("ordering=(SELECT%201)", "ordering"),
    ("created=2026-13-45", "created"),
    ("created=yesterday", "created"),
    ("created=0000-01-01", "created"),
    ("created__gte=2026-11-23T25:00", "created__gte"),
    ("created__lte=2026-11-23T10", "created__lte"),
    ("created__lte=1700000000", "created__lte"),
    ("byte_size=-1", "byte_size"),
    ("byte_size=1.5", "byte_size"),
    ("byte_size__gte=99999999999999999999", "byte_size__gte"),
    ("byte_size__lte=0x10", "byte_size__lte"),
    ("cursor=!!!", "cursor"),
    ("cursor=WzFd", "cursor"),
    ("cursor=eyJhIjoxfQ", "cursor"),
    ("unknown=1", "unknown"),
    ("page=2", "page"),
    ("period=day", "period"),
    ("id=1", "id"),
]


@pytest.mark.parametrize(("query", "name"), BAD)
async def test_a_bad_parameter_is_a_json_400_naming_it(api: Api, query: str, name: str) -> None:
    status, body = await call(api, "GET", "/api/v1/logs", raw_query=query)
    assert status == 400, (query, body)
    assert body["error"] == "invalid parameter"
    assert body["parameter"] == name and body["detail"].startswith(f"{name}: ")


@pytest.mark.parametrize(
    ("query", "name"),
    [
        ("period=year", "period"),
        ("period=days", "period"),
        ("created__gte=soon", "created__gte"),
        ("ordering=-created", "ordering"),
        ("limit=5", "limit"),
        ("status=NOPE", "status"),
    ],
)
async def test_bad_stats_parameters_are_400(api: Api, query: str, name: str) -> None:
    status, body = await call(api, "GET", "/api/v1/stats", raw_query=query)
    assert status == 400 and body["parameter"] == name, body


@pytest.mark.parametrize("method", ["GET", "DELETE"])
@pytest.mark.parametrize(
    "raw", ["abc", "1;DROP%20TABLE%20dispatches", "0", "-1", "1.0", "1e3", "99999999999999999999"]
)
async def test_a_malformed_id_is_400(api: Api, method: str, raw: str) -> None:
    status, body = await call(api, method, f"/api/v1/logs/{raw}")
    assert status == 400 and body["parameter"] == "id", body
    status, body = await call(api, "POST", f"/api/v1/logs/{raw}/retry")
    assert status == 400 and body["parameter"] == "id", body


@pytest.mark.parametrize(("method", "suffix"), [("GET", ""), ("DELETE", ""), ("POST", "/retry")])
async def test_an_unknown_id_is_404(api: Api, method: str, suffix: str) -> None:
    status, body = await call(api, method, f"/api/v1/logs/987654321{suffix}")
    assert status == 404 and body["error"] == "not found" and "987654321" in body["detail"]


async def test_unknown_routes_and_methods_answer_json(api: Api) -> None:
    status, body = await call(api, "GET", "/api/v1/nothing")
    assert status == 404 and body["error"] == "not found"
    status, body = await call(api, "PUT", "/api/v1/logs")
    assert status == 405 and "error" in body


async def test_the_journal_survives_injection_attempts(api: Api) -> None:
    before = len(api.rows())
    for query in (
        "filename=x'%3BDROP%20TABLE%20dispatches%3B--",
        "source=%27%20OR%201%3D1--",
        "destination=%22%3B%20DELETE%20FROM%20dispatches",
        "filename=%ff%fe%00",
    ):
        status, body = await call(api, "GET", "/api/v1/logs", raw_query=query)
        assert status == 200 and body["count"] == 0, query
    assert len(api.rows()) == before


# --------------------------------------------------------------------------- detail


async def test_detail_of_a_failed_dispatch(api: Api) -> None:
    row = api.rows("filename = 'd.bin'")[0]
    status, body = await call(api, "GET", f"/api/v1/logs/{row['id']}")
    assert status == 200
    assert set(body) >= ENTRY_FIELDS
    assert body["status"] == "FAILED" and body["relpath"] == "d.bin" and body["step"] == 0
    assert body["reason"] == row["reason"] and body["error_type"] == row["error_type"]
    assert body["destination"] == str(api.root / "blocker" / "sub")


async def test_the_files_birth_time_is_what_statx_says(api: Api) -> None:
    """Each entry gives the source file's birth time as GNU stat(1) reads it with statx(2):
    the same nanoseconds in the journal, the API (ISO 8601 beside them) and ``history show``,
    or null on a filesystem that keeps none."""
    _, body = await call(api, "GET", "/api/v1/logs", {"source": "inbox", "limit": "100"})
    assert body["results"]
    for e in body["results"]:
        born = stat_birth_ns(api.root / "inbox" / e["filename"])
        (row,) = api.rows("id = ?", (e["id"],))
        assert e["btime_ns"] == born == (None if row["btime_ns"] is None else int(row["btime_ns"]))
        if born is None:
            assert e["btime"] is None
        else:
            btime = dt.datetime.fromisoformat(e["btime"].replace("Z", "+00:00"))
            assert abs(btime.timestamp() - born / 1e9) < 0.001
    a_txt = next(e for e in body["results"] if e["filename"] == "a.txt")
    born = stat_birth_ns(api.root / "inbox" / "a.txt")
    shown = run_cli("-c", api.root / "config.yml", "history", "show", str(a_txt["id"]))
    assert shown.returncode == 0, shown.stderr
    lines = [line for line in shown.stdout.splitlines() if line.startswith("btime_ns:")]
    assert [line.rsplit(" ", 1)[-1] for line in lines] == ([] if born is None else [f"({born})"])


def stat_birth_ns(path: Path) -> int | None:
    """The birth time GNU stat(1) gives for ``path`` (ns since the epoch; None: not known)."""
    out = subprocess.run(
        ["stat", "-c", "%w", str(path)], capture_output=True, text=True, check=True, env=_C
    ).stdout.strip()
    if out == "-":
        return None
    day, clock, zone = out.split()  # 2026-12-01 04:44:16.742911480 +0000
    whole, _, fraction = clock.partition(".")
    moment = dt.datetime.fromisoformat(f"{day}T{whole}{zone}")
    return int(moment.timestamp()) * 1_000_000_000 + int(fraction.ljust(9, "0"))


_C = {"LC_ALL": "C", "TZ": "UTC", "PATH": "/usr/bin:/bin"}


# --------------------------------------------------------------------------- stats, status


async def test_stats_per_day_week_and_month(api: Api) -> None:
    rows = api.rows()
    day = today()
    for period, start, label in (
        ("day", day, day.isoformat()),
        ("week", day - dt.timedelta(days=day.weekday()), None),
        ("month", day.replace(day=1), day.strftime("%Y-%m")),
    ):
        status, body = await call(api, "GET", "/api/v1/stats", {"period": period})
        assert status == 200, body
        assert body["period"] == period and len(body["results"]) == 1
        bucket = body["results"][0]
        assert bucket["start"] == start.isoformat()
        if label:
            assert bucket["label"] == label
        assert bucket["count"] == len(rows) == body["totals"]["count"]
        assert bucket["bytes"] == sum(r["size"] for r in rows)
        for key, col in (
            ("by_status", "status"),
            ("by_destination", "destination"),
            ("by_extension", "extension"),
        ):
            expected: dict[str, dict[str, int]] = {}
            for r in rows:
                t = expected.setdefault(r[col], {"count": 0, "bytes": 0})
                t["count"] += 1
                t["bytes"] += r["size"]
            assert bucket[key] == expected, key
    status, body = await call(api, "GET", "/api/v1/stats", {"status": "FAILED"})
    assert body["totals"]["count"] == 2 and set(body["totals"]["by_status"]) == {"FAILED"}
    yesterday = (day - dt.timedelta(days=1)).isoformat()
    status, body = await call(api, "GET", "/api/v1/stats", {"created__lte": yesterday})
    assert status == 200 and body["results"] == [] and body["since"] is None


async def test_status(api: Api) -> None:
    status, body = await call(api, "GET", "/api/v1/status")
    assert status == 200
    assert body["version"] == filedispatch.__version__ and body["uptime_s"] > 0
    assert {s["name"] for s in body["sources"]} == {"inbox", "drop"}
    rows = api.rows()
    assert body["counts"]["FAILED"] == sum(r["status"] == "FAILED" for r in rows)
    assert body["queue_depth"] == body["counts"]["PENDING"] == 0
    assert body["in_flight"] == 0
    assert body["destinations"][str(api.docs)]["succeeded"] == 4
    dead = body["destinations"][api.ftp]
    assert dead["failed"] == 1 and dead["last_error"]


async def test_health_and_metrics(api: Api) -> None:
    status, body = await call(api, "GET", "/health", token=None)
    assert status == 200 and body["status"] == "ok"

    async def metrics() -> str:
        status, text = await call(api, "GET", "/metrics")
        assert status == 200
        return str(text)

    deadline = time.monotonic() + 15
    docs = str(api.docs)
    want = f'filedispatch_dispatches_total{{destination="{docs}",status="SUCCEEDED"}} 4'
    while want not in (text := await metrics()):
        assert time.monotonic() < deadline, text
        time.sleep(0.3)
    assert "filedispatch_queue_depth 0" in text
    assert 'filedispatch_journal_dispatches{status="FAILED"} 2' in text
    assert f'filedispatch_bytes_total{{destination="{docs}",status="SUCCEEDED"}} 3029' in text
    assert f'filedispatch_dispatch_duration_seconds_count{{destination="{docs}"}} 4' in text
    assert (
        f'filedispatch_dispatch_duration_seconds_bucket{{destination="{docs}",le="+Inf"}} 4' in text
    )
    assert "# TYPE filedispatch_dispatch_duration_seconds histogram" in text


# --------------------------------------------------------------------------- auth, secrets


@pytest.mark.parametrize(
    "path",
    [
        "/api/v1/logs",
        "/api/v1/logs/1",
        "/api/v1/status",
        "/api/v1/stats",
        "/api/v1/schema",
        "/metrics",
    ],
)
async def test_the_token_is_required(api: Api, path: str) -> None:
    status, body = await call(api, "GET", path, token=None)
    assert status == 401 and body["error"] == "unauthorized"
    status, body = await call(api, "GET", path, token="wrong")
    assert status == 401
    status, _ = await call(api, "POST", "/api/v1/logs/1/retry", token=None)
    assert status == 401
    status, _ = await call(api, "DELETE", "/api/v1/logs/1", token=None)
    assert status == 401


async def test_the_dashboard_and_health_are_open(api: Api) -> None:
    status, html = await call(api, "GET", "/", token=None)
    assert status == 200 and "<canvas" in html
    # the protocol filter offers every step kind, from the one list of them
    assert "<option>s3</option>" in html and "<option>sftp</option>" in html
    status, found = await call(api, "GET", "/api/v1/logs", {"protocol": "s3"})
    assert status == 200 and found["count"] == 0
    status, js = await call(api, "GET", "/static/app.js", token=None)
    assert status == 200 and "fetch(" in js


async def test_no_output_shows_a_password(api: Api) -> None:
    assert api.ftp.startswith("ftp://bob:***@127.0.0.1:")
    texts = []
    for path in (
        "/api/v1/logs",
        "/api/v1/stats",
        "/api/v1/status",
        "/api/v1/schema",
        "/metrics",
        "/health",
        "/",
    ):
        status, body = await call(api, "GET", path)
        assert status == 200, path
        texts.append(str(body))
    for row in api.rows():
        texts.append(str((await call(api, "GET", f"/api/v1/logs/{row['id']}"))[1]))
    assert "bob:***@" in texts[0]
    for text in texts:
        assert FTP_PASSWORD not in text
    assert FTP_PASSWORD not in api.service.log()


# --------------------------------------------------------------------------- actions (last)


async def test_retry_requeues_a_failed_dispatch_and_it_is_sent(api: Api) -> None:
    ok = api.rows("filename = 'a.txt'")[0]
    status, body = await call(api, "POST", f"/api/v1/logs/{ok['id']}/retry")
    assert status == 409 and "SUCCEEDED" in body["detail"]
    failed = api.rows("filename = 'd.bin'")[0]
    unblock(api.root)  # the cause goes away
    status, body = await call(api, "POST", f"/api/v1/logs/{failed['id']}/retry")
    assert status == 200, body
    assert body["id"] == failed["id"] and body["status"] in ("PENDING", "IN_PROGRESS", "SUCCEEDED")
    assert body["reason"] is None
    wait_until(lambda: api.rows("id = ?", (failed["id"],))[0]["status"] == "SUCCEEDED")
    assert (api.root / "blocker" / "sub" / "d.bin").read_bytes() == b"x" * 64
    status, body = await call(api, "POST", f"/api/v1/logs/{failed['id']}/retry")
    assert status == 409


async def test_forget_removes_the_entry_and_the_file_is_sent_again(api: Api) -> None:
    row = api.rows("filename = 'a.txt'")[0]
    status, body = await call(api, "DELETE", f"/api/v1/logs/{row['id']}")
    assert status == 204 and body == ""
    assert not api.rows("id = ?", (row["id"],))
    status, _ = await call(api, "GET", f"/api/v1/logs/{row['id']}")
    assert status == 404
    status, _ = await call(api, "DELETE", f"/api/v1/logs/{row['id']}")
    assert status == 404
    # the next rescan finds a.txt unknown again and dispatches it anew
    again = wait_until(
        lambda: [r for r in api.rows("filename = 'a.txt'") if r["status"] == "SUCCEEDED"]
    )
    assert again[0]["id"] != row["id"]


# --------------------------------------------------------------------------- serving


def test_a_token_from_the_environment(tmp_path: Path) -> None:
    port = free_port()
    cfg = api_config(tmp_path, port)
    svc = ServiceProcess(
        cfg, env=env_without_token(FILEDISPATCH_API_TOKEN="from-env-1234567890")
    ).start()
    try:
        import urllib.error
        import urllib.request

        url = f"http://127.0.0.1:{port}/api/v1/logs"
        with pytest.raises(urllib.error.HTTPError) as err:
            urllib.request.urlopen(url, timeout=10)
        assert err.value.code == 401
        req = urllib.request.Request(url, headers={"Authorization": "Bearer from-env-1234567890"})
        with urllib.request.urlopen(req, timeout=10) as resp:
            assert resp.status == 200
        assert "token required" in svc.log() and "from-env-1234567890" not in svc.log()
    finally:
        assert svc.stop() == 0


def test_no_token_no_listening_beyond_loopback(tmp_path: Path) -> None:
    cfg = api_config(tmp_path, free_port())
    result = run_cli("-c", cfg, "-H", "0.0.0.0", env=env_without_token(), timeout=30)
    assert result.returncode == 1
    assert "refusing to serve the web app on 0.0.0.0 without a token" in result.stderr
    assert "Traceback" not in result.stderr


def test_a_port_in_use_is_a_clear_error(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        cfg = api_config(tmp_path, port)
        result = run_cli("-c", cfg, env=env_without_token(), timeout=30)
    assert result.returncode == 1
    assert f"cannot serve the web app on 127.0.0.1:{port}" in result.stderr
    assert "Traceback" not in result.stderr


def test_no_webapp_turns_it_off(tmp_path: Path) -> None:
    port = free_port()
    cfg = api_config(tmp_path, port)
    svc = ServiceProcess(cfg, "--no-webapp", env=env_without_token()).start()
    try:
        with socket.socket() as s:
            assert s.connect_ex(("127.0.0.1", port)) != 0
        assert "web app on" not in svc.log()
    finally:
        assert svc.stop() == 0


@pytest.mark.parametrize(("method", "suffix"), [("GET", ""), ("DELETE", ""), ("POST", "/retry")])
async def test_a_query_parameter_on_an_id_endpoint_is_400(
    api: Api, method: str, suffix: str
) -> None:
    status, body = await call(api, method, f"/api/v1/logs/1{suffix}?force=1")
    assert status == 400 and body["parameter"] == "force", body


async def test_enum_filters_take_any_case(api: Api) -> None:
    failed = sorted(r["id"] for r in api.rows("status = 'FAILED'"))
    for spelling in ("failed", "Failed", "FAILED"):
        status, body = await call(api, "GET", "/api/v1/logs", {"status": spelling})
        assert status == 200, body
        assert sorted(e["id"] for e in body["results"]) == failed
    status, body = await call(api, "GET", "/api/v1/logs", {"protocol": "FTP"})
    assert status == 200 and {e["protocol"] for e in body["results"]} == {"ftp"}
    status, body = await call(api, "GET", "/api/v1/stats", {"period": "Week"})
    assert status == 200 and body["period"] == "week"

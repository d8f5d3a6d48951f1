"""S3 destinations against moto's S3 API server on loopback, through the real CLI and service:
objects, metadata, tags, conflicts, multipart with bounded memory, wrong secret, missing bucket,
a server restarted mid-upload, and kill -9 of the service mid-upload."""

from __future__ import annotations

import base64
import hashlib
import signal
from pathlib import Path

import pytest
import yaml

from .conftest import journal_rows, run_cli, wait_until
from .servers import (
    FAST_RETRY,
    S3Server,
    fails_at_once,
    old_file,
    remote_config,
    resume,
    sha256_of,
    some_files,
)

MIB = 1024 * 1024


def test_files_arrive_as_objects_with_metadata_tags_and_storage_class(
    workspace: dict[str, Path], s3: S3Server
) -> None:
    ws = workspace
    srcs = some_files(ws["inbox"], 3, 20_000)
    big = old_file(ws["inbox"] / "big.bin", 12 * MIB)  # multipart: parts of 5 MiB
    dest = s3.dest(
        "in/",
        name="{yyyy}/{relpath}",
        metadata={"team": "ops"},
        tags={"origin": "scanner 2"},
        storage_class="STANDARD_IA",
        part_size=5 * MIB,
        verify="sha256",
    )
    result = run_cli("-c", remote_config(ws, dest, source={"recursive": True}), "--once")
    assert result.returncode == 0, result.stderr
    rows = journal_rows(ws["db"])
    assert {r["status"] for r in rows} == {"SUCCEEDED"} and len(rows) == 5
    objects = s3.objects("in/")
    year = {r["location"].split("/")[4] for r in rows}.pop()
    expected = {
        f"in/{year}/{p.relative_to(ws['inbox']).as_posix()}": sha256_of(p) for p in [*srcs, big]
    }
    assert objects == expected
    assert {r["location"] for r in rows} == {f"s3://{s3.bucket}/{k}" for k in expected}
    client = s3.client()
    head = client.head_object(Bucket=s3.bucket, Key=f"in/{year}/f0.dat")
    assert head["Metadata"]["team"] == "ops" and head["StorageClass"] == "STANDARD_IA"
    tags = client.get_object_tagging(Bucket=s3.bucket, Key=f"in/{year}/big.bin")["TagSet"]
    assert tags == [{"Key": "origin", "Value": "scanner 2"}]
    assert s3.uploads() == []
    assert s3.secret_key not in result.stderr


def test_on_conflict_rename_skip_fail_and_overwrite(
    workspace: dict[str, Path], s3: S3Server
) -> None:
    ws = workspace
    client = s3.client()
    for prefix in ("rename/", "skip/", "fail/", "overwrite/"):
        client.put_object(Bucket=s3.bucket, Key=f"{prefix}a.txt", Body=b"already there")
    src = old_file(ws["inbox"] / "a.txt", b"new bytes")
    steps = [
        s3.dest(f"{policy}/", on_conflict=policy, retry=FAST_RETRY)
        for policy in ("rename", "skip", "overwrite", "fail")  # a chain stops at a failure
    ]
    result = run_cli("-c", remote_config(ws, *steps), "--once")
    assert result.returncode == 1, result.stderr  # the fail step failed
    rows = {r["destination"].split("/")[3]: r for r in journal_rows(ws["db"])}
    assert rows["rename"]["location"] == f"s3://{s3.bucket}/rename/a-1.txt"
    assert "skipped" in rows["skip"]["detail"]
    assert rows["fail"]["status"] == "FAILED" and "already exists" in rows["fail"]["reason"]
    new, old = sha256_of(src), sha256_of(old_file(ws["root"] / "x", b"already there"))
    got = s3.objects()
    assert got["rename/a.txt"] == old and got["rename/a-1.txt"] == new
    assert got["skip/a.txt"] == old and "skip/a-1.txt" not in got
    assert got["fail/a.txt"] == old
    assert got["overwrite/a.txt"] == new


def test_a_large_file_on_conflict_rename_goes_in_parts_beside_the_taken_name(
    workspace: dict[str, Path], s3: S3Server
) -> None:
    ws = workspace
    s3.client().put_object(Bucket=s3.bucket, Key="big/a.bin", Body=b"taken")
    src = old_file(ws["inbox"] / "a.bin", 11 * MIB)
    dest = s3.dest("big/", part_size=5 * MIB, on_conflict="rename")
    result = run_cli("-c", remote_config(ws, dest), "--once")
    assert result.returncode == 0, result.stderr
    assert s3.objects("big/")["big/a-1.bin"] == sha256_of(src)
    assert s3.uploads() == []


@pytest.mark.slow
def test_200_mib_multipart_upload_holds_a_few_parts_in_memory(
    workspace: dict[str, Path], s3: S3Server, service_factory
) -> None:
    ws = workspace
    cfg = remote_config(ws, s3.dest(part_size=8 * MIB, part_concurrency=4))
    svc = service_factory(cfg).start()
    assert svc.proc is not None
    old_file(ws["inbox"] / "warm.txt", b"warm up the client")
    wait_until(lambda: _ended(ws["db"]), 60)
    before = _peak_rss(svc.proc.pid)
    src = old_file(ws["inbox"] / "huge.bin", 200 * MIB)
    wait_until(lambda: len(_ended(ws["db"])) == 2, 240)
    grew = _peak_rss(svc.proc.pid) - before
    assert svc.stop() == 0
    assert s3.objects()["huge.bin"] == sha256_of(src)
    # 4 parts of 8 MiB in flight and one being read, with botocore's copies: far below 200 MiB
    assert grew < 120 * MIB, f"peak RSS grew by {grew / MIB:.0f} MiB"


def _peak_rss(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmHWM")


def test_wrong_secret_fails_at_once_and_never_shows_it(
    workspace: dict[str, Path], tmp_path: Path
) -> None:
    server = S3Server(tmp_path / "s3auth", auth=True)
    try:
        old_file(workspace["inbox"] / "a.txt", b"x")
        wrong = "wrong-secret-" + server.secret_key[:20]
        row, stderr = fails_at_once(workspace, server.dest(secret_access_key=wrong))
        assert "SignatureDoesNotMatch" in row["reason"]
        assert wrong not in row["reason"] + stderr
        assert server.objects() == {}
    finally:
        server.stop()


def test_right_secret_with_signature_checks_delivers(
    workspace: dict[str, Path], tmp_path: Path
) -> None:
    server = S3Server(tmp_path / "s3auth", auth=True)
    try:
        src = old_file(workspace["inbox"] / "a.txt", b"signed")
        result = run_cli("-c", remote_config(workspace, server.dest()), "--once")
        assert result.returncode == 0, result.stderr
        assert server.objects() == {"a.txt": sha256_of(src)}
    finally:
        server.stop()


@pytest.mark.parametrize("chain", ["environment", "profile"])
def test_credentials_from_the_standard_chain(
    workspace: dict[str, Path], tmp_path: Path, chain: str
) -> None:
    """No keys in the config: the environment's, or a profile's in a credentials file, signed
    and checked by the server (an instance role is the same chain's last link)."""
    from .conftest import cli_env

    server = S3Server(tmp_path / "s3auth", auth=True)
    try:
        src = old_file(workspace["inbox"] / "a.txt", b"chained")
        dest = server.dest()
        del dest["access_key_id"], dest["secret_access_key"]
        env = cli_env()
        for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_PROFILE"):
            env.pop(name, None)
        env["AWS_CONFIG_FILE"] = str(tmp_path / "no-aws-config")
        if chain == "environment":
            env["AWS_ACCESS_KEY_ID"] = server.access_key
            env["AWS_SECRET_ACCESS_KEY"] = server.secret_key
        else:
            creds = tmp_path / "credentials"
            creds.write_text(
                f"[scanner]\naws_access_key_id = {server.access_key}\n"
                f"aws_secret_access_key = {server.secret_key}\n"
            )
            env["AWS_SHARED_CREDENTIALS_FILE"] = str(creds)
            dest["profile"] = "scanner"
        cfg = remote_config(workspace, dest)
        result = run_cli("-c", cfg, "--once", env=env)
        assert result.returncode == 0, result.stderr
        assert server.objects() == {"a.txt": sha256_of(src)}
        assert server.secret_key not in result.stderr
    finally:
        server.stop()


def test_credentials_from_an_instance_role(workspace: dict[str, Path], s3: S3Server) -> None:
    """No keys in the config, the environment or a profile: the chain's last link asks the
    instance metadata service (moto's server answers it: token, role name, the role's
    temporary keys) and the file arrives, sent with those keys."""
    from .conftest import cli_env

    src = old_file(workspace["inbox"] / "a.txt", b"from the role")
    dest = s3.dest()
    del dest["access_key_id"], dest["secret_access_key"]
    env = cli_env()
    for name in list(env):
        if name.startswith("AWS_") and name != "AWS_CA_BUNDLE":
            del env[name]
    empty = workspace["root"] / "empty-aws-file"
    empty.write_text("")
    env["AWS_CONFIG_FILE"] = env["AWS_SHARED_CREDENTIALS_FILE"] = str(empty)
    env["AWS_EC2_METADATA_SERVICE_ENDPOINT"] = s3.endpoint + "/"
    result = run_cli("-c", remote_config(workspace, dest), "--once", env=env)
    assert result.returncode == 0, result.stderr
    assert s3.objects() == {"a.txt": sha256_of(src)}
    asked = (s3.folder / "moto.log").read_text()
    assert "PUT /latest/api/token" in asked
    assert "GET /latest/meta-data/iam/security-credentials/default-role" in asked
    assert "test-secret-key" not in result.stderr


def test_missing_bucket_fails_at_once(workspace: dict[str, Path], s3: S3Server) -> None:
    old_file(workspace["inbox"] / "a.txt", b"x")
    dest = s3.dest()
    dest["url"] = "s3://no-such-bucket/in/"
    row, _ = fails_at_once(workspace, dest)
    assert "NoSuchBucket" in row["reason"]


def _ended(db: Path, statuses: tuple[str, ...] = ("SUCCEEDED",)) -> list[dict[str, object]]:
    return [r for r in journal_rows(db) if r["status"] in statuses]


def _uploading(s3: S3Server) -> bool:
    try:
        return bool(s3.uploads())
    except Exception:
        return False


@pytest.mark.slow
def test_server_restarted_mid_upload_the_file_is_sent_again_whole(
    workspace: dict[str, Path], s3: S3Server, service_factory
) -> None:
    ws = workspace
    retry = {"attempts": 5, "delay": 0.05, "jitter": False}
    cfg = remote_config(ws, s3.dest(part_size=5 * MIB, part_concurrency=1, retry=retry))
    svc = service_factory(cfg).start()
    assert svc.proc is not None
    src = old_file(ws["inbox"] / "big.bin", 80 * MIB)
    wait_until(lambda: _uploading(s3), 60, 0.01)
    svc.signal(signal.SIGSTOP)  # held still while its server goes away and comes back
    try:
        s3.restart()
    finally:
        svc.signal(signal.SIGCONT)
    (row,) = wait_until(lambda: _ended(ws["db"], ("SUCCEEDED", "FAILED")), 120)
    assert row["status"] == "SUCCEEDED", row
    assert row["attempts"] >= 2
    assert s3.objects() == {"big.bin": sha256_of(src)}
    assert s3.uploads() == []
    assert svc.stop() == 0


@pytest.mark.slow
def test_kill_9_mid_upload_then_resume_delivers_once_and_cleans_the_orphan_at_start(
    workspace: dict[str, Path], s3: S3Server, service_factory
) -> None:
    ws = workspace
    # short timeouts, so the server held still below is given up on quickly
    retry = {"delay": 0.2, "max_delay": 1, "jitter": False}
    dest = s3.dest(
        "in/", part_size=5 * MIB, part_concurrency=1, read_timeout=2, connect_timeout=2, retry=retry
    )
    cfg = remote_config(ws, dest)
    client = s3.client()
    # someone else's unfinished uploads, under our prefix and beside it: never ours to abort
    theirs = {
        client.create_multipart_upload(Bucket=s3.bucket, Key=key)["UploadId"]: key
        for key in ("in/their.bin", "other/their.bin")
    }
    first = service_factory(cfg).start()
    src = old_file(ws["inbox"] / "big.bin", 80 * MIB)
    # begun and written down in the journal (the server knows of it a moment before)
    wait_until(lambda: journal_rows(ws["db"], "key='in/big.bin'", table="uploads"), 60, 0.01)
    first.kill()
    assert sorted(s3.uploads()) == ["in/big.bin", "in/their.bin", "other/their.bin"]
    assert s3.proc is not None
    s3.proc.send_signal(signal.SIGSTOP)  # the server hangs: the start must not wait for it
    try:
        second = service_factory(cfg).start()
        wait_until(lambda: "cannot abort the unfinished upload" in second.log(), 60)
    finally:
        s3.proc.send_signal(signal.SIGCONT)
    # retried in the background once the server answers again
    wait_until(lambda: "aborted 1 unfinished multipart upload" in second.log(), 120)
    wait_until(lambda: _ended(ws["db"]), 120)
    assert second.stop() == 0
    assert s3.objects() == {"in/big.bin": sha256_of(src)}  # once, under its own name
    listed = client.list_multipart_uploads(Bucket=s3.bucket).get("Uploads", [])
    assert {u["UploadId"]: u["Key"] for u in listed} == theirs  # ours aborted, theirs kept
    assert journal_rows(ws["db"], table="uploads") == []  # nothing left to sweep
    assert s3.secret_key not in second.log()


@pytest.mark.slow
def test_a_stop_mid_upload_aborts_the_multipart_upload(
    workspace: dict[str, Path], s3: S3Server, service_factory
) -> None:
    ws = workspace
    dest = s3.dest(part_size=5 * MIB, part_concurrency=1)
    svc = service_factory(remote_config(ws, dest, shutdown_grace=0)).start()
    old_file(ws["inbox"] / "big.bin", 80 * MIB)
    wait_until(lambda: _uploading(s3), 60, 0.01)
    assert svc.stop() == 0  # no grace: the upload is cancelled
    assert "1 cancelled" in svc.log()
    assert s3.uploads() == []  # aborted, not left to bill its parts
    assert s3.objects() == {}


def test_one_bucket_name_on_two_servers_is_two_destinations(
    workspace: dict[str, Path], s3: S3Server, tmp_path: Path
) -> None:
    other = S3Server(tmp_path / "s3b")
    try:
        src = old_file(workspace["inbox"] / "a.txt", b"to both")
        cfg = remote_config(workspace, s3.dest())
        data = yaml.safe_load(cfg.read_text())
        data["rules"] = [  # two rules: the journal tells their steps apart by identity alone
            {"name": "one", "glob": "*", "continue": True, "to": [s3.dest()]},
            {"name": "two", "glob": "*", "to": [other.dest()]},
        ]
        cfg.write_text(yaml.safe_dump(data))
        result = run_cli("-c", cfg, "--once")
        assert result.returncode == 0, result.stderr
        assert s3.objects() == other.objects() == {"a.txt": sha256_of(src)}
        rows = journal_rows(workspace["db"])
        assert {r["destination"] for r in rows} == {
            f"s3://{s3.bucket}/ at {s3.endpoint}",
            f"s3://{other.bucket}/ at {other.endpoint}",
        }
    finally:
        other.stop()


WRONG_SHA256 = "47DEQpj8HBSa+/TImW+5JCeuQeRkm5NMpJWZG3hSuFU="  #: the SHA-256 of no bytes


class S3Front:
    """A plain HTTP front on loopback before moto's server, keeping each request's method,
    path and headers; with ``conditional=False`` it plays a server without conditional
    writes: a request with If-None-Match answers 501 NotImplemented, as such servers do.

    moto stores no ``x-amz-checksum-sha256``; ``checksum="echo"`` plays a server that does (a
    PUT's answer gives back the checksum it was sent), ``"wrong"`` one that stored other bytes
    (another SHA-256 in the answer); ``longer=True`` says a byte more in a HEAD's length."""

    def __init__(
        self,
        behind: S3Server,
        *,
        conditional: bool = True,
        checksum: str | None = None,
        longer: bool = False,
    ) -> None:
        from aiohttp import ClientSession, web

        from .conftest import free_port
        from .servers import LoopThread

        self.seen: list[tuple[str, str, dict[str, str]]] = []
        self.port = free_port()
        self.loop = LoopThread()

        async def forward(request: web.Request) -> web.StreamResponse:
            headers = dict(request.headers)
            self.seen.append((request.method, request.path, headers))
            if not conditional and "If-None-Match" in headers:
                body = b"<Error><Code>NotImplemented</Code><Message>no</Message></Error>"
                return web.Response(status=501, body=body, content_type="application/xml")
            data = await request.read()
            async with ClientSession(auto_decompress=False) as session:
                async with session.request(
                    request.method,
                    f"{behind.endpoint}{request.path_qs}",
                    headers=headers,
                    data=data,
                    allow_redirects=False,
                ) as answer:
                    payload = await answer.read()
                    drop = {"transfer-encoding", "connection", "content-length"}
                    keep = {k: v for k, v in answer.headers.items() if k.lower() not in drop}
                    sent = headers.get("x-amz-checksum-sha256")
                    if request.method == "PUT" and answer.status == 200 and sent is not None:
                        if checksum is not None:
                            keep["x-amz-checksum-sha256"] = sent
                        if checksum == "wrong":
                            keep["x-amz-checksum-sha256"] = WRONG_SHA256
                    if request.method != "HEAD":
                        return web.Response(status=answer.status, body=payload, headers=keep)
                    # a HEAD's length is the object's: sent as it came, with no body
                    reply = web.StreamResponse(status=answer.status, headers=keep)
                    reply.content_length = (answer.content_length or 0) + longer
                    await reply.prepare(request)
                    return reply

        app = web.Application(client_max_size=64 * MIB)
        app.router.add_route("*", "/{tail:.*}", forward)
        self.runner = web.AppRunner(app)

        async def start() -> None:
            await self.runner.setup()
            await web.TCPSite(self.runner, "127.0.0.1", self.port).start()

        self.loop.call(start())

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def methods(self, key: str) -> list[tuple[str, bool]]:
        """(method, sent with If-None-Match) of each request for ``key``, in order."""
        return [(m, "If-None-Match" in h) for m, p, h in self.seen if p.endswith(key)]

    def close(self) -> None:
        self.loop.call(self.runner.cleanup())
        self.loop.close()


@pytest.mark.parametrize("conditional", [True, False], ids=["if-none-match", "head"])
def test_conflicts_use_a_conditional_put_where_the_server_has_it_and_a_head_where_not(
    workspace: dict[str, Path], s3: S3Server, conditional: bool
) -> None:
    ws = workspace
    s3.client().put_object(Bucket=s3.bucket, Key="c/a.txt", Body=b"already there")
    src = old_file(ws["inbox"] / "a.txt", b"new bytes")
    front = S3Front(s3, conditional=conditional)
    try:
        dest = {**s3.dest("c/", on_conflict="rename"), "endpoint_url": front.endpoint}
        result = run_cli("-c", remote_config(ws, dest), "--once")
        assert result.returncode == 0, result.stderr
        assert s3.objects("c/") == {
            "c/a.txt": sha256_of(old_file(ws["root"] / "x", b"already there")),
            "c/a-1.txt": sha256_of(src),
        }
        first, second = front.methods("/c/a.txt"), front.methods("/c/a-1.txt")
        if conditional:  # the write is the check: a 412 for the taken name, no HEAD before
            assert first == [("PUT", True)]
            assert second[0] == ("PUT", True)  # (then verify's HEAD)
        else:  # told once that the server has none, then a HEAD before each plain PUT
            assert first[0] == ("PUT", True) and ("HEAD", False) in first
            assert second[:2] == [("HEAD", False), ("PUT", False)]
            assert "no conditional writes here" in result.stderr
    finally:
        front.close()


def test_the_secret_never_reaches_the_api_the_dashboard_or_the_journal(
    workspace: dict[str, Path], tmp_path: Path, service_factory
) -> None:
    import json
    import urllib.request

    from .conftest import free_port

    ws = workspace
    server = S3Server(tmp_path / "s3auth", auth=True)
    try:
        port = free_port()
        wrong = "wrong-secret-" + server.secret_key[:20]
        steps = [
            server.dest("good/"),
            server.dest("bad/", secret_access_key=wrong, retry=FAST_RETRY),
        ]
        rules = [
            {"name": "good", "glob": "*", "continue": True, "to": steps[:1]},
            {"name": "bad", "glob": "*", "to": steps[1:]},
        ]
        cfg = remote_config(ws, api={"enabled": True, "port": port, "token_env": None})
        data = yaml.safe_load(cfg.read_text())
        data["rules"] = rules
        cfg.write_text(yaml.safe_dump(data))
        svc = service_factory(cfg).start()
        old_file(ws["inbox"] / "a.txt", b"x")
        rows = wait_until(
            lambda: len(_ended(ws["db"], ("SUCCEEDED", "FAILED"))) == 2 and journal_rows(ws["db"]),
            60,
        )
        base = f"http://127.0.0.1:{port}"
        pages = ["/", "/metrics", "/api/v1/logs", "/api/v1/status", "/api/v1/stats"]
        pages += [f"/api/v1/logs/{r['id']}" for r in rows]
        seen = [urllib.request.urlopen(base + page, timeout=30).read().decode() for page in pages]
        assert svc.stop() == 0
        assert "SignatureDoesNotMatch" in "".join(seen)  # the failure is shown, its secret not
        blob = "\n".join([*seen, svc.log(), json.dumps(rows, default=str)])
        for secret in (server.secret_key, wrong):
            assert secret not in blob
    finally:
        server.stop()


@pytest.mark.parametrize("verify", ["size", "sha256"])
def test_a_stored_object_that_does_not_verify_is_removed_and_sent_again(
    workspace: dict[str, Path], s3: S3Server, verify: str
) -> None:
    ws = workspace
    old_file(ws["inbox"] / "a.txt", b"bytes the server misreports")
    # a HEAD's length a byte over, or another SHA-256 in the answer to the PUT
    front = S3Front(s3, longer=True) if verify == "size" else S3Front(s3, checksum="wrong")
    try:
        retry = {"attempts": 2, "delay": 0, "jitter": False}
        dest = {**s3.dest(verify=verify, retry=retry), "endpoint_url": front.endpoint}
        result = run_cli("-c", remote_config(ws, dest), "--once")
    finally:
        front.close()
    assert result.returncode == 1, result.stderr
    (row,) = journal_rows(ws["db"])
    assert (row["status"], row["attempts"]) == ("FAILED", 2)
    if verify == "size":
        assert "verify: 28 bytes stored of 27" in row["reason"]
    else:
        assert f"the stored SHA-256 ({WRONG_SHA256}) is not the one sent" in row["reason"]
    assert s3.objects() == {}  # each attempt's object was removed: none that does not verify


def test_verify_sha256_takes_the_checksum_the_server_stored(
    workspace: dict[str, Path], s3: S3Server
) -> None:
    ws = workspace
    src = old_file(ws["inbox"] / "a.txt", b"checked by the server")
    front = S3Front(s3, checksum="echo", longer=True)  # a HEAD's length would not pass
    try:
        dest = {**s3.dest(verify="sha256"), "endpoint_url": front.endpoint}
        result = run_cli("-c", remote_config(ws, dest), "--once")
        sent = front.methods("/a.txt")
    finally:
        front.close()
    assert result.returncode == 0, result.stderr
    (row,) = journal_rows(ws["db"])
    assert row["sha256"] == sha256_of(src)
    assert s3.objects() == {"a.txt": sha256_of(src)}
    assert sent == [("PUT", True)]  # the checksum in the answer sufficed: no HEAD
    put = next(h for m, p, h in front.seen if m == "PUT")
    assert put["x-amz-checksum-sha256"] == base64.b64encode(bytes.fromhex(sha256_of(src))).decode()


def test_a_credential_in_an_s3_endpoints_query_is_refused_and_never_echoed(
    tmp_path: Path,
) -> None:
    """``endpoint_url: http://host:port/?token=...``. Before (a6 review): the config took it,
    botocore refused the URL at the first request with a message quoting it whole, and that
    message went to the log at ERROR and into the journal's reason (so the API and the
    dashboard). Now the config is refused: exit 2, the field named, the token never shown."""
    token = "SEKRETTOKEN-a6"
    ws = {"root": tmp_path, "inbox": tmp_path / "inbox", "db": tmp_path / "journal.db"}
    step = {
        "url": "s3://inbox-bucket/in/",
        "endpoint_url": f"http://127.0.0.1:9/?token={token}",
        "access_key_id": "AKIDA6",
        "secret_access_key": "a6-secret-key",
    }
    config = remote_config(ws, step)
    for args in (["check"], ["--once"]):
        done = run_cli("-c", config, *args)
        said = done.stdout + done.stderr
        assert done.returncode == 2, said
        assert "endpoint_url" in said and "takes no ?query" in said, said
        assert token not in said and "Traceback" not in said, said


def test_an_s3_resume_never_takes_another_journals_object_for_its_own(tmp_path: Path) -> None:
    """Another host (a journal of its own) delivered its a.bin from its row 7 into the same
    bucket and prefix. Our row 7 delivers another a.bin of the same size and is resumed (its
    first attempt failed, or the service was killed mid-way: every retry is a resume). The
    resume looks for an object an earlier attempt of this row completed: the other one is
    not ours (its ``filedispatch-id`` lacks our journal's token), so our bytes are sent
    (beside it, ``on_conflict: rename``). Before, the bare row id and the size matched:
    SUCCEEDED, "found delivered by an earlier attempt", and our bytes never arrived."""
    s3 = S3Server(tmp_path / "s3")
    try:
        theirs, ours = b"T" * 4096, b"O" * 4096
        for other in ("7", "9f8e7d6c-7"):  # an older filedispatch's, another journal's
            s3.client().put_object(
                Bucket=s3.bucket, Key="in/a.bin", Body=theirs, Metadata={"filedispatch-id": other}
            )
            (tmp_path / other).mkdir()
            outcome = resume(tmp_path / other, s3.dest("in/"), ours, "a.bin", None, "0a1b2c3d")
            assert not isinstance(outcome, BaseException), outcome
            held = s3.objects("in/")
            assert hashlib.sha256(ours).hexdigest() in held.values(), (
                f"our a.bin never reached the bucket ({outcome.detail!r} at {outcome.location})"
            )
            assert held["in/a.bin"] == hashlib.sha256(theirs).hexdigest()
            (key,) = (k for k, digest in held.items() if digest == hashlib.sha256(ours).hexdigest())
            head = s3.client().head_object(Bucket=s3.bucket, Key=key)
            assert head["Metadata"]["filedispatch-id"] == "0a1b2c3d-7-1767225600500000"
            for key in held:
                s3.client().delete_object(Bucket=s3.bucket, Key=key)
    finally:
        s3.stop()

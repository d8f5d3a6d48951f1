"""Real servers on loopback for the remote-destination tests and the benchmark: an aiohttp
receiver, a pyftpdlib FTP server and an asyncssh SFTP server, each in a thread of its own.

The service under test runs as a subprocess (or in-process), so these never share its loop.
"""

from __future__ import annotations

import asyncio
import hashlib
import subprocess
import threading
import time
from collections import defaultdict
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from aiohttp import BodyPartReader, web

from .conftest import journal_rows, run_cli

T = TypeVar("T")


class LoopThread:
    """An asyncio loop running in a daemon thread; ``call`` runs a coroutine there."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()

    def call(self, coro: Coroutine[Any, Any, T], timeout: float = 30) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        self.loop.close()


# ------------------------------------------------------------------ HTTP


@dataclass
class Received:
    """One request as the receiver saw it."""

    method: str
    path: str
    headers: dict[str, str]
    size: int
    sha256: str
    at: float
    fields: dict[str, str] = field(default_factory=dict)
    filename: str | None = None


Behaviour = Callable[[web.Request, int], Awaitable[web.StreamResponse | None]]


class HttpReceiver:
    """Records every upload (size and SHA-256, computed while streaming, never stored whole).

    ``behave[path]`` may answer differently: it gets the request and how many requests that
    path has had (1 for the first), and returns a response or None for the default 201.
    """

    def __init__(
        self, read_delay: float = 0.0, tls: tuple[Path, Path] | None = None, port: int = 0
    ) -> None:
        """``port``: 0 for any free one; a given port lets a test start it where a client
        has been failing to connect."""
        self.tls = tls
        self._port = port
        self.received: list[Received] = []
        self.hits: dict[str, int] = defaultdict(int)
        self.behave: dict[str, Behaviour] = {}
        self.read_delay = read_delay
        self.first_byte = threading.Event()
        self.lt = LoopThread()
        self.port = self.lt.call(self._start())

    @property
    def url(self) -> str:
        return f"{'https' if self.tls else 'http'}://127.0.0.1:{self.port}"

    async def _start(self) -> int:
        app = web.Application(client_max_size=1 << 40)
        app.router.add_route("*", r"/{tail:[\s\S]*}", self._handle)  # any path, newlines too
        self.runner = web.AppRunner(app, handle_signals=False)
        await self.runner.setup()
        context = None
        if self.tls is not None:
            import ssl

            context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
            context.load_cert_chain(*self.tls)
        site = web.TCPSite(self.runner, "127.0.0.1", self._port, ssl_context=context)
        await site.start()
        server = site._server
        assert server is not None and server.sockets
        return int(server.sockets[0].getsockname()[1])

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        self.hits[request.path] += 1
        behaviour = self.behave.get(request.path)
        if behaviour is not None:
            answer = await behaviour(request, self.hits[request.path])
            if answer is not None:
                return answer
        rec = Received(request.method, request.path, dict(request.headers), 0, "", time.time())
        if request.content_type.startswith("multipart/"):
            reader = await request.multipart()
            async for part in reader:
                if not isinstance(part, BodyPartReader):
                    continue
                if part.filename is None:
                    rec.fields[part.name or ""] = (await part.read()).decode()
                else:
                    rec.filename = part.filename
                    h, size = hashlib.sha256(), 0
                    while data := await part.read_chunk(1 << 20):
                        self.first_byte.set()
                        h.update(data)
                        size += len(data)
                    rec.size, rec.sha256 = size, h.hexdigest()
        else:
            h, size = hashlib.sha256(), 0
            async for data in request.content.iter_chunked(1 << 20):
                self.first_byte.set()
                h.update(data)
                size += len(data)
                if self.read_delay:
                    await asyncio.sleep(self.read_delay)
            rec.size, rec.sha256 = size, h.hexdigest()
        self.received.append(rec)
        return web.Response(status=201, text="created")

    def close(self) -> None:
        self.lt.call(self.runner.cleanup())
        self.lt.close()


class EarlyAnswer:
    """A bare HTTP/1.1 server that answers every request from its headers alone, reads none
    of the body and closes the connection (as a proxy enforcing a size limit or a login does).

    ``status`` is the answer; ``requests`` counts requests seen, ``continued`` how many asked
    for ``100-continue``. With ``abort``, the close is a reset (unread data makes it one anyway).
    """

    def __init__(self, status: int, headers: str = "", abort: bool = False) -> None:
        self.status, self.extra, self.abort = status, headers, abort
        self.requests = 0
        self.continued = 0
        self.lt = LoopThread()
        self.port = self.lt.call(self._start())

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def _start(self) -> int:
        self.server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        return int(self.server.sockets[0].getsockname()[1])

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.requests += 1
        while (line := await reader.readline()) not in (b"\r\n", b""):
            if line.lower().startswith(b"expect: 100-continue"):
                self.continued += 1
        text = f"refused with {self.status}"
        writer.write(
            f"HTTP/1.1 {self.status} Refused\r\nContent-Length: {len(text)}\r\n"
            f"Connection: close\r\n{self.extra}\r\n{text}".encode()
        )
        await writer.drain()
        if self.abort:
            writer.transport.abort()
        else:
            writer.close()

    def close(self) -> None:
        async def stop() -> None:
            self.server.close()
            await self.server.wait_closed()

        self.lt.call(stop())
        self.lt.close()


# ------------------------------------------------------------------ FTP


class FtpServer:
    """pyftpdlib with one real user whose home is ``root``; stop() and start() keep the port.

    With ``tls`` (cert, key), FTPS: TLS required before login and on every data connection.
    """

    def __init__(
        self,
        root: Path,
        user: str = "alice",
        password: str = "alice-Pw-1",
        port: int = 0,
        read_limit: int = 0,
        tls: tuple[Path, Path] | None = None,
        overrides: dict[str, Any] | None = None,
        without: tuple[str, ...] = (),
    ) -> None:
        """``overrides``: handler attributes, e.g. ``ftp_RNFR`` (a method answering a command
        differently, or a command pyftpdlib lacks); ``without``: commands the server does
        not know (answered ``500``, and left out of FEAT)."""
        from pyftpdlib.authorizers import DummyAuthorizer
        from pyftpdlib.handlers import FTPHandler, ThrottledDTPHandler

        self.root, self.user, self.password = root, user, password
        root.mkdir(parents=True, exist_ok=True)
        authorizer = DummyAuthorizer()
        authorizer.add_user(user, password, str(root), perm="elradfmwMT")
        self.logins = 0
        server = self

        def on_login(handler: Any, username: str) -> None:
            server.logins += 1

        attrs: dict[str, Any] = {
            "authorizer": authorizer,
            "auth_failed_timeout": 0.05,
            "on_login": on_login,
        }
        if read_limit:
            attrs["dtp_handler"] = type("Slow", (ThrottledDTPHandler,), {"read_limit": read_limit})
        base: type = FTPHandler
        self.tls = tls
        if tls is not None:
            from pyftpdlib.handlers import TLS_FTPHandler

            base = TLS_FTPHandler
            attrs.update(certfile=str(tls[0]), keyfile=str(tls[1]))
            attrs.update(tls_control_required=True, tls_data_required=True)
        attrs.update(overrides or {})
        commands = {k: v for k, v in base.proto_cmds.items() if k not in without}
        feats: list[str] = []
        for key in overrides or {}:  # a command of our own takes a path, as SIZE does
            if key.startswith("ftp_") and key[4:] not in commands:
                commands[key[4:]] = dict(base.proto_cmds["SIZE"], help=f"Syntax: {key[4:]}")
                feats.append(key[4:])  # and FEAT lists it

        def init(handler: Any, *args: Any, **kwargs: Any) -> None:
            base.__init__(handler, *args, **kwargs)
            handler._extra_feats.extend(feats)

        attrs["__init__"] = init
        attrs["proto_cmds"] = commands
        self.handler = type("Handler", (base,), attrs)
        self.handler.log_prefix = "ftpd"
        self.port = port
        self.server: Any = None
        self.thread: threading.Thread | None = None
        self.start()

    def start(self) -> None:
        import logging

        from pyftpdlib.servers import FTPServer

        logging.getLogger("pyftpdlib").setLevel(logging.WARNING)
        self.server = FTPServer(("127.0.0.1", self.port), self.handler)
        self.port = self.server.address[1]
        self._stop = threading.Event()
        self.thread = threading.Thread(target=self._serve, args=(self.server,), daemon=True)
        self.thread.start()

    def _serve(self, server: Any) -> None:
        # the loop is stopped and closed in its own thread: close_all() from another one races
        while not self._stop.is_set():
            server.serve_forever(timeout=0.05, blocking=False, handle_exit=False)
        server.close_all()

    def stop(self) -> None:
        if self.server is not None:
            self._stop.set()
            assert self.thread is not None
            self.thread.join(10)
            self.server = None

    def url(self, path: str = "/", password: str | None = None) -> str:
        pw = self.password if password is None else password
        scheme = "ftps" if self.tls else "ftp"
        return f"{scheme}://{self.user}:{pw}@127.0.0.1:{self.port}{path}"


# ------------------------------------------------------------------ SFTP


class SftpServer:
    """asyncssh with a generated host key; ``user`` logs in with ``password`` or ``user_key``.

    The SFTP root is chrooted to ``root``; ``known_hosts`` trusts this server's host key.
    """

    def __init__(
        self,
        root: Path,
        keys: Path,
        user: str = "bob",
        password: str = "bob-Pw-2",
        sftp_class: Any = None,
    ):
        """``sftp_class``: an ``asyncssh.SFTPServer`` subclass that answers some requests
        differently (it is given the chroot)."""
        import asyncssh

        self.sftp_class = sftp_class or asyncssh.SFTPServer
        self.root, self.user, self.password = root, user, password
        root.mkdir(parents=True, exist_ok=True)
        keys.mkdir(parents=True, exist_ok=True)
        self.host_key = asyncssh.generate_private_key("ssh-ed25519")
        self.user_key = asyncssh.generate_private_key("ssh-ed25519")
        self.key_file = keys / "id_user"
        self.user_key.write_private_key(str(self.key_file))
        self.lt = LoopThread()
        self.port = self.lt.call(self._start())
        self.known_hosts = keys / "known_hosts"
        self.known_hosts.write_text(self.known_hosts_line(self.host_key))

    def known_hosts_line(self, key: Any) -> str:
        public = key.export_public_key().decode().strip()
        return f"[127.0.0.1]:{self.port} {public}\n"

    async def _start(self) -> int:
        import asyncssh

        server = self

        class Auth(asyncssh.SSHServer):
            def begin_auth(self, username: str) -> bool:
                return True

            def password_auth_supported(self) -> bool:
                return True

            def validate_password(self, username: str, password: str) -> bool:
                return username == server.user and password == server.password

        authorized = asyncssh.import_authorized_keys(self.user_key.export_public_key().decode())
        self.acceptor = await asyncssh.listen(
            "127.0.0.1",
            0,
            server_host_keys=[self.host_key],
            authorized_client_keys=authorized,
            server_factory=Auth,
            sftp_factory=lambda chan: self.sftp_class(chan, chroot=str(self.root).encode()),
        )
        return int(self.acceptor.sockets[0].getsockname()[1])

    def url(self, path: str = "/", password: str | None = None) -> str:
        auth = f"{self.user}:{password}@" if password else f"{self.user}@"
        return f"sftp://{auth}127.0.0.1:{self.port}{path}"

    def close(self) -> None:
        async def stop() -> None:
            self.acceptor.close()
            await self.acceptor.wait_closed()

        self.lt.call(stop())
        self.lt.close()


# ------------------------------------------------------------------ S3


class S3Server:
    """moto's S3 API server in a subprocess on loopback (so it can be killed and restarted),
    with one bucket. ``auth``: moto checks signatures against an IAM user made at start."""

    bucket = "inbox-bucket"
    region = "us-east-1"

    def __init__(self, folder: Path, *, auth: bool = False) -> None:
        from .conftest import free_port

        self.folder = folder
        folder.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.auth = auth
        self.access_key, self.secret_key = "AKIDFILEDISPATCHTEST", "not-checked-secret-key"
        self.proc: subprocess.Popen[bytes] | None = None
        self.start()

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> None:
        import os
        import sys

        from .conftest import wait_until

        env = dict(os.environ)
        if self.auth:  # the first actions (user, key, policy, bucket) are made unchecked
            env["INITIAL_NO_AUTH_ACTION_COUNT"] = "4"
        server = Path(sys.executable).parent / "moto_server"
        with (self.folder / "moto.log").open("ab") as log:
            self.proc = subprocess.Popen(
                [str(server), "-H", "127.0.0.1", "-p", str(self.port)],
                stdout=log,
                stderr=subprocess.STDOUT,
                env=env,
            )
        wait_until(self._up, 30)
        if self.auth:
            iam = self.client("iam")
            iam.create_user(UserName="dispatch")
            key = iam.create_access_key(UserName="dispatch")["AccessKey"]
            self.access_key, self.secret_key = key["AccessKeyId"], key["SecretAccessKey"]
            iam.put_user_policy(
                UserName="dispatch",
                PolicyName="all-s3",
                PolicyDocument=(
                    '{"Version": "2012-10-17", "Statement": '
                    '[{"Effect": "Allow", "Action": "s3:*", "Resource": "*"}]}'
                ),
            )
        self.client().create_bucket(Bucket=self.bucket)

    def _up(self) -> bool:
        import socket

        assert self.proc is not None and self.proc.poll() is None, "moto_server exited"
        with socket.socket() as s:
            return s.connect_ex(("127.0.0.1", self.port)) == 0

    def client(self, service: str = "s3") -> Any:
        import boto3

        return boto3.client(
            service,
            endpoint_url=self.endpoint,
            region_name=self.region,
            aws_access_key_id=self.access_key,
            aws_secret_access_key=self.secret_key,
        )

    def dest(self, prefix: str = "", **options: Any) -> dict[str, Any]:
        """A destination mapping for this server, with its credentials."""
        return {
            "url": f"s3://{self.bucket}/{prefix}",
            "endpoint_url": self.endpoint,
            "region": self.region,
            "access_key_id": self.access_key,
            "secret_access_key": self.secret_key,
            **options,
        }

    def objects(self, prefix: str = "") -> dict[str, str]:
        """Every object under ``prefix``: key -> SHA-256 of its bytes."""
        s3, out = self.client(), {}
        for page in s3.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=prefix):
            for item in page.get("Contents", []):
                body = s3.get_object(Bucket=self.bucket, Key=item["Key"])["Body"]
                digest = hashlib.sha256()
                for chunk in iter(lambda b=body: b.read(1 << 20), b""):
                    digest.update(chunk)
                out[item["Key"]] = digest.hexdigest()
        return out

    def uploads(self) -> list[str]:
        """Keys of the multipart uploads begun and neither completed nor aborted."""
        found = self.client().list_multipart_uploads(Bucket=self.bucket)
        return [u["Key"] for u in found.get("Uploads", [])]

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(30)
        self.proc = None

    def restart(self) -> None:
        """A new server on the same port: every bucket and upload is gone, the bucket is
        made again."""
        self.stop()
        self.start()


def sha256_of(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        while data := f.read(1 << 20):
            h.update(data)
    return h.hexdigest()


# ------------------------------------------------------------------ configs and files

FAST_RETRY: dict[str, Any] = {"attempts": 3, "delay": 0.05, "jitter": False}


def remote_config(
    ws: dict[str, Path],
    *steps: Any,
    source: dict[str, Any] | None = None,
    file: str = "config.yml",
    **top: Any,
) -> Path:
    """A config watching ws["inbox"] with one rule sending every file through ``steps``."""
    import yaml

    src = {"path": str(ws["inbox"]), "name": "inbox", "settle": 0.05, **(source or {})}
    data = {
        "database": str(ws["db"]),
        "sources": [src],
        "rules": [{"name": "remote", "glob": "*", "to": list(steps)}],
        "api": {"enabled": False},
        "monitor": {"enabled": False},
        **top,
    }
    path = ws["root"] / file
    path.write_text(yaml.safe_dump(data, sort_keys=False), encoding="utf-8")
    return path


def old_file(path: Path, data: bytes | int) -> Path:
    """A complete file (its mtime in the past): bytes, or that many random bytes."""
    import os

    path.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(data, int):
        with path.open("wb") as f:
            left = data
            while left:
                n = min(left, 1 << 20)
                f.write(os.urandom(n))
                left -= n
    else:
        path.write_bytes(data)
    past = time.time() - 3600
    os.utime(path, (past, past))
    return path


def consumed_once(cfg: Path, inbox: Path, name: str, data: bytes) -> None:
    """``name`` (``data``) put in ``inbox`` and dispatched by ``filedispatch --once``, whose
    source deletes what it delivered: the run ends well and the file is gone."""
    old_file(inbox / name, data)
    result = run_cli("-c", cfg, "--once", timeout=90)
    assert result.returncode == 0, result.stderr
    assert not (inbox / name).exists()  # consumed


#: when ``resume``'s row 7 was planned (``StepContext.planned``): 2026-01-01 00:00:00.5 UTC
RESUMED_PLANNED = 1767225600.5


def resume(
    tmp_path: Path,
    step: dict[str, Any],
    data: bytes = b"the file",
    name: str = "a.txt",
    epoch: int | None = 5,
    journal: str = "",
) -> Any:
    """Resume row 7 (claim ``epoch``; of the journal whose token is ``journal``) delivering
    tmp_path/inbox/``name`` (``data``) through ``step``, as a worker does after a crash, a
    lost lease or any failed attempt (``started`` is kept: every retry is a resume); the
    outcome, or the exception the delivery raised."""
    import os

    from filedispatch.config import load_config
    from filedispatch.models import FileVersion
    from filedispatch.processors import StepContext

    ws = {"root": tmp_path, "inbox": tmp_path / "inbox", "db": tmp_path / "journal.db"}
    config = load_config(remote_config(ws, step))
    source = config.sources[0]
    src = old_file(ws["inbox"] / name, data)
    version = FileVersion.from_stat(source.key, source.path, name, os.stat(src))
    ctx = StepContext(
        7,
        version,
        src,
        "r",
        0,
        2,
        tmp_path / "work",
        resuming=True,
        epoch=epoch,
        journal=journal,
        planned=RESUMED_PLANNED,
    )

    try:
        return deliver_once(config.rules[0].to[0], ctx)
    except Exception as exc:
        return exc


def deliver_once(step: Any, ctx: Any) -> Any:
    """Deliver ``ctx`` (a StepContext) through ``step`` (a step of a loaded config) with a
    registry of its own, in a loop of its own, as one worker's attempt; the outcome (the
    delivery's exception is raised)."""
    from filedispatch.processors import Registry

    async def run() -> Any:
        registry = Registry()
        try:
            return await registry.get(step).deliver(ctx)
        finally:
            await registry.aclose()

    return asyncio.run(run())


def keep_idempotency_keys(receiver: HttpReceiver, path: str) -> list[str]:
    """Make ``receiver`` honour ``Idempotency-Key`` on ``path`` as the docs invite a receiver
    to: the first request with a key is stored, a repeat is answered 201 and dropped. Returns
    the keys of the dropped requests (filled in as they come)."""
    seen: set[str] = set()
    dropped: list[str] = []

    async def behave(request: web.Request, hits: int) -> web.StreamResponse | None:
        del hits
        key = request.headers.get("Idempotency-Key")
        if key is None or key not in seen:
            if key is not None:
                seen.add(key)
            return None  # stored by the receiver's own handler
        await request.read()
        dropped.append(key)
        return web.Response(status=201, text="already received")

    receiver.behave[path] = behave
    return dropped


def files_under(root: Path) -> dict[str, str]:
    """Every file below ``root`` (relative POSIX path) with its SHA-256."""
    return {p.relative_to(root).as_posix(): sha256_of(p) for p in root.rglob("*") if p.is_file()}


def fails_at_once(ws: dict[str, Path], dest: dict[str, Any]) -> tuple[dict[str, Any], str]:
    """Run ``--once`` with one destination that must fail on the first attempt, no retry.

    Returns the journal row and the service's stderr.
    """
    result = run_cli("-c", remote_config(ws, {"retry": FAST_RETRY, **dest}), "--once", timeout=60)
    assert result.returncode == 1, result.stderr
    (row,) = journal_rows(ws["db"])
    assert (row["status"], row["attempts"]) == ("FAILED", 1), row
    return row, result.stderr


def some_files(inbox: Path, n: int, size: int) -> list[Path]:
    """``n`` files of about ``size`` random bytes, plus one in a sub-folder."""
    files = [old_file(inbox / f"f{i}.dat", size + i) for i in range(n)]
    return [*files, old_file(inbox / "sub" / "deep.txt", b"deep")]


def self_signed(folder: Path) -> tuple[Path, Path]:
    """A certificate for 127.0.0.1 signed by itself (it is its own CA): (cert, key) PEM files."""
    import datetime
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "filedispatch test")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    folder.mkdir(parents=True, exist_ok=True)
    cert_path, key_path = folder / "cert.pem", folder / "key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return cert_path, key_path

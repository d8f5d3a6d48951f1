"""HTTP(S) destination: the file is streamed from disk as a raw body or a multipart form.

One aiohttp ClientSession serves the whole service. The file is never read whole, credentials
never travel in the request URL (so no aiohttp error can show them), and every failure is
translated here into a transient (retry) or permanent (fail now) delivery error.
"""

from __future__ import annotations

import asyncio
import email.utils
import json
import logging
import mimetypes
import os
import ssl
import time
from collections.abc import Callable
from pathlib import PurePosixPath
from typing import Any
from urllib.parse import quote, unquote, urlsplit

import aiohttp
from aiohttp import hdrs, payload
from multidict import CIMultiDict
from yarl import URL

from ..config import HttpDestination, redact_url
from ..errors import DeliveryError, PermanentDeliveryError, TransientDeliveryError
from ..models import Outcome
from . import Resources, StepContext
from .local import open_input, render_target
from .remote import copy_to

log = logging.getLogger(__name__)
SESSION_KEY = "http.session"
#: connections open at once over the shared session, in all and to one host
LIMIT, LIMIT_PER_HOST = 100, 32
_BODY_PEEK = 64 * 1024  #: bytes of an error answer read to quote its start
_EXPECT_BODY_MAX = 4 * 1024 * 1024  #: bytes of a success answer read to check ``expect``
_PATH_SAFE = "/:@!$&'()*+,;=~"  #: what a rendered URL path keeps unencoded (RFC 3986 pchar)


def create(step: HttpDestination, resources: Resources) -> HttpProcessor:
    return HttpProcessor(step, resources)


def shared_session(resources: Resources) -> aiohttp.ClientSession:
    """The service's one ClientSession, opened on first use and closed with the resources."""
    session: aiohttp.ClientSession | None = resources.items.get(SESSION_KEY)
    if session is None or session.closed:
        connector = aiohttp.TCPConnector(limit=LIMIT, limit_per_host=LIMIT_PER_HOST)
        # no total timeout: each request sets connect and read timeouts of its own
        session = aiohttp.ClientSession(
            connector=connector, timeout=aiohttp.ClientTimeout(total=None)
        )
        resources.items[SESSION_KEY] = session
        resources.closers.append(session.close)
    return session


class FileBody(payload.Payload):
    """A file streamed from an open descriptor, with a known size (so Content-Length works,
    for a raw body and inside a multipart form alike). Each chunk sent counts as progress."""

    def __init__(
        self,
        fd: int,
        st: os.stat_result,
        chunk: int,
        progress: Callable[[], None],
        content_type: str,
    ) -> None:
        super().__init__(None, content_type=content_type)
        self._fd, self._st, self._chunk, self._progress = fd, st, chunk, progress
        self._size = st.st_size
        self.error: DeliveryError | None = None  #: our own error, which aiohttp would wrap

    async def write(self, writer: Any) -> None:
        await self.write_with_length(writer, None)

    async def write_with_length(self, writer: Any, content_length: int | None) -> None:
        async def send(data: bytes | bytearray) -> None:
            await writer.write(data)
            self._progress()

        try:
            await copy_to(self._fd, self._st, send, self._chunk)
        except DeliveryError as exc:
            self.error = exc
            raise

    def decode(self, encoding: str = "utf-8", errors: str = "strict") -> str:
        raise TypeError("a file body is streamed, never decoded")


class _Stall:
    """The read timeout while sending: aiohttp only times reads, so a receiver that stops
    reading the body would otherwise hold the upload forever."""

    def __init__(self, idle: float) -> None:
        self.idle = idle
        self.loop = asyncio.get_running_loop()
        self.timeout: asyncio.Timeout | None = None

    def start(self, timeout: asyncio.Timeout, connect: float) -> None:
        self.timeout = timeout
        timeout.reschedule(self.loop.time() + connect + self.idle)

    def progress(self) -> None:
        if self.timeout is not None:
            self.timeout.reschedule(self.loop.time() + self.idle)

    def answered(self) -> None:
        """The answer came: aiohttp's sock_read applies from here."""
        timeout, self.timeout = self.timeout, None
        if timeout is not None:
            timeout.reschedule(None)


class HttpProcessor:
    """Uploads to one configured URL (its path may hold the naming template)."""

    def __init__(self, dest: HttpDestination, resources: Resources) -> None:
        self.dest = dest
        self.resources = resources
        parts = urlsplit(dest.url)
        self.auth = (
            aiohttp.BasicAuth(unquote(parts.username or ""), unquote(parts.password or ""))
            if parts.username or parts.password
            else None
        )
        host = parts.hostname or ""
        if ":" in host:
            host = f"[{host}]"
        netloc = f"{host}:{parts.port}" if parts.port else host
        self.base = f"{parts.scheme}://{netloc}"  # no credentials: errors may print it
        self.display_base = redact_url(f"{parts.scheme}://{parts.netloc}")
        self.path = unquote(parts.path) or "/"
        self.templated = "{" in self.path
        self.query = f"?{parts.query}" if parts.query else ""
        t = dest.http_timeout
        self.timeout = aiohttp.ClientTimeout(
            total=t.total, sock_connect=t.connect, sock_read=t.read
        )
        self.headers = CIMultiDict(dest.headers)
        if dest.token is not None:
            self.headers[hdrs.AUTHORIZATION] = f"Bearer {dest.token.get_secret_value()}"
        self._ssl: ssl.SSLContext | bool | None = None
        if not dest.verify and dest.parts.scheme.lower() == "https":
            log.warning(
                "%s: TLS certificate checking is OFF (verify: false): the server is not "
                "verified, and a man in the middle would get the files and credentials",
                dest.display,
            )

    async def aclose(self) -> None:
        return None  # the session belongs to the service's resources

    def _ssl_setting(self) -> ssl.SSLContext | bool:
        if self._ssl is None:
            if not self.dest.verify:
                self._ssl = False
            elif self.dest.ca_file is not None:
                try:
                    self._ssl = ssl.create_default_context(cafile=str(self.dest.ca_file))
                except (OSError, ssl.SSLError) as exc:
                    raise PermanentDeliveryError(
                        f"cannot load ca_file {self.dest.ca_file}: {exc}"
                    ) from exc
            else:
                self._ssl = True
        return self._ssl

    def _url(self, ctx: StepContext) -> str:
        """The request path: the URL's own, or its template rendered for this file."""
        if not self.templated:
            return quote(self.path, safe=_PATH_SAFE) + self.query
        rel = render_target(self.path.lstrip("/"), ctx)
        return "/" + quote(str(rel), safe=_PATH_SAFE) + self.query

    async def deliver(self, ctx: StepContext) -> Outcome:
        filename = str(render_target(self.dest.name, ctx))
        path = self._url(ctx)
        location = self.display_base + path
        sslsetting = self._ssl_setting()
        fd, st = open_input(ctx)
        try:
            return await self._send(ctx, fd, st, path, filename, location, sslsetting)
        finally:
            os.close(fd)

    async def _send(
        self,
        ctx: StepContext,
        fd: int,
        st: os.stat_result,
        path: str,
        filename: str,
        location: str,
        sslsetting: ssl.SSLContext | bool,
    ) -> Outcome:
        dest = self.dest
        session = shared_session(self.resources)
        headers = CIMultiDict(self.headers)
        headers.setdefault("Idempotency-Key", str(ctx.dispatch_id))
        ctype = mimetypes.guess_type(PurePosixPath(filename).name)[0] or "application/octet-stream"
        stall = _Stall(dest.http_timeout.read)
        body = FileBody(fd, st, dest.chunk_size, stall.progress, ctype)
        data: payload.Payload = body
        if dest.fieldname is not None:
            form = aiohttp.MultipartWriter("form-data")
            for key, value in dest.fields.items():
                form.append(value).set_content_disposition("form-data", name=key)
            # the file name as browsers send it: UTF-8, quoted, not percent-encoded
            body.set_content_disposition(
                "form-data", quote_fields=False, name=dest.fieldname, filename=filename
            )
            form.append_payload(body)
            data = form
        else:
            body.headers[hdrs.CONTENT_DISPOSITION] = attachment(filename)
        started = time.monotonic()
        try:
            async with asyncio.timeout(None) as deadline:
                stall.start(deadline, dest.http_timeout.connect)
                async with session.request(
                    dest.method,
                    URL(self.base + path, encoded=True),
                    data=data,
                    headers=headers,
                    auth=self.auth,
                    ssl=sslsetting,
                    timeout=self.timeout,
                    chunked=True if dest.chunked else None,
                    # a 301/302/303 would be followed as a GET without the file
                    allow_redirects=False,
                ) as resp:
                    stall.answered()
                    detail = await self._check(resp, location)
        except DeliveryError:
            raise
        except TimeoutError as exc:
            elapsed = time.monotonic() - started
            raise body.error or self._timed_out(exc, location, elapsed) from exc
        except aiohttp.ClientError as exc:
            raise body.error or _translate(exc, location) from exc
        finally:
            stall.timeout = None  # the writer may still report progress: it no longer counts
        return Outcome(location, detail=detail)

    def _timed_out(self, exc: BaseException, location: str, elapsed: float) -> DeliveryError:
        t = self.dest.http_timeout
        if isinstance(exc, aiohttp.ConnectionTimeoutError):
            what = f"could not connect within {t.connect:g}s"
        elif t.total is not None and elapsed >= t.total:
            what = f"not done within the total timeout of {t.total:g}s"
        else:
            what = f"nothing sent or received for {t.read:g}s"
        return TransientDeliveryError(f"{location}: timed out ({what})")

    async def _check(self, resp: aiohttp.ClientResponse, location: str) -> str:
        """The detail for the journal when the answer is a success, else the error to raise."""
        expect = self.dest.expect
        status = resp.status
        if status not in expect.status:
            start = _snippet(await resp.content.read(_BODY_PEEK))
            msg = f"{location}: HTTP {status} {resp.reason or ''}".rstrip()
            if 300 <= status < 400:
                msg += f": redirected to {resp.headers.get(hdrs.LOCATION, '?')}; use that URL"
            elif start:
                msg += f": {start}"
            if status in (408, 425, 429) or status >= 500:
                raise TransientDeliveryError(
                    msg, retry_after=retry_after(resp.headers.get(hdrs.RETRY_AFTER))
                )
            raise PermanentDeliveryError(msg)
        if expect.contains is None and expect.json_field is None:
            return f"HTTP {status}"
        raw = await resp.content.read(_EXPECT_BODY_MAX)
        text = raw.decode(resp.get_encoding() if resp.charset else "utf-8", "replace")
        if expect.contains is not None and expect.contains not in text:
            raise PermanentDeliveryError(
                f"{location}: HTTP {status} but the answer lacks {expect.contains!r}: "
                f"{_snippet(raw)}"
            )
        if expect.json_field is not None:
            problem = _json_problem(text, expect.json_field, expect.json_value)
            if problem:
                raise PermanentDeliveryError(
                    f"{location}: HTTP {status} but {problem}: {_snippet(raw)}"
                )
        return f"HTTP {status}"


def attachment(filename: str) -> str:
    """An RFC 6266 Content-Disposition for a raw body: an ASCII name, or UTF-8 ``filename*``."""
    name = PurePosixPath(filename).name
    if name.isascii() and name.isprintable():
        escaped = name.replace("\\", "\\\\").replace('"', '\\"')
        return f'attachment; filename="{escaped}"'
    fallback = name.encode("ascii", "replace").decode().replace('"', "_").replace("\\", "_")
    return f"attachment; filename=\"{fallback}\"; filename*=UTF-8''{quote(name, safe='')}"


def _snippet(raw: bytes, limit: int = 200) -> str:
    return " ".join(raw.decode("utf-8", "replace").split())[:limit]


def _json_problem(text: str, field: str, value: Any) -> str | None:
    try:
        node: Any = json.loads(text)
    except ValueError:
        return "the answer is not JSON"
    for key in field.split("."):
        if isinstance(node, dict) and key in node:
            node = node[key]
        elif isinstance(node, list) and key.isdigit() and int(key) < len(node):
            node = node[int(key)]
        else:
            return f"the answer has no field {field!r}"
    if value is None:
        return None if node else f"the field {field!r} is {node!r}"
    return None if node == value else f"the field {field!r} is {node!r}, not {value!r}"


def retry_after(value: str | None) -> float | None:
    """Seconds from a Retry-After header: a number, or an HTTP date."""
    if not value:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - time.time())


def _translate(exc: aiohttp.ClientError, location: str) -> DeliveryError:
    """aiohttp's errors in our tree; the request URL holds no credentials, so text is safe."""
    if isinstance(exc, aiohttp.ClientConnectorCertificateError):
        return PermanentDeliveryError(
            f"{location}: the server's TLS certificate is not trusted "
            f"({exc.certificate_error}); set ca_file, or verify: false"
        )
    if isinstance(exc, aiohttp.InvalidURL):
        return PermanentDeliveryError(f"{location}: not a valid URL")
    if isinstance(exc, aiohttp.ServerDisconnectedError):
        return TransientDeliveryError(f"{location}: the server closed the connection")
    text = str(exc) or type(exc).__name__
    return TransientDeliveryError(f"{location}: {text}")

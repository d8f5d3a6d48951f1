"""HTTP(S) destination: the file is streamed from disk as a raw body or a multipart form.

One aiohttp ClientSession serves the whole service. The file is never read whole, credentials
never travel in the request URL (so no aiohttp error can show them), and every failure is
translated here into a transient (retry) or permanent (fail now) delivery error.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import contextvars
import email.utils
import hashlib
import json
import logging
import mimetypes
import os
import ssl
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import PurePosixPath
from typing import TYPE_CHECKING, Any, ClassVar
from urllib.parse import quote, unquote, urlsplit

import aiohttp
from aiohttp import hdrs, payload
from multidict import CIMultiDict
from yarl import URL

from ..config import HttpDestination, redact_url
from ..errors import DeliveryError, NetworkError, PermanentDeliveryError, TransientDeliveryError
from ..models import Outcome
from . import Resources, StepContext, inputs
from .common import render_target
from .remote import copy_to

if TYPE_CHECKING:
    from ..controls import Throttle

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
            connector=connector,
            timeout=aiohttp.ClientTimeout(total=None),
            request_class=_Request,
        )
        resources.items[SESSION_KEY] = session
        resources.closers.append(session.close)
    return session


#: bodies from this size on ask ``Expect: 100-continue`` first (as curl does): a server that
#: refuses the upload (413, 401, 403) answers before the body is sent. Without it, a server
#: that answers and closes while the body is still coming resets the connection, and TCP
#: discards its answer with it
EXPECT_FROM = 1024 * 1024
#: seconds to wait for ``100 Continue`` before sending the body anyway (curl waits 1 s):
#: a server that ignores ``Expect`` still gets the file
CONTINUE_WAIT = 1.0


class _Request(aiohttp.ClientRequest):
    """aiohttp's request, waiting at most CONTINUE_WAIT for ``100 Continue`` (aiohttp itself
    waits for ever, and a server that ignores ``Expect`` would never get the body)."""

    async def write_bytes(self, writer: Any, conn: Any, content_length: int | None = None) -> None:
        try:
            waiter: asyncio.Future[bool] | None = self._continue
            if waiter is not None and not waiter.done():
                writer.send_headers()
                await writer.drain()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(asyncio.shield(waiter), CONTINUE_WAIT)
                self._continue = None  # from here aiohttp writes the body at once
            await super().write_bytes(writer, conn, content_length)
        finally:  # however it ends (aiohttp cancels it once the answer is complete)
            body = _SENDING.get(None)
            if body is not None:
                body.ended.set()


#: the file body the request being made in this task sends (seen by its writer task)
_SENDING: contextvars.ContextVar[FileBody] = contextvars.ContextVar("sending")


class FileBody(payload.Payload):
    """A file streamed from an open descriptor, with a known size (so Content-Length works,
    for a raw body and inside a multipart form alike). Each chunk sent counts as progress.

    ``data``: the whole file, already read (``inputs.Source.data``, its identity checked
    after the read): sent in one write, with no streaming."""

    def __init__(
        self,
        fd: int,
        st: os.stat_result,
        chunk: int,
        progress: Callable[[], None],
        content_type: str,
        throttle: Throttle | None = None,
        data: bytes | bytearray | None = None,
        fence: Callable[[], None] | None = None,
    ) -> None:
        super().__init__(None, content_type=content_type)
        self._fd, self._st, self._chunk, self._progress = fd, st, chunk, progress
        self._throttle = throttle
        self._fence = fence
        self._size = st.st_size
        self._data = data
        self.error: DeliveryError | None = None  #: our own error, which aiohttp would wrap
        #: of every byte sent, fed as they are read
        self.digest = hashlib.sha256() if data is None else hashlib.sha256(data)
        self.ended = asyncio.Event()  #: the request's writer ended, sent all or not
        self.complete = False  #: every byte of the file was handed to the connection

    async def write(self, writer: Any) -> None:
        await self.write_with_length(writer, None)

    async def write_with_length(self, writer: Any, content_length: int | None) -> None:
        handed = 0

        async def send(data: bytes | bytearray) -> None:
            nonlocal handed
            # aiohttp's writer takes the bytes into the transport at once and only then may
            # wait for it to drain: counted before the await, they count even if that wait
            # is cancelled
            handed += len(data)
            await writer.write(data)
            self._progress()

        try:
            if self._data is not None:  # read already (and its identity checked): one write
                if self._throttle is not None:
                    await self._throttle.take(len(self._data))
                if self._fence is not None:
                    self._fence()
                await send(self._data)
            else:
                self.digest = hashlib.sha256()  # of this sending only
                await copy_to(
                    self._fd,
                    self._st,
                    send,
                    self._chunk,
                    self.digest,
                    self._throttle,
                    self._fence,
                )
            self.complete = True
        except DeliveryError as exc:
            self.error = exc
            raise
        except asyncio.CancelledError:
            # aiohttp cancels the writer once the answer is complete: a server that read the
            # whole body may answer while the last chunk's drain is still awaited
            self.complete = handed == self._size
            raise

    async def sent_whole(self, wait: float) -> bool:
        """Whether the whole file went out; a success answer may come a moment before the
        writer has finished, so its end is awaited (at most ``wait`` seconds)."""
        if not self.ended.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.ended.wait(), wait)
        return self.complete

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

    paces: ClassVar[bool] = True  #: the body pays ``ctx.throttle`` per chunk (FileBody)

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
        if not dest.tls_verify and dest.parts.scheme.lower() == "https":
            log.warning(
                "%s: TLS certificate checking is OFF (tls_verify: false): the server is not "
                "verified, and a man in the middle would get the files and credentials",
                dest.display,
            )

    async def aclose(self) -> None:
        return None  # the session belongs to the service's resources

    def _ssl_setting(self) -> ssl.SSLContext | bool:
        if self._ssl is None:
            if not self.dest.tls_verify:
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
        rel = render_target(self.path.lstrip("/"), ctx, self.dest.naming)
        # the rendered names may hold anything a file name can: all but "/" and the
        # unreserved characters is percent-encoded (bytes that are not UTF-8 as they are)
        return "/" + quote(os.fsencode(str(rel)), safe="/~") + self.query

    async def deliver(self, ctx: StepContext) -> Outcome:
        filename = str(render_target(self.dest.name, ctx, self.dest.naming))
        path = self._url(ctx)
        location = self.display_base + path
        sslsetting = self._ssl_setting()
        async with inputs.opened(ctx) as source:
            return await self._send(ctx, source, path, filename, location, sslsetting)

    async def _send(
        self,
        ctx: StepContext,
        source: inputs.Source,
        path: str,
        filename: str,
        location: str,
        sslsetting: ssl.SSLContext | bool,
    ) -> Outcome:
        dest = self.dest
        session = shared_session(self.resources)
        headers = CIMultiDict(self.headers)
        headers.setdefault("Idempotency-Key", ctx.delivery_id)
        ctype = mimetypes.guess_type(PurePosixPath(filename).name)[0] or "application/octet-stream"
        stall = _Stall(dest.http_timeout.read)
        whole = None
        throttle = ctx.throttle
        fd, st = source.fd, source.st
        if (
            source.data is not None
            and st.st_size <= dest.chunk_size
            and (throttle is None or st.st_size <= throttle.chunk)
        ):
            whole = source.data  # a small file, read in its open's thread: one write
        body = FileBody(fd, st, dest.chunk_size, stall.progress, ctype, throttle, whole, ctx.fence)
        data: payload.Payload = body
        if dest.fieldname is not None:
            form = aiohttp.MultipartWriter("form-data")
            for key, value in dest.fields.items():
                form.append(value).set_content_disposition("form-data", name=key)
            body.headers[hdrs.CONTENT_DISPOSITION] = form_data(dest.fieldname, filename)
            form.append_payload(body)
            data = form
        else:
            body.headers[hdrs.CONTENT_DISPOSITION] = attachment(filename)
        if st.st_size >= EXPECT_FROM:
            headers.setdefault(hdrs.EXPECT, "100-continue")
        started = time.monotonic()
        _SENDING.set(body)
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
                    detail = await self._check(resp, location, body)
        except DeliveryError:
            raise
        except TimeoutError as exc:
            elapsed = time.monotonic() - started
            raise body.error or self._timed_out(exc, location, elapsed) from exc
        except aiohttp.ClientError as exc:
            raise body.error or _translate(exc, location) from exc
        finally:
            stall.timeout = None  # the writer may still report progress: it no longer counts
        return Outcome(location, detail=detail, sha256=body.digest.hexdigest())

    def _verify(self, echoed: Echo, location: str, status: int) -> None:
        """``verify`` against what the server echoed: a mismatch is transient (sent again);
        ``size`` with nothing echoed passes (an HTTP server need not echo anything), and
        ``sha256`` with no digest echoed is permanent (no retry can make the server tell)."""
        mode = self.dest.verify
        if mode == "none":
            return
        problem = echoed.mismatch()
        if problem:
            raise TransientDeliveryError(f"{location}: HTTP {status} but verify: {problem}")
        if mode == "sha256" and echoed.sha256 is None:
            raise PermanentDeliveryError(
                f"{location}: HTTP {status} but verify: sha256 needs the server to echo the "
                "digest (a Repr-Digest header, or expect.sha256_field)"
            )

    def _timed_out(self, exc: BaseException, location: str, elapsed: float) -> DeliveryError:
        t = self.dest.http_timeout
        if isinstance(exc, aiohttp.ConnectionTimeoutError):
            what = f"could not connect within {t.connect:g}s"
        elif t.total is not None and elapsed >= t.total:
            what = f"not done within the total timeout of {t.total:g}s"
        else:
            what = f"nothing sent or received for {t.read:g}s"
        return NetworkError(f"{location}: timed out ({what})")

    async def _check(self, resp: aiohttp.ClientResponse, location: str, body: FileBody) -> str:
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
        if not await body.sent_whole(self.dest.http_timeout.read):
            # a success for a file the server did not wait for is no delivery
            raise TransientDeliveryError(
                f"{location}: HTTP {status} came before the whole file was sent"
            )
        echoed = Echo(body.size or 0, body.digest.hexdigest(), _repr_digest(resp.headers))
        fields = (expect.json_field, expect.size_field, expect.sha256_field)
        if expect.contains is None and fields == (None, None, None):
            self._verify(echoed, location, status)
            return f"HTTP {status}"
        raw = await resp.content.read(_EXPECT_BODY_MAX)
        text = raw.decode(resp.get_encoding() if resp.charset else "utf-8", "replace")
        if expect.size_field is not None or expect.sha256_field is not None:
            echoed.read_json(text, expect.size_field, expect.sha256_field)
        self._verify(echoed, location, status)
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


#: RFC 8187 attr-char: what ``filename*`` keeps as it is
_ATTR_CHAR = "!#$&+-.^_`|~"


def _plain(name: str) -> bool:
    """A name any receiver reads the same in a quoted ``filename=``: printable ASCII, without
    the characters parsers treat differently (quote, backslash, percent, semicolon)."""
    return name.isascii() and name.isprintable() and not any(c in name for c in '"\\%;')


def _extended(name: str) -> str:
    """``filename*`` (RFC 8187): UTF-8, percent-encoded; bytes that are not UTF-8 as they are."""
    return "filename*=UTF-8''" + quote(os.fsencode(name), safe=_ATTR_CHAR)


def attachment(filename: str) -> str:
    """An RFC 6266 Content-Disposition for a raw body: a plain name as it is; any other with
    an ASCII fallback ``filename=`` and the exact name in ``filename*``. Never a control
    character in the header, whatever the name holds."""
    name = PurePosixPath(filename).name
    if _plain(name):
        return f'attachment; filename="{name}"'
    fallback = "".join(c if _plain(c) else "_" for c in name)
    return f'attachment; filename="{fallback}"; {_extended(name)}'


def form_data(field: str, filename: str) -> str:
    """The Content-Disposition of the file part of a form: the name as browsers send it
    (UTF-8; quote, CR and LF as %22, %0D, %0A: WHATWG HTML), and, when the name is not
    plain, the exact name in ``filename*`` too, which receivers such as aiohttp prefer."""
    name = PurePosixPath(filename).name
    text = name.encode("utf-8", "surrogateescape").decode("utf-8", "replace")
    head = f'form-data; name="{_browser(field)}"; filename="{_browser(text)}"'
    return head if _plain(name) else f"{head}; {_extended(name)}"


def _browser(text: str) -> str:
    """A quoted-string value as browsers write one in a form: a quote and what is not
    printable (CR, LF ...) percent-encoded, the rest as it is."""
    return "".join(c if c.isprintable() and c != '"' else quote(c, safe="") for c in text)


@dataclass
class Echo:
    """What was sent, and what the server said it received (None where it said nothing)."""

    sent_size: int
    sent_sha256: str
    sha256: str | None = None
    size: int | None = None

    def read_json(self, text: str, size_field: str | None, sha256_field: str | None) -> None:
        try:
            node = json.loads(text)
        except ValueError:
            return
        if size_field is not None:
            found = _field(node, size_field)
            self.size = found if isinstance(found, int) else None
        if sha256_field is not None:
            found = _field(node, sha256_field)
            self.sha256 = found.lower() if isinstance(found, str) else self.sha256

    def mismatch(self) -> str | None:
        if self.size is not None and self.size != self.sent_size:
            return f"the server received {self.size} bytes of {self.sent_size} sent"
        if self.sha256 is not None and self.sha256 != self.sent_sha256:
            return f"the server received SHA-256 {self.sha256}, not {self.sent_sha256}"
        return None


def _repr_digest(headers: Any) -> str | None:
    """The hex SHA-256 in a ``Repr-Digest: sha-256=:<base64>:`` header (RFC 9530), if any."""
    for value in headers.getall("Repr-Digest", ()):
        for item in value.split(","):
            key, _, encoded = item.strip().partition("=")
            if key.strip().lower() == "sha-256" and encoded.startswith(":"):
                try:
                    return base64.b64decode(encoded.strip(":"), validate=True).hex()
                except (ValueError, binascii.Error):
                    return None
    return None


_MISSING = object()


def _field(node: Any, field: str, missing: Any = None) -> Any:
    """The value at a dotted path in parsed JSON (list items by index); ``missing`` if none."""
    for key in field.split("."):
        if isinstance(node, dict) and key in node:
            node = node[key]
        elif isinstance(node, list) and key.isdigit() and int(key) < len(node):
            node = node[int(key)]
        else:
            return missing
    return node


def _snippet(raw: bytes, limit: int = 200) -> str:
    return " ".join(raw.decode("utf-8", "replace").split())[:limit]


def _json_problem(text: str, field: str, value: Any) -> str | None:
    try:
        node: Any = json.loads(text)
    except ValueError:
        return "the answer is not JSON"
    node = _field(node, field, _MISSING)
    if node is _MISSING:
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
            f"({exc.certificate_error}); set ca_file, or tls_verify: false"
        )
    if isinstance(exc, aiohttp.InvalidURL):
        return PermanentDeliveryError(f"{location}: not a valid URL")
    if isinstance(exc, aiohttp.ServerDisconnectedError):
        return NetworkError(f"{location}: the server closed the connection")
    if isinstance(exc, aiohttp.ClientConnectorError):  # no name, refused, unreachable
        return NetworkError.from_os_error(location, exc.os_error, "Cannot connect")
    if isinstance(exc, aiohttp.ClientOSError):  # reset, broken pipe
        return NetworkError.from_os_error(location, exc)
    return TransientDeliveryError(f"{location}: {str(exc) or type(exc).__name__}")

"""FTP and FTPS (explicit TLS) destination, with aioftp: passive mode, a few pooled logins per
server, and every upload written to a hidden temporary name, then renamed (see remote.py).

aioftp has no timeouts by default and its ``upload()`` writes straight to the final name: this
module always sets the timeouts and streams to the temporary name itself. No aioftp error
leaves this module untranslated.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import ssl
from pathlib import PurePosixPath
from typing import Any, ClassVar

import aioftp

from ..config import FtpDestination
from ..errors import DeliveryError, NetworkError, PermanentDeliveryError, TransientDeliveryError
from . import Resources, StepContext, inputs
from .remote import CHUNK, RemoteProcessor, send_source

log = logging.getLogger(__name__)


def create(step: FtpDestination, resources: Resources) -> FtpProcessor:
    return FtpProcessor(step, resources)


class _Client(aioftp.Client):
    """aioftp's client, sending ``TYPE I`` once per login rather than before every transfer
    (one round trip in seven for a small file)."""

    binary = False

    async def command(  # type: ignore[override]
        self,
        command: str | None = None,
        expected_codes: str | tuple[str, ...] = (),
        wait_codes: str | tuple[str, ...] = (),
        censor_after: int | None = None,
    ) -> tuple[aioftp.Code, list[str]] | None:
        if command == "TYPE I" and self.binary:
            return aioftp.Code("200"), []
        result = await super().command(command, expected_codes, wait_codes, censor_after)
        if command == "TYPE I":
            self.binary = True
        return result

    # A folder we list may hold anyone's names: one the server sends in another encoding than
    # UTF-8 (an old client's Latin-1), or a line no parser reads (a name with a line break in
    # a LIST answer, a header like ``total 8``). aioftp raises on such a line, which would end
    # the listing half read and the delivery with it (every retry alike). Such a line is none
    # of ours (we send UTF-8 names without line breaks): it is passed over, as aioftp passes
    # over ``.`` and ``..``.

    #
    # aioftp also strips every blank from the end of a line, and so from a name that ends in
    # one (``a.txt ``): such a name is given back its blanks (``_blanks``).

    def parse_mlsx_line(self, b: bytes | str) -> tuple[PurePosixPath, Any]:
        try:
            return _blanks(b, self.encoding, *super().parse_mlsx_line(b), listed=False)
        except ValueError:  # UnicodeDecodeError among them
            return PurePosixPath("."), {"type": "unreadable"}

    def parse_list_line(self, b: bytes) -> tuple[PurePosixPath, Any]:
        try:
            return _blanks(b, self.encoding, *super().parse_list_line(b))
        except ValueError:
            return PurePosixPath("."), {"type": "unreadable"}


def _blanks(
    line: bytes | str, encoding: str, path: PurePosixPath, info: Any, listed: bool = True
) -> tuple[PurePosixPath, Any]:
    """``(path, info)`` of a listing line, the name given back the blanks aioftp stripped from
    the line's end. In a ``LIST`` line (``listed``) a link's ``name -> target`` keeps them on
    the target: left as it is; an MLSD line has no such form, so there a name holding
    `` -> `` is a name like any other."""
    text = line.decode(encoding) if isinstance(line, bytes) else line
    text = text.rstrip("\r\n")
    blanks = text[len(text.rstrip()) :]
    if blanks and info.get("type") != "link" and not (listed and " -> " in text):
        path = PurePosixPath(str(path) + blanks)
    return path, info


class FtpProcessor(RemoteProcessor[aioftp.Client]):
    """Delivers into one folder of one FTP server."""

    kind = "ftp"
    default_port = 21
    refusals: ClassVar[tuple[type[Exception], ...]] = (aioftp.StatusCodeError,)
    salted = True  # STOR cannot create exclusively: a name no one knows in advance instead

    def __init__(self, dest: FtpDestination, resources: Resources) -> None:
        super().__init__(dest, resources)
        self.ftp = dest
        self.tls = dest.parts.scheme.lower() == "ftps"
        if self.tls and not dest.tls_verify:
            log.warning(
                "%s: TLS certificate checking is OFF (tls_verify: false): the server is not "
                "verified, and a man in the middle would get the files and credentials",
                self.target.display,
            )

    def _ssl_context(self) -> ssl.SSLContext:
        cafile = str(self.ftp.ca_file) if self.ftp.ca_file is not None else None
        try:
            context = ssl.create_default_context(cafile=cafile)
        except (OSError, ssl.SSLError) as exc:
            raise PermanentDeliveryError(f"cannot load ca_file {cafile}: {exc}") from exc
        if not self.ftp.tls_verify:
            context.check_hostname = False
            context.verify_mode = ssl.CERT_NONE
        return context

    async def connect(self) -> aioftp.Client:
        dest, target = self.ftp, self.target
        client = _Client(
            socket_timeout=dest.socket_timeout,
            connection_timeout=dest.connect_timeout,
            path_timeout=dest.socket_timeout,
            passive_commands=("epsv", "pasv"),
        )
        try:
            await client.connect(target.host, target.port)
            if self.tls:  # AUTH TLS, then PBSZ 0 and PROT P: the data connections too
                await client.upgrade_to_tls(self._ssl_context())
            try:
                await client.login(target.user or "anonymous", target.password)
            except aioftp.StatusCodeError as exc:
                raise PermanentDeliveryError(
                    f"{target.display}: login refused ({_codes(exc)}): check the user and password"
                ) from exc
        except BaseException:
            client.close()
            raise
        return client

    async def disconnect(self, conn: aioftp.Client) -> None:
        try:
            await asyncio.wait_for(conn.quit(), 2)
        finally:
            conn.close()

    async def mkdir(self, conn: aioftp.Client, folder: PurePosixPath) -> None:
        await conn.command(f"MKD {folder}", "257")

    async def is_dir(self, conn: aioftp.Client, path: PurePosixPath) -> bool:
        try:
            return bool(await conn.is_dir(path))
        except aioftp.StatusCodeError:
            return False

    async def upload(
        self,
        conn: aioftp.Client,
        source: inputs.Source,
        path: PurePosixPath,
        digest: Any,
        ctx: StepContext,
        fresh: bool = False,
    ) -> None:
        # FTP has no exclusive create (``fresh`` cannot be asked for): STOR opens what is
        # there, as the server does; the name is salted instead (docs/integrity.md, 5)
        async with conn.upload_stream(path) as stream:
            try:
                await send_source(source, stream.write, digest, ctx)
            except OSError as exc:
                # The server closed the data connection mid-file (a quota, a full disk): its
                # reason is the reply on the control connection, classified by its code.
                refusal = await self._reply(conn)
                if refusal is not None:
                    raise refusal from exc
                raise

    async def _reply(self, conn: aioftp.Client) -> DeliveryError | None:
        """The server's reply to a transfer it broke off, in our tree; None if none comes."""
        try:
            code, info = await asyncio.wait_for(conn.parse_response(), self.ftp.socket_timeout)
        except (OSError, TimeoutError, aioftp.AIOFTPException, ValueError):
            return None
        if code.matches("2xx") or code.matches("1xx"):
            return None
        return self.translate(aioftp.StatusCodeError(aioftp.Code("2xx"), code, info))

    async def exists(self, conn: aioftp.Client, path: PurePosixPath) -> bool:
        # One MLST. aioftp's ``exists`` lists the whole folder when a file is missing (the
        # common case here): a data connection per file, and a listing that grows.
        try:
            await conn.command(f"MLST {path}", "2xx")
            return True
        except aioftp.StatusCodeError as exc:
            if exc.received_codes[-1].matches("550"):
                return False
            if exc.received_codes[-1].matches("50x"):  # no MLST on this server: LIST
                return bool(await conn.exists(path))
            raise

    async def size(self, conn: aioftp.Client, path: PurePosixPath) -> int | None:
        # SIZE (RFC 3659) first: one line; a server without it is asked by MLST, then LIST
        try:
            await conn.command("TYPE I", "200")  # SIZE counts bytes in binary mode only
            _, info = await conn.command(f"SIZE {path}", "213")
            return int(info[-1].split()[-1])
        except aioftp.StatusCodeError as exc:
            if not exc.received_codes[-1].matches("50x"):
                return None
        except (ValueError, IndexError):
            pass
        try:
            stat = await conn.stat(path)
        except aioftp.StatusCodeError:
            return None
        return int(stat.get("size", -1)) if stat.get("type") == "file" else -1

    async def sha256(self, conn: aioftp.Client, path: PurePosixPath) -> str:
        command = await self._hash_command(conn)
        if command is None:
            raise PermanentDeliveryError(
                f"{self.target.display}: verify: sha256 needs the server's HASH (SHA-256) or "
                "XSHA256 command, and FEAT lists neither; use verify: size"
            )
        _, info = await conn.command(f"{command} {path}", "213")
        # "213 SHA-256 0-1234 <hex> name" (HASH) or "213 <hex>" (XSHA256)
        for word in info[-1].split():
            if len(word) == 64 and all(c in "0123456789abcdefABCDEF" for c in word):
                return word
        raise PermanentDeliveryError(
            f"{self.target.display}: verify: cannot read a SHA-256 in {info[-1]!r}"
        )

    async def read_sha256(self, conn: aioftp.Client, path: PurePosixPath) -> str:
        if await self._hash_command(conn) is not None:
            return await self.sha256(conn, path)
        digest = hashlib.sha256()  # no HASH on this server: read the file back (RETR)
        async with conn.download_stream(path) as stream:
            async for block in stream.iter_by_block(CHUNK):
                digest.update(block)
        return digest.hexdigest()

    async def _hash_command(self, conn: aioftp.Client) -> str | None:
        """HASH (draft-bryan-ftpext-hash, set to SHA-256) or XSHA256, if FEAT lists one."""
        if not hasattr(conn, "hash_command"):
            features = await feature_lines(conn)
            command: str | None = None
            if any(f.startswith("HASH") and "SHA-256" in f for f in features):
                await conn.command("OPTS HASH SHA-256", "200")
                command = "HASH"
            elif any(f.split()[:1] == ["XSHA256"] for f in features):
                command = "XSHA256"
            conn.hash_command = command  # type: ignore[attr-defined]
        found: str | None = conn.hash_command  # type: ignore[attr-defined]
        return found

    async def rename(
        self, conn: aioftp.Client, src: PurePosixPath, dst: PurePosixPath, overwrite: bool
    ) -> None:
        del overwrite  # RNTO replaces an existing file on the servers that allow it
        await conn.rename(src, dst)

    async def delete(self, conn: aioftp.Client, path: PurePosixPath) -> None:
        await conn.remove_file(path)

    async def remove(self, conn: aioftp.Client, path: PurePosixPath) -> None:
        try:
            await conn.remove_file(path)
        except (aioftp.StatusCodeError, OSError, TimeoutError):
            pass

    async def listdir(self, conn: aioftp.Client, folder: PurePosixPath) -> list[str]:
        # MLSD lists hidden names. A server without it is asked ``LIST -a``: vsftpd and
        # pure-ftpd leave names that begin with a dot (every temporary name of ours) out of a
        # plain LIST; a server that refuses the option is asked plain LIST. A refusal of that
        # too (no such folder yet, no right to list) lists nothing
        try:
            return [path.name for path, _info in await conn.list(folder, raw_command="MLSD")]
        except aioftp.StatusCodeError as exc:
            if not exc.received_codes[-1].matches("50x"):
                return []
        try:
            return await self._list_all(conn, folder)
        except aioftp.StatusCodeError:
            pass
        try:
            return [path.name for path, _info in await conn.list(folder, raw_command="LIST")]
        except aioftp.StatusCodeError:
            return []

    async def _list_all(self, conn: aioftp.Client, folder: PurePosixPath) -> list[str]:
        """The names ``LIST -a`` gives for ``folder`` (``.`` and ``..`` left out)."""
        names: list[str] = []
        async with conn.get_stream(f"LIST -a {folder}", "1xx") as stream:
            while line := await stream.readline():
                path, _info = conn.parse_list_line(line)
                if str(path) not in (".", ".."):
                    names.append(path.name)
        return names

    def check_name(self, path: PurePosixPath) -> None:
        text = str(path)
        if "\r" in text or "\n" in text or "\0" in text:
            # RFC 959: a command ends at CRLF, so such a name would end it early (and the
            # rest would be read as a command of its own)
            raise PermanentDeliveryError(
                f"{self.target.display}: FTP cannot carry a name with a line break or NUL "
                f"({text!r}); rename the file or use a naming template without it"
            )
        try:
            text.encode("utf-8")
        except UnicodeEncodeError:
            raise PermanentDeliveryError(
                f"{self.target.display}: the name {text!r} is not valid UTF-8, which FTP "
                "names are sent as"
            ) from None

    def translate(self, exc: Exception) -> DeliveryError | None:
        display = self.target.display
        if isinstance(exc, aioftp.StatusCodeError):
            text = f"{display}: the server refused ({_codes(exc)})"
            if any(str(c).startswith("4") for c in exc.received_codes):
                return TransientDeliveryError(text)
            return PermanentDeliveryError(text)
        if isinstance(exc, ssl.SSLCertVerificationError):
            return PermanentDeliveryError(
                f"{display}: the server's TLS certificate is not trusted "
                f"({exc.verify_message}); set ca_file, or tls_verify: false"
            )
        if isinstance(exc, TimeoutError):
            return NetworkError(f"{display}: timed out")
        if isinstance(exc, OSError):
            return NetworkError.from_os_error(display, exc)
        if isinstance(exc, EOFError):
            return NetworkError(f"{display}: the server closed the connection")
        return None


async def sha256_problem(step: FtpDestination) -> str | None:
    """For ``check``: why ``verify: sha256`` cannot work with this server (it has neither
    HASH nor XSHA256, or cannot be reached), or None when it can."""
    resources = Resources()
    proc = FtpProcessor(step, resources)
    try:
        async with proc.pool.connection() as conn:
            command = await proc._hash_command(conn)
    except Exception as exc:
        error = exc if isinstance(exc, DeliveryError) else proc.translate(exc)
        return f"{step.display}: cannot ask the server its features ({error or exc!r})"
    finally:
        await resources.aclose()
    if command is None:
        return (
            f"{step.display}: verify: sha256 needs the server's HASH (SHA-256) or XSHA256 "
            "command, and its FEAT lists neither; use verify: size"
        )
    return None


async def feature_lines(conn: aioftp.Client) -> list[str]:
    """The server's FEAT answer, one feature a line, upper-case (RFC 2389); [] without FEAT."""
    try:
        _, info = await conn.command("FEAT", "211")
    except aioftp.StatusCodeError:
        return []
    return [line.strip().upper() for line in info[1:-1] if line.strip()]


def _codes(exc: aioftp.StatusCodeError) -> str:
    info = " ".join(str(line).strip() for line in (exc.info or []))
    codes = ",".join(str(c) for c in exc.received_codes)
    return f"{codes} {info}".strip()

"""FTP and FTPS (explicit TLS) destination, with aioftp: passive mode, a few pooled logins per
server, and every upload written to a hidden temporary name, then renamed (see remote.py).

aioftp has no timeouts by default and its ``upload()`` writes straight to the final name: this
module always sets the timeouts and streams to the temporary name itself. No aioftp error
leaves this module untranslated.
"""

from __future__ import annotations

import asyncio
import logging
import os
import ssl
from pathlib import PurePosixPath
from typing import ClassVar

import aioftp

from ..config import FtpDestination
from ..errors import DeliveryError, PermanentDeliveryError, TransientDeliveryError
from . import Resources
from .remote import RemoteProcessor, copy_to

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


class FtpProcessor(RemoteProcessor[aioftp.Client]):
    """Delivers into one folder of one FTP server."""

    kind = "ftp"
    default_port = 21
    refusals: ClassVar[tuple[type[Exception], ...]] = (aioftp.StatusCodeError,)

    def __init__(self, dest: FtpDestination, resources: Resources) -> None:
        super().__init__(dest, resources)
        self.ftp = dest
        self.tls = dest.parts.scheme.lower() == "ftps"
        if self.tls and not dest.verify:
            log.warning(
                "%s: TLS certificate checking is OFF (verify: false): the server is not "
                "verified, and a man in the middle would get the files and credentials",
                self.target.display,
            )

    def _ssl_context(self) -> ssl.SSLContext:
        cafile = str(self.ftp.ca_file) if self.ftp.ca_file is not None else None
        try:
            context = ssl.create_default_context(cafile=cafile)
        except (OSError, ssl.SSLError) as exc:
            raise PermanentDeliveryError(f"cannot load ca_file {cafile}: {exc}") from exc
        if not self.ftp.verify:
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

    async def makedirs(self, conn: aioftp.Client, folder: PurePosixPath) -> None:
        try:
            await conn.make_directory(folder)
        except aioftp.StatusCodeError:
            if not await conn.is_dir(folder):  # else another connection just made it
                raise

    async def upload(
        self, conn: aioftp.Client, fd: int, st: os.stat_result, path: PurePosixPath
    ) -> None:
        async with conn.upload_stream(path) as stream:
            await copy_to(fd, st, stream.write)

    async def exists(self, conn: aioftp.Client, path: PurePosixPath) -> bool:
        # One MLST. aioftp's ``exists`` lists the whole folder when a file is missing (the
        # common case here): a data connection per file, and a listing that grows.
        try:
            await conn.command(f"MLST {path}", "2xx")
            return True
        except aioftp.StatusCodeError as exc:
            if exc.received_codes[-1].matches("550"):
                return False
            if exc.received_codes[-1].matches("50x"):  # no MLST on this server
                return await conn.exists(path)
            raise

    async def size(self, conn: aioftp.Client, path: PurePosixPath) -> int | None:
        try:
            info = await conn.stat(path)
        except aioftp.StatusCodeError:
            return None
        return int(info.get("size", -1)) if info.get("type") == "file" else -1

    async def rename(
        self, conn: aioftp.Client, src: PurePosixPath, dst: PurePosixPath, overwrite: bool
    ) -> None:
        del overwrite  # RNTO replaces an existing file on the servers that allow it
        await conn.rename(src, dst)

    async def remove(self, conn: aioftp.Client, path: PurePosixPath) -> None:
        try:
            await conn.remove_file(path)
        except (aioftp.StatusCodeError, OSError, TimeoutError):
            pass

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
                f"({exc.verify_message}); set ca_file, or verify: false"
            )
        if isinstance(exc, TimeoutError):
            return TransientDeliveryError(f"{display}: timed out")
        if isinstance(exc, (OSError, EOFError)):
            return TransientDeliveryError(f"{display}: {exc or type(exc).__name__}")
        return None


def _codes(exc: aioftp.StatusCodeError) -> str:
    info = " ".join(str(line).strip() for line in (exc.info or []))
    codes = ",".join(str(c) for c in exc.received_codes)
    return f"{codes} {info}".strip()

"""SFTP destination, with asyncssh: host keys checked against known_hosts, password or key
authentication, pooled connections, and every upload written to a temporary name, then renamed
(see remote.py).

Turning host key checking off must be explicit and is logged as a warning; no asyncssh error
leaves this module untranslated, and none carries a password.
"""

from __future__ import annotations

import hashlib
import logging
import os
from dataclasses import dataclass
from pathlib import PurePosixPath
from typing import Any, ClassVar

import asyncssh

from ..config import SftpDestination
from ..errors import (
    DeliveryError,
    NetworkError,
    PermanentDeliveryError,
    TempNameTakenError,
    TransientDeliveryError,
)
from . import Resources, StepContext, inputs
from .remote import CHUNK, RemoteProcessor, send_source

log = logging.getLogger(__name__)


def create(step: SftpDestination, resources: Resources) -> SftpProcessor:
    return SftpProcessor(step, resources)


@dataclass
class Session:
    """One SSH connection and the SFTP channel opened on it."""

    conn: asyncssh.SSHClientConnection
    sftp: asyncssh.SFTPClient


class SftpProcessor(RemoteProcessor[Session]):
    """Delivers into one folder of one SSH server."""

    kind = "sftp"
    default_port = 22
    refusals: ClassVar[tuple[type[Exception], ...]] = (asyncssh.SFTPError,)

    def __init__(self, dest: SftpDestination, resources: Resources) -> None:
        super().__init__(dest, resources)
        self.sftp = dest
        if dest.insecure_skip_host_key_check:
            log.warning(
                "%s: host key checking is OFF (insecure_skip_host_key_check): the server is "
                "not verified, and a man in the middle would get the files and credentials",
                self.target.display,
            )

    def _options(self) -> dict[str, Any]:
        dest, target = self.sftp, self.target
        options: dict[str, Any] = {
            "port": target.port,
            "connect_timeout": dest.connect_timeout,
            "login_timeout": dest.connect_timeout,
            "keepalive_interval": 30,
        }
        if target.user:
            options["username"] = target.user
        if target.password:
            options["password"] = target.password
        if dest.insecure_skip_host_key_check:
            options["known_hosts"] = None
        elif dest.known_hosts is not None:
            if not dest.known_hosts.is_file():
                raise PermanentDeliveryError(f"known_hosts {dest.known_hosts} is not a file")
            options["known_hosts"] = str(dest.known_hosts)
        if dest.key_file is not None:
            passphrase = dest.passphrase.get_secret_value() if dest.passphrase else None
            try:
                options["client_keys"] = [asyncssh.read_private_key(dest.key_file, passphrase)]
            except (OSError, asyncssh.KeyImportError, asyncssh.KeyEncryptionError) as exc:
                reason = exc.strerror if isinstance(exc, OSError) else str(exc)
                raise PermanentDeliveryError(
                    f"cannot use key_file {dest.key_file}: {reason}"
                ) from None
            options["agent_path"] = None  # the configured key, not whatever an agent holds
        elif target.password:
            options["client_keys"] = None
            options["agent_path"] = None
        return options

    async def connect(self) -> Session:
        conn = await asyncssh.connect(self.target.host, **self._options())
        try:
            sftp = await conn.start_sftp_client()
        except BaseException:
            conn.close()
            raise
        return Session(conn, sftp)

    async def disconnect(self, conn: Session) -> None:
        conn.sftp.exit()
        conn.conn.close()
        await conn.conn.wait_closed()

    async def mkdir(self, conn: Session, folder: PurePosixPath) -> None:
        await conn.sftp.mkdir(_raw(folder))

    async def is_dir(self, conn: Session, path: PurePosixPath) -> bool:
        try:
            return bool(await conn.sftp.isdir(_raw(path)))
        except asyncssh.SFTPError:
            return False

    async def upload(
        self,
        conn: Session,
        source: inputs.Source,
        path: PurePosixPath,
        digest: Any,
        ctx: StepContext,
        fresh: bool = False,
    ) -> None:
        opened = await (self._create(conn, path) if fresh else conn.sftp.open(_raw(path), "wb"))
        async with opened as remote:
            await send_source(source, remote.write, digest, ctx)

    async def _create(self, conn: Session, path: PurePosixPath) -> asyncssh.SFTPClientFile:
        """Open our temporary name ``path`` as a new file (create exclusively: the server
        never opens what is there, so never writes through a link someone planted at the
        name, which is known in advance). What is there is removed first: the name is ours
        (``temp_name``), and a removal takes away a link, never what it points to; what
        cannot be removed (a folder) raises TempNameTakenError, and the upload takes a salted
        name."""
        for _ in range(3):
            try:
                return await conn.sftp.open(_raw(path), "xb")
            except asyncssh.SFTPError:
                if not await conn.sftp.lexists(_raw(path)):
                    raise  # not taken: the refusal is the answer (permissions, no folder...)
            log.warning(
                "%s: %s was already there (a link someone put there?): removed, not written to",
                self.target.display,
                path,
            )
            try:
                await conn.sftp.remove(_raw(path))
            except asyncssh.SFTPError as exc:
                raise TempNameTakenError(f"{self.target.display}: {path}: {exc.reason}") from exc
        raise TransientDeliveryError(f"{self.target.display}: {path} keeps being taken")

    async def exists(self, conn: Session, path: PurePosixPath) -> bool:
        return bool(await conn.sftp.exists(_raw(path)))

    async def size(self, conn: Session, path: PurePosixPath) -> int | None:
        try:
            attrs = await conn.sftp.stat(_raw(path))
        except asyncssh.SFTPNoSuchFile:
            return None
        return attrs.size

    async def sha256(self, conn: Session, path: PurePosixPath) -> str:
        # SFTP has no standard way to ask the server: read the file back
        digest = hashlib.sha256()
        async with conn.sftp.open(_raw(path), "rb", encoding=None) as remote:
            while data := await remote.read(CHUNK):
                digest.update(data if isinstance(data, bytes) else data.encode())
        return digest.hexdigest()

    async def rename(
        self, conn: Session, src: PurePosixPath, dst: PurePosixPath, overwrite: bool
    ) -> None:
        sftp = conn.sftp
        if not overwrite:  # a plain SFTP rename refuses to replace a file (OpenSSH)
            await sftp.rename(_raw(src), _raw(dst))
            return
        try:  # atomic where the server offers it, as OpenSSH does; else see _rename
            await sftp.posix_rename(_raw(src), _raw(dst))
        except asyncssh.SFTPOpUnsupported:
            await sftp.rename(_raw(src), _raw(dst))

    async def delete(self, conn: Session, path: PurePosixPath) -> None:
        await conn.sftp.remove(_raw(path))

    async def remove(self, conn: Session, path: PurePosixPath) -> None:
        try:
            await conn.sftp.remove(_raw(path))
        except (asyncssh.SFTPError, OSError):
            pass

    async def listdir(self, conn: Session, folder: PurePosixPath) -> list[str]:
        try:
            names = await conn.sftp.listdir(_raw(folder))
        except asyncssh.SFTPError:  # no such folder yet, no right to list: nothing listed
            return []
        return [os.fsdecode(n) for n in names]

    def check_name(self, path: PurePosixPath) -> None:
        # SFTP names are length-prefixed bytes: only NUL cannot travel (POSIX forbids it too)
        if "\0" in str(path):
            raise PermanentDeliveryError(f"{self.target.display}: a name cannot hold NUL")

    def translate(self, exc: Exception) -> DeliveryError | None:
        display = self.target.display
        if isinstance(exc, asyncssh.PermissionDenied):
            return PermanentDeliveryError(
                f"{display}: authentication refused ({exc.reason}): check the user, password "
                "or key_file"
            )
        if isinstance(exc, asyncssh.HostKeyNotVerifiable):
            return PermanentDeliveryError(
                f"{display}: the server's host key is not trusted ({exc.reason}); add it to "
                "known_hosts (ssh-keyscan) if the server is the right one"
            )
        if isinstance(exc, (asyncssh.SFTPPermissionDenied, asyncssh.SFTPWriteProtect)):
            return PermanentDeliveryError(f"{display}: permission denied ({exc.reason})")
        if isinstance(exc, asyncssh.ConnectionLost):
            return NetworkError(f"{display}: {exc.reason}")
        if isinstance(exc, (asyncssh.SFTPError, asyncssh.Error)):
            return TransientDeliveryError(f"{display}: {exc.reason}")
        if isinstance(exc, TimeoutError):
            return NetworkError(f"{display}: timed out")
        if isinstance(exc, OSError):
            return NetworkError.from_os_error(display, exc)
        return None


def _raw(path: PurePosixPath) -> bytes:
    """A path as the bytes SFTP carries: a name that is not UTF-8 (read from the disk with
    surrogate escapes) arrives as the very bytes it had here."""
    return os.fsencode(str(path))

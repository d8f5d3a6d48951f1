"""The S3 multipart uploads this service has open, written down so that the ones a crash
leaves can be told from anybody else's: one file per run in the state folder, locked (flock)
for the run's whole life, one JSON line per upload begun and per upload ended.

A run file whose lock can be taken belongs to a run that is gone: the uploads it lists as
still open are its orphans. This module never talks to S3 (``s3.sweep_orphans`` aborts them).
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import json
import logging
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path

log = logging.getLogger(__name__)

#: the key under which the service hands the ledger to the S3 processors (``Resources.items``)
LEDGER = "s3-uploads"
_SUFFIX = ".jsonl"


@dataclass(frozen=True, slots=True)
class OpenUpload:
    """One multipart upload begun: where, and its id (the server's)."""

    endpoint: str | None  #: the destination's endpoint_url (None: AWS)
    bucket: str
    key: str
    upload_id: str


class UploadLedger:
    """This run's file of open uploads in ``folder``, made on the first upload begun.

    ``begun`` reaches the disk (fsync) before the first part is sent; ``ended`` need not (a
    completed upload found open is only asked to abort and answers NoSuchUpload). Closing
    removes the file when nothing is open, and lets its lock go either way.
    """

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.path = folder / f"{os.getpid()}-{time.time_ns()}{_SUFFIX}"
        self._fd: int | None = None
        self._open: set[str] = set()
        self._lock = asyncio.Lock()
        self._said = False

    async def begun(self, upload: OpenUpload) -> None:
        """Write the upload down before its first part. Never raises: a ledger that cannot be
        written costs the clean-up after a crash (said once in the log), never a delivery."""
        line = json.dumps({"begun": asdict(upload)}) + "\n"
        async with self._lock:  # lines never interleave, the file is made once
            try:
                await asyncio.to_thread(self._append, line, True)
            except OSError as exc:
                if not self._said:
                    self._said = True
                    log.warning(
                        "cannot write the S3 upload ledger %s (uploads a crash leaves will not "
                        "be aborted at the next start): %s",
                        self.path,
                        exc,
                    )
                return
            self._open.add(upload.upload_id)

    def ended(self, upload_id: str) -> None:
        """The upload was completed or aborted (a short append, on the caller's thread).
        Never raises: a line that cannot be written only costs a NoSuchUpload at a start."""
        if upload_id not in self._open:
            return
        self._open.discard(upload_id)
        try:
            if self._open or self._fd is None:
                self._append(json.dumps({"ended": upload_id}) + "\n", False)
            else:  # nothing open: the file starts again from nothing (it never grows)
                os.ftruncate(self._fd, 0)
        except OSError as exc:
            log.warning("cannot write the S3 upload ledger %s: %s", self.path, exc)

    def _append(self, line: str, sync: bool) -> None:
        if self._fd is None:
            self.folder.mkdir(mode=0o700, parents=True, exist_ok=True)
            # locked under a name no sweep reads, then named: never seen unlocked
            making = self.path.with_name(f".{self.path.name}.new")
            fd = os.open(making, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_APPEND, 0o600)
            fcntl.flock(fd, fcntl.LOCK_EX)
            os.rename(making, self.path)
            self._fd = fd
        os.write(self._fd, line.encode())
        if sync:
            os.fsync(self._fd)

    def close(self) -> None:
        if self._fd is None:
            return
        if not self._open:
            with contextlib.suppress(OSError):
                self.path.unlink()
        os.close(self._fd)
        self._fd = None

    # -- the runs that are gone

    def orphans(self) -> dict[Path, list[OpenUpload]]:
        """Per file of a run that is gone (its lock is free), the uploads it left open. Files
        that cannot be read are left alone (and said)."""
        found: dict[Path, list[OpenUpload]] = {}
        try:
            names = sorted(os.listdir(self.folder))
        except FileNotFoundError:
            return found
        for name in names:
            path = self.folder / name
            if not name.endswith(_SUFFIX) or path == self.path:
                continue
            try:
                uploads = _read_if_dead(path)
            except (OSError, ValueError, KeyError, TypeError) as exc:
                log.warning("cannot read the upload ledger %s: %s", path, exc)
                continue
            if uploads is not None:
                found[path] = uploads
        return found

    @staticmethod
    def settle(path: Path, left: list[OpenUpload]) -> None:
        """Write what is still open of a dead run's file, or remove the file when nothing is."""
        if not left:
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
            return
        temp = path.with_name(f".{path.name}.tmp")
        temp.write_text("".join(json.dumps({"begun": asdict(u)}) + "\n" for u in left))
        os.replace(temp, path)


def _read_if_dead(path: Path) -> list[OpenUpload] | None:
    """The uploads still open in a run's file, or None while its run holds the lock."""
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return None  # a live run (this node's, or another's sharing the folder)
        with os.fdopen(os.dup(fd), encoding="utf-8") as file:
            text = file.read()
    finally:
        os.close(fd)
    begun: dict[str, OpenUpload] = {}
    for line in text.splitlines():
        if not line.strip():
            continue
        try:
            entry = json.loads(line)
        except ValueError:
            continue  # the last line of a crash, cut short: its upload was never fsync'd
        if "begun" in entry:
            upload = OpenUpload(**entry["begun"])
            begun[upload.upload_id] = upload
        else:
            begun.pop(entry["ended"], None)
    return list(begun.values())

"""The S3 multipart uploads this run has open, written down in the journal (its ``uploads``
table) before the first part is sent, so that any live service sharing the journal can abort
the ones a run that is gone left open (``s3.sweep_orphans``). Also the import of the ledger
files older versions kept per run in the state folder. This module never talks to S3.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import json
import logging
import os
from pathlib import Path

from ..config import redact_url
from ..errors import JournalError
from ..journal import Journal, OpenUpload

log = logging.getLogger(__name__)

#: the key under which the service hands the ledger to the S3 processors (``Resources.items``)
LEDGER = "s3-uploads"
#: seconds ``begun`` waits for the journal to commit its row before the upload goes on without
#: it (a journal that holds its writes: the delivery must not wait on the ledger's account)
BEGUN_WAIT_S = 10.0
_SUFFIX = ".jsonl"


def stored_endpoint(url: str | None) -> str | None:
    """An endpoint as the ledger stores it (and compares it): redacted."""
    return None if url is None else redact_url(url)


class UploadLedger:
    """This run's open uploads, kept in ``journal``.

    ``begun`` is committed before the first part is sent; ``ended`` is only queued (a completed
    upload still listed is only asked to abort, and answers NoSuchUpload). Neither raises: a
    ledger that cannot be written costs the clean-up after a crash (said once), never a
    delivery.
    """

    def __init__(self, journal: Journal, wait_s: float = BEGUN_WAIT_S) -> None:
        self.journal = journal
        self.wait_s = wait_s
        self._said = False

    async def begun(self, upload: OpenUpload) -> None:
        """Write the upload down and wait (up to ``wait_s``) until the journal holds it."""
        try:
            committed = self.journal.record_uploads([upload])
            await asyncio.wait_for(asyncio.shield(committed), self.wait_s)
        except Exception as exc:  # the ledger is a courtesy: the delivery goes on
            self._say(str(exc) or f"not committed within {self.wait_s:g}s")

    def ended(self, upload: OpenUpload) -> None:
        """The upload was completed or aborted: its row goes at the journal's next commit."""
        try:
            fut = self.journal.end_uploads([upload])
        except Exception as exc:
            self._say(str(exc))
            return
        fut.add_done_callback(self._told)

    def _told(self, fut: asyncio.Future[None]) -> None:
        if not fut.cancelled() and fut.exception() is not None:
            self._say(str(fut.exception()))

    def _say(self, why: str) -> None:
        if not self._said:
            self._said = True
            log.warning(
                "cannot write the S3 upload ledger in the journal (uploads a crash leaves may "
                "not be aborted): %s",
                why,
            )


async def import_files(folder: Path, journal: Journal) -> int:
    """Move the open uploads listed in the ledger files of older versions' runs that are gone
    (their lock is free) into the journal as orphans, and remove those files; how many
    uploads. Files that cannot be read are left (and said); never raises."""
    found = await asyncio.to_thread(_dead_files, folder)
    moved = 0
    for path, uploads in found.items():
        try:
            if uploads:
                await journal.record_uploads(uploads, orphaned=True)
        except JournalError as exc:
            log.warning("cannot move the upload ledger %s into the journal: %s", path, exc)
            continue
        moved += len(uploads)
        with contextlib.suppress(FileNotFoundError):
            await asyncio.to_thread(path.unlink)
    if moved:
        log.info("moved %d open S3 upload(s) of older runs from %s into the journal", moved, folder)
    return moved


def _dead_files(folder: Path) -> dict[Path, list[OpenUpload]]:
    """Per ledger file of a run that is gone, the uploads it left open."""
    found: dict[Path, list[OpenUpload]] = {}
    try:
        names = sorted(os.listdir(folder))
    except FileNotFoundError:
        return found
    for name in names:
        path = folder / name
        if not name.endswith(_SUFFIX) or name.startswith("."):
            continue
        try:
            uploads = _read_if_dead(path)
        except (OSError, ValueError, KeyError, TypeError) as exc:
            log.warning("cannot read the upload ledger %s: %s", path, exc)
            continue
        if uploads is not None:
            found[path] = uploads
    return found


def _read_if_dead(path: Path) -> list[OpenUpload] | None:
    """The uploads still open in a run's file, or None while its run holds the lock."""
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return None  # a live run of an older version
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
            found = entry["begun"]
            found["endpoint"] = stored_endpoint(found["endpoint"])
            upload = OpenUpload(**found)
            begun[upload.upload_id] = upload
        else:
            begun.pop(entry["ended"], None)
    return list(begun.values())

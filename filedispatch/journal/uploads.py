"""The ledger of open S3 multipart uploads, in the journal: one row per upload begun, removed
when it is completed or aborted, owned by the run that began it (its node and epoch), so that
any live service can find and abort the uploads a run that is gone left open.

Written once for both backends (``?`` marks a parameter); a backend gives its writer
(``_upload_rows``), this run's token (``_upload_run``) and what "gone" means (``_GONE``).
Never holds a secret: the endpoint is stored redacted, keys and credentials never.
"""

from __future__ import annotations

import abc
import asyncio
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, ClassVar


@dataclass(frozen=True, slots=True)
class OpenUpload:
    """One multipart upload begun: where, and its id (the server's)."""

    endpoint: str | None  #: the destination's endpoint_url, redacted (None: AWS)
    bucket: str
    key: str
    upload_id: str


#: the table, as both backends create it (``{real}``: the float type of each)
SCHEMA = """CREATE TABLE uploads (
    bucket TEXT NOT NULL,
    key TEXT NOT NULL,
    upload_id TEXT NOT NULL,
    endpoint TEXT,                -- redacted; NULL: AWS
    node TEXT,                    -- the node that began it
    epoch BIGINT,                 -- its run: the node's epoch (PostgreSQL), the run (SQLite);
                                  -- NULL: of a run known to be gone (an old ledger file)
    begun {real} NOT NULL,
    PRIMARY KEY (bucket, key, upload_id)
)"""

_BEGUN = (
    "INSERT INTO uploads (bucket, key, upload_id, endpoint, node, epoch, begun) "
    "VALUES (?, ?, ?, ?, ?, ?, ?) ON CONFLICT (bucket, key, upload_id) DO NOTHING"
)
_ENDED = "DELETE FROM uploads WHERE bucket=? AND key=? AND upload_id=?"
_ORPHANS = "SELECT endpoint, bucket, key, upload_id FROM uploads WHERE epoch IS NULL OR {gone}"


class UploadRecords(abc.ABC):
    """The ``Journal`` methods of the upload ledger over a backend's reads and writes."""

    #: the SQL condition on ``epoch`` of a row whose run is gone, with ``?`` for the
    #: parameters ``_gone_params`` gives
    _GONE: ClassVar[str]

    @abc.abstractmethod
    async def read(self, sql: str, params: Sequence[Any] = ()) -> list[Any]:
        """Rows of one query; raises JournalError when the journal cannot be read."""

    @abc.abstractmethod
    def _upload_rows(self, sql: str, params: list[tuple[Any, ...]]) -> asyncio.Future[None]:
        """Queue ``sql`` once per row of ``params`` on the writer; done once committed."""

    @abc.abstractmethod
    def _upload_run(self) -> tuple[str | None, int | None]:
        """(node, epoch) that owns the uploads this service begins now."""

    def _gone_params(self) -> tuple[Any, ...]:
        return ()

    def record_uploads(
        self, uploads: Sequence[OpenUpload], *, orphaned: bool = False
    ) -> asyncio.Future[None]:
        """Queue rows for ``uploads`` begun by this run (``orphaned``: by a run known to be
        gone, found in an old ledger file); the future is done once they are committed.
        Raises JournalError once the journal is closed."""
        node, epoch = (None, None) if orphaned else self._upload_run()
        now = time.time()
        return self._upload_rows(
            _BEGUN, [(u.bucket, u.key, u.upload_id, u.endpoint, node, epoch, now) for u in uploads]
        )

    def end_uploads(self, uploads: Sequence[OpenUpload]) -> asyncio.Future[None]:
        """Queue the removal of the rows of ``uploads`` (completed, or aborted); nobody needs
        to wait for the future. Raises JournalError once the journal is closed."""
        return self._upload_rows(_ENDED, [(u.bucket, u.key, u.upload_id) for u in uploads])

    async def orphan_uploads(self) -> list[OpenUpload]:
        """The uploads left open by runs that are gone (see ``_GONE``), oldest first."""
        rows = await self.read(
            _ORPHANS.format(gone=self._GONE) + " ORDER BY begun", self._gone_params()
        )
        return [OpenUpload(e, str(b), str(k), str(u)) for e, b, k, u in rows]

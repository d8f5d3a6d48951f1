"""What the web app holds: its typed keys and the service link.

The app reads the journal through a reader of its own (``Journal.reader``), so a slow history
query never waits behind, or holds up, the dispatcher's reads; writes (retry, forget) go
through the journal's single writer. Nothing here serves HTTP.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any

from aiohttp import web

from ..journal import Journal, JournalReader
from ..recovery import RetryAnswer


@dataclass(frozen=True, slots=True)
class ServiceLink:
    """What the running service lends the web app."""

    #: a snapshot: version, uptime_s, sources, in_flight, destinations ... (``Service.status``)
    status: Callable[[], Mapping[str, Any]]
    #: tell the dispatcher to look for due work now (after a retry)
    wake: Callable[[], None]
    #: send a FAILED dispatch again or say why not (None: only re-queue it in the journal)
    retry: Callable[[int], Awaitable[RetryAnswer]] | None = None


journal_key = web.AppKey("journal", Journal)
reader_key = web.AppKey("reader", JournalReader)
link_key = web.AppKey("link", ServiceLink)
token_key: web.AppKey[str | None] = web.AppKey("token")

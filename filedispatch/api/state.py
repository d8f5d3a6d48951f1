"""What the web app holds: its typed keys and the service link.

``ServiceLink``, the narrow status interface the API, the console and the progress report
share, is in ``link.py``. The app reads the journal through a reader of its own
(``Journal.reader``), so a slow history query never waits behind, or holds up, the
dispatcher's reads; writes (retry, forget) go through the journal's single writer. Nothing
here serves HTTP.
"""

from __future__ import annotations

from aiohttp import web

from ..journal import Journal, JournalReader
from ..link import ServiceLink

journal_key = web.AppKey("journal", Journal)
reader_key = web.AppKey("reader", JournalReader)
link_key = web.AppKey("link", ServiceLink)
token_key: web.AppKey[str | None] = web.AppKey("token")

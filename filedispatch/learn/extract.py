"""Text of a document for learned routing, bounded in bytes, pages, characters and time.

Plain text, CSV, JSON, XML and HTML are read here; PDF (pypdf) and DOCX (python-docx) are
parsed in a worker process that is killed when a file takes too long or too much memory, so a
hostile document costs at most ``PARSE_TIMEOUT_S`` and never stalls the caller. Never reads
more than ``MAX_BYTES`` of a file, and never follows the caller's files anywhere: it is given
bytes, not paths.
"""

from __future__ import annotations

import codecs
import html
import logging
import os
import re
import select
import struct
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from typing import IO, Literal

log = logging.getLogger(__name__)

#: the most bytes of one file read for its text (a larger PDF or DOCX is known by name only)
MAX_BYTES = 16 * 1024 * 1024
#: the most characters of text kept per document (enough to classify; more only costs time)
MAX_CHARS = 100_000
#: the most PDF pages read per document
MAX_PAGES = 20
#: seconds a PDF or DOCX may take in the worker before the worker is killed and replaced
PARSE_TIMEOUT_S = 5.0
#: the address space the worker may use (bytes): a decompression bomb ends it, not the host
WORKER_MEMORY = 1024 * 1024 * 1024

#: how the text was found; ``name`` means the file name only (the content was not read)
Method = Literal["text", "pdf", "docx", "name"]

#: a tag: no "<" inside, so each character is looked at once (with ``[^>]*`` a text of many
#: "<" and no ">" is scanned again from each "<": seconds for one file)
_TAG = re.compile(r"<[^<>]*>")
_WORD_BREAK = re.compile(r"[\W_]+")
_TEXT_EXTENSIONS = frozenset({"txt", "text", "csv", "tsv", "json", "xml", "html", "htm", "md"})


@dataclass(frozen=True, slots=True)
class Document:
    """A document's text as the model sees it: the words of its name, then its content."""

    text: str
    method: Method
    #: why the content was not read (``method == "name"``), for ``explain``
    note: str | None = None
    #: the parser was stopped (it took longer than its time, or more than its memory)
    stopped: bool = False


def name_words(name: str) -> str:
    """``Invoice_2024-03.pdf`` -> ``Invoice 2024 03 pdf``."""
    return _WORD_BREAK.sub(" ", name).strip()


def looks_like_text(head: bytes) -> bool:
    """No NUL byte, and UTF-8 (a character cut at the end of ``head`` allowed)."""
    if b"\x00" in head:
        return False
    try:
        head.decode("utf-8")
    except UnicodeDecodeError as exc:
        return exc.start >= len(head) - 4
    return True


def markup_text(text: str) -> str:
    """HTML or XML without its tags, entities decoded."""
    return html.unescape(_TAG.sub(" ", text))


class Extractor:
    """Turns a file's bytes into a ``Document``; one worker process, started on first need.

    Thread-safe (one parse at a time); ``close()`` ends the worker. Parsing errors, timeouts
    and a worker killed by its memory limit all give a name-only document with a note.
    """

    def __init__(self, timeout_s: float = PARSE_TIMEOUT_S) -> None:
        self.timeout_s = timeout_s
        self._lock = threading.Lock()
        self._worker: subprocess.Popen[bytes] | None = None

    def document(
        self, name: str, data: bytes | None, size: int | None = None, parse: bool = True
    ) -> Document:
        """The document for a file called ``name`` whose first bytes are ``data`` (None: it
        could not be read) and whose whole size is ``size`` (None: ``len(data)``); without
        ``parse``, a PDF or DOCX is known by its name (no worker is asked)."""
        words = name_words(name)
        if data is None:
            return Document(words, "name", "the file could not be read")
        size = len(data) if size is None else size
        ext = name.rpartition(".")[2].lower() if "." in name else ""
        kind: Method | None = None
        if data.startswith(b"%PDF-"):
            kind = "pdf"
        elif data.startswith(b"PK\x03\x04") and ext == "docx":
            kind = "docx"
        if kind is not None:
            if size > len(data) or size > MAX_BYTES:
                return Document(words, "name", f"{kind.upper()} larger than {MAX_BYTES} bytes")
            if not parse:
                return Document(words, "name", f"{kind.upper()} not read (parsing is off)")
            text, error, stopped = self._parse(kind, data)
            if error is not None:
                note = f"{kind.upper()} not readable: {error}"
                return Document(words, "name", note, stopped)
            return Document(f"{words}\n{text[:MAX_CHARS]}", kind)
        head = data[: MAX_CHARS * 4]
        decoded: str | None = None
        if head.startswith((codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)):
            # UTF-16 with its byte order mark (Excel's "Unicode text", Windows Notepad): every
            # other byte is NUL, which would make it look like a binary file
            decoded = head[: len(head) // 2 * 2].decode("utf-16", "replace")
            if "\x00" in decoded:
                decoded = None
        elif looks_like_text(head):
            decoded = head.decode("utf-8", "replace").removeprefix("\ufeff")
        elif ext in _TEXT_EXTENSIONS and b"\x00" not in head[:8192]:
            # not UTF-8: most likely Windows-1252 / Latin-1, whose accented letters would
            # otherwise each become U+FFFD and cut the words they are in
            decoded = head.decode("cp1252", "replace")
        if decoded is not None:
            if ext in ("html", "htm", "xml") or decoded.lstrip()[:1] == "<":
                decoded = markup_text(decoded)
            return Document(f"{words}\n{decoded[:MAX_CHARS]}", "text")
        return Document(words, "name", "not a text, PDF or DOCX file")

    def _parse(self, kind: Method, data: bytes) -> tuple[str, str | None, bool]:
        """(text, error, whether the worker was stopped)"""
        with self._lock:
            for attempt in (1, 2):  # a worker that died since its last file is replaced once
                worker = self._worker
                if worker is None or worker.poll() is not None:
                    worker = self._worker = _start_worker()
                assert worker.stdin is not None and worker.stdout is not None
                try:
                    _send(worker.stdin, kind.encode(), data)
                except (BrokenPipeError, OSError):
                    self._kill()
                    if attempt == 2:
                        return "", "the parser process is not available", False
                    continue
                answer = _receive(worker.stdout, self.timeout_s)
                if answer is None:
                    self._kill()
                    return "", f"took longer than {self.timeout_s:g} s or too much memory", True
                status, text = answer
                return (text, None, False) if status == b"ok" else ("", text, False)
        raise AssertionError("unreachable")

    def _kill(self) -> None:
        worker, self._worker = self._worker, None
        if worker is not None:
            worker.kill()
            worker.wait()
            for pipe in (worker.stdin, worker.stdout):
                if pipe is not None:
                    pipe.close()

    def close(self) -> None:
        """End the worker process (a later ``document`` starts a new one)."""
        with self._lock:
            self._kill()

    def __enter__(self) -> Extractor:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()


def _start_worker() -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [sys.executable, "-m", "filedispatch.learn.extract"],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        close_fds=True,
    )


def _send(pipe: IO[bytes], kind: bytes, data: bytes) -> None:
    pipe.write(struct.pack("!4sQ", kind.ljust(4), len(data)) + data)
    pipe.flush()


def _read_exact(fd: int, n: int, deadline: float) -> bytes | None:
    parts, left = [], n
    while left:
        wait = deadline - time.monotonic()
        if wait <= 0 or not select.select([fd], [], [], wait)[0]:
            return None
        chunk = os.read(fd, min(left, 1 << 20))
        if not chunk:
            return None  # the worker died (its memory limit, a crash)
        parts.append(chunk)
        left -= len(chunk)
    return b"".join(parts)


def _receive(pipe: IO[bytes], timeout_s: float) -> tuple[bytes, str] | None:
    deadline = time.monotonic() + timeout_s
    head = _read_exact(pipe.fileno(), 12, deadline)
    if head is None:
        return None
    status, length = struct.unpack("!4sQ", head)
    body = _read_exact(pipe.fileno(), length, deadline)
    if body is None:
        return None
    return status.strip(), body.decode("utf-8", "replace")


# ---------------------------------------------------------------------- in the worker


def _pdf_text(data: bytes) -> str:
    import io

    from pypdf import PdfReader

    reader = PdfReader(io.BytesIO(data))
    parts: list[str] = []
    size = 0
    for page in reader.pages[:MAX_PAGES]:
        text = page.extract_text() or ""
        parts.append(text)
        size += len(text)
        if size >= MAX_CHARS:
            break
    return "\n".join(parts)[:MAX_CHARS]


def _docx_text(data: bytes) -> str:
    """Every paragraph of the body, those in tables and text boxes included (python-docx's
    ``paragraphs`` holds only the top-level ones: an invoice's table would be unread)."""
    import io

    import docx
    from docx.oxml.ns import qn

    body = docx.Document(io.BytesIO(data)).element.body
    text, breaks = qn("w:t"), (qn("w:tab"), qn("w:br"), qn("w:cr"))
    parts: list[str] = []
    size = 0
    for paragraph in body.iter(qn("w:p")):
        line = "".join(
            (node.text or "") if node.tag == text else " " for node in paragraph.iter(text, *breaks)
        )
        parts.append(line)
        size += len(line)
        if size >= MAX_CHARS:
            break
    return "\n".join(parts)[:MAX_CHARS]


def _serve() -> None:  # pragma: no cover - runs in the worker process
    import resource

    resource.setrlimit(resource.RLIMIT_AS, (WORKER_MEMORY, WORKER_MEMORY))
    logging.disable(logging.CRITICAL)  # pypdf warns on every odd object; nobody reads them
    import warnings

    warnings.simplefilter("ignore")
    stdin, stdout = sys.stdin.buffer, sys.stdout.buffer
    parsers = {b"pdf": _pdf_text, b"docx": _docx_text}
    while True:
        head = stdin.read(12)
        if len(head) < 12:
            return
        kind, length = struct.unpack("!4sQ", head)
        data = stdin.read(length)
        try:
            status, text = b"ok", parsers[kind.strip()](data)
        except MemoryError:
            status, text = b"err", "too much memory"
        except Exception as exc:  # a malformed file: say so, keep serving
            status, text = b"err", f"{type(exc).__name__}: {exc}"[:300]
        body = text.encode("utf-8", "replace")
        stdout.write(struct.pack("!4sQ", status.ljust(4), len(body)) + body)
        stdout.flush()


if __name__ == "__main__":  # pragma: no cover
    _serve()

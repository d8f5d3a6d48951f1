"""Generated documents for the learned-routing tests and benchmark.

Each label has its own vocabulary; every document mixes a few of its label's words into many
filler words that all labels share, so a label is learned from its words, not the filler.
Noise documents hold filler only. Written as text, as PDF (a minimal writer: one page per
document, Helvetica, text lines) or as DOCX (python-docx).
"""

from __future__ import annotations

import random
import zlib
from pathlib import Path

VOCABULARY = {
    "invoices": "invoice amount due payment total vat net remit billing account overdue "
    "balance tax supplier purchase order iban",
    "contracts": "agreement party parties clause term termination liability governing law "
    "signature obligations confidential warranty indemnify breach",
    "medical": "patient diagnosis treatment prescription dosage clinic physician symptoms "
    "allergy blood pressure therapy referral examination chronic",
    "resumes": "experience education skills employment university degree career references "
    "internship responsibilities achievements languages profile objective",
}
FILLER_TEXT = (
    "the of and to in for on with by from this that is are be as at or an it was will "
    "please note see page date number reference regarding attached following above below "
    "document dear sincerely thank you information dated item department office"
)
FILLER = FILLER_TEXT.split()


def sentence(rng: random.Random, label: str | None, words: int = 14, share: float = 0.25) -> str:
    own = VOCABULARY[label].split() if label else []
    out = [
        rng.choice(own) if own and rng.random() < share else rng.choice(FILLER)
        for _ in range(words)
    ]
    return " ".join(out).capitalize() + "."


def text(rng: random.Random, label: str | None, lines: int = 12) -> str:
    return "\n".join(sentence(rng, label) for _ in range(lines)) + "\n"


def _pdf_escape(line: str) -> str:
    return line.replace("\\", "\\\\").replace("(", "\\(").replace(")", "\\)")


def pdf_bytes(body: str, flate: bool = False) -> bytes:
    """A one-page PDF showing ``body``'s lines (ASCII); ``flate``: its content compressed, so
    none of its words shows in the file's bytes."""
    ops = ["BT", "/F1 10 Tf", "12 TL", "40 800 Td"]
    for line in body.splitlines():
        ops.append(f"({_pdf_escape(line[:110])}) Tj T*")
    ops.append("ET")
    stream = "\n".join(ops).encode("latin-1", "replace")
    return pdf_page(zlib.compress(stream), flate=True) if flate else pdf_page(stream)


def pdf_page(stream: bytes, flate: bool = False, pages: int = 1) -> bytes:
    """A PDF of ``pages`` pages whose content is ``stream`` (``flate``: already
    zlib-compressed), every offset in its xref right."""
    filters = b" /Filter /FlateDecode" if flate else b""
    kids = b" ".join(b"%d 0 R" % (4 + i) for i in range(pages))
    objects = [
        b"<< /Type /Catalog /Pages 2 0 R >>",
        b"<< /Type /Pages /Kids [%s] /Count %d >>" % (kids, pages),
        b"<< /Length %d%s >>\nstream\n" % (len(stream), filters) + stream + b"\nendstream",
    ]
    objects += [
        b"<< /Type /Page /Parent 2 0 R /MediaBox [0 0 595 842] "
        b"/Resources << /Font << /F1 %d 0 R >> >> /Contents 3 0 R >>" % (4 + pages)
    ] * pages
    objects.append(b"<< /Type /Font /Subtype /Type1 /BaseFont /Helvetica >>")
    out = bytearray(b"%PDF-1.4\n")
    offsets = []
    for i, obj in enumerate(objects, 1):
        offsets.append(len(out))
        out += b"%d 0 obj\n" % i + obj + b"\nendobj\n"
    xref = len(out)
    out += b"xref\n0 %d\n0000000000 65535 f \n" % (len(objects) + 1)
    out += b"".join(b"%010d 00000 n \n" % o for o in offsets)
    out += b"trailer\n<< /Size %d /Root 1 0 R >>\nstartxref\n%d\n%%%%EOF\n" % (
        len(objects) + 1,
        xref,
    )
    return bytes(out)


def slow_pdf(operators: int = 250_000, pages: int = 20) -> bytes:
    """A small PDF (about 8 KB) whose ``pages`` pages share one content stream of
    ``operators`` text operators (just under pypdf's own limit of tokens per stream): pypdf
    spends seconds on each page, minutes on the whole. The hostile input a bounded
    extraction must survive."""
    ops = b"BT /F1 1 Tf " + b"(a) Tj 1 0 Td " * operators + b"ET"
    return pdf_page(zlib.compress(ops, 9), flate=True, pages=pages)


def docx_bytes(body: str) -> bytes:
    import io

    import docx

    document = docx.Document()
    for line in body.splitlines():
        document.add_paragraph(line)
    buf = io.BytesIO()
    document.save(buf)
    return buf.getvalue()


def docx_table_bytes(body: str) -> bytes:
    """A DOCX whose only text is ``body``'s lines in the cells of a table (one row each)."""
    import io

    import docx

    document = docx.Document()
    lines = body.splitlines()
    table = document.add_table(rows=len(lines), cols=2)
    for i, line in enumerate(lines):
        table.cell(i, 0).text = str(i + 1)
        table.cell(i, 1).text = line
    buf = io.BytesIO()
    document.save(buf)
    return buf.getvalue()


def csv_text(body: str) -> str:
    """``body``'s lines as the rows of a CSV table (id, the line, a date)."""
    rows = ["id,text,date"]
    rows += [f'{i},"{line}",2024-03-{i % 28 + 1:02d}' for i, line in enumerate(body.splitlines())]
    return "\r\n".join(rows) + "\r\n"


def json_text(body: str) -> str:
    """``body``'s lines as the strings of a nested JSON document."""
    import json

    lines = [{"n": i, "text": line} for i, line in enumerate(body.splitlines())]
    return json.dumps({"document": {"id": 17, "lines": lines}}, indent=2)


def markup_text(body: str, tag: str, attributes: str) -> str:
    """``body``'s lines each in a ``tag`` element whose ``class`` is ``attributes``: words
    the reader must drop with the tags."""
    return "\n".join(f'<{tag} class="{attributes}">{line}</{tag}>' for line in body.splitlines())


def write(path: Path, body: str) -> Path:
    """``body`` written as the file type ``path``'s extension names (txt, pdf, docx)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix == ".pdf":
        path.write_bytes(pdf_bytes(body))
    elif path.suffix == ".docx":
        path.write_bytes(docx_bytes(body))
    else:
        path.write_text(body, encoding="utf-8")
    return path


def examples(
    folder: Path,
    per_label: int = 8,
    labels: list[str] | None = None,
    seed: int = 1,
    kinds: tuple[str, ...] = ("txt", "pdf"),
) -> Path:
    """``folder/<label>/doc-N.<kind>`` for each label; returns ``folder``."""
    rng = random.Random(seed)
    for label in labels or list(VOCABULARY):
        for i in range(per_label):
            kind = kinds[i % len(kinds)]
            write(folder / label / f"doc-{i}.{kind}", text(rng, label))
    return folder


def docx_bomb(megabytes: int = 1280) -> bytes:
    """A DOCX of about 6 MB whose document part unpacks to ``megabytes`` MiB of spaces: more
    than the extraction worker may use."""
    import io
    import zipfile

    source = zipfile.ZipFile(io.BytesIO(docx_bytes("x")))
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w", zipfile.ZIP_DEFLATED, compresslevel=1) as bomb:
        for info in source.infolist():
            if info.filename != "word/document.xml":
                bomb.writestr(info, source.read(info))
                continue
            with bomb.open(info.filename, "w", force_zip64=True) as part:
                part.write(source.read(info)[:-20])  # the opening, not the closing tags
                chunk = b" " * (1 << 20)
                for _ in range(megabytes):
                    part.write(chunk)
    return out.getvalue()

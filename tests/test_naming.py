"""Naming templates and their safety."""

from __future__ import annotations

import time
from pathlib import Path, PurePosixPath

import pytest

from filedispatch.errors import PermanentDeliveryError
from filedispatch.models import FileVersion
from filedispatch.naming import (
    NAME_MAX,
    check_template,
    cut_utf8,
    render,
    shorten,
    with_suffix_number,
)
from filedispatch.processors.common import temp_name


def test_placeholders() -> None:
    mtime = time.mktime((2026, 3, 9, 14, 5, 0, 0, 0, -1))
    v = FileVersion("inbox", Path("/in"), "scans/report.final.pdf", 1, int(mtime * 1e9))
    assert render("{yyyy}/{mm}/{dd}/{name}", v) == PurePosixPath("2026/03/09/report.final.pdf")
    assert render("{reldir}/{stem}-{HH}{MM}.{ext}", v) == PurePosixPath(
        "scans/report.final-1405.pdf"
    )
    assert render("{source}/{relpath}", v) == PurePosixPath("inbox/scans/report.final.pdf")


def test_a_template_cannot_leave_the_destination() -> None:
    v = FileVersion("in", Path("/in"), "a.txt", 1, 0)
    with pytest.raises(PermanentDeliveryError):
        render("../{name}", v)
    with pytest.raises(PermanentDeliveryError):
        render("/etc/{name}", v)
    with pytest.raises(ValueError):
        check_template("{unknown}")


def test_suffix_numbers() -> None:
    assert with_suffix_number(PurePosixPath("a/r.pdf"), 2) == PurePosixPath("a/r-2.pdf")
    assert with_suffix_number(PurePosixPath("README"), 1) == PurePosixPath("README-1")


# ------------------------------------------------------------------ the 255-byte limit


def fits(name: str) -> bool:
    raw = name.encode("utf-8", "surrogateescape")
    return len(raw) <= NAME_MAX


def test_a_name_that_fits_is_left_alone() -> None:
    name = "é" * 127 + "x"  # 255 bytes
    assert shorten(name) == name
    assert with_suffix_number(PurePosixPath(f"a/{name}"), 7).name != name


@pytest.mark.parametrize("char", ["é", "€", "😀", "x"])  # 2, 3, 4 and 1 bytes a character
@pytest.mark.parametrize("reserve", [0, 1, 3, 40])
def test_shortening_keeps_the_extension_and_never_splits_a_character(
    char: str, reserve: int
) -> None:
    name = char * 300 + ".tar.gz"
    short = shorten(name, reserve)
    raw = short.encode()
    raw.decode("utf-8", "strict")
    assert len(raw) + reserve <= NAME_MAX
    assert len(raw) + reserve > NAME_MAX - 4  # as long as it may be, less one character
    assert short.startswith(char) and short.endswith(".gz")
    assert shorten(name, reserve) == short  # the same each time: a retry finds its file


def test_names_that_differ_past_the_cut_stay_apart() -> None:
    a, b = "x" * 300 + "-a.csv", "x" * 300 + "-b.csv"
    assert shorten(a) != shorten(b)
    assert all(fits(n) and n.endswith(".csv") for n in (shorten(a), shorten(b)))


def test_an_extension_too_long_to_be_one_is_cut_with_the_rest() -> None:
    name = "report." + "e" * 300
    short = shorten(name)
    assert fits(short) and short.startswith("report.eee")


def test_bytes_that_are_not_utf8_count_one_each() -> None:
    name = "caf\udce9" * 100 + ".txt"  # b"caf\xe9" repeated, as os.fsdecode gives it
    short = shorten(name)
    assert fits(short) and short.endswith(".txt")
    assert cut_utf8("\udce9" * 10, 4) == "\udce9" * 4


@pytest.mark.parametrize("n", [1, 9, 10, 9999, 1_700_000_000_000_000_000])
def test_a_conflict_number_shortens_the_stem_not_the_extension(n: int) -> None:
    name = "é" * 127 + ".pdf"  # 258 bytes cut to fit, and one that fits exactly
    for base in (shorten(name), "é" * 125 + "x.pdf"):
        got = with_suffix_number(PurePosixPath(f"docs/{base}"), n)
        assert got.parent == PurePosixPath("docs")
        assert fits(got.name) and got.name.endswith(f"-{n}.pdf"), got.name
        got.name.encode().decode("utf-8", "strict")


def test_every_part_of_a_rendered_name_is_shortened() -> None:
    long = "é" * 125 + "x.csv"  # 255 bytes
    v = FileVersion("in", Path("/in"), f"{long[:200]}/{long}", 1, 0)
    rel = render("copy-{reldir}/copy-{name}", v)
    assert all(fits(part) for part in rel.parts)
    assert rel.parts[0].startswith("copy-éé") and rel.name.endswith(".csv")
    assert render("{relpath}", v) == PurePosixPath(v.relpath)  # fits already: untouched


def test_temporary_names_fit() -> None:
    name = "€" * 85  # 255 bytes
    tmp = temp_name(123456789, name, None, "0a1b2c3d")
    assert fits(tmp) and tmp.startswith(".filedispatch-tmp-0a1b2c3d-123456789-€")
    tmp.encode().decode("utf-8", "strict")


def test_a_date_the_c_library_cannot_give_fails_that_file_with_a_reason() -> None:
    v = FileVersion("in", Path("/in"), "a.txt", 1, 2**62 * 10**9)
    with pytest.raises(PermanentDeliveryError, match="has no calendar date"):
        render("{yyyy}/{name}", v)
    assert render("{name}", v) == PurePosixPath("a.txt")  # no date asked: no date needed
    far = FileVersion("in", Path("/in"), "a.txt", 1, 10**20)  # tmpfs: year 5138
    assert render("{yyyy}/{name}", far).parts[0] == str(time.localtime(1e11).tm_year)

"""Naming templates and their safety."""

from __future__ import annotations

import time
from pathlib import Path, PurePosixPath

import pytest

from filedispatch.errors import PermanentDeliveryError
from filedispatch.models import FileVersion
from filedispatch.naming import check_template, render, with_suffix_number


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

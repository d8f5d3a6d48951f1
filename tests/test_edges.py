"""The edges of what a filesystem allows, through the real CLI on real files.

Names at the 255-byte limit through templates, conflict numbers, temporary names, compressed
outputs and failed_dir; paths past PATH_MAX; mtimes from 1901 to the far future; sparse, huge
and empty files. Each file is delivered, or fails alone with its reason in the journal.
"""

from __future__ import annotations

import contextlib
import gzip
import hashlib
import io
import os
import resource
import subprocess
import sys
import tarfile
import time
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import zstandard

from filedispatch.processors.local import COPY_WAYS, copy_data

from .conftest import cli_env, delivered, journal_rows, mounted_tmpfs, run_cli
from .servers import FtpServer, HttpReceiver, SftpServer, old_file, remote_config

NAME_MAX = 255
GIB = 1 << 30


def name_of(nbytes: int, ext: str = ".csv", tail: str = "") -> str:
    """A name of exactly ``nbytes`` UTF-8 bytes: two-byte "é"s, then ``tail`` and ``ext``."""
    room = nbytes - len((tail + ext).encode())
    return "é" * (room // 2) + "x" * (room % 2) + tail + ext


def assert_fits(name: str, ext: str = "") -> None:
    """A name a user can use: valid UTF-8 (no character split), in 255 bytes, its extension."""
    raw = os.fsencode(name)
    raw.decode("utf-8", "strict")
    assert len(raw) <= NAME_MAX, (len(raw), name)
    assert name.endswith(ext), name


def once(cfg: Path, *args: str, **kw: Any) -> subprocess.CompletedProcess[str]:
    return run_cli("-c", cfg, "--once", *args, timeout=120, **kw)


def the_other(folder: Path, *known: str) -> str:
    (name,) = set(os.listdir(folder)) - set(known)
    return name


# ------------------------------------------------------------------ names at the limit


@pytest.mark.parametrize("after", ["keep", "delete"])  # a copy, and the inline rename
def test_a_conflict_number_never_pushes_a_name_past_255_bytes(
    workspace: dict[str, Path], after: str
) -> None:
    ws = workspace
    name = name_of(NAME_MAX)
    (ws["outbox"]).mkdir()
    (ws["outbox"] / name).write_bytes(b"already there")
    old_file(ws["inbox"] / name, b"new")
    cfg = remote_config(
        ws, {"url": str(ws["outbox"]), "on_conflict": "rename"}, source={"after": after}
    )
    result = once(cfg)
    assert result.returncode == 0, result.stderr
    other = the_other(ws["outbox"], name)
    assert_fits(other, ".csv")
    assert "-1.csv" in other and other.startswith("éé")
    assert delivered(ws["outbox"]) == {name: b"already there", other: b"new"}
    (row,) = journal_rows(ws["db"])
    assert (row["status"], row["location"]) == ("SUCCEEDED", str(ws["outbox"] / other))
    assert os.path.exists(ws["inbox"] / name) == (after == "keep")


def test_remote_temporary_names_and_conflict_numbers_fit(
    workspace: dict[str, Path], ftp: FtpServer, sftp: SftpServer
) -> None:
    """FTP and SFTP: the hidden temporary name and the ``-1`` both stay within 255 bytes."""
    ws = workspace
    name = name_of(NAME_MAX)
    for root in (ftp.root / "in", sftp.root / "in"):
        root.mkdir(parents=True)
        (root / name).write_bytes(b"already there")
    old_file(ws["inbox"] / name, b"new")
    cfg = remote_config(
        ws,
        {"url": ftp.url("/in/"), "on_conflict": "rename"},
        {"url": sftp.url("/in/"), "known_hosts": str(sftp.known_hosts),
         "key_file": str(sftp.key_file), "on_conflict": "rename"},
    )  # fmt: skip
    result = once(cfg)
    assert result.returncode == 0, result.stderr
    for root in (ftp.root / "in", sftp.root / "in"):
        other = the_other(root, name)
        assert_fits(other, ".csv")
        assert (root / other).read_bytes() == b"new" and "-1.csv" in other
    rows = journal_rows(ws["db"])
    assert [r["status"] for r in rows] == ["SUCCEEDED", "SUCCEEDED"]


def test_a_template_that_lengthens_names_shortens_them_and_keeps_them_apart(
    workspace: dict[str, Path],
) -> None:
    """Two 255-byte names that differ only at their end, through a template that adds 16
    bytes: each is shortened (extension kept, a digest of the whole name where it was cut),
    and they stay apart (on_conflict: fail would refuse the second otherwise)."""
    ws = workspace
    a, b = name_of(NAME_MAX, tail="-a"), name_of(NAME_MAX, tail="-b")
    short = "short.txt"
    for n in (a, b, short):
        old_file(ws["inbox"] / n, n.encode())
    cfg = remote_config(
        ws,
        {"url": str(ws["outbox"]), "name": "{yyyy}/archived-{stem}.{ext}", "on_conflict": "fail"},
    )
    result = once(cfg)
    assert result.returncode == 0, result.stderr
    year = time.strftime("%Y", time.localtime((ws["inbox"] / short).stat().st_mtime))
    got = delivered(ws["outbox"])
    assert got.pop(f"{year}/archived-short.txt") == short.encode()
    assert sorted(got.values()) == sorted([a.encode(), b.encode()])  # both, apart
    for rel in got:
        folder, _, name = rel.partition("/")
        assert folder == year and name.startswith("archived-éé") and "~" in name
        assert_fits(name, ".csv")
    rows = journal_rows(ws["db"])
    assert {r["status"] for r in rows} == {"SUCCEEDED"} and len(rows) == 3


@pytest.mark.parametrize("fmt", ["gzip", "zip", "tar.gz", "zstd"])
def test_a_compressed_output_of_a_name_at_the_limit_fits(
    workspace: dict[str, Path], fmt: str
) -> None:
    ws = workspace
    name = name_of(NAME_MAX, ".csv")
    data = b"a,b\n" * 1000
    old_file(ws["inbox"] / name, data)
    cfg = remote_config(ws, {"compress": fmt}, str(ws["outbox"]))
    result = once(cfg)
    assert result.returncode == 0, result.stderr
    suffix = {"gzip": ".gz", "zip": ".zip", "tar.gz": ".tar.gz", "zstd": ".zst"}[fmt]
    (out,) = os.listdir(ws["outbox"])
    assert_fits(out, ".csv" + suffix)
    assert unpack(fmt, (ws["outbox"] / out).read_bytes()) == data
    assert {r["status"] for r in journal_rows(ws["db"])} == {"SUCCEEDED"}


def unpack(fmt: str, blob: bytes) -> bytes:
    if fmt == "gzip":
        return gzip.decompress(blob)
    if fmt == "zstd":
        return zstandard.ZstdDecompressor().decompressobj().decompress(blob)
    if fmt == "zip":
        with zipfile.ZipFile(io.BytesIO(blob)) as zf:
            return zf.read(zf.namelist()[0])
    with tarfile.open(fileobj=io.BytesIO(blob)) as tf:
        member = tf.extractfile(tf.getmembers()[0])
        assert member is not None
        return member.read()


def fail_into_taken_name(ws: dict[str, Path], failed: Path, src: Path) -> Path:
    """Fail ``src`` at once with ``failed_dir`` holding its name already; where it went."""
    failed.mkdir()
    (failed / src.name).write_bytes(b"an earlier failure")
    cfg = remote_config(
        ws, {"command": "exit 3", "retry": {"attempts": 1}}, source={"failed_dir": str(failed)}
    )
    assert once(cfg).returncode == 1
    assert journal_rows(ws["db"])[0]["status"] == "FAILED"
    assert not src.exists()
    other = the_other(failed, src.name)
    stem, _, ext = src.name.rpartition(".")
    assert_fits(other, "." + ext)
    assert f"-1.{ext}" in other and other.startswith(stem[:10])
    return failed / other


def test_a_failed_file_moved_to_a_taken_name_in_failed_dir_fits(
    workspace: dict[str, Path],
) -> None:
    src = old_file(workspace["inbox"] / name_of(NAME_MAX, ".pdf"), b"fails")
    moved = fail_into_taken_name(workspace, workspace["root"] / "failed", src)
    assert moved.read_bytes() == b"fails"


def test_a_move_to_failed_dir_on_another_filesystem_keeps_holes_and_fits_its_name(
    workspace: dict[str, Path], other_fs: Path
) -> None:
    """failed_dir on another filesystem: the source is moved by copying (relocate.py), under
    a hidden name that fits, then numbered within 255 bytes, its holes kept."""
    pieces = {0: b"head", 200 << 20: b"tail!"}
    src = sparse(workspace["inbox"] / name_of(NAME_MAX, ".img"), (200 << 20) + 5, pieces)
    before = digest(src)
    moved = fail_into_taken_name(workspace, other_fs / "failed", src)
    assert digest(moved) == before
    assert moved.stat().st_blocks * 512 < 1 << 20  # 200 MiB of holes stayed holes


# ------------------------------------------------------------------ deep paths


def deep_folder(base: Path, total: int, part: str = "d" * 200) -> Path:
    """A chain of folders below ``base`` whose path is about ``total`` bytes long."""
    folder = base
    while len(os.fsencode(folder / part)) < total:
        folder = folder / part
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def test_a_destination_path_past_path_max_fails_alone(workspace: dict[str, Path]) -> None:
    ws = workspace
    deep = deep_folder(ws["inbox"], len(os.fsencode(ws["inbox"])) + 2200)
    old_file(deep / "deep.txt", b"deep")
    old_file(ws["inbox"] / "top.txt", b"top")
    out = deep_folder(ws["root"] / "out", 2200)  # out + the deep relpath > 4096 bytes
    cfg = remote_config(ws, {"url": str(out), "name": "{relpath}"}, source={"recursive": True})
    result = once(cfg)
    assert result.returncode == 1, result.stderr
    rows = {r["filename"]: r for r in journal_rows(ws["db"])}
    assert rows["top.txt"]["status"] == "SUCCEEDED" and (out / "top.txt").read_bytes() == b"top"
    bad = rows["deep.txt"]
    assert (bad["status"], bad["attempts"]) == ("FAILED", 1)  # at once: no retry can help
    assert "File name too long" in bad["reason"]
    assert (deep / "deep.txt").exists()


def test_a_source_folder_past_path_max_is_reported_and_the_rest_goes(
    workspace: dict[str, Path],
) -> None:
    ws = workspace
    # made below a folder we stand in: no path call reaches a file past 4096 bytes
    deep = deep_folder(ws["inbox"], 3900)
    here = os.getcwd()
    os.chdir(deep)
    try:
        os.makedirs("e" * 250 + "/" + "f" * 250)
        Path("e" * 250, "f" * 250, "lost.txt").write_bytes(b"too deep")
    finally:
        os.chdir(here)
    old_file(ws["inbox"] / "top.txt", b"top")
    cfg = remote_config(ws, str(ws["outbox"]), source={"recursive": True})
    result = once(cfg)
    assert result.returncode == 0, result.stderr
    assert "longer than this system allows (PATH_MAX" in result.stderr
    assert delivered(ws["outbox"]) == {"top.txt": b"top"}


# ------------------------------------------------------------------ timestamps

#: a step that fails its first attempt: the retry then runs from the journal's row
FLAKY = 'test "$FILEDISPATCH_ATTEMPT" -gt 1'


def test_mtimes_from_1901_to_the_last_ext4_date_are_delivered_kept_and_shown(
    workspace: dict[str, Path],
) -> None:
    """Each file fails once (so its retry runs from the journal's row), is compressed (gzip
    keeps 32 bits of mtime, zip dates run from 1980 to 2107, tar keeps any), lands in its
    year's folder, and is deleted once delivered. Before: a year-2400 mtime (past 2**63 ns)
    stopped the whole service, and gzip and zip refused dates outside their range."""
    ws = workspace
    stamps = {
        "y1901.txt": -(2**31) * 10**9,  # the first second ext4 and 32-bit time_t can hold
        "before1970.txt": -500_000_001,
        "y2400.txt": 13_569_465_600_123_456_789,  # nanoseconds, past 2**63
        "max.txt": 2**80,  # the kernel keeps the filesystem's last date (2446 on ext4)
    }
    for name, ns in stamps.items():
        path = ws["inbox"] / name
        path.write_bytes(name.encode())
        os.utime(path, ns=(0, ns))
        stamps[name] = path.stat().st_mtime_ns
    zips, tars = ws["root"] / "zips", ws["root"] / "tars"
    dated = [
        {"command": FLAKY, "retry": {"attempts": 3, "delay": 0.05}},
        {"compress": "gzip"},
        {"url": str(ws["outbox"]), "name": "{yyyy}/{name}"},
    ]
    rules = [
        {"name": "dated", "glob": "*", "continue": True, "to": dated},
        {"name": "zip", "glob": "*", "continue": True, "to": [{"compress": "zip"}, str(zips)]},
        {"name": "tar", "glob": "*", "to": [{"compress": "tar.gz"}, str(tars)]},
    ]
    cfg = remote_config(ws, source={"after": "delete"}, rules=rules)
    result = once(cfg)
    assert result.returncode == 0, result.stderr
    got = delivered(ws["outbox"])
    for name, ns in stamps.items():
        year = time.localtime(ns / 1e9).tm_year
        assert gzip.decompress(got.pop(f"{year:04d}/{name}.gz")) == name.encode()
        assert unpack("zip", (zips / f"{name}.zip").read_bytes()) == name.encode()
        with tarfile.open(tars / f"{name}.tar.gz") as tf:
            assert tf.getmembers()[0].mtime == ns // 10**9  # to the second, before 1970 too
        assert not (ws["inbox"] / name).exists()  # the after-action found the same file
    assert got == {}
    rows = journal_rows(ws["db"])
    assert {r["status"] for r in rows} == {"SUCCEEDED"} and len(rows) == 7 * len(stamps)
    kept = {r["filename"]: int(r["mtime_ns"]) for r in rows}
    assert kept == stamps  # exact, to the nanosecond
    row = next(r for r in rows if r["filename"] == "y2400.txt" and r["rule"] == "dated")
    assert row["attempts"] == 2
    shown = run_cli("history", "show", str(row["id"]), "--db", ws["db"])
    assert shown.returncode == 0, shown.stderr
    assert f"{stamps['y2400.txt']}" in shown.stdout
    again = once(cfg)  # the versions are known: nothing is planned twice
    assert again.returncode == 0 and "processed: 0" in again.stdout


@contextlib.contextmanager
def tmpfs(folder: Path, size: str = "64M") -> Iterator[Path]:
    """A small tmpfs at ``folder`` (root only): it stores any mtime time_t can, and a copy
    that wrote a sparse file's holes would run out of room at once."""
    folder.mkdir(parents=True, exist_ok=True)
    with mounted_tmpfs(folder, size) as mounted:
        yield mounted


def test_an_mtime_with_no_calendar_date_fails_alone(
    workspace: dict[str, Path], tmp_path: Path
) -> None:
    """tmpfs keeps mtimes up to 2**63 s: year 5138 goes to its folder; 2**62 s, which the C
    library cannot turn into a date, fails at once for the ``{yyyy}`` template, alone."""
    ws = workspace
    with tmpfs(tmp_path / "mnt") as mnt:
        inbox = mnt / "inbox"
        inbox.mkdir()
        ws["inbox"] = inbox
        for name, ns in (("y5138.txt", 10**20), ("nodate.txt", 2**62 * 10**9)):
            (inbox / name).write_bytes(name.encode())
            os.utime(inbox / name, ns=(0, ns))
        old_file(inbox / "today.txt", b"today")
        cfg = remote_config(ws, {"url": str(ws["outbox"]), "name": "{yyyy}/{name}"})
        result = once(cfg)
        assert result.returncode == 1, result.stderr
        year = time.strftime("%Y", time.localtime((inbox / "today.txt").stat().st_mtime))
        assert delivered(ws["outbox"]) == {
            "5138/y5138.txt": b"y5138.txt",
            f"{year}/today.txt": b"today",
        }
        rows = {r["filename"]: r for r in journal_rows(ws["db"])}
        bad = rows["nodate.txt"]
        assert (bad["status"], bad["attempts"]) == ("FAILED", 1)
        assert "has no calendar date" in bad["reason"]
        assert int(bad["mtime_ns"]) == 2**62 * 10**9


# ------------------------------------------------------------------ sizes


def sparse(path: Path, size: int, pieces: dict[int, bytes]) -> Path:
    with path.open("wb") as f:
        for offset, data in pieces.items():
            f.seek(offset)
            f.write(data)
        f.truncate(size)
    past = time.time() - 3600
    os.utime(path, (past, past))
    return path


def test_a_sparse_file_of_terabytes_is_copied_with_its_holes(
    workspace: dict[str, Path], tmp_path: Path
) -> None:
    """4 TiB with three pieces of data, from one small tmpfs to another (and to a folder of
    this test's own filesystem): only the data is written, the holes stay holes."""
    ws = workspace
    size = 4 << 40
    pieces = {0: b"head", 1 << 40: b"middle" * 1000, size - 5: b"tail!"}
    with tmpfs(tmp_path / "src") as src, tmpfs(tmp_path / "dst") as dst:
        ws["inbox"] = src
        path = sparse(src / "disk.img", size, pieces)
        old_file(src / "next.txt", b"next")
        cfg = remote_config(ws, str(dst / "out"), str(ws["outbox"]))
        result = once(cfg)
        assert result.returncode == 0, result.stderr
        for out in (dst / "out" / "disk.img", ws["outbox"] / "disk.img"):
            st = out.stat()
            assert st.st_size == size and st.st_blocks * 512 < 64 << 20
            with out.open("rb") as f:
                for offset, data in pieces.items():
                    f.seek(offset)
                    assert f.read(len(data)) == data
                f.seek(1 << 39)
                assert f.read(4096) == bytes(4096)
            assert st.st_mtime_ns == path.stat().st_mtime_ns
        assert (dst / "out" / "next.txt").read_bytes() == b"next"
        assert {r["status"] for r in journal_rows(ws["db"])} == {"SUCCEEDED"}


def test_a_sparse_file_keeps_its_holes_on_the_test_filesystem(
    workspace: dict[str, Path],
) -> None:
    """The same on whatever filesystem holds the test's folder (no root needed)."""
    ws = workspace
    size = 2 * GIB
    pieces = {0: b"head", GIB: os.urandom(100_000), size - 5: b"tail!"}
    path = sparse(ws["inbox"] / "disk.img", size, pieces)
    if path.stat().st_blocks * 512 >= GIB:
        pytest.skip("this filesystem does not keep holes")
    result = once(remote_config(ws, str(ws["outbox"])))
    assert result.returncode == 0, result.stderr
    out = ws["outbox"] / "disk.img"
    assert out.stat().st_size == size and out.stat().st_blocks * 512 < 16 << 20
    assert digest(out) == digest(path)


@pytest.mark.parametrize("way", range(len(COPY_WAYS)), ids=COPY_WAYS)
def test_every_way_of_copying_keeps_bytes_and_holes(tmp_path: Path, way: int) -> None:
    """copy_data's fallbacks (sendfile, then read/write), forced, on real files: a sparse
    one with data at both ends and a hole at its end, a dense one larger than one kernel
    call, and an empty one."""
    files = {
        "sparse": sparse(tmp_path / "sparse", (300 << 20) + 3, {0: b"a", 200 << 20: b"b" * 70_000}),
        "dense": old_file(tmp_path / "dense", (64 << 20) + 12_345),
        "empty": old_file(tmp_path / "empty", b""),
    }
    for name, src in files.items():
        out = tmp_path / f"{name}.copy"
        fd = os.open(src, os.O_RDONLY)
        dst = os.open(out, os.O_WRONLY | os.O_CREAT | os.O_EXCL)
        try:
            copy_data(fd, dst, os.fstat(fd), first=way)
        finally:
            os.close(dst)
            os.close(fd)
        assert out.stat().st_size == src.stat().st_size
        assert digest(out) == digest(src), name
        if src.stat().st_blocks * 512 < 100 << 20:  # the filesystem keeps holes: so must the copy
            assert out.stat().st_blocks <= src.stat().st_blocks + 2048, name


def digest(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        while data := f.read(1 << 24):
            h.update(data)
    return h.hexdigest()


def test_a_file_larger_than_the_destination_allows_fails_alone_at_once(
    workspace: dict[str, Path],
) -> None:
    """A size limit on files (RLIMIT_FSIZE here; a 17 TiB file on ext4, whose limit is
    16 TiB, is the same error, EFBIG): FAILED at the first attempt with the reason, no
    temporary file left, and the small file beside it delivered."""
    ws = workspace
    sparse(ws["inbox"] / "big.img", 1 * GIB, {0: b"head"})
    old_file(ws["inbox"] / "small.txt", b"small")
    dense = old_file(ws["inbox"] / "dense.bin", 40 << 20)
    cfg = remote_config(ws, str(ws["outbox"]))
    limit = 32 << 20

    def limited() -> None:
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    done = subprocess.run(
        [sys.executable, "-m", "filedispatch", "-c", str(cfg), "--once"],
        capture_output=True,
        text=True,
        timeout=120,
        env=cli_env(),
        preexec_fn=limited,
    )
    assert done.returncode == 1, done.stderr
    rows = {r["filename"]: r for r in journal_rows(ws["db"])}
    assert rows["small.txt"]["status"] == "SUCCEEDED"
    for name in ("big.img", dense.name):
        assert (rows[name]["status"], rows[name]["attempts"]) == ("FAILED", 1), rows[name]
        assert "File too large" in rows[name]["reason"]
    assert delivered(ws["outbox"]) == {"small.txt": b"small"}  # no temporary file left


def test_empty_files_arrive_empty_everywhere(
    workspace: dict[str, Path], ftp: FtpServer, sftp: SftpServer
) -> None:
    ws = workspace
    receiver = HttpReceiver()
    try:
        old_file(ws["inbox"] / "empty.txt", b"")
        cfg = remote_config(
            ws,
            str(ws["outbox"]),
            {"url": f"{receiver.url}/raw"},
            {"url": f"{receiver.url}/form", "fieldname": "file"},
            {"url": ftp.url("/in/")},
            {"url": sftp.url("/in/"), "known_hosts": str(sftp.known_hosts),
             "key_file": str(sftp.key_file)},
            {"compress": "gzip"},
            str(ws["root"] / "gz"),
        )  # fmt: skip
        result = once(cfg)
        assert result.returncode == 0, result.stderr
        assert delivered(ws["outbox"]) == {"empty.txt": b""}
        got = {r.path: r for r in receiver.received}
        assert got["/raw"].size == 0 and got["/raw"].headers["Content-Length"] == "0"
        assert (got["/form"].filename, got["/form"].size) == ("empty.txt", 0)
        assert (ftp.root / "in" / "empty.txt").read_bytes() == b""
        assert (sftp.root / "in" / "empty.txt").read_bytes() == b""
        assert gzip.decompress((ws["root"] / "gz" / "empty.txt.gz").read_bytes()) == b""
        rows = journal_rows(ws["db"])
        assert {r["status"] for r in rows} == {"SUCCEEDED"} and len(rows) == 7
    finally:
        receiver.close()

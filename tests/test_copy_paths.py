"""Local copies by every path (issue 16): the kernel's copy and its fallbacks, the batched lane
and the workers, with the fast paths on and off (``FILEDISPATCH_FASTPATH``). Whatever the way,
what arrives is the source's bytes, size, holes and mtime, under its final name only, once."""

from __future__ import annotations

import errno
import hashlib
import os
from pathlib import Path

import pytest

from filedispatch.dispatcher.lanes import COPY_CHUNK
from filedispatch.processors.local import sha256_if_same

from .conftest import cli_env, journal_rows, run_cli
from .servers import deliver_once, old_file, remote_config, sha256_of
from .test_edges import sparse

MIB = 1 << 20


def sources(inbox: Path) -> dict[str, Path]:
    """Small files for the batches (an empty one among them), a dense file for a worker (above
    the batch limit), and a sparse one with a hole at each end and data between."""
    files = {
        f"small-{i:03d}.csv": old_file(inbox / f"small-{i:03d}.csv", i * 331) for i in range(300)
    }
    files["empty.txt"] = old_file(inbox / "empty.txt", b"")
    files["dense.bin"] = old_file(inbox / "dense.bin", 9 * MIB + 17)
    files["sparse.img"] = sparse(
        inbox / "sparse.img", 300 * MIB + 5, {40 * MIB: os.urandom(70_000), 200 * MIB: b"mid"}
    )
    return files


def assert_copied(files: dict[str, Path], outbox: Path, db: Path) -> None:
    """Every file arrived with its bytes, size, mtime and holes; nothing else; one row each."""
    assert sorted(p.name for p in outbox.iterdir()) == sorted(files)  # no temporary left
    for name, src in files.items():
        out, st = outbox / name, src.stat()
        assert (out.stat().st_size, out.stat().st_mtime_ns) == (st.st_size, st.st_mtime_ns), name
        assert sha256_of(out) == sha256_of(src), name
        if st.st_blocks * 512 < st.st_size // 2:  # the source keeps holes: so must its copy
            assert out.stat().st_blocks <= st.st_blocks + 4096, name
        assert src.exists()  # mode: copy keeps the source
    rows = journal_rows(db)
    assert len(rows) == len(files)
    assert {(r["status"], r["attempts"]) for r in rows} == {("SUCCEEDED", 1)}


@pytest.mark.parametrize("fastpath", ["1", "0"], ids=["fast paths on", "fast paths off"])
def test_copies_of_every_size_arrive_whole(workspace: dict[str, Path], fastpath: str) -> None:
    """The default copy (``fsync``, ``verify: size``): kernel copies, the batched lane with two
    batches in flight and reflinks where the switch is on; read/write and the workers only
    where it is off. A name already taken in the destination gets the next number; the file
    there is left as it was (the rename into place never replaces it, renameat2 or link)."""
    ws = workspace
    files = sources(ws["inbox"])
    ws["outbox"].mkdir(parents=True, exist_ok=True)
    taken = old_file(ws["outbox"] / "small-007.csv", b"someone else's")
    cfg = remote_config(ws, {"url": str(ws["outbox"]), "on_conflict": "rename"})
    result = run_cli("-c", cfg, "--once", timeout=120, env=cli_env(FILEDISPATCH_FASTPATH=fastpath))
    assert result.returncode == 0, result.stderr

    batched = journal_rows(ws["db"], "detail LIKE 'copied in a batch%'")
    assert (len(batched) > COPY_CHUNK) == (fastpath == "1")  # more than one batch, or none
    assert taken.read_bytes() == b"someone else's"
    taken.rename(ws["root"] / "taken.csv")
    files["small-007-1.csv"] = files.pop("small-007.csv")
    assert_copied(files, ws["outbox"], ws["db"])


def test_a_copy_the_kernel_will_not_make_across_filesystems_falls_back(
    workspace: dict[str, Path], other_fs: Path
) -> None:
    """A source on a tmpfs (/dev/shm), the destination on the test's own filesystem:
    copy_file_range(2) refuses to copy between two kinds of filesystem (EXDEV, Linux 5.19 and
    later), so each copy goes on by sendfile(2), holes and all, in the batches and in the
    workers alike."""
    ws = workspace
    probe, out = old_file(other_fs / "probe", b"x"), ws["root"] / "probe.copy"
    fin = os.open(probe, os.O_RDONLY)
    fout = os.open(out, os.O_WRONLY | os.O_CREAT)
    try:
        os.copy_file_range(fin, fout, 1)
        refused = None
    except OSError as exc:
        refused = exc.errno
    finally:
        os.close(fin)
        os.close(fout)
        probe.unlink()
    if refused is None:
        pytest.skip("this kernel copies across these filesystems: nothing to fall back from")
    assert refused in (errno.EXDEV, errno.EOPNOTSUPP, errno.EINVAL)

    ws["inbox"] = other_fs
    files = {
        f"small-{i:02d}.csv": old_file(other_fs / f"small-{i:02d}.csv", i * 997) for i in range(40)
    }
    files["empty.txt"] = old_file(other_fs / "empty.txt", b"")
    files["dense.bin"] = old_file(other_fs / "dense.bin", 5 * MIB + 3)
    files["sparse.img"] = sparse(other_fs / "sparse.img", 100 * MIB, {MIB: os.urandom(9000)})
    cfg = remote_config(ws, str(ws["outbox"]))
    result = run_cli("-c", cfg, "--once", timeout=120)
    assert result.returncode == 0, result.stderr
    assert_copied(files, ws["outbox"], ws["db"])


@pytest.mark.parametrize(
    "copy",
    [b"", b"a" * (MIB + 1), b"a" * MIB + b"b", b"a" * MIB, b"a" * (MIB + 2), b"b" + b"a" * MIB],
    ids=["empty", "the same", "last byte", "shorter", "longer", "first byte"],
)
def test_verify_sha256_hashes_the_source_and_compares_the_copy(tmp_path: Path, copy: bytes) -> None:
    """``verify: sha256`` on a local copy hashes the source once and compares the copy with it
    byte for byte: the SHA-256 only when every byte and the length match."""
    src = tmp_path / "src"
    src.write_bytes(b"a" * (MIB + 1))
    (tmp_path / "copy").write_bytes(copy)
    fds = [os.open(tmp_path / name, os.O_RDONLY) for name in ("src", "copy")]
    try:
        got = sha256_if_same(*fds)
    finally:
        for fd in fds:
            os.close(fd)
    same = copy == src.read_bytes()
    assert got == (hashlib.sha256(copy).hexdigest() if same else None)


@pytest.mark.parametrize("planted", ["same-size-and-mtime", "link-to-the-source"])
def test_a_local_resume_takes_only_its_own_bytes_for_an_earlier_delivery(
    tmp_path: Path, planted: str
) -> None:
    """Someone who may write into the destination folder puts a file at our final name with
    our size and mtime (both readable from the inbox), or a link to our source there, and our
    row's attempt fails (any retry is a resume). The resume took either for our earlier
    delivery (size and mtime matched): ours was never copied, the row SUCCEEDED and the source
    was consumed. Now what is there must hold our very bytes, as a regular file: ours lands
    beside it (``rename``); a file with our bytes is still found delivered."""
    from filedispatch.config import load_config
    from filedispatch.models import FileVersion
    from filedispatch.processors import StepContext

    out = tmp_path / "out"
    out.mkdir()
    ws = {"root": tmp_path, "inbox": tmp_path / "inbox", "db": tmp_path / "journal.db"}
    src = old_file(ws["inbox"] / "a.bin", b"O" * 4096)
    st = os.stat(src)
    if planted == "link-to-the-source":
        (out / "a.bin").symlink_to(src)
    else:
        (out / "a.bin").write_bytes(b"T" * 4096)
        os.utime(out / "a.bin", ns=(st.st_atime_ns, st.st_mtime_ns))
    config = load_config(remote_config(ws, {"url": out.as_uri()}))
    source = config.sources[0]
    version = FileVersion.from_stat(source.key, source.path, "a.bin", st)

    def deliver() -> object:
        ctx = StepContext(
            7, version, src, "r", 0, 2, tmp_path / "work", resuming=True, journal="0a1b2c3d"
        )
        return deliver_once(config.rules[0].to[0], ctx)

    outcome = deliver()
    assert getattr(outcome, "detail", None) is None, f"{outcome}: ours was never copied"
    assert (out / "a-1.bin").read_bytes() == b"O" * 4096
    assert os.path.islink(out / "a.bin") == (planted == "link-to-the-source")
    again = deliver()  # our copy at a-1.bin, of our size, mtime and bytes
    assert getattr(again, "detail", None) == "found delivered by an earlier attempt"

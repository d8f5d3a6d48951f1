"""A FIFO or a device node at a source's name is refused before it is ever opened: every open
of a source first takes an ``O_PATH`` handle, checks the type on it, and only then opens the
file through ``/proc/self/fd/N``. An ``O_PATH`` handle raises no inotify ``IN_OPEN``; a real
open does, so a watch on the node tells whether anything opened it."""

from __future__ import annotations

import ctypes
import os
import stat
import struct
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from filedispatch import sourcefile
from filedispatch.content import detect_mime
from filedispatch.errors import SourceVanishedError
from filedispatch.models import FileVersion

from .conftest import ServiceProcess, free_port, old, run_cli, wait_until, write_config

IN_OPEN = 0x20
IN_NONBLOCK = os.O_NONBLOCK


class OpenWatch:
    """inotify ``IN_OPEN`` on one path: ``opened()`` tells whether anyone opened it since."""

    def __init__(self, path: Path) -> None:
        libc = ctypes.CDLL(None, use_errno=True)
        self.fd = libc.inotify_init1(IN_NONBLOCK | os.O_CLOEXEC)
        assert self.fd >= 0, os.strerror(ctypes.get_errno())
        wd = libc.inotify_add_watch(self.fd, os.fsencode(path), IN_OPEN)
        assert wd >= 0, os.strerror(ctypes.get_errno())

    def opened(self) -> bool:
        try:
            data = os.read(self.fd, 4096)
        except BlockingIOError:
            return False
        masks = [struct.unpack_from("iIII", data, i)[1] for i in range(0, len(data), 16)]
        return any(m & IN_OPEN for m in masks)

    def close(self) -> None:
        os.close(self.fd)


@pytest.fixture
def watch_opens() -> Iterator[Callable[[Path], OpenWatch]]:
    made: list[OpenWatch] = []

    def make(path: Path) -> OpenWatch:
        made.append(OpenWatch(path))
        return made[-1]

    yield make
    for w in made:
        w.close()


def can_mknod() -> bool:
    return os.geteuid() == 0


def special(kind: str, path: Path) -> None:
    """A FIFO, or a copy of /dev/zero's device node (root only)."""
    if kind == "fifo":
        os.mkfifo(path)
    else:
        if not can_mknod():
            pytest.skip("making a device node needs root")
        zero = os.stat("/dev/zero").st_rdev
        try:
            os.mknod(path, stat.S_IFCHR | 0o600, zero)
        except PermissionError:
            pytest.skip("this container refuses mknod")


KINDS = ["fifo", "device"]


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("resolver", ["openat2", "walk"])
def test_a_special_file_swapped_in_is_refused_unopened(
    kind: str,
    resolver: str,
    tmp_path: Path,
    watch_opens: Callable[[Path], OpenWatch],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    if resolver == "walk":
        monkeypatch.setattr(sourcefile, "openat2", None)
    elif sourcefile.openat2 is None:
        pytest.skip("this kernel has no openat2")
    inbox = tmp_path / "inbox"
    versions = []
    for rel in ("top.dat", "sub/deep.dat"):
        st = old(inbox / rel, b"planned bytes").stat()
        versions.append(FileVersion.from_stat("inbox", inbox, rel, st))
    watches = []
    for v in versions:  # swapped in after the watcher saw a regular file
        special(kind, tmp_path / "swap")
        os.rename(tmp_path / "swap", v.path)
        watches.append(watch_opens(v.path))
    what = "a FIFO" if kind == "fifo" else "a device"
    for v in versions:
        with pytest.raises(SourceVanishedError, match=f"is now {what}: not read"):
            sourcefile.open_version(v)
        assert sourcefile.read_head(v, 512) is None
        assert detect_mime(v) is None
    assert sourcefile.WriterCheck().busy(inbox, versions) == set()
    assert [w.opened() for w in watches] == [False, False]


def test_the_watch_can_see_an_open(
    tmp_path: Path, watch_opens: Callable[[Path], OpenWatch]
) -> None:
    """The test's own instrument: a real open of a FIFO is seen, an O_PATH handle is not."""
    os.mkfifo(tmp_path / "f")
    w = watch_opens(tmp_path / "f")
    os.close(os.open(tmp_path / "f", os.O_PATH))
    assert not w.opened()
    os.close(os.open(tmp_path / "f", os.O_RDONLY | os.O_NONBLOCK))
    assert w.opened()


@pytest.mark.parametrize("kind", KINDS)
def test_the_service_passes_special_files_over_unopened_and_keeps_working(
    kind: str,
    tmp_path: Path,
    watch_opens: Callable[[Path], OpenWatch],
    service_factory: Callable[..., ServiceProcess],
) -> None:
    inbox, outbox = tmp_path / "inbox", tmp_path / "outbox"
    inbox.mkdir()
    special(kind, inbox / "node.dat")
    watch = watch_opens(inbox / "node.dat")
    port = free_port()
    data = {
        "database": str(tmp_path / "journal.db"),
        "sources": [{"path": str(inbox), "name": "inbox", "settle": 0, "rescan": 0.2}],
        "rules": [{"name": "all", "glob": "*", "to": str(outbox)}],
        "api": {"host": "127.0.0.1", "port": port},
        "monitor": {"enabled": False},
    }
    cfg = write_config(tmp_path / "config.yml", data)
    once = run_cli("-c", cfg, "--once", "--no-webapp")
    assert once.returncode == 0, once.stderr
    assert "not_regular: 1" in once.stdout
    service_factory(cfg).start()
    old(inbox / "after.dat", b"still working")
    wait_until(lambda: (outbox / "after.dat").exists(), 30)
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=10) as resp:
        assert resp.status == 200
    os.utime(inbox / "node.dat")  # an event on the node itself, and rescans meanwhile
    old(inbox / "later.dat", b"after the event")
    wait_until(lambda: (outbox / "later.dat").exists(), 30)
    assert sorted(p.name for p in outbox.iterdir()) == ["after.dat", "later.dat"]
    assert not watch.opened()

"""Compress transform: gzip, zip, tar.gz or zstd of the step's input, written into the work folder.

The output has a deterministic name (``<name>.gz`` ...) in the chain's private work folder and
appears there whole or not at all (temporary name, then rename). It never writes next to the
source; the dispatcher removes the work folder when the chain ends.
"""

from __future__ import annotations

import gzip
import math
import os
import shutil
import tarfile
import tempfile
import time
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import IO

import zstandard

from .. import naming, sourcefile
from ..asyncutil import in_daemon_thread
from ..config import CompressStep
from ..errors import PermanentDeliveryError
from ..models import Outcome
from . import Resources, StepContext
from .common import open_input, translate_os_error, unlink_quietly

#: the name suffix each format adds
SUFFIX = {"gzip": ".gz", "zip": ".zip", "tar.gz": ".tar.gz", "zstd": ".zst"}
#: the level used when the step names none (zlib's 6: most of the gain for half of 9's time)
DEFAULT_LEVEL = {"gzip": 6, "zip": 6, "tar.gz": 6, "zstd": 3}
_CHUNK = 1024 * 1024
_FORMAT_ERRORS = (zstandard.ZstdError, zipfile.LargeZipFile, tarfile.TarError)


def create(step: CompressStep, resources: Resources) -> CompressProcessor:
    del resources
    return CompressProcessor(step)


def ensure_workdir(folder: Path) -> Path:
    """Create a chain's work folder (and the work root above it) readable only by us."""
    try:
        folder.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        folder.mkdir(mode=0o700, exist_ok=True)
    except OSError as exc:
        raise translate_os_error(exc, f"cannot create the work folder {folder}") from exc
    return folder


class CompressProcessor:
    """Writes ``<workdir>/step<N>/<name><suffix>``; later steps deliver that file."""

    def __init__(self, step: CompressStep) -> None:
        self.step = step
        self.format = step.compress
        self.level = DEFAULT_LEVEL[step.compress] if step.level is None else step.level

    async def aclose(self) -> None:
        return None

    async def deliver(self, ctx: StepContext) -> Outcome:
        # a daemon thread: a source whose open or read hangs holds no thread of anyone else's
        # and not the exit (cancelled, the wait ends; the thread goes on into its own files)
        return await in_daemon_thread(self._compress, ctx)

    def _compress(self, ctx: StepContext) -> Outcome:
        # one folder per step, so two transforms of one chain can never collide
        folder = ensure_workdir(ctx.workdir) / f"step{ctx.step + 1}"
        suffix = SUFFIX[self.format]
        target = folder / (naming.shorten(ctx.input.name, len(suffix)) + suffix)
        fd, st = open_input(ctx)  # also checks the source is still the planned version
        try:
            folder.mkdir(mode=0o700, exist_ok=True)
            # a unique temporary name: an abandoned (timed-out) attempt cannot clash with this one
            out_fd, tmp_name = tempfile.mkstemp(prefix=".tmp-", dir=folder)
        except OSError as exc:
            os.close(fd)
            raise translate_os_error(exc, f"cannot write in {folder}") from exc
        tmp = Path(tmp_name)
        try:
            with open(fd, "rb") as src, open(out_fd, "wb") as out:
                _WRITERS[self.format](src, out, ctx.input.name, st.st_mtime, self.level)
                sourcefile.check_unchanged(src.fileno(), st, ctx.input.name)
            os.replace(tmp, target)
        except OSError as exc:
            unlink_quietly(tmp)
            raise translate_os_error(exc, f"cannot compress {ctx.input.name}") from exc
        except _FORMAT_ERRORS as exc:
            unlink_quietly(tmp)
            raise PermanentDeliveryError(f"cannot compress {ctx.input.name}: {exc}") from exc
        except BaseException:
            unlink_quietly(tmp)
            raise
        size = target.stat().st_size
        return Outcome(
            str(target),
            produced=target,
            detail=f"{self.format}: {st.st_size} -> {size} bytes",
        )


def _gzip_time(mtime: float) -> int:
    """The gzip header's MTIME: 32 unsigned bits, 0 meaning "none" (RFC 1952), so a date
    before 1970 or after 2106 is left out rather than refused."""
    return math.floor(mtime) if 0 <= mtime < 2**32 else 0


def _gzip(src: IO[bytes], out: IO[bytes], name: str, mtime: float, level: int) -> None:
    # the original name and mtime go into the header, as gzip(1) does; output is reproducible
    with gzip.GzipFile(name, "wb", level, out, mtime=_gzip_time(mtime)) as gz:
        shutil.copyfileobj(src, gz, _CHUNK)


def _zip(src: IO[bytes], out: IO[bytes], name: str, mtime: float, level: int) -> None:
    info = zipfile.ZipInfo(name, _zip_time(mtime))
    info.compress_type = zipfile.ZIP_DEFLATED
    info.external_attr = 0o644 << 16
    with (
        zipfile.ZipFile(out, "w", zipfile.ZIP_DEFLATED, compresslevel=level) as zf,
        zf.open(info, "w", force_zip64=True) as entry,
    ):
        shutil.copyfileobj(src, entry, _CHUNK)


def _tar_gz(src: IO[bytes], out: IO[bytes], name: str, mtime: float, level: int) -> None:
    info = tarfile.TarInfo(name)
    info.size = os.fstat(src.fileno()).st_size
    info.mtime = math.floor(mtime)  # PAX keeps any date; the second it falls in, as stat
    info.mode = 0o644
    with (
        gzip.GzipFile(name + ".tar", "wb", level, out, mtime=_gzip_time(mtime)) as gz,
        tarfile.open(fileobj=gz, mode="w", format=tarfile.PAX_FORMAT) as tar,
    ):
        tar.addfile(info, src)


def _zstd(src: IO[bytes], out: IO[bytes], name: str, mtime: float, level: int) -> None:
    del name, mtime  # a zstd frame has no room for either
    size = os.fstat(src.fileno()).st_size
    zstandard.ZstdCompressor(level=level, write_checksum=True).copy_stream(
        src, out, size=size, read_size=_CHUNK, write_size=_CHUNK
    )


def _zip_time(mtime: float) -> tuple[int, int, int, int, int, int]:
    # zip (MS-DOS) dates run from 1980 to 2107: a date outside is brought to the nearest end
    t = time.localtime(min(max(mtime, _ZIP_FIRST), _ZIP_LAST))
    return (t.tm_year, t.tm_mon, t.tm_mday, t.tm_hour, t.tm_min, t.tm_sec)


_ZIP_FIRST = 315_532_800 + 86_400  #: 1980-01-02 UTC: 1980-01-01 in every time zone
_ZIP_LAST = 4_354_819_200 - 86_400  #: 2107-12-31 UTC: still 2107 in every time zone


_WRITERS: dict[str, Callable[[IO[bytes], IO[bytes], str, float, int], None]] = {
    "gzip": _gzip,
    "zip": _zip,
    "tar.gz": _tar_gz,
    "zstd": _zstd,
}

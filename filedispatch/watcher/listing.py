"""The scan's listing, held compactly: every candidate file a walk found, as the numbers of
its stat and its relpath packed in sorted runs of arrays (41 bytes and the name per file,
about 300 as tuples), read back merged, oldest first. It never stats, opens or hands on a
file itself.
"""

from __future__ import annotations

import heapq
import os
from array import array
from collections.abc import Iterable, Iterator

#: (mtime_ns, relpath, size, inode, ctime_ns, device): a file as the scan orders it
Row = tuple[int, str, int, int, int, int]

#: files sorted together before they are packed (the only rows held as tuples at once)
RUN = 4_096


def _numbers(code: str, values: list[int]) -> array[int] | list[int]:
    """``values`` packed 8 bytes each, or kept as a list when one does not fit (ext4 keeps
    times up to the year 2446, past 2**63 nanoseconds)."""
    try:
        return array(code, values)
    except OverflowError:
        return values


class _Run:
    """Rows sorted, then packed: one array per number, the relpaths joined by NUL (a name
    never holds one), encoded as the walk decoded them."""

    __slots__ = ("ctimes", "devs", "inos", "mtimes", "names", "sizes")

    def __init__(self, rows: list[Row]) -> None:
        rows.sort()
        self.mtimes = _numbers("q", [r[0] for r in rows])
        self.names = os.fsencode("\0".join(r[1] for r in rows))
        self.sizes = _numbers("q", [r[2] for r in rows])
        self.inos = _numbers("Q", [r[3] for r in rows])
        self.ctimes = _numbers("q", [r[4] for r in rows])
        self.devs = _numbers("Q", [r[5] for r in rows])

    def __iter__(self) -> Iterator[Row]:
        names, pos = self.names, 0
        for i, mtime in enumerate(self.mtimes):
            end = names.find(b"\0", pos)
            if end < 0:
                end = len(names)
            rel = os.fsdecode(names[pos:end])
            pos = end + 1
            yield mtime, rel, self.sizes[i], self.inos[i], self.ctimes[i], self.devs[i]


class Listing:
    """The files of one scan, oldest first (ties by relpath), whatever their number."""

    def __init__(self, found: Iterable[tuple[str, os.stat_result]]) -> None:
        """Take every (relpath, stat) of ``found`` (a walk; it runs in the caller's thread)."""
        self._runs: list[_Run] = []
        self.count = 0
        rows: list[Row] = []
        for rel, st in found:
            rows.append((st.st_mtime_ns, rel, st.st_size, st.st_ino, st.st_ctime_ns, st.st_dev))
            if len(rows) >= RUN:
                self._pack(rows)
                rows = []
        self._pack(rows)

    def _pack(self, rows: list[Row]) -> None:
        if rows:
            self.count += len(rows)
            self._runs.append(_Run(rows))

    def __len__(self) -> int:
        return self.count

    def __iter__(self) -> Iterator[Row]:
        """Every row, oldest first: the runs merged as they are read, none unpacked whole."""
        if len(self._runs) == 1:
            return iter(self._runs[0])
        return heapq.merge(*self._runs)

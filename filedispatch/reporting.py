"""What the command line's and the API's reports share: the period a moment falls in (a day,
an ISO 8601 week, a month) and sizes for people.

A period is found from a *day number* (whole days since 1970-01-01) so that the journal can
group rows by day cheaply and Python folds the days into weeks or months with one rule for both.
"""

from __future__ import annotations

import datetime as dt
import functools
from typing import Literal

PERIODS = ("day", "week", "month")
Period = Literal["day", "week", "month"]


@functools.lru_cache(maxsize=4096)
def period_start(day: int, period: Period) -> dt.date:
    """The first day of the period holding day number ``day``: the day itself, the Monday of
    its ISO week, or the first of its month."""
    date = dt.date(1970, 1, 1) + dt.timedelta(days=day)
    if period == "week":
        return date - dt.timedelta(days=date.weekday())
    if period == "month":
        return date.replace(day=1)
    return date


def period_label(start: dt.date, period: Period) -> str:
    """``2026-11-30``, ``2026-W49`` (ISO 8601 week-numbering year and week: 2027-01-01 is in
    ``2026-W53``) or ``2026-11``."""
    if period == "week":
        year, week, _ = start.isocalendar()
        return f"{year}-W{week:02d}"
    if period == "month":
        return start.strftime("%Y-%m")
    return start.isoformat()


def human_size(n: int) -> str:
    """1536 -> "1.5 KB" (powers of 1024, as sizes are written in the config)."""
    if n < 1024:
        return f"{n} B"
    value = float(n)
    for unit in ("KB", "MB", "GB", "TB", "PB"):
        value /= 1024
        if value < 1024 or unit == "PB":
            break
    return f"{value:.1f} {unit}"

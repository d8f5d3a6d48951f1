"""The retry policy: what is retried, how often, until when, and how long each wait is.

The settings are ``config.RetryPolicy`` (one per step); every decision made from them is here,
in ``decide``. Pure apart from the jitter's randomness: no I/O, no logging, no counting (the
dispatcher records, counts and logs), no sleeping (a wait is a time kept in the journal).
``set_testing`` (or ``FILEDISPATCH_RETRY_TESTING=1``) turns the waits off, as stamina's does.
"""

from __future__ import annotations

import math
import os
import random
from dataclasses import dataclass
from typing import TYPE_CHECKING

from .errors import DeliveryError, NetworkError, TransientDeliveryError

if TYPE_CHECKING:
    from .config import RetryPolicy

#: tries in all for an error that may heal, where ``attempts`` is not set (network errors
#: excepted: they are bounded by time, ``NETWORK_FOR_S``)
DEFAULT_ATTEMPTS = 5
#: seconds after the first try during which a network error is retried, where neither
#: ``attempts`` nor ``for`` is set (an ordinary outage: a DNS failure, a server restarting)
NETWORK_FOR_S = 3600.0
#: the jitter's spread: each wait is multiplied by a random factor in [1 - J, 1 + J]
JITTER = 0.2

_testing = os.environ.get("FILEDISPATCH_RETRY_TESTING", "") not in ("", "0")


def set_testing(on: bool) -> None:
    """Turn the waits between tries off (``on``) or back on, for tests: what is retried and
    how often stays as configured, only the waits become 0 s. The environment variable
    ``FILEDISPATCH_RETRY_TESTING=1`` does the same for a service started as a process."""
    global _testing
    _testing = on


def testing() -> bool:
    """Whether ``set_testing`` (or the environment variable) turned the waits off."""
    return _testing


@dataclass(frozen=True, slots=True)
class Decision:
    """What happens after a failed try: ``retry`` after ``wait_s`` seconds, or give up with
    ``note`` appended to the reason (empty when there is nothing to add)."""

    retry: bool
    wait_s: float = 0.0
    note: str = ""


def backoff_s(policy: RetryPolicy, attempt: int) -> float:
    """Seconds to wait after the ``attempt``-th try failed (1-based), before jitter: ``delay``
    multiplied by ``backoff`` per earlier retry, capped at ``max_delay``."""
    try:
        grown = policy.delay * policy.backoff ** max(0, attempt - 1)
    except OverflowError:  # 100 ** 999 is no float: the cap applies
        grown = math.inf
    return float(min(policy.max_delay, grown))


def limits(policy: RetryPolicy, network: bool) -> tuple[int | None, float | None]:
    """(most tries in all, seconds after the first try when retrying stops), None for no
    bound, for an error of this kind. ``attempts`` set applies to every error; unset, a
    network error is bounded by ``for`` (default ``NETWORK_FOR_S``) and any other by
    ``DEFAULT_ATTEMPTS`` (and ``for`` if set)."""
    if policy.attempts is not None:
        return policy.attempts, policy.for_
    if network:
        return None, NETWORK_FOR_S if policy.for_ is None else policy.for_
    return DEFAULT_ATTEMPTS, policy.for_


def decide(
    policy: RetryPolicy,
    exc: DeliveryError,
    attempt: int,
    previous_error: str | None,
    *,
    first_try_s: float,
    now_s: float,
) -> Decision:
    """Whether the ``attempt``-th try (1-based), which failed with ``exc``, is tried again.

    A permanent error is never retried. A transient one is while within ``limits``: the
    tries made, and the time from ``first_try_s`` (when the row's first try started, Unix
    seconds) to ``now_s``; with ``same_error``, only while the error's kind (``error_kind``)
    is the one the row failed with before (``previous_error``, None on a first failure). A
    ``retry_after`` the server asked for (seconds) lengthens the wait, up to ``max_delay``.
    """
    if not isinstance(exc, TransientDeliveryError):
        return Decision(False)
    kind = error_kind(exc)
    if policy.same_error and previous_error not in (None, kind):
        return Decision(
            False, note=f" (a different error than before, {previous_error}: not retried)"
        )
    most, for_s = limits(policy, isinstance(exc, NetworkError))
    if most is not None and attempt >= most:
        return Decision(False, note=f" (gave up after {attempt} attempts)" if most > 1 else "")
    if for_s is not None and now_s - first_try_s >= for_s:
        return Decision(
            False, note=f" (gave up after {attempt} attempts in {now_s - first_try_s:.0f}s)"
        )
    wait = backoff_s(policy, attempt)
    if policy.jitter:  # spread, but never past the cap
        wait = min(policy.max_delay, wait * random.uniform(1 - JITTER, 1 + JITTER))
    hint = exc.retry_after
    if hint is not None:
        wait = max(wait, min(float(hint), policy.max_delay or float(hint)))
    return Decision(True, 0.0 if _testing else wait)


def error_kind(exc: DeliveryError) -> str:
    """The name the journal keeps as a row's ``error_type``: the foreign error's class where
    the processor translated one, else ours."""
    return type(exc.__cause__ or exc).__name__

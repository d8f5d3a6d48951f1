"""What every file-like processor shares: names, conflicts, opening the input, OS errors.

Pure helpers with no state; each destination module (local, http, ftp, sftp, s3, command,
compress, python) builds on them. Nothing here writes to a destination.
"""

from __future__ import annotations

import base64
import errno
import os
import secrets
from collections.abc import Awaitable, Callable, Iterable, Iterator
from pathlib import Path, PurePosixPath
from typing import Any

from .. import naming, sourcefile
from ..errors import DeliveryError, PermanentDeliveryError, TransientDeliveryError
from . import StepContext

TMP_PREFIX = naming.OWN_PREFIX + "tmp-"
MAX_RENAME = 10_000
_PERMANENT_ERRNOS = {
    errno.EACCES,
    errno.EPERM,
    errno.EROFS,
    errno.ENAMETOOLONG,
    errno.EISDIR,
    errno.ENOTDIR,
    errno.EINVAL,
    errno.EEXIST,
    errno.EFBIG,  # larger than the destination filesystem allows a file to be
}


def temp_name(
    dispatch_id: int, name: str, epoch: int | None = None, journal: str = "", salt: str = ""
) -> str:
    """The hidden name a delivery of row ``dispatch_id`` is written under before its rename:
    ``.filedispatch-tmp-<journal>-<id>-e<epoch>-NAME`` for a claim with a fencing token
    (``epoch``, a PostgreSQL journal), ``.filedispatch-tmp-<journal>-<id>-NAME`` without one
    (None or 0: SQLite). ``journal`` is the journal's identity token (``Journal.token``, 8
    hex characters); "" (a caller with no journal) leaves it out: ``.filedispatch-tmp-<id>-``.

    Each claim of a row thus writes a file of its own: a node whose lease ran out can rename or
    remove only its own copy, never the upload of the node that took the row over; and two
    journals (two hosts or services, each with its own journal, whose row ids both start at 1)
    delivering a file of the same name into one folder never write one temporary file. At most
    NAME_MAX bytes: ``name`` is shortened by ``naming.shorten`` to leave room for the head.

    ``salt`` (``fresh_salt``, "" for none) goes after the id and epoch:
    ``...-<id>-[e<epoch>-]<salt>-NAME``, a name no one could know in advance: every FTP
    attempt's (no exclusive create), and a local copy's when the predictable name is taken by
    what is not ours to remove (a planted link, see ``local.create_temp``). It keeps the
    row's prefix, so ``earlier_temps`` with a token (a resume) and the start-up sweep find it
    like any other temporary name of the journal; without a token it is not looked for.
    """
    head = temp_prefix(dispatch_id, journal) + (f"e{epoch}-" if epoch else "")
    head += f"{salt}-" if salt else ""
    return head + naming.shorten(name, len(head))


def fresh_salt() -> str:
    """Six random lower-case base32 characters (30 bits) for ``temp_name``'s ``salt``."""
    return base64.b32encode(secrets.token_bytes(4)).decode("ascii")[:6].lower()


def temp_prefix(dispatch_id: int, journal: str = "") -> str:
    """How every temporary name of row ``dispatch_id`` of the journal whose token is
    ``journal`` begins, whatever its claim (the trailing dash keeps row 7's names apart from
    row 70's)."""
    return f"{TMP_PREFIX}{journal}-{dispatch_id}-" if journal else f"{TMP_PREFIX}{dispatch_id}-"


def earlier_temps(
    names: Iterable[str], dispatch_id: int, name: str, journal: str = ""
) -> list[str]:
    """The names among ``names`` (one folder's entries) that are temporary names earlier
    claims or attempts of row ``dispatch_id`` of the journal ``journal`` (its token) wrote:
    what a resumed delivery removes before it starts again.

    With a token, every name that begins with the row's prefix (``temp_prefix``): a row
    delivers one file, but the name it renders may differ from one attempt to the next (a
    ``{now}`` template, a reload that changed the name; a6 review: the earlier copy was left),
    and no other journal, row or user writes that prefix (the token is random, the dash ends
    the id). Without a token (no journal): exactly what ``temp_name`` gives for the file
    ``name``, with or without an epoch, since the prefix is shared by every journal's row of
    that id."""
    if journal:
        head = temp_prefix(dispatch_id, journal)
        return [entry for entry in names if entry.startswith(head)]
    plain = temp_name(dispatch_id, name, journal=journal)
    head = temp_prefix(dispatch_id, journal) + "e"
    found = []
    for entry in names:
        if entry == plain:
            found.append(entry)
        elif entry.startswith(head):
            digits, dash, _ = entry[len(head) :].partition("-")
            if (
                dash
                and digits.isdigit()
                and entry == temp_name(dispatch_id, name, int(digits), journal)
            ):
                found.append(entry)
    return found


def translate_os_error(exc: OSError, what: str) -> DeliveryError:
    """Map an OSError met while writing to the destination onto our error tree."""
    text = f"{what}: {exc.strerror or exc}"
    if exc.errno == errno.EFBIG:
        text += " (larger than the destination filesystem allows one file to be)"
    if exc.errno in _PERMANENT_ERRNOS:
        return PermanentDeliveryError(text)
    return TransientDeliveryError(text)


def choices(target: PurePosixPath, on_conflict: str) -> Iterator[tuple[PurePosixPath, bool]]:
    """The names to try for ``target``, in order, each with whether it may replace a file.

    The policy of ``on_conflict`` in one place, for every file-like destination, local or
    remote: the iterator ends when ``skip`` finds the name taken, and raises for ``fail`` or
    when ``rename`` runs out of numbers. The caller tries each name until one is free.
    """
    if on_conflict == "overwrite":
        yield target, True
        return
    for candidate in candidates(target, on_conflict):
        yield candidate, False
    if on_conflict == "fail":
        raise PermanentDeliveryError(f"{target} already exists (on_conflict: fail)")
    if on_conflict == "rename":
        raise PermanentDeliveryError(f"no free name near {target} after {MAX_RENAME} tries")


def place(
    exists: Callable[[PurePosixPath], bool],
    target: PurePosixPath,
    on_conflict: str,
    put: Callable[[PurePosixPath, bool], None],
) -> PurePosixPath | None:
    """Resolve ``on_conflict`` for ``target`` and call ``put(final, overwrite)``.

    ``put`` must be atomic and, when ``overwrite`` is false, refuse to replace an existing
    file with FileExistsError (so two writers can never pick the same name). Returns the final
    path, or None when ``skip`` found the name taken.
    """
    for candidate, overwrite in choices(target, on_conflict):
        if overwrite or not exists(candidate):
            try:
                put(candidate, overwrite)
                return candidate
            except FileExistsError:
                pass
    return None


async def aplace(
    exists: Callable[[PurePosixPath], Awaitable[bool]],
    target: PurePosixPath,
    on_conflict: str,
    put: Callable[[PurePosixPath, bool], Awaitable[None]],
) -> PurePosixPath | None:
    """``place`` for a remote server (FTP, SFTP, S3): looking and writing are round trips.

    A server's rename may replace an existing file, so a name is only used once ``exists``
    says it is free, or until ``put`` raises FileExistsError (as a conditional write does):
    two services writing the same names to one FTP server can still race.
    """
    for candidate, overwrite in choices(target, on_conflict):
        if overwrite or not await exists(candidate):
            try:
                await put(candidate, overwrite)
                return candidate
            except FileExistsError:  # a conditional write found it taken after all
                pass
    return None


def candidates(target: PurePosixPath, on_conflict: str) -> Iterable[PurePosixPath]:
    """Names an earlier attempt may have used, for recognising our own delivery after a crash."""
    yield target
    if on_conflict == "rename":
        for n in range(1, MAX_RENAME + 1):
            yield naming.with_suffix_number(target, n)


def render_target(
    template: str, ctx: StepContext, options: naming.NameOptions = naming.NO_OPTIONS
) -> PurePosixPath:
    """The name template rendered for this step's input (a transform's output keeps its name);
    ``options``: the destination's (``step.naming``: its rule's regex, its time zone)."""
    return PurePosixPath(render_target_str(template, ctx, options))


def render_target_str(
    template: str, ctx: StepContext, options: naming.NameOptions = naming.NO_OPTIONS
) -> str:
    """``render_target`` as a plain "a/b" string, for the per-file hot path."""
    transformed = ctx.input is not ctx.version.path and ctx.input != ctx.version.path
    return naming.render_str(
        template,
        ctx.version,
        ctx.input.name if transformed else None,
        options,
        counter=ctx.dispatch_id,
        content=ctx.input,
        label=ctx.label,
        sha256=ctx.sha256,
    )


def named_by_content(step: Any) -> bool:
    """Whether the step's destination names a file by its bytes (``{sha256}`` in its
    ``name``, or in an HTTP URL's path): its digest is then worked out before the step
    (``inputs.content_sha256``), off the event loop."""
    parts = getattr(step, "parts", None)
    return naming.by_content(getattr(step, "name", None), parts.path if parts else None)


def open_input(ctx: StepContext) -> tuple[int, os.stat_result]:
    """Open the file a step delivers (a raw fd) and check it is still the planned version.

    Raises SourceVanishedError when it is gone, changed or replaced (see ``sourcefile``).
    """
    return sourcefile.open_input(ctx.version, ctx.input)


def unlink_quietly(path: Path) -> None:
    """Remove ``path`` if it is there; an error (gone already, no permission) is ignored."""
    try:
        os.unlink(path)
    except OSError:
        pass

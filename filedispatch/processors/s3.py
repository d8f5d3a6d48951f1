"""S3 destination, with aiobotocore: one PUT for a small file, a multipart upload with bounded
memory for a large one, conflicts settled by a conditional write where the server has them.

An interrupted multipart upload is aborted; each one begun is written down first in the
journal (s3uploads.py), so the ones a run that is gone left are found and aborted by a live
service (``sweep_orphans``), and nobody else's are. No botocore error leaves this module
untranslated, and none carries a secret.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import logging
import os
from collections.abc import Awaitable, Callable, Iterator
from pathlib import PurePosixPath
from typing import TYPE_CHECKING, Any, ClassVar
from urllib.parse import quote

import aiohttp
from aiobotocore.config import AioConfig
from aiobotocore.session import get_session
from botocore.exceptions import (
    BotoCoreError,
    ClientError,
    NoCredentialsError,
    PartialCredentialsError,
)

from .. import fastpath, sourcefile
from ..asyncutil import to_thread_joined
from ..config import Config, S3Destination, scrub, secrets_of
from ..errors import (
    DeliveryError,
    PermanentDeliveryError,
    SourceVanishedError,
    TransientDeliveryError,
)
from ..journal import Journal, OpenUpload
from ..models import NAME_TAKEN, Outcome
from . import Resources, StepContext, inputs
from .common import aplace, candidates, render_target
from .s3uploads import LEDGER, UploadLedger, stored_endpoint

if TYPE_CHECKING:
    pass

log = logging.getLogger(__name__)

#: the user metadata that marks an object as the delivery of one journal row, by its
#: ``StepContext.delivery_id`` (journal token, row id, planned time; see resuming)
ID_META = "filedispatch-id"
#: a file up to this size is read on the event loop if the page cache holds it all: a thread
#: hop costs more than such a read
INLINE_READ = 64 * 1024
#: error codes no retry will cure
_PERMANENT_CODES = {
    "AccessDenied",
    "AllAccessDisabled",
    "InvalidAccessKeyId",
    "SignatureDoesNotMatch",
    "NoSuchBucket",
    "InvalidBucketName",
    "InvalidStorageClass",
    "InvalidTag",
    "InvalidArgument",
    "KeyTooLongError",
    "MetadataTooLarge",
    "EntityTooLarge",
    "AccountProblem",
    "InvalidObjectState",
}
#: a multipart upload that vanished (the server lost it, or it was aborted): start again
_TRANSIENT_CODES = {"NoSuchUpload", "RequestTimeout", "SlowDown", "InternalError"}
_STATUS_MEANING = {
    403: "forbidden (a wrong access key or secret, or no permission)",
    404: "not found",
}
_CONFLICT_STATUS = 412  #: If-None-Match: * found the key taken


#: seconds between two tries of the start's sweep while the server cannot be reached, at most
SWEEP_RETRY_MAX_S = 60.0


def create(step: S3Destination, resources: Resources) -> S3Processor:
    return S3Processor(step, resources.items.get(LEDGER))


class _Taken(FileExistsError):
    """A conditional write found the key taken."""


class S3Processor:
    """Delivers objects under one bucket and prefix."""

    #: ``ctx.throttle`` is paid per part (at most ``part_size`` bytes) before it is sent: an
    #: S3 request's body is handed to the client whole
    paces: ClassVar[bool] = True

    def __init__(self, dest: S3Destination, ledger: UploadLedger | None = None) -> None:
        self.dest = dest
        self._ledger = ledger
        self.bucket, self.prefix = dest.bucket, dest.prefix
        self.display = dest.display
        self._secrets = secrets_of(dest)
        self._stack = contextlib.AsyncExitStack()
        self._client: Any = None
        self._opening = asyncio.Lock()
        #: does the server honour If-None-Match: * on writes? None until a write tells
        self._conditional: bool | None = None

    # -- the client

    async def _get_client(self) -> Any:
        if self._client is not None:
            return self._client
        async with self._opening:
            if self._client is None:
                self._client = await self._stack.enter_async_context(self._new_client())
        return self._client

    def _new_client(self) -> Any:
        dest = self.dest
        session = get_session()
        if dest.profile is not None:
            session.set_config_variable("profile", dest.profile)
        config = AioConfig(
            connect_timeout=dest.connect_timeout,
            read_timeout=dest.read_timeout,
            # the step's retry policy retries a file; botocore only rides out a blip
            retries={"mode": "standard", "total_max_attempts": 3},
            # the workers share one client: room for all of them, and for the parts in flight
            max_pool_connections=max(32, 2 * dest.part_concurrency),
            s3={"addressing_style": dest.addressing_style},
            # we send SHA-256 when verify asks for it; no CRC of every byte otherwise
            request_checksum_calculation="when_required",
            response_checksum_validation="when_required",
        )
        verify: bool | str = dest.tls_verify
        if dest.tls_verify and dest.ca_file is not None:
            verify = str(dest.ca_file)
        secret, token = dest.secret_access_key, dest.session_token
        return session.create_client(
            "s3",
            endpoint_url=dest.endpoint_url,
            region_name=dest.region,
            aws_access_key_id=dest.access_key_id,
            aws_secret_access_key=secret.get_secret_value() if secret else None,
            aws_session_token=token.get_secret_value() if token else None,
            verify=verify,
            config=config,
        )

    async def aclose(self) -> None:
        self._client = None
        await self._stack.aclose()

    # -- delivering

    def location(self, key: str) -> str:
        return f"s3://{self.bucket}/{quote(key, safe='/')}"

    def key(self, rel: PurePosixPath) -> str:
        return f"{self.prefix}{rel}"

    async def deliver(self, ctx: StepContext) -> Outcome:
        try:
            return await self._deliver(ctx)
        except DeliveryError:
            raise
        except Exception as exc:
            error = _translate(exc, self.display, self._secrets)
            if error is None:
                raise
            raise error from exc

    async def _deliver(self, ctx: StepContext) -> Outcome:
        rel = render_target(self.dest.name, ctx, self.dest.naming)
        if len(self.key(rel).encode("utf-8", "surrogateescape")) > 1024:
            raise PermanentDeliveryError(f"{self.display}: the key {rel} is over 1024 bytes")
        client = await self._get_client()
        async with inputs.opened(ctx) as (fd, st, whole):
            if ctx.resuming:
                found = await self._find_previous(client, ctx, rel, st.st_size)
                if found is not None:
                    return Outcome(
                        self.location(self.key(found)),
                        detail="found delivered by an earlier attempt",
                    )
            if st.st_size <= self.dest.part_size:
                if ctx.throttle is not None:
                    await ctx.throttle.take(st.st_size)
                if whole is not None:  # read and checked in its open's thread
                    body = whole
                else:
                    body = await _read(fd, st.st_size, 0)
                    sourcefile.check_unchanged(fd, st, "the file")
                    if len(body) != st.st_size:
                        raise SourceVanishedError("the file shrank while it was sent")
                digest = await _sha256(body)

                async def put(p: PurePosixPath, overwrite: bool) -> None:
                    ctx.fence()  # one request: the last moment it can be called off
                    await self._put(client, ctx, self.key(p), body, digest, overwrite)

                final = await aplace(self._free_check(client), rel, self.dest.on_conflict, put)
                sent: str | None = digest.hex()
            else:
                final, sent = await self._deliver_multipart(client, ctx, rel, fd, st)
        if final is None:
            return Outcome(self.location(self.key(rel)), detail=NAME_TAKEN)
        return Outcome(self.location(self.key(final)), sha256=sent)

    def _free_check(self, client: Any) -> Callable[[PurePosixPath], Awaitable[bool]]:
        """``exists`` for aplace: a HEAD, unless conditional writes make the write itself the
        check (then the first name is tried at once and a taken one answers 412)."""

        async def exists(p: PurePosixPath) -> bool:
            if self._conditional is not False:  # True, or not known yet: try the write
                return False
            return await self._head(client, self.key(p)) is not None

        return exists

    def _object_args(self, ctx: StepContext) -> dict[str, Any]:
        dest = self.dest
        args: dict[str, Any] = {
            "Bucket": self.bucket,
            "Metadata": {**dest.metadata, ID_META: ctx.delivery_id},
        }
        if dest.storage_class:
            args["StorageClass"] = dest.storage_class
        if dest.tags:
            args["Tagging"] = "&".join(
                f"{quote(k, safe='')}={quote(v, safe='')}" for k, v in dest.tags.items()
            )
        return args

    async def _put(
        self,
        client: Any,
        ctx: StepContext,
        key: str,
        body: bytes,
        digest: bytes,
        overwrite: bool,
    ) -> None:
        args = self._object_args(ctx) | {"Key": key, "Body": body}
        if self.dest.verify == "sha256":
            args["ChecksumSHA256"] = base64.b64encode(digest).decode()
        # aplace's ``exists`` has just looked, where a HEAD is how names are checked
        answer = await self._write(client.put_object, args, overwrite, key, looked=True)
        await self._verify(client, key, len(body), answer, args.get("ChecksumSHA256"))

    async def _write(
        self,
        call: Callable[..., Awaitable[Any]],
        args: dict[str, Any],
        overwrite: bool,
        key: str,
        *,
        looked: bool = False,
    ) -> Any:
        """``call(**args)``, made conditional on the key being free unless ``overwrite``.
        Raises _Taken when it is; a server without conditional writes gets a HEAD first,
        unless ``looked``: the caller has just made it (servers known to have none)."""
        if overwrite:
            return await call(**args)
        if self._conditional is False and looked:
            return await call(**args)
        if self._conditional is not False:
            try:
                answer = await call(**args, IfNoneMatch="*")
            except ClientError as exc:
                status, code = _status(exc)
                if status == _CONFLICT_STATUS or code == "PreconditionFailed":
                    self._conditional = True
                    raise _Taken(key) from None
                if status != 501 and code not in ("NotImplemented", "InvalidArgument"):
                    raise
                log.info("%s: no conditional writes here: a HEAD checks each name", self.display)
                self._conditional = False
            else:
                self._conditional = True
                return answer
        if await self._head(self._client, key) is not None:  # set: a write was made
            raise _Taken(key)
        return await call(**args)

    async def _deliver_multipart(
        self,
        client: Any,
        ctx: StepContext,
        rel: PurePosixPath,
        fd: int,
        st: os.stat_result,
    ) -> tuple[PurePosixPath | None, str | None]:
        """Upload in parts under the first free name; a name taken meanwhile (412 on
        completion) is transient: the next attempt picks another."""
        overwrite = self.dest.on_conflict == "overwrite"
        final: PurePosixPath | None = None
        for cand in candidates(rel, self.dest.on_conflict) if not overwrite else [rel]:
            if overwrite or await self._head(client, self.key(cand)) is None:
                final = cand
                break
            if self.dest.on_conflict == "skip":
                return None, None
        if final is None:
            raise PermanentDeliveryError(
                f"{self.display}: {rel} already exists (on_conflict: {self.dest.on_conflict})"
                if self.dest.on_conflict == "fail"
                else f"{self.display}: no free name near {rel}"
            )
        key = self.key(final)
        args = self._object_args(ctx) | {"Key": key}
        sha = self.dest.verify == "sha256"
        if sha:
            args["ChecksumAlgorithm"] = "SHA256"
        upload_id = (await client.create_multipart_upload(**args))["UploadId"]
        ids = {"Bucket": self.bucket, "Key": key, "UploadId": upload_id}
        try:
            if self._ledger is not None:  # before any part: a crash now leaves a known orphan
                await self._ledger.begun(_open_upload(self.dest, ids))
            parts, whole = await self._send_parts(client, ids, fd, st, sha, ctx)
            done: dict[str, Any] = {"MultipartUpload": {"Parts": parts}, **ids}
            ctx.fence()  # the completion is what makes the object appear
            try:
                answer = await self._write(client.complete_multipart_upload, done, overwrite, key)
            except _Taken:
                raise TransientDeliveryError(
                    f"{self.display}: {final} was taken while it was uploaded"
                ) from None
        except BaseException:
            await asyncio.shield(self._abort(client, ids))
            raise
        self._ended(ids)
        composite = None
        if sha:
            joined = b"".join(base64.b64decode(p["ChecksumSHA256"]) for p in parts)
            composite = f"{base64.b64encode(hashlib.sha256(joined).digest()).decode()}-{len(parts)}"
        await self._verify(client, key, st.st_size, answer, composite)
        return final, whole

    async def _send_parts(
        self,
        client: Any,
        ids: dict[str, Any],
        fd: int,
        st: os.stat_result,
        sha: bool,
        ctx: StepContext,
    ) -> tuple[list[dict[str, Any]], str | None]:
        """Read the file part by part, in order, and send up to part_concurrency at once:
        at most part_concurrency + 1 parts are in memory. Returns the parts for completion
        and, with ``sha``, the SHA-256 of the whole file. Each part is paid for
        (``ctx.throttle``) before it is read, and ``ctx.fence`` is asked before it is sent."""
        size, step, throttle = st.st_size, self.dest.part_size, ctx.throttle
        room = asyncio.Semaphore(self.dest.part_concurrency)
        whole = hashlib.sha256() if sha else None
        parts: list[dict[str, Any]] = []

        async def send(number: int, data: bytes) -> None:
            try:
                args: dict[str, Any] = {"PartNumber": number, "Body": data, **ids}
                if sha:
                    args["ChecksumSHA256"] = base64.b64encode(await _sha256(data)).decode()
                answer = await client.upload_part(**args)
                part = {"PartNumber": number, "ETag": answer["ETag"]}
                if sha:
                    part["ChecksumSHA256"] = args["ChecksumSHA256"]
                parts.append(part)
            finally:
                room.release()

        try:
            async with asyncio.TaskGroup() as group:
                for number, offset in enumerate(range(0, size, step), 1):
                    await room.acquire()
                    if throttle is not None:
                        await throttle.take(min(step, size - offset))
                    data = await _read(fd, min(step, size - offset), offset)
                    if len(data) != min(step, size - offset):
                        raise SourceVanishedError("the file shrank while it was sent")
                    if whole is not None:
                        await to_thread_joined(whole.update, data)
                    ctx.fence()
                    group.create_task(send(number, data))
                    del data
        except BaseExceptionGroup as group_error:
            raise _first(group_error) from None
        sourcefile.check_unchanged(fd, st, "the file")
        parts.sort(key=lambda p: int(p["PartNumber"]))
        return parts, whole.hexdigest() if whole is not None else None

    async def _abort(self, client: Any, ids: dict[str, Any]) -> None:
        try:
            await asyncio.wait_for(client.abort_multipart_upload(**ids), self.dest.connect_timeout)
        except Exception as exc:  # NoSuchUpload: aborted by a node that took this run for gone
            if not isinstance(exc, ClientError) or _status(exc)[1] != "NoSuchUpload":
                log.warning(
                    "%s: cannot abort an interrupted upload of %s (a sweep aborts it once this "
                    "run is gone): %s",
                    self.display,
                    ids["Key"],
                    _why(exc, self._secrets),
                )
                return
        self._ended(ids)

    def _ended(self, ids: dict[str, Any]) -> None:
        if self._ledger is not None:
            self._ledger.ended(_open_upload(self.dest, ids))

    async def abort_orphan(self, upload: OpenUpload) -> bool:
        """Abort one upload a dead run left: True once it is gone (aborted, or no longer
        there); False when it is not under this destination's prefix. Raises our errors."""
        where = (stored_endpoint(self.dest.endpoint_url), self.bucket)
        if (upload.endpoint, upload.bucket) != where or not upload.key.startswith(self.prefix):
            return False
        try:
            client = await self._get_client()
            await client.abort_multipart_upload(
                Bucket=self.bucket, Key=upload.key, UploadId=upload.upload_id
            )
        except ClientError as exc:
            status, code = _status(exc)
            if code == "NoSuchUpload" or (status == 404 and code != "NoSuchBucket"):
                return True  # completed before the crash, or aborted already
            raise _translate(exc, self.display, self._secrets) or exc from exc
        except (BotoCoreError, aiohttp.ClientError, OSError, TimeoutError) as exc:
            raise _translate(exc, self.display, self._secrets) or exc from exc
        return True

    async def _verify(
        self, client: Any, key: str, size: int, answer: dict[str, Any], checksum: str | None
    ) -> None:
        """``size``: HEAD says the stored length; ``sha256``: the server checked the SHA-256
        sent with the data (``x-amz-checksum-sha256``) and stores the one we expect."""
        if self.dest.verify == "none":
            return
        if self.dest.verify == "sha256" and checksum is not None:
            stored = answer.get("ChecksumSHA256")
            if stored is None:
                head = await self._head(client, key, checksum=True)
                stored = (head or {}).get("ChecksumSHA256")
            # a multipart object's checksum is the SHA-256 of its parts' SHA-256s, "-N" after
            # it on AWS and not on some other servers
            if stored is not None and stored.split("-")[0] != checksum.split("-")[0]:
                await self._discard(client, key)
                raise TransientDeliveryError(
                    f"{self.display}: verify: the stored SHA-256 ({stored}) is not the one "
                    f"sent ({checksum})"
                )
            if stored is not None:
                return
        head = await self._head(client, key)
        got = None if head is None else head.get("ContentLength")
        if got != size:
            await self._discard(client, key)
            raise TransientDeliveryError(f"{self.display}: verify: {got} bytes stored of {size}")

    async def _discard(self, client: Any, key: str) -> None:
        """Remove an object that failed verification (the next attempt sends it again)."""
        with contextlib.suppress(ClientError):
            await client.delete_object(Bucket=self.bucket, Key=key)

    async def _head(self, client: Any, key: str, *, checksum: bool = False) -> Any:
        """The object's HEAD answer, or None when there is no such key."""
        args: dict[str, Any] = {"Bucket": self.bucket, "Key": key}
        if checksum:
            args["ChecksumMode"] = "ENABLED"
        try:
            return await client.head_object(**args)
        except ClientError as exc:
            status, code = _status(exc)
            if status == 404 and code != "NoSuchBucket":
                return None
            raise

    async def _find_previous(
        self, client: Any, ctx: StepContext, rel: PurePosixPath, size: int
    ) -> PurePosixPath | None:
        """After a crash: the object an earlier attempt of this row completed, if any (it
        carries this row's delivery name in its metadata, and our size)."""
        for cand in candidates(rel, self.dest.on_conflict):
            head = await self._head(client, self.key(cand))
            if head is None:
                return None
            mine = head.get("Metadata", {}).get(ID_META) == ctx.delivery_id  # token, id, planned
            if mine and head.get("ContentLength") == size:
                return cand
        return None

    # -- errors


def _open_upload(dest: S3Destination, ids: dict[str, Any]) -> OpenUpload:
    """The ledger's entry for the upload ``ids`` (Bucket, Key, UploadId) to ``dest``."""
    return OpenUpload(
        stored_endpoint(dest.endpoint_url), ids["Bucket"], ids["Key"], ids["UploadId"]
    )


def _why(exc: BaseException, secrets: list[str]) -> str:
    """An S3 or connection error in a line, without the ``secrets``."""
    if isinstance(exc, ClientError):
        error = exc.response.get("Error", {})
        status, code = _status(exc)
        # a HEAD answer has no body, so no code: say what its status means
        message = error.get("Message") or _STATUS_MEANING.get(status or 0, "no message")
        text = f"{code or status}: {message}"
    else:
        text = f"{type(exc).__name__}: {exc}"
    return scrub(text, secrets)


def _translate(exc: Exception, display: str, secrets: list[str]) -> DeliveryError | None:
    """Our error for a botocore or connection error (``display``: the destination, shown);
    None for any other."""
    if isinstance(exc, (NoCredentialsError, PartialCredentialsError)):
        return PermanentDeliveryError(
            f"{display}: no credentials: give access_key_id and secret_access_key, "
            "a profile, or AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, "
            "or run where an instance or container role supplies them"
        )
    if isinstance(exc, ClientError):
        status, code = _status(exc)
        text = f"{display}: {_why(exc, secrets)}"
        transient = code in _TRANSIENT_CODES
        if code in _PERMANENT_CODES or (status in (400, 403, 404) and not transient):
            return PermanentDeliveryError(text)
        return TransientDeliveryError(text)
    if isinstance(exc, (BotoCoreError, aiohttp.ClientError, OSError, TimeoutError)):
        return TransientDeliveryError(f"{display}: {_why(exc, secrets)}")
    return None


def _status(exc: ClientError) -> tuple[int | None, str]:
    meta = exc.response.get("ResponseMetadata", {})
    return meta.get("HTTPStatusCode"), str(exc.response.get("Error", {}).get("Code", ""))


def _first(group: BaseExceptionGroup[BaseException]) -> BaseException:
    """The error to report from a failed TaskGroup: ours before a cancellation."""
    found = list(_leaves(group))
    for exc in found:
        if not isinstance(exc, asyncio.CancelledError):
            return exc
    return found[0]


def _leaves(group: BaseExceptionGroup[BaseException]) -> Iterator[BaseException]:
    for exc in group.exceptions:
        if isinstance(exc, BaseExceptionGroup):
            yield from _leaves(exc)
        else:
            yield exc


async def _read(fd: int, count: int, offset: int) -> bytes:
    """``count`` bytes of ``fd`` at ``offset``: on the event loop when they are small and all
    in the page cache (``RWF_NOWAIT``: never waits for a disk or a server), else in a daemon
    thread (``inputs.read``).
    The bytes are handed on as ``bytes``: botocore sends other buffers as a stream."""
    if count <= INLINE_READ:
        data, _ = fastpath.read_cached(fd, count, offset)
        if len(data) == count:
            return bytes(data)
    # a cancelled wait leaves the read to end on its own: ``inputs.close`` waits for it
    return await asyncio.shield(inputs.read(fd, count, offset))


async def _sha256(data: bytes) -> bytes:
    if len(data) <= INLINE_READ:
        return hashlib.sha256(data).digest()
    return await asyncio.to_thread(lambda: hashlib.sha256(data).digest())


async def sweep_orphans(
    journal: Journal, config: Config | Callable[[], Config], every_s: float | None = None
) -> None:
    """In the background: abort the multipart uploads that runs which are gone left open (the
    journal's ledger, ``Journal.orphan_uploads``), each through a configured destination with
    their endpoint, bucket and prefix (``abort_stale_uploads``). ``config``: the config, or a
    function giving the service's current one (read at each pass, so a reload that turns
    ``abort_stale_uploads`` on or off, or changes a destination, counts from the next pass).
    A server that cannot be reached is tried again, at growing intervals up to
    SWEEP_RETRY_MAX_S. ``every_s``: look again that often for the service's whole life (a
    shared journal: a node may go at any time); None: stop once none is left that can be
    aborted. An upload no destination covers stays in the ledger (said once). Never raises."""
    current = config if callable(config) else (lambda: config)
    sweeper: _Sweeper | None = None
    delay = 1.0
    try:
        while True:
            dests = _sweep_dests(current())
            if sweeper is None or sweeper.dests != dests:
                if sweeper is not None:
                    await sweeper.aclose()
                sweeper = _Sweeper(dests)
            if not dests:  # nothing may abort now: a reload may change that
                if every_s is None:
                    return
                await asyncio.sleep(every_s)
                continue
            try:
                again = await sweeper.once(journal)
            except Exception as exc:  # the sweep is a courtesy: it must never end the service
                sweeper.say(f"cannot look for unfinished S3 uploads: {exc!r}")
                if every_s is None:
                    return
                again = False
            if again:
                await asyncio.sleep(delay)
                delay = min(delay * 2, SWEEP_RETRY_MAX_S)
                continue
            delay = 1.0
            if every_s is None:
                return
            await asyncio.sleep(every_s)
    finally:
        if sweeper is not None:
            await sweeper.aclose()


def _sweep_dests(config: Config) -> list[S3Destination]:
    """The destinations a sweep may abort through: S3 ones with ``abort_stale_uploads``."""
    return [
        s
        for rule in config.rules
        for s in rule.to
        if isinstance(s, S3Destination) and s.abort_stale_uploads
    ]


class _Sweeper:
    """The sweep's destinations (their clients kept between passes) and what it said."""

    def __init__(self, dests: list[S3Destination]) -> None:
        self.dests = dests
        self.processors = [S3Processor(d) for d in dests]
        self._said: set[str] = set()

    async def aclose(self) -> None:
        for p in self.processors:
            await p.aclose()

    def say(self, text: str) -> None:
        """Log ``text`` once for the service's life (a periodic sweep finds the same again)."""
        if text not in self._said:
            self._said.add(text)
            log.warning("%s", text)

    async def once(self, journal: Journal) -> bool:
        """One pass over the ledger's orphans; True when a server could not be reached."""
        unreachable = False
        gone: list[OpenUpload] = []
        for upload in await journal.orphan_uploads():
            done, failed = await self._abort(upload)
            unreachable |= failed
            if done:
                gone.append(upload)
        # rows not ended (an error above, a closed journal) are aborted again: NoSuchUpload
        if gone:
            await journal.end_uploads(gone)
        return unreachable

    async def _abort(self, upload: OpenUpload) -> tuple[bool, bool]:
        """(gone, a server failed) for one orphan, through the destinations covering it in
        turn, until one can (two may cover it with different credentials, one of them
        refused)."""
        covered = transient = False
        for p in self.processors:
            try:
                if not await p.abort_orphan(upload):
                    continue
            except DeliveryError as exc:
                covered = True
                transient |= isinstance(exc, TransientDeliveryError)
                self.say(
                    f"{p.display}: cannot abort the unfinished upload of {upload.key} a run "
                    "that is gone left (tried again"
                    f"{'' if isinstance(exc, TransientDeliveryError) else ' at the next look'})"
                    f": {exc}"
                )
                continue
            log.info(
                "%s: aborted 1 unfinished multipart upload a run that is gone left: %s",
                p.display,
                upload.key,
            )
            return True, False
        if not covered:
            self.say(
                f"an unfinished upload of {upload.key} to s3://{upload.bucket} a run that is "
                "gone left is under no configured destination with abort_stale_uploads now: "
                "left in the journal's ledger"
            )
        return False, transient

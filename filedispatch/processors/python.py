"""Python callables as steps: ``package.module:function`` or ``package.module:Class``.

Calls ``target(path, *args, **kwargs)`` as Rattail does (a class is instantiated once and its
instance called), adding ``context=`` only for callables that declare a ``context`` parameter.
Sync callables run in a daemon thread, async ones on the loop. Their exceptions are translated
here into our delivery errors; a callable never sees the journal.
"""

from __future__ import annotations

import asyncio
import contextvars
import inspect
import logging
import os
import reprlib
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .. import sourcefile
from ..asyncutil import in_daemon_thread
from ..config import PythonStep, scrub, secrets_of
from ..content import import_object
from ..errors import DeliveryError, PermanentDeliveryError, TransientDeliveryError
from ..models import Outcome
from . import Resources, StepContext, inputs
from .compress import ensure_workdir

log = logging.getLogger(__name__)

#: errors that say the code or its configuration is wrong: repeating the call cannot help
PROGRAMMING_ERRORS: tuple[type[BaseException], ...] = (
    TypeError,
    NameError,
    AttributeError,
    ImportError,
    SyntaxError,
    NotImplementedError,
)
MAX_REASON = 1000  #: characters of an exception message kept in the journal
_repr = reprlib.Repr()
_repr.maxstring = _repr.maxother = 160


def create(step: PythonStep, resources: Resources) -> PythonProcessor:
    del resources
    return PythonProcessor(step)


class PythonProcessor:
    """One configured callable; imported (and a class instantiated) on the first file."""

    def __init__(self, step: PythonStep) -> None:
        self.step = step
        self._target: Callable[..., Any] | None = None
        self._instance: object = None  #: made from a configured class; closed at shutdown
        self._is_async = False
        self._wants_context = False
        self._lock = asyncio.Lock()
        self._running: set[threading.Thread] = set()
        #: its args and kwargs are secrets: an exception or a result echoing them is scrubbed
        self.secrets = secrets_of(step)

    async def aclose(self) -> None:
        hung = [t for t in self._running if t.is_alive()]
        if hung:
            log.warning(
                "%s: %d call(s) still running after a timeout are abandoned (a thread cannot "
                "be killed); they end with the process",
                self.step.python,
                len(hung),
            )
        close = getattr(self._instance, "close", None)
        if callable(close):
            try:
                result = close()
                if inspect.isawaitable(result):
                    await result
            except Exception as exc:  # closing must not stop the other processors closing
                reason = scrub(f"{type(exc).__name__}: {exc}", self.secrets)
                log.warning("%s: close() failed: %s", self.step.python, reason)

    async def deliver(self, ctx: StepContext) -> Outcome:
        target = await self._load()
        kwargs = dict(self.step.kwargs)
        if self._wants_context:
            kwargs["context"] = ctx
            ensure_workdir(ctx.workdir)  # documented to exist, for a transform's output
        args = (str(ctx.input), *self.step.args)
        # checked before the call and after it (the callable gets a path, which it may open
        # after someone put a link there): a link or special file found after discards it
        async with inputs.opened(ctx):
            pass
        value = await self._call(target, args, kwargs)
        await in_daemon_thread(sourcefile.recheck, ctx.version, ctx.input, "the callable")
        return self._outcome(ctx, value)

    async def _call(self, target: Callable[..., Any], args: tuple[Any, ...], kwargs: Any) -> Any:
        try:
            if self._is_async:
                value = await target(*args, **kwargs)
            else:
                value = await self._in_thread(target, *args, **kwargs)
                if inspect.isawaitable(value):  # a sync wrapper that hands back a coroutine
                    value = await value
        except SystemExit as exc:  # must not end the service
            raise self._scrubbed(_exit_error(exc)) from None
        except DeliveryError as exc:  # the callable chose: Permanent fails now, Transient retries
            raise self._scrubbed(exc) from exc.__cause__
        except Exception as exc:
            raise self._scrubbed(_translate(exc)) from exc  # its kind is the error type
        return value

    def _scrubbed(self, exc: DeliveryError) -> DeliveryError:
        """``exc`` with the step's secrets hidden in its message (the same class and hint)."""
        text = str(exc)
        clean = scrub(text, self.secrets)
        if clean == text:
            return exc
        if isinstance(exc, TransientDeliveryError):
            return TransientDeliveryError(clean, retry_after=exc.retry_after)
        return PermanentDeliveryError(clean)

    async def _load(self) -> Callable[..., Any]:
        if self._target is not None:
            return self._target
        async with self._lock:
            if self._target is None:
                try:
                    obj = import_object(self.step.python)
                except Exception as exc:  # `filedispatch check` reports these before a start
                    raise PermanentDeliveryError(
                        f"cannot import {self.step.python}: {type(exc).__name__}: {exc}"
                    ) from exc
                if inspect.isclass(obj):
                    try:  # instantiated once (Rattail)
                        if inspect.iscoroutinefunction(obj.__call__):
                            instance = obj()  # on the loop: it may make locks or sessions
                        else:  # in a thread: a sync __init__ may connect somewhere
                            instance = await self._in_thread(obj)
                    except Exception as exc:
                        raise self._scrubbed(_translate(exc)) from exc
                    obj = self._instance = instance
                if not callable(obj):
                    raise PermanentDeliveryError(f"{self.step.python} is not callable")
                self._is_async = _is_async(obj)
                self._wants_context = _accepts_context(obj)
                self._target = obj
        return self._target

    async def _in_thread(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        """Run ``fn`` in a daemon thread; a cancelled (timed-out) call is abandoned, not joined.

        asyncio.to_thread would use the loop's default executor, whose threads are joined at
        exit: one hung call would then keep the process from ever stopping.
        """
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Any] = loop.create_future()
        context = contextvars.copy_context()

        def settle(ok: bool, value: Any, thread: threading.Thread) -> None:
            self._running.discard(thread)  # only the loop's thread touches the set
            if not future.done():  # cancelled by a timeout or a shutdown: nobody waits
                if ok:
                    future.set_result(value)
                else:
                    future.set_exception(value)

        def run() -> None:
            try:
                ok, value = True, context.run(fn, *args, **kwargs)
            except SystemExit as exc:
                ok, value = False, _exit_error(exc)
            except Exception as exc:
                ok, value = False, exc
            except BaseException as exc:  # e.g. KeyboardInterrupt: it must not reach the loop
                ok, value = False, PermanentDeliveryError(f"{type(exc).__name__}: {exc}")
            try:
                loop.call_soon_threadsafe(settle, ok, value, threading.current_thread())
            except RuntimeError:
                pass  # the loop is closed: the call was abandoned long ago

        thread = threading.Thread(target=run, name=f"python:{self.step.python}", daemon=True)
        self._running.add(thread)
        thread.start()
        return await future

    def _outcome(self, ctx: StepContext, value: Any) -> Outcome:
        produced = _as_file(value)
        if produced is not None and produced not in (ctx.input, ctx.version.path):
            return Outcome(str(produced), produced=produced, detail=f"produced {produced.name}")
        detail = None if value is None else scrub(f"returned {_repr.repr(value)}", self.secrets)
        return Outcome(self.step.display, detail=detail)


def _translate(exc: Exception) -> DeliveryError:
    message = f"{type(exc).__name__}: {exc}"
    if len(message) > MAX_REASON:
        message = message[: MAX_REASON - 3] + "..."
    if isinstance(exc, PROGRAMMING_ERRORS):
        return PermanentDeliveryError(message)
    return TransientDeliveryError(message)


def _exit_error(exc: SystemExit) -> DeliveryError:
    return PermanentDeliveryError(f"SystemExit: the callable called exit({exc.code!r})")


def _as_file(value: Any) -> Path | None:
    """A returned absolute path to an existing regular file: the transform's output."""
    if not isinstance(value, (str, os.PathLike)):
        return None
    try:
        path = Path(os.fsdecode(os.fspath(value)))
        return path if path.is_absolute() and path.is_file() else None
    except (OSError, ValueError):
        return None


def _is_async(obj: Any) -> bool:
    if inspect.iscoroutinefunction(obj):
        return True
    call = getattr(obj, "__call__", None)  # noqa: B004 - an instance's async __call__
    return not inspect.isfunction(obj) and inspect.iscoroutinefunction(call)


def _accepts_context(obj: Any) -> bool:
    try:
        params = inspect.signature(obj).parameters
    except (TypeError, ValueError):  # some builtins have no signature: call them plainly
        return False
    param = params.get("context")
    return param is not None and param.kind in (
        inspect.Parameter.POSITIONAL_OR_KEYWORD,
        inspect.Parameter.KEYWORD_ONLY,
    )

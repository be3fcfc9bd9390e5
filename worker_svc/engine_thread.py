"""The thread that owns the engine: the only place ``Engine`` methods are ever called.

The engine is synchronous and not thread-safe, and a step takes milliseconds to seconds, so the
asyncio server must never call it directly. Commands (dispatch, abort, describe...) are closures
put on a queue and run by this thread between two steps; their results come back to the event loop
through ``loop.call_soon_threadsafe``. After every step the ``StepOutput`` is handed to the loop the
same way. Between steps the thread blocks on the queue, so an idle worker burns no CPU.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import queue
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

from common.errors import Unavailable

log = logging.getLogger(__name__)

T = TypeVar("T")

# How long the idle thread sleeps on the queue before re-checking ``has_work`` (a safety net only:
# every command wakes it up).
_IDLE_POLL_S = 0.5
# Between idle steps (the engine only waits for copies to finish): a short nap instead of a spin.
_SPIN_WAIT_S = 0.001


@dataclass
class _Command(Generic[T]):
    """A closure to run on the engine thread and the future (of the event loop) it resolves."""

    fn: Callable[[Any], T]
    future: asyncio.Future[T]


def _resolve(future: asyncio.Future[Any], result: Any, error: BaseException | None) -> None:
    if future.cancelled():  # the RPC that waited for it went away
        return
    if error is not None:
        future.set_exception(error)
    else:
        future.set_result(result)


class EngineThread:
    """Runs ``engine.step()`` while there is work, and commands in between, on one thread.

    ``on_step`` is called on the event loop with each ``StepOutput``; ``on_error`` with an exception
    that escaped ``step()`` (the thread then stops: an engine in an unknown state must not go on).
    """

    def __init__(
        self,
        engine: Any,
        loop: asyncio.AbstractEventLoop,
        on_step: Callable[[Any], None],
        on_error: Callable[[BaseException], None] | None = None,
    ) -> None:
        self._engine = engine
        self._loop = loop
        self._on_step = on_step
        self._on_error = on_error
        self._commands: queue.SimpleQueue[_Command[Any] | None] = queue.SimpleQueue()
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._run, name="engine", daemon=True)
        self.failed: BaseException | None = None
        self._last_usage: Any = None  # usage of the last published step (skip repeats of idle steps)

    def start(self) -> None:
        self._thread.start()

    async def call(self, fn: Callable[[Any], T]) -> T:
        """Run ``fn(engine)`` on the engine thread between two steps and return its result."""
        if self.failed is not None:
            raise Unavailable(f"the engine failed and stopped: {type(self.failed).__name__}: {self.failed}")
        if self._stopping.is_set():
            raise Unavailable("the worker is stopping")
        future: asyncio.Future[T] = self._loop.create_future()
        self._commands.put(_Command(fn, future))
        return await future

    def stop(self, timeout: float = 10.0) -> None:
        """Stop after the current step (blocking; call it from a thread or at shutdown)."""
        self._stopping.set()
        self._commands.put(None)  # wake the thread if it sleeps on the queue
        if self._thread.is_alive() and threading.current_thread() is not self._thread:
            self._thread.join(timeout)

    # --- the thread ------------------------------------------------------------------------------

    def _run(self) -> None:
        try:
            idle_steps = 0
            while not self._stopping.is_set():
                has_work = self._engine.has_work()
                # Nothing to do, or only copies in flight (idle steps): wait on the queue instead of spinning.
                timeout = _IDLE_POLL_S if not has_work else (_SPIN_WAIT_S if idle_steps else 0.0)
                self._run_commands(timeout)
                if self._stopping.is_set():
                    break
                if self._engine.has_work():
                    out = self._engine.step()
                    quiet = out.stats.kind == "idle" and not out.outputs and not out.admitted
                    idle_steps = idle_steps + 1 if quiet else 0
                    if not quiet or out.usage != self._last_usage:
                        self._last_usage = out.usage
                        self._post(self._on_step, out)
        except BaseException as exc:  # the engine is in an unknown state: report and stop
            log.exception("engine thread failed")
            self.failed = exc
            if self._on_error is not None:
                self._post(self._on_error, exc)
        finally:
            self._drain_commands()

    def _run_commands(self, timeout: float) -> None:
        """Run every queued command, waiting up to ``timeout`` seconds for the first one."""
        try:
            first = self._commands.get(timeout=timeout) if timeout > 0 else self._commands.get_nowait()
        except queue.Empty:
            return
        pending: list[_Command[Any] | None] = [first]
        while True:
            try:
                pending.append(self._commands.get_nowait())
            except queue.Empty:
                break
        for cmd in pending:
            if cmd is None:
                continue
            try:
                result = cmd.fn(self._engine)
            except Exception as exc:  # a refused command is an answer for its caller, not a crash
                self._post(_resolve, cmd.future, None, exc)
            else:
                self._post(_resolve, cmd.future, result, None)

    def _drain_commands(self) -> None:
        """Fail the commands nobody will run any more, so no RPC waits forever."""
        error = Unavailable("the engine stopped before running this command")
        while True:
            try:
                cmd = self._commands.get_nowait()
            except queue.Empty:
                return
            if cmd is not None:
                self._post(_resolve, cmd.future, None, error)

    def post(self, fn: Callable[..., None], *args: Any) -> None:
        """From the engine thread: run ``fn(*args)`` on the loop, ordered with the step events."""
        self._post(fn, *args)

    def _post(self, fn: Callable[..., None], *args: Any) -> None:
        # A closed loop means shutdown: nobody listens any more.
        with contextlib.suppress(RuntimeError):
            self._loop.call_soon_threadsafe(fn, *args)

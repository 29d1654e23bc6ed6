"""Agent runs as scopes: ``agent_started`` on entry and exactly one terminal event on exit.

Rules of this module: the terminal event is decided by how the body ended (normal exit ->
``agent_completed``, exception -> ``agent_error``, cancellation -> ``agent_cancelled``) and is
published in a shielded scope bounded by ``Config.terminal_event_timeout``, so even a cancelled
run reports its end. Exceptions still propagate; a run cancelled through its own scope
(``cancel_run``) ends the ``async with`` block quietly, like ``trio.move_on_after``.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from contextlib import asynccontextmanager
from typing import Any, final

import attrs
import trio

from ._errors import InvalidEvent, RunEnded
from ._events import AgentEvent, EventType

__all__ = ["Run", "run_scope"]

#: Publishes one event on a thread and returns its seq (``UserSession.send_to_thread``).
Publish = Callable[[str, AgentEvent], Awaitable[int]]


@final
@attrs.define(eq=False, repr=False)
class Run:
    """A live agent run; emit its events through the methods below.

    Set :attr:`result` to what ``agent_completed`` should carry.
    """

    run_id: str
    thread_id: str
    agent_name: str
    _publish: Publish
    #: What ``agent_completed`` carries in ``data.result``; must be JSON-serialisable.
    result: Any = None
    _scope: trio.CancelScope = attrs.Factory(trio.CancelScope)
    _cancel_reason: str | None = None
    _ended: bool = False
    _started_at: float | None = None
    _tools_started: dict[str, float] = attrs.Factory(dict)
    _done: trio.Event = attrs.Factory(trio.Event)

    def __repr__(self) -> str:
        state = "ended" if self._ended else "active"
        return f"<Run {self.run_id} thread={self.thread_id!r} {state}>"

    @property
    def ended(self) -> bool:
        """True once the terminal event has been published."""
        return self._ended

    def cancel(self, reason: str = "cancelled") -> None:
        """Cancel the run; its scope then emits ``agent_cancelled`` with ``reason``."""
        if self._cancel_reason is None:
            self._cancel_reason = reason
        self._scope.cancel()

    async def wait_done(self) -> None:
        """Wait until the run has published its terminal event."""
        await self._done.wait()

    async def emit(self, event_type: EventType | str, data: Mapping[str, Any]) -> int:
        """Publish a non-terminal event of this run and return its seq.

        Raises:
            InvalidEvent: the type is ``agent_started`` or terminal (the scope sends those), or
                the data does not fit the schema.
            RunEnded: the run has already ended.
        """
        if event_type == EventType.AGENT_STARTED or event_type in (
            EventType.AGENT_COMPLETED, EventType.AGENT_ERROR, EventType.AGENT_CANCELLED,
        ):
            raise InvalidEvent(f"{event_type} is emitted by the run scope itself")
        return await self._emit(AgentEvent(event_type, data, self.run_id))

    async def _emit(self, event: AgentEvent) -> int:
        if self._ended:
            raise RunEnded(f"run {self.run_id} has ended; it cannot emit {event.type}")
        return await self._publish(self.thread_id, event)

    async def thinking(
        self, text: str, *, step: int | None = None, progress: float | None = None
    ) -> int:
        """Publish ``agent_thinking`` (optional ``step`` number and ``progress`` 0..1)."""
        data: dict[str, Any] = {"text": text}
        if step is not None:
            data["step"] = step
        if progress is not None:
            data["progress"] = progress
        return await self.emit(EventType.AGENT_THINKING, data)

    async def text(self, delta: str) -> int:
        """Publish ``agent_text``: a piece of the streamed answer (e.g. a token delta)."""
        return await self.emit(EventType.AGENT_TEXT, {"text": delta})

    async def tool_executing(self, tool_name: str, arguments: Mapping[str, Any]) -> int:
        """Publish ``tool_executing`` and start timing the tool."""
        self._tools_started[tool_name] = trio.current_time()
        return await self.emit(
            EventType.TOOL_EXECUTING, {"tool_name": tool_name, "arguments": dict(arguments)}
        )

    async def tool_completed(
        self, tool_name: str, result: Any, *, duration_ms: float | None = None, ok: bool = True
    ) -> int:
        """Publish ``tool_completed``; ``duration_ms`` defaults to the time since
        :meth:`tool_executing` for the same tool."""
        started = self._tools_started.pop(tool_name, None)
        if duration_ms is None:
            duration_ms = 0.0 if started is None else _elapsed_ms(started)
        return await self.emit(
            EventType.TOOL_COMPLETED,
            {"tool_name": tool_name, "result": result, "duration_ms": duration_ms, "ok": ok},
        )


def _elapsed_ms(since: float) -> float:
    return round((trio.current_time() - since) * 1000, 3)


def _leaves(exc: BaseException) -> list[BaseException]:
    if isinstance(exc, BaseExceptionGroup):
        return [leaf for inner in exc.exceptions for leaf in _leaves(inner)]
    return [exc]


def _error_event(run: Run, exc: BaseException, message_limit: int) -> AgentEvent:
    return AgentEvent(
        EventType.AGENT_ERROR,
        {"error_type": type(exc).__name__, "message": str(exc)[:message_limit]},
        run.run_id,
    )


def _terminal_for_exception(run: Run, exc: BaseException, message_limit: int) -> AgentEvent:
    """``agent_error`` for the first real error in ``exc``; ``agent_cancelled`` otherwise."""
    leaves = _leaves(exc)
    errors = [leaf for leaf in leaves if isinstance(leaf, Exception)]
    if errors:
        return _error_event(run, errors[0], message_limit)
    if all(isinstance(leaf, trio.Cancelled) for leaf in leaves):
        reason = run._cancel_reason or "cancelled"
    else:
        reason = type(leaves[0]).__name__
    return AgentEvent(EventType.AGENT_CANCELLED, {"reason": reason}, run.run_id)


@asynccontextmanager
async def run_scope(
    run: Run, *, terminal_timeout: float, message_limit: int
) -> AsyncIterator[Run]:
    """Emit ``agent_started``, run the body in the run's cancel scope, emit one terminal event."""
    await run._emit(
        AgentEvent(EventType.AGENT_STARTED, {"agent_name": run.agent_name}, run.run_id)
    )
    run._started_at = started = trio.current_time()
    terminal: AgentEvent | None = None
    invalid_result: InvalidEvent | None = None
    try:
        with run._scope:
            yield run
    except BaseException as exc:
        terminal = _terminal_for_exception(run, exc, message_limit)
        raise
    else:
        if run._scope.cancelled_caught:
            reason = run._cancel_reason or "cancelled"
            terminal = AgentEvent(EventType.AGENT_CANCELLED, {"reason": reason}, run.run_id)
        else:
            try:
                terminal = AgentEvent(
                    EventType.AGENT_COMPLETED,
                    {"result": run.result, "duration_ms": _elapsed_ms(started)},
                    run.run_id,
                )
            except InvalidEvent as exc:
                invalid_result = InvalidEvent(f"run.result is not valid event data: {exc}")
                terminal = _error_event(run, invalid_result, message_limit)
    finally:
        if terminal is None:  # pragma: no cover - every path above sets it
            terminal = AgentEvent(EventType.AGENT_CANCELLED, {"reason": "unknown"}, run.run_id)
        with trio.CancelScope(shield=True, deadline=trio.current_time() + terminal_timeout):
            try:
                await run._emit(terminal)
            finally:
                run._ended = True
                run._done.set()
    if invalid_result is not None:
        raise invalid_result

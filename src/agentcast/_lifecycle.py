"""The run lifecycle, written once for both run shells (trio ``Run``, anyio ``PublisherRun``).

Rules of this module: no trio, no anyio, no I/O. :func:`decide_terminal` is the one rule for
which terminal event ends a run, from how its body ended; :class:`RunEmitter` is the one set
of event-building methods a run offers. A shell supplies only what differs between event
loops: how an event is published, its clock, and its cancellation exception class. Keeping one
copy is the point: the two copies this replaced had drifted (a missing terminal event, a
``thinking`` without ``step``, a tool duration of 0).
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from types import TracebackType
from typing import Any, Protocol

import attrs

from ._config import ERROR_MESSAGE_LIMIT
from ._errors import InvalidEvent, RunEnded
from ._events import TERMINAL_TYPES, AgentEvent, EventType
from ._ids import check_id, new_id

__all__ = ["RunEmitter", "Terminal", "ToolCall", "decide_terminal", "started_event"]


def started_event(run_id: str, agent_name: str) -> AgentEvent:
    """The ``agent_started`` event that opens every run."""
    return AgentEvent(EventType.AGENT_STARTED, {"agent_name": agent_name}, run_id)


@attrs.frozen
class Terminal:
    """The terminal event a run must publish, and an error to raise once it has."""

    event: AgentEvent
    #: Raised after publishing when the body ended normally but the run could not report its
    #: result (``run.result`` is not valid event data): the caller learns of it, the client
    #: gets ``agent_error``.
    raise_after: InvalidEvent | None = None


def _leaves(exc: BaseException) -> list[BaseException]:
    if isinstance(exc, BaseExceptionGroup):
        return [leaf for inner in exc.exceptions for leaf in _leaves(inner)]
    return [exc]


def _message(exc: BaseException) -> str:
    try:
        return str(exc)
    except Exception:  # noqa: BLE001 - a failing __str__ must still end its run
        return f"<{type(exc).__name__}: message unavailable>"


def _error(run_id: str, exc: BaseException, message_limit: int) -> AgentEvent:
    return AgentEvent(
        EventType.AGENT_ERROR,
        {"error_type": type(exc).__name__, "message": _message(exc)[:message_limit]},
        run_id,
    )


def _cancelled(run_id: str, reason: str) -> AgentEvent:
    return AgentEvent(EventType.AGENT_CANCELLED, {"reason": reason}, run_id)


def decide_terminal(
    run_id: str,
    *,
    body_error: BaseException | None,
    cancelled_caught: bool,
    cancel_reason: str | None,
    result: Any,
    duration_ms: float,
    message_limit: int,
    cancelled_type: type[BaseException],
) -> Terminal:
    """Which terminal event ends a run, from how its body ended.

    - The body raised: ``agent_error`` for its first real error (an ``Exception`` anywhere in
      an exception group); if it holds only cancellations, ``agent_cancelled`` with the run's
      cancel reason; another ``BaseException`` (``KeyboardInterrupt``...) is ``agent_cancelled``
      named after it.
    - The run's own scope caught a cancellation (``run.cancel()``): ``agent_cancelled``.
    - Otherwise ``agent_completed`` with the result and duration, or, if the result is not
      valid event data, ``agent_error`` and an :class:`InvalidEvent` to raise afterwards.
    """
    reason = cancel_reason or "cancelled"
    if body_error is not None:
        leaves = _leaves(body_error)
        errors = [leaf for leaf in leaves if isinstance(leaf, Exception)]
        if errors:
            return Terminal(_error(run_id, errors[0], message_limit))
        if all(isinstance(leaf, cancelled_type) for leaf in leaves):
            return Terminal(_cancelled(run_id, reason))
        return Terminal(_cancelled(run_id, type(leaves[0]).__name__))
    if cancelled_caught:
        return Terminal(_cancelled(run_id, reason))
    try:
        completed = AgentEvent(
            EventType.AGENT_COMPLETED, {"result": result, "duration_ms": duration_ms}, run_id
        )
    except InvalidEvent as exc:
        invalid = InvalidEvent(f"run.result is not valid event data: {exc}")
        return Terminal(_error(run_id, invalid, message_limit), raise_after=invalid)
    return Terminal(completed)


def elapsed_ms(since: float, now: float) -> float:
    """Milliseconds between two clock readings, rounded to microseconds."""
    return round((now - since) * 1000, 3)


@attrs.define(eq=False)
class ToolCall:
    """One tool call inside :meth:`RunEmitter.tool`: set :attr:`result` before the block ends
    (or pass it to :meth:`RunEmitter.tool_completed` yourself)."""

    tool_call_id: str
    tool_name: str
    #: What ``tool_completed`` carries in ``data.result``; must be JSON-serialisable.
    result: Any = None


class CancelScopeLike(Protocol):
    """What the run shell needs of a cancel scope (``trio.CancelScope``, anyio's)."""

    @property
    def cancelled_caught(self) -> bool: ...

    def __enter__(self) -> Any: ...

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None,
        traceback: TracebackType | None, /,
    ) -> bool | None: ...


class RunEmitter:
    """The events a run emits, shared by ``Run`` and ``PublisherRun``.

    A subclass provides ``run_id``, ``agent_name``, ``result``, ``_ended``, ``_scope``,
    ``_cancel_reason``, ``_tools_started``, :meth:`_publish` (send one
    event, return its seq) and :meth:`_now` (its event loop's clock, in seconds).
    """

    __slots__ = ()  # the attrs subclasses keep their slots

    run_id: str
    agent_name: str
    #: What ``agent_completed`` carries in ``data.result``.
    result: Any
    _ended: bool
    #: The scope the body runs in (trio's or anyio's); ``cancel`` cancels it.
    _scope: CancelScopeLike
    #: Why ``cancel`` was called, for ``agent_cancelled``; None if it was not.
    _cancel_reason: str | None
    #: tool call id -> (tool name, clock reading at its ``tool_executing``), oldest first: the
    #: open calls, for ``tool_completed``'s pairing and duration.
    _tools_started: dict[str, tuple[str, float]]

    async def _publish(self, event: AgentEvent) -> int:
        raise NotImplementedError

    def _now(self) -> float:
        raise NotImplementedError

    def _on_ended(self) -> None:
        """Called once the terminal event was published or given up on (a shell's hook)."""

    @property
    def ended(self) -> bool:
        """True once the terminal event has been published."""
        return self._ended

    async def _emit(self, event: AgentEvent) -> int:
        if self._ended:
            raise RunEnded(f"run {self.run_id} has ended; it cannot emit {event.type}")
        return await self._publish(event)

    async def emit(self, event_type: EventType | str, data: Mapping[str, Any]) -> int:
        """Publish a non-terminal event of this run and return its seq.

        Raises:
            InvalidEvent: the type is ``agent_started`` or terminal (the scope sends those), or
                the data does not fit the schema.
            RunEnded: the run has already ended.
        """
        if event_type == EventType.AGENT_STARTED or event_type in TERMINAL_TYPES:
            raise InvalidEvent(f"{event_type} is emitted by the run scope itself")
        return await self._emit(AgentEvent(event_type, data, self.run_id))

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

    async def tool_executing(
        self, tool_name: str, arguments: Mapping[str, Any], *, tool_call_id: str | None = None
    ) -> str:
        """Publish ``tool_executing``, start timing the call, and return its ``tool_call_id``
        (generated unless given; pass it to :meth:`tool_completed` to pair the two, which
        parallel calls of one tool need).

        Raises:
            InvalidIdentifier: ``tool_call_id`` is not a valid id.
            InvalidEvent: the call id is already open in this run, or the data is invalid.
        """
        call_id = new_id("call") if tool_call_id is None else check_id(
            "tool_call_id", tool_call_id
        )
        if call_id in self._tools_started:
            raise InvalidEvent(f"tool call {call_id!r} is already executing in this run")
        event = AgentEvent(
            EventType.TOOL_EXECUTING,
            {"tool_name": tool_name, "arguments": dict(arguments), "tool_call_id": call_id},
            self.run_id,
        )
        await self._emit(event)
        self._tools_started[call_id] = (tool_name, self._now())
        return call_id

    async def tool_completed(
        self,
        tool_name: str,
        result: Any,
        *,
        tool_call_id: str | None = None,
        duration_ms: float | None = None,
        ok: bool = True,
    ) -> int:
        """Publish ``tool_completed`` and return its seq.

        Without ``tool_call_id`` it completes the oldest open call of ``tool_name`` (or, if
        there is none, a call that never reported its start, with a fresh id). ``duration_ms``
        defaults to the time since that call's :meth:`tool_executing` (0 if there was none).
        """
        if tool_call_id is None:
            tool_call_id = next(
                (call for call, (name, _) in self._tools_started.items() if name == tool_name),
                None,
            ) or new_id("call")
        else:
            check_id("tool_call_id", tool_call_id)
        started = self._tools_started.pop(tool_call_id, None)
        if duration_ms is None:
            duration_ms = 0.0 if started is None else elapsed_ms(started[1], self._now())
        return await self.emit(
            EventType.TOOL_COMPLETED,
            {"tool_name": tool_name, "result": result, "duration_ms": duration_ms, "ok": ok,
             "tool_call_id": tool_call_id},
        )

    @asynccontextmanager
    async def tool(
        self, tool_name: str, arguments: Mapping[str, Any], *, tool_call_id: str | None = None
    ) -> AsyncIterator[ToolCall]:
        """Report one tool call around its work: ``tool_executing`` on entry, ``tool_completed``
        with ``call.result`` and the measured duration on exit.

        If the block raises, ``tool_completed`` carries ``ok: false`` and the error's type and
        message as its result, and the exception propagates (the run then ends as it decides).
        A cancelled block reports nothing more: the run's terminal event says it was cancelled.
        """
        call = ToolCall(
            await self.tool_executing(tool_name, arguments, tool_call_id=tool_call_id), tool_name
        )
        try:
            yield call
        except Exception as exc:
            await self.tool_completed(
                tool_name,
                {"error_type": type(exc).__name__, "message": _message(exc)[:ERROR_MESSAGE_LIMIT]},
                tool_call_id=call.tool_call_id, ok=False,
            )
            raise
        await self.tool_completed(tool_name, call.result, tool_call_id=call.tool_call_id)

"""The run lifecycle, written once for both run shells (trio ``Run``, anyio ``PublisherRun``).

Rules of this module: no trio, no anyio, no I/O. :func:`decide_terminal` is the one rule for
which terminal event ends a run, from how its body ended; :class:`RunEmitter` is the one set
of event-building methods a run offers. A shell supplies only what differs between event
loops: how an event is published, its clock, and its cancellation exception class. Keeping one
copy is the point: the two copies this replaced had drifted (a missing terminal event, a
``thinking`` without ``step``, a tool duration of 0).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import attrs

from ._errors import InvalidEvent, RunEnded
from ._events import TERMINAL_TYPES, AgentEvent, EventType

__all__ = ["RunEmitter", "Terminal", "decide_terminal", "started_event"]


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


class RunEmitter:
    """The events a run emits, shared by ``Run`` and ``PublisherRun``.

    A subclass provides ``run_id``, ``_ended``, ``_tools_started``, :meth:`_publish` (send one
    event, return its seq) and :meth:`_now` (its event loop's clock, in seconds).
    """

    __slots__ = ()  # the attrs subclasses keep their slots

    run_id: str
    _ended: bool
    #: tool name -> clock reading at its ``tool_executing``, for ``tool_completed``'s duration.
    _tools_started: dict[str, float]

    async def _publish(self, event: AgentEvent) -> int:
        raise NotImplementedError

    def _now(self) -> float:
        raise NotImplementedError

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

    async def tool_executing(self, tool_name: str, arguments: Mapping[str, Any]) -> int:
        """Publish ``tool_executing`` and start timing the tool."""
        self._tools_started[tool_name] = self._now()
        return await self.emit(
            EventType.TOOL_EXECUTING, {"tool_name": tool_name, "arguments": dict(arguments)}
        )

    async def tool_completed(
        self, tool_name: str, result: Any, *, duration_ms: float | None = None, ok: bool = True
    ) -> int:
        """Publish ``tool_completed``; ``duration_ms`` defaults to the time since
        :meth:`tool_executing` for the same tool (0 if there was none)."""
        started = self._tools_started.pop(tool_name, None)
        if duration_ms is None:
            duration_ms = 0.0 if started is None else elapsed_ms(started, self._now())
        return await self.emit(
            EventType.TOOL_COMPLETED,
            {"tool_name": tool_name, "result": result, "duration_ms": duration_ms, "ok": ok},
        )

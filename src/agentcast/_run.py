"""Agent runs as trio scopes: ``agent_started`` on entry and exactly one terminal event on exit.

Rules of this module: the trio shell of the run lifecycle. Which terminal event a run sends is
decided by :func:`~agentcast._lifecycle.decide_terminal` (shared with ``PublisherRun``); this
module only runs the body in the run's cancel scope and publishes the terminal event in a
shielded scope bounded by ``Config.terminal_event_timeout``, so even a cancelled run reports
its end. Exceptions still propagate; a run cancelled through its own scope (``cancel_run``)
ends the ``async with`` block quietly, like ``trio.move_on_after``.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any, final

import attrs
import trio

from ._events import AgentEvent
from ._lifecycle import RunEmitter, decide_terminal, elapsed_ms, started_event

__all__ = ["Run", "run_scope"]

#: Publishes one event on a thread and returns its seq (``UserSession.send_to_thread``).
Publish = Callable[[str, AgentEvent], Awaitable[int]]


@final
@attrs.define(eq=False, repr=False)
class Run(RunEmitter):
    """A live agent run; emit its events through the methods below.

    Set :attr:`result` to what ``agent_completed`` should carry.
    """

    run_id: str
    thread_id: str
    agent_name: str
    _send: Publish
    #: What ``agent_completed`` carries in ``data.result``; must be JSON-serialisable.
    result: Any = None
    _scope: trio.CancelScope = attrs.Factory(trio.CancelScope)
    _cancel_reason: str | None = None
    _ended: bool = False
    _tools_started: dict[str, tuple[str, float]] = attrs.Factory(dict)
    _done: trio.Event = attrs.Factory(trio.Event)

    def __repr__(self) -> str:
        state = "ended" if self._ended else "active"
        return f"<Run {self.run_id} thread={self.thread_id!r} {state}>"

    async def _publish(self, event: AgentEvent) -> int:
        return await self._send(self.thread_id, event)

    def _now(self) -> float:
        return trio.current_time()

    def cancel(self, reason: str = "cancelled") -> None:
        """Cancel the run; its scope then emits ``agent_cancelled`` with ``reason``."""
        if self._cancel_reason is None:
            self._cancel_reason = reason
        self._scope.cancel()

    async def wait_done(self) -> None:
        """Wait until the run has published its terminal event."""
        await self._done.wait()


@asynccontextmanager
async def run_scope(
    run: Run, *, terminal_timeout: float, message_limit: int
) -> AsyncIterator[Run]:
    """Emit ``agent_started``, run the body in the run's cancel scope, emit one terminal event."""
    await run._emit(started_event(run.run_id, run.agent_name))
    started = trio.current_time()
    body_error: BaseException | None = None
    try:
        with run._scope:
            yield run
    except BaseException as exc:
        body_error = exc
        raise
    finally:
        terminal = decide_terminal(
            run.run_id, body_error=body_error, cancelled_caught=run._scope.cancelled_caught,
            cancel_reason=run._cancel_reason, result=run.result,
            duration_ms=elapsed_ms(started, trio.current_time()), message_limit=message_limit,
            cancelled_type=trio.Cancelled,
        )
        del body_error  # no reference cycle through the traceback
        with trio.CancelScope(shield=True, deadline=trio.current_time() + terminal_timeout):
            try:
                await run._emit(terminal.event)
            finally:
                run._ended = True
                run._done.set()
    if terminal.raise_after is not None:
        raise terminal.raise_after

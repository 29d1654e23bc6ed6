"""Agent runs as trio scopes: ``agent_started`` on entry and exactly one terminal event on exit.

Rules of this module: the trio side of a run: its state, trio cancel scope and clock. The
lifecycle itself (the body in the run's cancel scope, the terminal event that
:func:`~agentcast._lifecycle.decide_terminal` chooses, published shielded within
``Config.terminal_event_timeout``, so even a cancelled run reports its end) is the one shell
shared with ``PublisherRun``, :func:`~agentcast._run_shell.run_lifecycle`. Exceptions still
propagate; a run cancelled through its own scope (``cancel_run``) ends the ``async with``
block quietly, like ``trio.move_on_after``.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from contextlib import AbstractAsyncContextManager as AsyncContextManager
from typing import Any, final

import attrs
import trio

from ._events import AgentEvent
from ._lifecycle import RunEmitter
from ._run_shell import run_lifecycle

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

    def _on_ended(self) -> None:
        self._done.set()

    def cancel(self, reason: str = "cancelled") -> None:
        """Cancel the run; its scope then emits ``agent_cancelled`` with ``reason``."""
        if self._cancel_reason is None:
            self._cancel_reason = reason
        self._scope.cancel()

    async def wait_done(self) -> None:
        """Wait until the run has published its terminal event."""
        await self._done.wait()


def run_scope(run: Run, *, terminal_timeout: float, message_limit: int) -> AsyncContextManager[Run]:
    """Emit ``agent_started``, run the body in the run's cancel scope, emit one terminal event
    (the shared shell, :func:`~agentcast._run_shell.run_lifecycle`)."""
    return run_lifecycle(run, terminal_timeout=terminal_timeout, message_limit=message_limit)

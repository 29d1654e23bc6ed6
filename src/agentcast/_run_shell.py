"""The one async shell of the run lifecycle, for ``Run`` (trio) and ``PublisherRun`` (anyio).

Rules of this module: anyio only, no trio import (``RedisPublisher`` runs under asyncio), so
the same code runs on both event loops: under trio, anyio's scopes are trio's. It emits
``agent_started``, runs the body in the run's own cancel scope, and publishes the terminal
event that :func:`~agentcast._lifecycle.decide_terminal` chooses in a shielded scope bounded
by ``terminal_timeout``, so even a cancelled run reports its end. A rule kept once: the two
shells it replaced were line-for-line copies.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import TypeVar

import anyio

from ._lifecycle import RunEmitter, decide_terminal, elapsed_ms, started_event

__all__ = ["run_lifecycle"]

R = TypeVar("R", bound=RunEmitter)


@asynccontextmanager
async def run_lifecycle(
    run: R, *, terminal_timeout: float, message_limit: int
) -> AsyncIterator[R]:
    """Emit ``agent_started``, run the body in ``run``'s cancel scope, then exactly one
    terminal event; an exception of the body propagates, a cancellation through the run's own
    scope (``run.cancel``) ends the block quietly, like ``move_on_after``."""
    await run._emit(started_event(run.run_id, run.agent_name))
    started = run._now()
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
            duration_ms=elapsed_ms(started, run._now()), message_limit=message_limit,
            cancelled_type=anyio.get_cancelled_exc_class(),
        )
        del body_error  # no reference cycle through the traceback
        with anyio.move_on_after(terminal_timeout, shield=True):
            try:
                await run._emit(terminal.event)
            finally:
                run._ended = True
                run._on_ended()
    if terminal.raise_after is not None:
        raise terminal.raise_after

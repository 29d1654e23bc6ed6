"""One way to run the real server in a test: ``serving(settings)`` starts ``serve`` in-process on
a free loopback port and, when the block ends, checks what every fault test must leave behind:
each connection finished closing, none counted or reserved, at most the supervisor task per
user session, and no file descriptor more than before (``../shared/FAULTS.md``)."""

from __future__ import annotations

import functools
import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Final

import attrs
import trio

from agentcast import MessageHandler
from agentcast.server._serve import RunningServer, serve
from agentcast.server._settings import ServerSettings

__all__ = ["Served", "open_fds", "serving"]


def open_fds() -> int:
    """File descriptors this process has open."""
    return len(os.listdir("/proc/self/fd"))


@attrs.define
class Served:
    """A server running for a test; set ``stop`` to drain it the way SIGTERM does."""

    running: RunningServer
    stop: trio.Event


#: Seconds between looks at handshakes still unwinding (see :func:`_settled`).
POLL: Final = 0.005


def _reserving(running: RunningServer) -> bool:
    stats = running.server.manager.get_stats()
    return any(user.reserved_connections for user in stats.per_user.values())


async def _settled(running: RunningServer) -> None:
    """Wait until every connection has finished closing, then check nothing is left."""
    manager = running.server.manager
    # A handshake whose client already left may still be unwinding on the server (its slot
    # is reserved until trio-websocket gives up): wait for the condition, bounded by the
    # caller's fail_after, rather than for a fixed time.
    while _reserving(running):  # noqa: ASYNC110 - the server exposes no event for it
        await trio.sleep(POLL)
    for user in list(manager.get_stats().per_user):
        session = manager.session(user)
        if session is not None:
            for connection in session.connections():
                await connection.wait_closed()
    stats = manager.get_stats()
    assert stats.connections == 0
    assert all(user.reserved_connections == 0 for user in stats.per_user.values())
    assert all(user.live_tasks <= 1 for user in stats.per_user.values())


@asynccontextmanager
async def serving(
    settings: ServerSettings, *, bound: float = 30.0, leak_check: bool = True,
    message_handler: MessageHandler | None = None,
) -> AsyncIterator[Served]:
    """Serve ``settings`` for the block (bounded by ``bound`` seconds in all).

    The block's own teardown (closing its clients) runs before the leak checks, so a fixture
    closes its clients inside the block. ``leak_check=False`` skips the connection and task
    checks (for tests that leave a client connected on purpose); fds are always checked.
    ``message_handler`` replaces the demo agent's handler.
    """
    baseline = open_fds()
    stop = trio.Event()
    with trio.fail_after(bound):
        async with trio.open_nursery() as nursery:
            running: RunningServer = await nursery.start(
                functools.partial(serve, settings, stop=stop, message_handler=message_handler)
            )
            yield Served(running, stop)
            if leak_check:
                await _settled(running)
            stop.set()
    # Every socket the server opened for a client has been closed.
    assert open_fds() <= baseline

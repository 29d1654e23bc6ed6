"""Server keepalive: one task pings every open WebSocket, instead of one sleeping task each.

A per-connection keepalive task costs a task, its coroutine stack and two cancel scopes for
the whole life of every idle connection (about 3 KB each, measured with tracemalloc). Here a
connection costs one small entry in a queue, and a ping costs no task at all: the ping frame
is written in the keepalive's step (:meth:`Pinged.send_ping`), its pong is seen by the
connection's own reader (:meth:`Watch.pong`), and the keepalive checks ``timeout`` seconds
later whether it came. Only a ping the socket cannot take at once gets a task, which writes it
when the socket drains (within ``timeout``).

The rules, one copy of each:

* every connection is pinged ``interval`` seconds after it was watched (accepted) or its last
  ping was answered, so due times are appended in increasing order and the queue stays sorted
  without a heap; so are the checks, each ``timeout`` after its ping;
* a ping not answered within ``timeout`` (a black-holed peer, or one whose receive buffer is
  full) aborts the connection, since a close handshake would only wait for a reply that never
  comes; a pong answers the ping in flight only if it carries that ping's payload.
"""

from __future__ import annotations

import collections
import contextlib
import logging
import struct
from typing import Final, Protocol

import attrs
import trio
from trio_websocket import ConnectionClosed

from .._connection import Connection
from .._protocol import CloseCode

__all__ = ["Keepalive", "Pinged", "Watch"]

log = logging.getLogger("agentcast.server")

#: Ping payloads: the ping's number on the connection, 32 bits.
_PAYLOAD: Final = struct.Struct("!I")


class Pinged(Protocol):
    """What the keepalive needs of a WebSocket (``_wsconn.ServerWebSocket``)."""

    #: The keepalive's entry for it; the WebSocket passes its pongs to it and clears it when
    #: it closes (:meth:`Keepalive.unwatch`).
    watch: Watch | None

    def send_ping(self, payload: bytes) -> bool:
        """Write a ping frame now; True if it waits behind bytes the socket has not taken and
        nobody is writing them (then :meth:`flush` must run). Raises ConnectionClosed."""

    async def flush(self) -> None:
        """Write what waits; raises ConnectionClosed."""


@attrs.define(eq=False, slots=True)
class Watch:
    """One watched connection; :meth:`Keepalive.unwatch` empties it when the connection ends."""

    ws: Pinged | None
    connection: Connection | None
    keepalive: Keepalive
    #: Pings sent, and the number of the last one answered.
    sent: int = 0
    answered: int = 0

    def pong(self, payload: bytes) -> None:
        """A pong arrived: if it answers the ping in flight, the next is due in ``interval``."""
        if self.ws is None or self.answered == self.sent or payload != _payload(self.sent):
            return  # unsolicited, stale, or after the end: ignored (RFC 6455 5.5.3)
        self.answered = self.sent
        self.keepalive._schedule(self)


def _payload(number: int) -> bytes:
    return _PAYLOAD.pack(number & 0xFFFFFFFF)


@attrs.define(eq=False)
class Keepalive:
    """Pings watched connections every ``interval`` s; drops those silent for ``timeout`` s."""

    interval: float
    timeout: float
    #: (due time, watch) of the next pings, oldest first; ended entries are skipped when due.
    _due: collections.deque[tuple[float, Watch]] = attrs.Factory(collections.deque)
    #: (check time, watch, ping number) of the pings in flight, oldest first.
    _checks: collections.deque[tuple[float, Watch, int]] = attrs.Factory(collections.deque)
    _added: trio.Event = attrs.Factory(trio.Event)

    def watch(self, ws: Pinged, connection: Connection) -> Watch:
        """Start pinging ``ws`` (first ping after ``interval``); returns the handle to unwatch."""
        entry = Watch(ws, connection, self)
        ws.watch = entry
        self._schedule(entry)
        return entry

    def _schedule(self, entry: Watch) -> None:
        self._due.append((trio.current_time() + self.interval, entry))
        self._added.set()

    @staticmethod
    def unwatch(entry: Watch) -> None:
        """Stop pinging (the connection has ended); its queue entries are dropped when due."""
        entry.ws = entry.connection = None

    async def run(self) -> None:
        """Ping what is due and check what was pinged, forever; cancel the surrounding scope to
        stop (flushes included)."""
        due, checks = self._due, self._checks
        async with trio.open_nursery() as flushes:
            while True:
                now = trio.current_time()
                if due and due[0][0] <= now:
                    self._ping(due.popleft()[1], now, flushes)
                    continue
                if checks and checks[0][0] <= now:
                    _, entry, number = checks.popleft()
                    self._check(entry, number)
                    continue
                wake = min(
                    due[0][0] if due else float("inf"), checks[0][0] if checks else float("inf")
                )
                # A pong or a new watch appends a due time that may come before ``wake``.
                self._added = trio.Event()
                with trio.move_on_at(wake):
                    await self._added.wait()

    def _ping(self, entry: Watch, now: float, flushes: trio.Nursery) -> None:
        ws = entry.ws
        if ws is None:
            return  # ended
        entry.sent += 1
        try:
            waits = ws.send_ping(_payload(entry.sent))
        except ConnectionClosed:
            self.unwatch(entry)
            return
        self._checks.append((now + self.timeout, entry, entry.sent))
        if waits:
            flushes.start_soon(self._flush, ws)

    async def _flush(self, ws: Pinged) -> None:
        """Write a ping the socket could not take at once (the check still comes on time)."""
        # Closed meanwhile: the connection's own close goes on.
        with trio.move_on_after(self.timeout), contextlib.suppress(ConnectionClosed):
            await ws.flush()

    def _check(self, entry: Watch, number: int) -> None:
        connection = entry.connection
        if connection is None or entry.answered >= number:
            return
        log.info("dropping connection %s: no pong in time", connection.connection_id)
        connection.abort(CloseCode.GOING_AWAY, "ping timeout")
        self.unwatch(entry)

    @property
    def watched(self) -> int:
        """Queue entries (pings due and in flight), including ended connections not yet due
        (for tests and stats)."""
        return len(self._due) + len(self._checks)

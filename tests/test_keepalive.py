"""The server's keepalive: one task pings every connection on time and drops silent peers.

Fakes stand in for the WebSocket and the connection so the clock can be mocked
(``autojump_clock``); the real-socket behaviour is covered in ``test_server_faults``.
"""

from __future__ import annotations

import attrs
import trio
import trio.testing

from agentcast import CloseCode
from agentcast.server._keepalive import Keepalive, Watch

INTERVAL, TIMEOUT = 10.0, 4.0


@attrs.define
class FakeWebSocket:
    """Answers pings at once (its pong reaches the watch as the reader would pass it), or never
    once ``silent`` is set; records when it was pinged."""

    silent: bool = False
    pinged_at: list[float] = attrs.Factory(list)
    watch: Watch | None = None

    def send_ping(self, payload: bytes) -> bool:
        self.pinged_at.append(trio.current_time())
        if not self.silent and self.watch is not None:
            self.watch.pong(payload)
        return False

    async def flush(self) -> None:
        await trio.lowlevel.checkpoint()


@attrs.define
class FakeConnection:
    connection_id: str
    aborted: list[tuple[int, str, float]] = attrs.Factory(list)

    def abort(self, code: int, reason: str = "") -> None:
        self.aborted.append((code, reason, trio.current_time()))


async def run_for(keepalive: Keepalive, seconds: float) -> None:
    async with trio.open_nursery() as nursery:
        nursery.start_soon(keepalive.run)
        await trio.sleep(seconds)
        nursery.cancel_scope.cancel()


async def test_answered_pings_repeat_every_interval(autojump_clock: trio.testing.MockClock) -> None:
    keepalive = Keepalive(INTERVAL, TIMEOUT)
    ws, connection = FakeWebSocket(), FakeConnection("c-1")
    start = trio.current_time()
    keepalive.watch(ws, connection)  # type: ignore[arg-type]
    await run_for(keepalive, 35)
    assert [round(t - start, 6) for t in ws.pinged_at] == [10.0, 20.0, 30.0]
    assert connection.aborted == []


async def test_a_silent_peer_is_aborted_after_interval_plus_timeout(
    autojump_clock: trio.testing.MockClock,
) -> None:
    keepalive = Keepalive(INTERVAL, TIMEOUT)
    alive, silent = FakeWebSocket(), FakeWebSocket(silent=True)
    alive_connection, silent_connection = FakeConnection("c-1"), FakeConnection("c-2")
    start = trio.current_time()
    keepalive.watch(alive, alive_connection)  # type: ignore[arg-type]
    keepalive.watch(silent, silent_connection)  # type: ignore[arg-type]
    await run_for(keepalive, 45)
    assert [(code, reason) for code, reason, _ in silent_connection.aborted] == [
        (CloseCode.GOING_AWAY, "ping timeout")
    ]
    assert silent_connection.aborted[0][2] - start == INTERVAL + TIMEOUT
    assert len(silent.pinged_at) == 1  # not pinged again once dropped
    assert alive_connection.aborted == []
    assert len(alive.pinged_at) == 4  # the other peer's pings were not delayed


async def test_an_unwatched_connection_is_not_pinged(
    autojump_clock: trio.testing.MockClock,
) -> None:
    keepalive = Keepalive(INTERVAL, TIMEOUT)
    ws, connection = FakeWebSocket(), FakeConnection("c-1")
    entry = keepalive.watch(ws, connection)  # type: ignore[arg-type]
    async with trio.open_nursery() as nursery:
        nursery.start_soon(keepalive.run)
        await trio.sleep(15)
        keepalive.unwatch(entry)
        await trio.sleep(30)
        nursery.cancel_scope.cancel()
    assert len(ws.pinged_at) == 1
    assert keepalive.watched == 0  # the ended entry left the queue when it fell due


async def test_connections_added_while_idle_wake_the_keepalive(
    autojump_clock: trio.testing.MockClock,
) -> None:
    keepalive = Keepalive(INTERVAL, TIMEOUT)
    sockets = [FakeWebSocket() for _ in range(50)]
    async with trio.open_nursery() as nursery:
        nursery.start_soon(keepalive.run)
        await trio.sleep(100)  # nothing watched: the keepalive waits, it does not poll
        watched_at = []
        for index, ws in enumerate(sockets):
            watched_at.append(trio.current_time())
            keepalive.watch(ws, FakeConnection(f"c-{index}"))  # type: ignore[arg-type]
            await trio.sleep(0.1)
        await trio.sleep(INTERVAL)
        nursery.cancel_scope.cancel()
    assert all(len(ws.pinged_at) == 1 for ws in sockets)
    # Each was pinged exactly one interval after it was watched: the queue stays in order.
    gaps = [round(ws.pinged_at[0] - t, 6) for ws, t in zip(sockets, watched_at, strict=True)]
    assert gaps == [INTERVAL] * len(sockets)


@attrs.define
class ScriptedWebSocket:
    """Pongs with ``payload_of(ping)`` ``delay`` seconds after each ping (None: never); with
    ``blocked`` its pings wait for :meth:`flush` (a socket that could not take them)."""

    delay: float | None = 0.0
    wrong_payload: bool = False
    blocked: bool = False
    pinged_at: list[float] = attrs.Factory(list)
    flushed_at: list[float] = attrs.Factory(list)
    watch: Watch | None = None
    _pending: list[bytes] = attrs.Factory(list)
    _pinged: trio.Event = attrs.Factory(trio.Event)

    def send_ping(self, payload: bytes) -> bool:
        self.pinged_at.append(trio.current_time())
        self._pending.append(b"\xff" + payload[1:] if self.wrong_payload else payload)
        self._pinged.set()
        return self.blocked

    async def flush(self) -> None:
        await trio.sleep(1.0)  # the socket drains a second later
        self.flushed_at.append(trio.current_time())

    async def answer(self) -> None:
        """Play the client: answer each ping after ``delay``, as the reader would pass it."""
        while True:
            await self._pinged.wait()
            self._pinged = trio.Event()
            if self.delay is not None and self.watch is not None:
                await trio.sleep(self.delay)
                self.watch.pong(self._pending.pop(0))


async def run_scripted(keepalive: Keepalive, ws: ScriptedWebSocket, seconds: float) -> None:
    async with trio.open_nursery() as nursery:
        nursery.start_soon(keepalive.run)
        nursery.start_soon(ws.answer)
        await trio.sleep(seconds)
        nursery.cancel_scope.cancel()


async def test_the_next_ping_is_one_interval_after_the_answer(
    autojump_clock: trio.testing.MockClock,
) -> None:
    keepalive = Keepalive(INTERVAL, TIMEOUT)
    ws, connection = ScriptedWebSocket(delay=3.0), FakeConnection("c-1")
    start = trio.current_time()
    keepalive.watch(ws, connection)  # type: ignore[arg-type]
    await run_scripted(keepalive, ws, 40)
    # Pinged at 10, answered at ~13 (within the 4 s timeout), pinged again ~10 s later.
    gaps = [round(b - a, 1) for a, b in zip([start, *ws.pinged_at], ws.pinged_at, strict=False)]
    assert gaps[0] == INTERVAL
    assert all(gap == round(INTERVAL + 3.0, 1) for gap in gaps[1:])
    assert connection.aborted == []


async def test_a_pong_with_another_payload_does_not_answer_the_ping(
    autojump_clock: trio.testing.MockClock,
) -> None:
    keepalive = Keepalive(INTERVAL, TIMEOUT)
    ws, connection = ScriptedWebSocket(wrong_payload=True), FakeConnection("c-1")
    keepalive.watch(ws, connection)  # type: ignore[arg-type]
    await run_scripted(keepalive, ws, 20)
    assert [(code, reason) for code, reason, _ in connection.aborted] == [
        (CloseCode.GOING_AWAY, "ping timeout")
    ]
    assert keepalive.watched == 0


async def test_a_ping_the_socket_could_not_take_is_flushed_by_a_task_within_the_timeout(
    autojump_clock: trio.testing.MockClock,
) -> None:
    keepalive = Keepalive(INTERVAL, TIMEOUT)
    ws, connection = ScriptedWebSocket(blocked=True), FakeConnection("c-1")
    keepalive.watch(ws, connection)  # type: ignore[arg-type]
    await run_scripted(keepalive, ws, 15)
    assert len(ws.flushed_at) == 1
    assert ws.flushed_at[0] - ws.pinged_at[0] < TIMEOUT
    assert connection.aborted == []

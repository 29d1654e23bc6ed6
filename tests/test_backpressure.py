"""Backpressure: producers never block on clients.

A client that stops reading fills, in order, its socket buffer (``MemoryTransport`` capacity),
then its bounded send queue (``Config.send_queue_size``). A full queue, or one write blocked past
``Config.write_timeout``, closes that connection as a slow consumer (4008) and nothing else
waits: the producer, the user's other connections and other users go on at full speed.

About the close code the stalled client sees: when the server gave up while its writer was in
the middle of a write (blocked on the full socket buffer), the frame on the wire may be cut in
half, so the server *aborts* the transport instead of writing a close frame: the client sees
1006 (abnormal closure). Only when no write was in progress is the close polite and the client
sees 4008 itself. Server-side, ``Connection.close_code`` is 4008 either way.
"""

from __future__ import annotations

from typing import Any

import attrs
import trio
import trio.testing
from trio_websocket import ConnectionClosed

import agentcast
from agentcast import AgentEvent, CloseCode, Config, EventType, UserContext, UserSession

from .helpers import Client, connect, settle

ALICE = UserContext.from_request(user_id="alice")
BOB = UserContext.from_request(user_id="bob")
ABNORMAL_CLOSURE = 1006


def thinking(index: int) -> AgentEvent:
    return AgentEvent(EventType.AGENT_THINKING, {"text": f"event {index}"})


@attrs.define(eq=False)
class Reader:
    """A healthy client, read continuously by a background task; notes when each frame came."""

    client: Client
    frames: list[dict[str, Any]] = attrs.Factory(list)
    times: list[float] = attrs.Factory(list)
    close_code: int | None = None

    async def run(self) -> None:
        try:
            while True:
                self.frames.append(await self.client.receive())
                self.times.append(trio.current_time())
        except ConnectionClosed as exc:
            self.close_code = exc.reason.code if exc.reason is not None else ABNORMAL_CLOSURE

    def seqs(self, thread_id: str = "t1") -> list[int]:
        return [f["seq"] for f in self.frames if f.get("thread_id") == thread_id
                and f["type"] == "agent_thinking"]


async def healthy(nursery: trio.Nursery, session: UserSession) -> Reader:
    client, _ = await connect(session, ("t1",), capacity=1024)
    reader = Reader(client)
    nursery.start_soon(reader.run)
    return reader


async def test_a_full_queue_closes_only_the_stalled_client_and_never_blocks_the_producer(
    autojump_clock: trio.testing.MockClock,
) -> None:
    config = Config(send_queue_size=8)
    total = 100
    async with agentcast.open_manager(config) as manager, trio.open_nursery() as nursery:
        alice = manager.get_websocket_manager(ALICE)
        bob = manager.get_websocket_manager(BOB)
        # Never reads: its socket buffer takes 2 messages, its queue 8 more.
        stalled, stalled_connection = await connect(alice, ("t1",), capacity=2)
        alice_reader = await healthy(nursery, alice)
        bob_reader = await healthy(nursery, bob)
        await settle()

        start = trio.current_time()
        for index in range(total):
            await alice.send_to_thread("t1", thinking(index))
            await bob.send_to_thread("t1", thinking(index))
            # Let every consumer run until it is blocked: the healthy ones keep up, so each
            # queue holds one event at most; the stalled one fills. No time passes here.
            await settle()
        # Every publish returned without waiting: no virtual time passed (any wait for a
        # client would have needed the autojump clock to advance to a write timeout).
        assert trio.current_time() == start

        assert stalled_connection.closed
        assert stalled_connection.close_code == CloseCode.SLOW_CONSUMER
        expected = list(range(1, total + 1))
        for reader in (alice_reader, bob_reader):
            assert reader.frames[0]["type"] == "subscribed"
            assert reader.seqs() == expected
            assert set(reader.times) == {start}  # every event arrived with no delay
            assert reader.close_code is None

        stats = manager.get_stats()
        assert stats.slow_consumer_disconnects == 1
        assert stats.per_user["alice"].slow_consumer_disconnects == 1
        assert stats.per_user["bob"].slow_consumer_disconnects == 0
        assert stats.events_dropped > 0
        assert stats.per_user["bob"].events_dropped == 0

        # The stalled client now reads: what was in its socket buffer, then the end. Its
        # writer was blocked mid-write, so the server aborted: 1006, not a close frame.
        frames, code = await stalled.receive_closed()
        assert code == ABNORMAL_CLOSURE
        assert [f["type"] for f in frames] == ["subscribed", "agent_thinking"]
        assert frames[1]["seq"] == 1
        assert trio.current_time() == start
        nursery.cancel_scope.cancel()


async def test_a_burst_past_the_queue_closes_politely_with_4008_when_no_write_is_cut(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with agentcast.open_manager(Config(send_queue_size=8)) as manager:
        alice = manager.get_websocket_manager(ALICE)
        client, connection = await connect(alice, ("t1",))
        # Ten events without yielding: the writer has not run yet, the queue (ack + 7) fills.
        for index in range(10):
            await alice.send_to_thread("t1", thinking(index))
        await connection.wait_closed()
        assert connection.close_code == CloseCode.SLOW_CONSUMER
        # No write was in progress, so the close is polite and the client sees 4008.
        frames, code = await client.receive_closed()
        assert code == CloseCode.SLOW_CONSUMER
        assert frames == []  # queued frames are dropped; the client resumes from history
        stats = alice.get_stats()
        assert stats.slow_consumer_disconnects == 1
        assert stats.events_dropped >= 3


async def test_a_write_blocked_past_write_timeout_closes_the_stalled_client(
    autojump_clock: trio.testing.MockClock,
) -> None:
    config = Config(write_timeout=1.0)  # the default queue (1024) never fills here
    async with agentcast.open_manager(config) as manager, trio.open_nursery() as nursery:
        alice = manager.get_websocket_manager(ALICE)
        bob = manager.get_websocket_manager(BOB)
        stalled, stalled_connection = await connect(alice, ("t1",), capacity=2)
        alice_reader = await healthy(nursery, alice)
        bob_reader = await healthy(nursery, bob)
        await settle()

        start = trio.current_time()
        for index in range(20):
            await alice.send_to_thread("t1", thinking(index))
            await bob.send_to_thread("t1", thinking(index))
        assert trio.current_time() == start
        await settle()
        assert not stalled_connection.closed  # its queue is far from full

        for reader in (alice_reader, bob_reader):
            assert reader.seqs() == list(range(1, 21))
            assert set(reader.times) == {start}

        await stalled_connection.wait_closed()
        # The write blocked on the full socket buffer was cut by the manager's watchdog, which
        # checks every eighth of write_timeout.
        assert config.write_timeout <= trio.current_time() - start <= config.write_timeout * 1.125
        assert stalled_connection.close_code == CloseCode.SLOW_CONSUMER
        stats = manager.get_stats()
        assert stats.slow_consumer_disconnects == 1
        assert stats.per_user["bob"].slow_consumer_disconnects == 0

        # Cut mid-write, so aborted: the client drains its buffer and sees 1006.
        frames, code = await stalled.receive_closed()
        assert code == ABNORMAL_CLOSURE
        assert [f.get("seq") for f in frames] == [0, 1]

        # The others are unaffected and still live.
        await alice.send_to_thread("t1", thinking(20))
        await bob.send_to_thread("t1", thinking(20))
        await settle()
        assert alice_reader.seqs() == bob_reader.seqs() == list(range(1, 22))
        assert alice_reader.close_code is bob_reader.close_code is None
        nursery.cancel_scope.cancel()


async def test_a_slow_consumer_that_reconnects_with_since_seq_loses_nothing(
    autojump_clock: trio.testing.MockClock,
) -> None:
    config = Config(send_queue_size=8, write_timeout=1.0)
    async with agentcast.open_manager(config) as manager:
        alice = manager.get_websocket_manager(ALICE)
        stalled, stalled_connection = await connect(alice, ("t1",), capacity=2)
        ack = await stalled.receive()
        published = []
        for index in range(40):
            published.append(await alice.send_to_thread("t1", thinking(index)))
            await settle()
        await stalled_connection.wait_closed()
        assert stalled_connection.close_code == CloseCode.SLOW_CONSUMER

        frames, code = await stalled.receive_closed()
        # Its socket buffer held 1 and 2; the writer was blocked on 3 when the queue
        # overflowed, so the close was an abort.
        assert code == ABNORMAL_CLOSURE
        seen = [f["seq"] for f in frames]
        assert seen == [1, 2]
        last = seen[-1]

        again, _ = await connect(alice)
        await again.send(
            {"type": "subscribe", "thread_id": "t1", "since_seq": last, "epoch": ack["epoch"]}
        )
        resumed = await again.receive()
        assert (resumed["type"], resumed["recovered"]) == ("subscribed", True)
        replayed = [(await again.receive())["seq"] for _ in range(published[-1] - last)]
        assert seen + replayed == published  # every event, once, in order
        await alice.send_to_thread("t1", thinking(99))
        assert (await again.receive())["seq"] == published[-1] + 1


async def test_closing_a_client_that_never_reads_is_bounded_by_close_timeout(
    autojump_clock: trio.testing.MockClock,
) -> None:
    # write_timeout is long, so only close_timeout can end the drain.
    config = Config(close_timeout=2.0, write_timeout=100.0)
    async with agentcast.open_manager(config) as manager:
        alice = manager.get_websocket_manager(ALICE)
        stalled, connection = await connect(alice, ("t1",), capacity=2)
        for index in range(5):
            await alice.send_to_thread("t1", thinking(index))
        await settle()
        start = trio.current_time()
        assert await alice.remove_connection(connection.connection_id, 1000, "bye")
        # A draining close waits for the writer at most close_timeout, then aborts.
        assert trio.current_time() - start == config.close_timeout
        assert connection.closed
        frames, code = await stalled.receive_closed()
        assert code == ABNORMAL_CLOSURE
        assert [f.get("seq") for f in frames] == [0, 1]


async def test_a_polite_close_to_a_full_socket_buffer_is_bounded_by_close_timeout(
    autojump_clock: trio.testing.MockClock,
) -> None:
    config = Config(close_timeout=2.0, write_timeout=100.0)
    async with agentcast.open_manager(config) as manager:
        alice = manager.get_websocket_manager(ALICE)
        # The ack alone fills the socket buffer; the writer is idle, not mid-write.
        stalled, connection = await connect(alice, ("t1",), capacity=1)
        await settle()
        start = trio.current_time()
        assert await alice.remove_connection(connection.connection_id, 1000, "bye")
        # The close frame cannot be written; past close_timeout the transport is dropped.
        assert trio.current_time() - start == config.close_timeout
        frames, code = await stalled.receive_closed()
        assert code == ABNORMAL_CLOSURE
        assert [f["type"] for f in frames] == ["subscribed"]


async def test_shutdown_never_hangs_on_a_client_that_never_reads(
    autojump_clock: trio.testing.MockClock,
) -> None:
    config = Config(close_timeout=1.0, write_timeout=100.0, shutdown_timeout=5.0)
    async with agentcast.open_manager(config) as manager:
        alice = manager.get_websocket_manager(ALICE)
        stalled, connection = await connect(alice, ("t1",), capacity=2)
        for index in range(10):
            await alice.send_to_thread("t1", thinking(index))
        await settle()
        start = trio.current_time()
    elapsed = trio.current_time() - start
    assert elapsed <= config.shutdown_timeout
    assert connection.closed
    assert manager.get_stats().live_tasks == 0
    frames, code = await stalled.receive_closed()
    assert code == ABNORMAL_CLOSURE
    assert len(frames) == 2

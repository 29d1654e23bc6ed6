"""Producer-side write-through over real sockets: a live event is written in the producer's step
when its connection's writer is idle and nothing is queued (``_connection.py``,
``_writethrough.py``, ``server/_wsconn.py``), and queued as before otherwise.

Each test runs the real server on a loopback port (port 0, every wait bounded by
``fail_after``); ``serving()`` checks that no connection, task or fd is left, and the tests with
a bystander check that another user's stream stays complete and in order. What they show: a
delivery at low load costs fewer scheduler steps than the queued path (the writer takes none), a
socket that would block mid-stream falls back to the writer with nothing lost and the order
kept, a frame the socket took part of is finished before the connection's own frames, a peer
that is gone is closed as before, and bursts still leave in batches.
"""

from __future__ import annotations

import json
import socket
import struct
from collections.abc import AsyncIterator

import attrs
import pytest
import trio
import trio.testing

from agentcast import Config
from agentcast._connection import Connection
from agentcast._transport import Written
from agentcast._writethrough import BATCH_GAP
from agentcast.server._settings import ServerSettings
from agentcast.server._wsconn import ServerWebSocket

from .rawws import PING, TEXT, RawClient
from .test_server_faults import SECRET, Bystander, Fixture, open_fixture, read_json, watching

#: A keepalive that never fires during a test (some clients here stop reading on purpose).
SETTINGS = ServerSettings(
    port=0, secret=SECRET, handshake_timeout=2.0, ping_interval=60.0, ping_timeout=30.0,
    core=Config(send_queue_size=64, write_timeout=2.0, close_timeout=1.0, shutdown_timeout=2.0),
)


@pytest.fixture
async def fixture() -> AsyncIterator[Fixture]:
    async with open_fixture(SETTINGS) as fixture:
        yield fixture


@pytest.fixture
async def bystander(fixture: Fixture) -> AsyncIterator[Bystander]:
    async with watching(fixture) as watcher:
        yield watcher


async def subscribed(
    fixture: Fixture, user: str, *, receive_buffer: int | None = None,
    subprotocol: str | None = None,
) -> tuple[RawClient, Connection, ServerWebSocket]:
    """A raw client of ``user`` subscribed to t1, its server connection and transport."""
    client = await RawClient.open(
        fixture.port, fixture.token(user), receive_buffer=receive_buffer, subprotocol=subprotocol
    )
    fixture.clients.append(client)
    assert (await fixture.subscribe_raw(client))["type"] == "subscribed"
    connection = await fixture.connection(user)
    transport = connection.transport
    assert isinstance(transport, ServerWebSocket)
    return client, connection, transport


async def read_texts(client: RawClient, count: int) -> list[tuple[int, str]]:
    """The next ``count`` agent_text events (batched or not) as (seq, text)."""
    events: list[tuple[int, str]] = []
    while len(events) < count:
        opcode, payload = await client.read_frame()
        assert opcode == TEXT
        for line in payload.decode().split("\n"):
            frame = json.loads(line)
            assert frame["type"] == "agent_text"
            events.append((frame["seq"], frame["data"]["text"]))
    return events


@attrs.define(eq=False)
class Steps(trio.abc.Instrument):
    """Counts every scheduler step, and those of the task named ``writer``."""

    writer: str
    total: int = 0
    of_writer: int = 0

    def before_task_step(self, task: trio.lowlevel.Task) -> None:
        self.total += 1
        if task.name == self.writer:
            self.of_writer += 1


async def test_a_delivery_at_low_load_costs_fewer_scheduler_steps_than_the_queued_path(
    fixture: Fixture,
) -> None:
    count = 50

    async def one_at_a_time(first: int) -> Steps:
        steps = Steps(f"{connection.connection_id}:writer")
        trio.lowlevel.add_instrument(steps)
        try:
            events = []
            for _ in range(count):  # one event at a time: nothing to batch
                await fixture.publish("alice", "t1", 1)
                events += await read_texts(client, 1)
        finally:
            trio.lowlevel.remove_instrument(steps)
        assert [seq for seq, _ in events] == list(range(first, first + count))
        return steps

    with trio.fail_after(10):
        client, connection, transport = await subscribed(fixture, "alice")
        before = transport.written_through
        through = await one_at_a_time(1)
        assert transport.written_through - before == count
        # The same connection with the producer side switched off: every event is queued and
        # the writer (itself writing through, one step a delivery) sends it.
        connection._through = None
        queued = await one_at_a_time(count + 1)
    assert through.of_writer == 0
    assert queued.of_writer == count
    # The writer's wake-up is what write-through saves; nothing else costs more for it.
    assert through.total <= queued.total - count


async def test_a_socket_that_would_block_falls_back_with_nothing_lost_and_the_order_kept(
    fixture: Fixture, bystander: Bystander
) -> None:
    count, size = 40, 1500
    with trio.fail_after(10):
        client, connection, transport = await subscribed(fixture, "alice", receive_buffer=4096)
        transport._sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
        before = transport.written_through
        for _ in range(count):  # the client does not read: its buffers fill
            await fixture.publish("alice", "t1", 1, size=size)
            await trio.testing.wait_all_tasks_blocked()
        written = transport.written_through - before
        assert 0 < written < count  # the first went through, then the socket was full
        # The rest waits in the queue behind the writer, which waits for the socket.
        assert connection._write_started is not None
        events = await read_texts(client, count)
        # Every frame intact (each publish is its own n = 0), every seq once, in order.
        assert events == [(n + 1, "000000" + "x" * size) for n in range(count)]
        # Drained, the writer is idle again: the next events write through.
        before = transport.written_through
        for _ in range(5):
            await fixture.publish("alice", "t1", 1)
            await trio.testing.wait_all_tasks_blocked()
        assert transport.written_through - before == 5
        assert [seq for seq, _ in await read_texts(client, 5)] == list(range(41, 46))


async def test_the_rest_of_a_part_written_frame_goes_before_the_connections_own_frames(
    fixture: Fixture,
) -> None:
    message = json.dumps({"type": "heartbeat", "pad": "y" * 200_000})
    with trio.fail_after(10):
        client, _, transport = await subscribed(fixture, "alice", receive_buffer=4096)
        transport._sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
        assert transport.send_nowait(message) is Written.PART
        # Until the rest is written nothing else is written through.
        assert transport.send_nowait('{"type":"heartbeat"}') is Written.NONE
        # A keepalive ping now waits behind the rest (nobody is writing it yet).
        assert transport.send_ping(b"ping") is True
        async with trio.open_nursery() as nursery:
            nursery.start_soon(transport.finish_send)
            first, second = await client._read_exactly(2)
            assert (first & 0x0F, second) == (TEXT, 127)
            (length,) = struct.unpack("!Q", await client._read_exactly(8))
            assert await client._read_exactly(length) == message.encode()
            assert await client._read_exactly(6) == bytes((0x80 | PING, 4)) + b"ping"
        await transport.finish_send()  # nothing left: returns at once
        assert transport.send_nowait('{"type":"heartbeat"}') is Written.ALL
        assert await read_json(client) == {"type": "heartbeat"}


async def test_a_peer_that_is_gone_is_closed_as_before(
    fixture: Fixture, bystander: Bystander
) -> None:
    with trio.fail_after(10):
        client, connection, transport = await subscribed(fixture, "alice")
        await fixture.publish("alice", "t1", 1)
        assert [seq for seq, _ in await read_texts(client, 1)] == [1]
        written = transport.written_through
        await client.reset()
        # Published before the server has read the reset: the write meets it.
        await fixture.publish("alice", "t1", 5)
        await connection.wait_closed()
    assert connection.close_code == 1006
    assert transport.written_through == written


async def test_bursts_still_leave_in_batches(fixture: Fixture, bystander: Bystander) -> None:
    count = 200
    with trio.fail_after(10):
        client, connection, transport = await subscribed(
            fixture, "alice", subprotocol="agentcast.ndjson"
        )
        assert connection.batch
        before = transport.written_through
        await fixture.publish("alice", "t1", count)  # a producer in a loop
        messages = 0
        events: list[tuple[int, str]] = []
        while len(events) < count:
            events += await read_texts(client, 1)
            messages += 1
        assert [seq for seq, _ in events] == list(range(1, count + 1))
        # A few write-throughs at most (one per quiet gap); the rest in the writer's batches.
        assert messages <= count // 10
        assert transport.written_through - before <= messages
        # An event arriving alone after a quiet gap is written through.
        await trio.sleep(BATCH_GAP)
        before = transport.written_through
        await fixture.publish("alice", "t1", 1)
        assert transport.written_through - before == 1
        assert [seq for seq, _ in await read_texts(client, 1)] == [count + 1]


async def test_a_part_written_frame_to_a_client_that_stopped_reading_is_cut_with_4008(
    fixture: Fixture, bystander: Bystander
) -> None:
    with trio.fail_after(10):  # write_timeout is 2 s
        client, connection, transport = await subscribed(fixture, "alice", receive_buffer=4096)
        transport._sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
        # One event larger than both buffers, written through in the producer's step: the
        # socket takes part of it, the writer waits to finish it, the client never reads.
        await fixture.publish("alice", "t1", 1, size=300_000)
        assert transport.waited_writes == 1
        assert connection._write_started is not None
        await connection.wait_closed()
    assert connection.close_code == 4008
    stats = fixture.manager.get_stats()
    assert stats.slow_consumer_disconnects == 1
    # Aborted, not closed politely over half a frame: the stream ends inside the event's frame,
    # with no close frame after it.
    with trio.fail_after(5), pytest.raises((EOFError, trio.BrokenResourceError)):
        await client.read_frame()

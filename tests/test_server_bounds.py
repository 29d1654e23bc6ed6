"""Bounded resources over real sockets (issue 9, FAULTS.md rows 24, 25, 27, 31): the attacked
user's outcome, a bystander user's stream complete and in order, and nothing leaked (no
connection counted, no connection slot reserved, no connection task left, fds back)."""

from __future__ import annotations

import base64
import gc
import json
import os
import socket
import struct
import tracemalloc
from collections.abc import AsyncIterator

import pytest
import trio

from agentcast import Config
from agentcast.server._settings import ServerSettings

from .rawws import TEXT, encode_frame
from .test_server_faults import SECRET, Bystander, Fixture, open_fixture, read_json, watching

LIMIT = 10
THREADS_CAP = 100
BYTES_BUDGET = 200_000
SETTINGS = ServerSettings(
    port=0, secret=SECRET, demo=True, demo_speed=2.0, handshake_timeout=2.0,
    ping_interval=5.0, ping_timeout=5.0, max_connections_per_user=LIMIT,
    core=Config(
        send_queue_size=256, write_timeout=1.0, close_timeout=1.0, shutdown_timeout=2.0,
        inbound_rate=200.0, inbound_burst=100, max_threads_per_user=THREADS_CAP,
        max_retained_bytes=BYTES_BUDGET,
    ),
)


@pytest.fixture
async def fixture() -> AsyncIterator[Fixture]:
    async with open_fixture(SETTINGS, bound=60) as fixture:
        yield fixture


@pytest.fixture
async def bystander(fixture: Fixture) -> AsyncIterator[Bystander]:
    async with watching(fixture) as watcher:
        yield watcher


def upgrade_head(token: str) -> bytes:
    key = base64.b64encode(os.urandom(16)).decode()
    return (
        f"GET /ws?token={token} HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\n"
        f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\n"
        "Sec-WebSocket-Version: 13\r\n\r\n"
    ).encode()


async def read_status(stream: trio.SocketStream) -> int:
    """The status code of the server's answer (the head only)."""
    data = b""
    while b"\r\n" not in data:
        chunk = await stream.receive_some(4096)
        if not chunk:
            return 0
        data += chunk
    return int(data.split(b" ", 2)[1])


# ---- connections per user, reserved atomically (row 24) --------------------------------


async def test_simultaneous_handshakes_admit_exactly_the_limit(
    fixture: Fixture, bystander: Bystander
) -> None:
    token = fixture.token("alice")
    streams: list[trio.SocketStream] = []
    try:
        with trio.fail_after(30):
            for _ in range(200):
                streams.append(await trio.open_tcp_stream("127.0.0.1", fixture.port))
            # Every head is on the wire before the server answers any of them.
            heads = [upgrade_head(token) for _ in streams]
            for stream, head in zip(streams, heads, strict=True):
                await stream.send_all(head)
            statuses: list[int] = [0] * len(streams)

            async def read(index: int) -> None:
                statuses[index] = await read_status(streams[index])

            async with trio.open_nursery() as readers:
                for index in range(len(streams)):
                    readers.start_soon(read, index)
            assert statuses.count(101) == LIMIT
            assert statuses.count(429) == 200 - LIMIT
            session = fixture.manager.session("alice")
            assert session is not None
            assert len(session.connections()) == LIMIT
            assert session.get_stats().reserved_connections == 0
    finally:
        for stream in streams:
            await trio.aclose_forcefully(stream)
    with trio.fail_after(10):
        await fixture.gone("alice")
    stats = fixture.manager.get_stats()
    assert stats.per_user["alice"].connections == 0
    assert stats.per_user["alice"].reserved_connections == 0
    # A fresh connection is admitted again once the others are gone.
    client = await fixture.raw("alice")
    assert (await fixture.subscribe_raw(client))["type"] == "subscribed"


async def test_a_handshake_that_fails_after_reserving_gives_its_slot_back(
    fixture: Fixture, bystander: Bystander
) -> None:
    token = fixture.token("alice")
    with trio.fail_after(15):
        # Past our checks (so a slot is reserved), then gone in the middle of the handshake:
        # clients that vanish (TCP RST) right after sending their head, twice the limit.
        for _ in range(LIMIT * 2):
            stream = await trio.open_tcp_stream("127.0.0.1", fixture.port)
            await stream.send_all(upgrade_head(token))
            stream.socket.setsockopt(
                socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0)
            )
            await trio.aclose_forcefully(stream)
        session = fixture.manager.session("alice")
        while session is not None and (
            session.get_stats().reserved_connections or session.connections()
        ):
            await trio.lowlevel.checkpoint()  # the server's handlers run meanwhile
        # Every place came back: the full limit can connect again.
        clients = [await fixture.raw("alice") for _ in range(LIMIT)]
        for client in clients:
            assert (await fixture.subscribe_raw(client))["type"] == "subscribed"
    assert fixture.manager.get_stats().per_user["alice"].connections == LIMIT


# ---- runs per user through the demo handler (row 31) -----------------------------------


async def test_fifty_user_messages_start_eight_runs_and_refuse_the_rest(
    fixture: Fixture, bystander: Bystander
) -> None:
    client = await fixture.raw("alice")
    runs_cap = SETTINGS.core.max_active_runs_per_user
    messages = [
        json.dumps({"type": "user_message", "thread_id": "t1", "text": f"question {n}"}).encode()
        for n in range(50)
    ]
    with trio.fail_after(15):
        # One write: every message is read before the first run can end.
        await client.stream.send_all(b"".join(encode_frame(TEXT, m) for m in messages))
        refused = 0
        while refused < 50 - runs_cap:
            frame = await read_json(client)
            assert frame["type"] == "error", frame
            assert frame["code"] == "too_many_runs"
            refused += 1
        session = fixture.manager.session("alice")
        assert session is not None
        assert len(session.active_runs()) == runs_cap
        assert session.get_stats().runs_started == runs_cap
        await client.send(TEXT, b'{"type": "ping", "id": "still-open"}')
        assert await read_json(client) == {"type": "pong", "id": "still-open"}
        for run in session.active_runs():
            await run.wait_done()  # the demo agent answers within a second at this speed
    assert fixture.manager.get_stats().session_crashes == 0


# ---- a frame the parser accepts but an encoder refuses (row 27) -------------------------


async def test_a_deeply_nested_ping_gets_bad_frame_and_no_tab_is_closed(
    fixture: Fixture, bystander: Bystander
) -> None:
    first = await fixture.raw("alice")
    second = await fixture.raw("alice")
    assert (await fixture.subscribe_raw(second))["type"] == "subscribed"
    with trio.fail_after(10):
        for _ in range(3):
            await first.send(TEXT, b'{"type": "ping", "id": ' + b"[" * 600 + b"]" * 600 + b"}")
            error = await read_json(first)
            assert (error["type"], error["code"]) == ("error", "bad_frame")
        await fixture.publish("alice", "t1", 5)
        seqs = [(await read_json(second))["seq"] for _ in range(5)]
        assert seqs == [1, 2, 3, 4, 5]
        await first.send(TEXT, b'{"type": "ping", "id": 1}')
        assert await read_json(first) == {"type": "pong", "id": 1}
    assert fixture.manager.get_stats().session_crashes == 0



# ---- one user subscribing to ever new thread ids (row 25) ------------------------------


async def test_ever_new_thread_ids_over_reconnects_keep_streams_and_bytes_at_the_cap(
    fixture: Fixture, bystander: Bystander
) -> None:
    per_connection = 25
    names = iter(range(10**9))

    async def one_round() -> None:
        client = await fixture.raw("alice")
        for _ in range(per_connection):
            thread_id = f"t-{next(names)}"
            assert (await fixture.subscribe_raw(client, thread_id))["type"] == "subscribed"
            await fixture.publish("alice", thread_id, 1, size=4000)  # what a run would write
            assert (await read_json(client))["thread_id"] == thread_id
        fixture.clients.remove(client)
        await client.aclose()
        await fixture.gone("alice")
        stats = fixture.manager.get_stats()
        assert stats.broker_streams <= THREADS_CAP + 1  # and the bystander's
        assert stats.broker_retained_bytes <= BYTES_BUDGET

    with trio.fail_after(60):
        tracemalloc.start()
        try:
            for _ in range(8):  # warm up: 200 thread ids, past the cap
                await one_round()
            gc.collect()
            before = tracemalloc.get_traced_memory()[0]
            for _ in range(40):  # 1 000 more, with a 4 KB event each
                await one_round()
            gc.collect()
            after = tracemalloc.get_traced_memory()[0]
        finally:
            tracemalloc.stop()
    # Unbounded, 1 000 streams of a 4 KB event each would hold over 4 MB more.
    assert after - before < 1_500_000, after - before
    stats = fixture.manager.get_stats()
    # 4 KB events: the byte budget binds first (emptied idle streams are forgotten with it).
    assert stats.broker_streams <= THREADS_CAP + 1
    assert BYTES_BUDGET - 5000 < stats.broker_retained_bytes <= BYTES_BUDGET

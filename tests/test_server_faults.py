"""Faults and bad input over real sockets (``../shared/FAULTS.md``): each closes or refuses only
the faulty client with its documented code, while a bystander user keeps a complete, ordered
stream, and afterwards no connection is counted, no connection task is left and no file
descriptor has leaked."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import attrs
import pytest
import trio
from trio_websocket import WebSocketConnection, open_websocket_url

from agentcast import AgentEvent, Config, Connection, EventType, UserContext
from agentcast.server import issue_token
from agentcast.server._serve import RunningServer
from agentcast.server._settings import ServerSettings

from .rawws import BINARY, CONTINUATION, TEXT, RawClient, encode_frame
from .serverkit import serving

SECRET = "a-test-secret-that-is-long-enough-for-hs256"
MAX_MESSAGE = 4096
#: Fault-sized knobs: small limits and short deadlines so every fault resolves in well under
#: a second of real time (each wait below is still bounded by fail_after).
SETTINGS = ServerSettings(
    port=0, secret=SECRET, demo=True, demo_speed=2.0, handshake_timeout=2.0,
    ping_interval=0.3, ping_timeout=1.5,
    core=Config(
        max_message_bytes=MAX_MESSAGE, send_queue_size=64, write_timeout=1.0,
        close_timeout=1.0, shutdown_timeout=2.0, inbound_rate=50.0, inbound_burst=20,
        rate_limit_strikes=5,
    ),
)


@attrs.define
class Fixture:
    running: RunningServer
    stop: trio.Event
    clients: list[RawClient] = attrs.Factory(list)

    @property
    def port(self) -> int:
        return self.running.port

    @property
    def manager(self):  # type: ignore[no-untyped-def]
        return self.running.server.manager

    def token(self, user: str) -> str:
        return issue_token(SECRET, user)

    async def raw(self, user: str, *, receive_buffer: int | None = None) -> RawClient:
        """A raw client of ``user``; the fixture closes it at teardown whatever happened."""
        client = await RawClient.open(self.port, self.token(user), receive_buffer=receive_buffer)
        self.clients.append(client)
        return client

    async def subscribe_raw(self, client: RawClient, thread_id: str = "t1") -> dict[str, object]:
        await client.send(TEXT, json.dumps({"type": "subscribe", "thread_id": thread_id}).encode())
        return await read_json(client)

    async def connection(self, user: str) -> Connection:
        """The (first) connection of ``user``, once the server has registered it."""
        session = self.manager.get_websocket_manager(UserContext.from_request(user_id=user))
        while not session.connections():
            await trio.lowlevel.checkpoint()
        first: Connection = session.connections()[0]
        return first

    async def gone(self, user: str) -> None:
        """Wait until every connection of ``user`` has finished closing."""
        session = self.manager.session(user)
        if session is not None:
            for connection in session.connections():
                await connection.wait_closed()

    async def publish(self, user: str, thread_id: str, count: int, size: int = 100) -> None:
        session = self.manager.get_websocket_manager(UserContext.from_request(user_id=user))
        for n in range(count):
            await session.send_to_thread(
                thread_id, AgentEvent(EventType.AGENT_TEXT, {"text": f"{n:06d}" + "x" * size})
            )


async def read_json(client: RawClient) -> dict[str, object]:
    opcode, payload = await client.read_frame()
    assert opcode == TEXT
    frame = json.loads(payload)
    assert isinstance(frame, dict)
    return frame


@attrs.define
class Bystander:
    """Another user's tab, connected through trio-websocket for the whole test."""

    ws: WebSocketConnection
    fixture: Fixture
    published: int = 0

    async def check_complete(self, count: int = 50) -> None:
        """Publish ``count`` more events and read every one, in order, with no gap."""
        first = self.published + 1
        await self.fixture.publish("bystander", "t1", count)
        self.published += count
        seqs: list[int] = []
        while len(seqs) < count:
            frame = json.loads(await self.ws.get_message())
            seqs.append(frame["seq"])
        assert seqs == list(range(first, first + count))


@pytest.fixture
async def fixture() -> AsyncIterator[Fixture]:
    # However the test ended, every connection is gone and left no task or fd behind.
    async with open_fixture(SETTINGS) as fixture:
        yield fixture


@asynccontextmanager
async def open_fixture(
    settings: ServerSettings, *, bound: float = 30.0, reset: bool = False
) -> AsyncIterator[Fixture]:
    """A served ``settings`` and its raw clients for the block; every client is closed at the
    end (``reset``: with a TCP RST, so the server drops what it has not read yet), before
    ``serving``'s leak checks: no connection, task or fd left behind."""
    async with serving(settings, bound=bound) as served:
        fixture = Fixture(served.running, served.stop)
        try:
            yield fixture
        finally:
            for client in fixture.clients:
                await (client.reset() if reset else client.aclose())


@asynccontextmanager
async def watching(fixture: Fixture) -> AsyncIterator[Bystander]:
    """Another user's tab for the block: its stream is complete before and after."""
    url = f"ws://127.0.0.1:{fixture.port}/ws?token={fixture.token('bystander')}"
    async with open_websocket_url(url) as ws:
        await ws.send_message(json.dumps({"type": "subscribe", "thread_id": "t1"}))
        assert json.loads(await ws.get_message())["type"] == "subscribed"
        watcher = Bystander(ws, fixture)
        await watcher.check_complete()
        yield watcher
        await watcher.check_complete()
    # trio-websocket's client can leave its socket open after the close; make sure.
    await trio.aclose_forcefully(ws._stream)


@pytest.fixture
async def bystander(fixture: Fixture) -> AsyncIterator[Bystander]:
    async with watching(fixture) as watcher:
        yield watcher


@pytest.mark.parametrize(
    "frames",
    [
        pytest.param([(TEXT, b"x" * (MAX_MESSAGE + 1), True)], id="one-frame"),
        pytest.param(
            [(TEXT, b"x" * 2000, False), (CONTINUATION, b"x" * 2000, False),
             (CONTINUATION, b"x" * 2000, True)],
            id="fragments",
        ),
    ],
)
async def test_an_oversize_message_closes_with_1009(
    fixture: Fixture, bystander: Bystander, frames: list[tuple[int, bytes, bool]]
) -> None:
    client = await fixture.raw("alice")
    with trio.fail_after(5):
        for opcode, payload, fin in frames:
            await client.send(opcode, payload, fin=fin)
        code, reason = await client.close_code()
        await fixture.gone("alice")
    assert code == 1009
    assert len(reason) <= 123


async def test_invalid_utf8_drops_the_connection_as_1007(
    fixture: Fixture, bystander: Bystander
) -> None:
    client = await fixture.raw("alice")
    with trio.fail_after(5):
        connection = await fixture.connection("alice")
        await client.send(TEXT, b'{"type": "ping", "id": "\xff\xfe"}')
        # wsproto refuses the frame; the server's own connection sends the close frame that
        # implies (trio-websocket dropped the TCP stream without one: the client saw 1006).
        code, _ = await client.close_code()
        await fixture.gone("alice")
    assert code == 1007
    assert connection.close_code == 1007


async def test_a_binary_frame_closes_with_1003(fixture: Fixture, bystander: Bystander) -> None:
    client = await fixture.raw("alice")
    with trio.fail_after(5):
        await client.send(BINARY, b'{"type": "ping"}')
        code, _ = await client.close_code()
        await fixture.gone("alice")
    assert code == 1003


async def test_malformed_json_gets_an_error_frame_and_the_socket_stays_usable(
    fixture: Fixture, bystander: Bystander
) -> None:
    client = await fixture.raw("alice")
    with trio.fail_after(5):
        for bad in (b"{not json", b"[1, 2]", b'{"type": "subscribe", "thread_id": 7}'):
            await client.send(TEXT, bad)
            error = await read_json(client)
            assert error["type"] == "error"
        await client.send(TEXT, b'{"type": "ping", "id": 1}')
        assert await read_json(client) == {"type": "pong", "id": 1}


async def test_an_inbound_flood_is_throttled_then_closed_with_4029(
    fixture: Fixture, bystander: Bystander
) -> None:
    client = await fixture.raw("alice")
    flood = [json.dumps({"type": "ping", "id": n}).encode() for n in range(40)]
    with trio.fail_after(5):
        # One write: past the burst (20) and the strikes (5) before the server can answer.
        await client.stream.send_all(b"".join(encode_frame(TEXT, frame) for frame in flood))
        code, _ = await client.close_code()
        await fixture.gone("alice")
    assert code == 4029


async def test_a_client_that_stops_reading_is_closed_alone_and_the_producer_never_waits(
    fixture: Fixture, bystander: Bystander
) -> None:
    client = await fixture.raw("slow", receive_buffer=4096)
    await fixture.subscribe_raw(client)
    connection = await fixture.connection("slow")
    with trio.fail_after(10):
        # 400 events of ~8 KB: far more than the socket buffers and the 64-frame queue hold.
        # The publishing loop finishes although nobody reads (the producer never blocks).
        await fixture.publish("slow", "t1", 400, size=8000)
        await fixture.gone("slow")
    assert connection.close_code == 4008
    stats = fixture.manager.get_stats()
    assert stats.slow_consumer_disconnects == 1
    assert stats.per_user["slow"].events_dropped > 0


async def test_an_idle_black_holed_peer_is_dropped_by_the_keepalive(
    fixture: Fixture, bystander: Bystander
) -> None:
    await fixture.raw("ghost")  # never reads, never answers a ping
    with trio.fail_after(5):  # ping_interval + ping_timeout is 1.8 s
        connection = await fixture.connection("ghost")
        await fixture.gone("ghost")
    assert connection.close_code == 1001


async def test_a_tcp_reset_mid_run_leaves_the_run_going_and_the_reconnect_resumes(
    fixture: Fixture, bystander: Bystander
) -> None:
    client = await fixture.raw("alice")
    ack = await fixture.subscribe_raw(client)
    epoch = ack["epoch"]
    await client.send(
        TEXT, json.dumps({"type": "user_message", "thread_id": "t1", "text": "hello"}).encode()
    )
    with trio.fail_after(10):
        seen = [await read_json(client) for _ in range(2)]
        assert [frame["type"] for frame in seen] == ["agent_started", "agent_thinking"]
        await client.reset()
        await fixture.gone("alice")  # removed at once, not at a keepalive deadline
        session = fixture.manager.session("alice")
        assert session is not None
        assert len(session.active_runs()) == 1  # the run goes on without a client

        again = await fixture.raw("alice")
        await again.send(TEXT, json.dumps({
            "type": "subscribe", "thread_id": "t1", "since_seq": seen[-1]["seq"],
            "epoch": epoch,
        }).encode())
        resumed = await read_json(again)
        assert resumed["recovered"] is True
        frames = [resumed]
        while frames[-1]["type"] != "agent_completed":
            frames.append(await read_json(again))
    seqs = [frame["seq"] for frame in seen + frames[1:]]
    assert seqs == list(range(1, len(seqs) + 1))


async def test_close_reasons_fit_in_a_close_frame(fixture: Fixture) -> None:
    client = await fixture.raw("alice")
    with trio.fail_after(5):
        connection = await fixture.connection("alice")
        session = fixture.manager.session("alice")
        async with trio.open_nursery() as nursery:
            # remove_connection returns once the client has answered the close.
            nursery.start_soon(session.remove_connection, connection.connection_id, 4000, "é" * 300)
            code, reason = await client.close_code()
    assert code == 4000
    assert len(reason) <= 123
    assert reason.decode() == "é" * 61

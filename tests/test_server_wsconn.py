"""The standalone server's write-through sends (``server/_wsconn.py``) and the frame encoder
under them (``_wsframe.py``).

The encoder is tested synchronously against wsproto's own output. The transport is tested over
real loopback sockets (port 0, every wait bounded by ``fail_after``) through the real server,
whose ``serving()`` checks that no connection, task or fd is left: a delivery costs the writer
one scheduler step, a frame the socket takes only part of is finished intact and in order, a
send while another writer holds the lock waits its turn, and the private trio-websocket
attributes the fast path reads exist in the pinned version.
"""

from __future__ import annotations

import importlib.metadata
import json
import socket
from collections.abc import AsyncIterator

import attrs
import pytest
import trio
import trio.testing
from trio_websocket import WebSocketConnection
from wsproto.connection import Connection as WsprotoConnection
from wsproto.connection import ConnectionState, ConnectionType
from wsproto.events import BytesMessage, TextMessage

from agentcast import AgentEvent, Config, EventType, UserContext
from agentcast._connection import Connection
from agentcast._wsframe import data_frame
from agentcast.server import issue_token
from agentcast.server._serve import RunningServer
from agentcast.server._settings import ServerSettings
from agentcast.server._wsconn import PRIVATE_ATTRIBUTES, WriteThrough

from .rawws import TEXT, RawClient
from .serverkit import serving

SECRET = "a-test-secret-that-is-long-enough-for-hs256"
SETTINGS = ServerSettings(
    port=0, secret=SECRET, handshake_timeout=2.0, ping_interval=30.0, ping_timeout=5.0,
    core=Config(send_queue_size=64, write_timeout=2.0, close_timeout=1.0, shutdown_timeout=2.0),
)

# ---- the encoder (pure) ---------------------------------------------------------------------


@pytest.mark.parametrize("length", [0, 1, 125, 126, 127, 65535, 65536, 70000])
@pytest.mark.parametrize("kind", ["text", "bytes"])
def test_data_frame_is_what_wsproto_sends_for_a_server(length: int, kind: str) -> None:
    server = WsprotoConnection(ConnectionType.SERVER)
    if kind == "text":
        message: str | bytes = "é" * (length // 2) + "x" * (length % 2)
        expected = server.send(TextMessage(data=message))
    else:
        message = bytes(range(256)) * (length // 256) + b"y" * (length % 256)
        expected = server.send(BytesMessage(data=message))
    assert data_frame(message) == expected


def test_data_frame_refuses_what_is_not_a_message() -> None:
    with pytest.raises(TypeError, match="str or bytes, not int"):
        data_frame(17)  # type: ignore[arg-type]


# ---- the transport, through the real server ---------------------------------------------------


def test_the_pinned_trio_websocket_is_the_one_checked() -> None:
    assert importlib.metadata.version("trio-websocket").startswith("0.12.")


@attrs.define
class Fixture:
    running: RunningServer
    clients: list[RawClient] = attrs.Factory(list)

    async def client(self, user: str, *, receive_buffer: int | None = None) -> RawClient:
        token = issue_token(SECRET, user)
        client = await RawClient.open(self.running.port, token, receive_buffer=receive_buffer)
        self.clients.append(client)
        await client.send(TEXT, json.dumps({"type": "subscribe", "thread_id": "t1"}).encode())
        assert (await read_json(client))["type"] == "subscribed"
        return client

    def session(self, user: str):  # type: ignore[no-untyped-def]
        return self.running.server.manager.get_websocket_manager(
            UserContext.from_request(user_id=user)
        )

    def connection(self, user: str) -> Connection:
        (connection,) = self.session(user).connections()
        return connection  # type: ignore[no-any-return]

    async def publish(self, user: str, count: int, size: int = 100) -> None:
        session = self.session(user)
        for n in range(count):
            await session.send_to_thread(
                "t1", AgentEvent(EventType.AGENT_TEXT, {"text": f"{n:06d}" + "x" * size})
            )


async def read_json(client: RawClient) -> dict[str, object]:
    opcode, payload = await client.read_frame()
    assert opcode == TEXT
    frame = json.loads(payload)
    assert isinstance(frame, dict)
    return frame


async def read_events(client: RawClient, count: int) -> list[int]:
    seqs = []
    while len(seqs) < count:
        frame = await read_json(client)
        assert frame["type"] == "agent_text"
        seqs.append(frame["seq"])
    return seqs


@pytest.fixture
async def fixture() -> AsyncIterator[Fixture]:
    async with serving(SETTINGS) as served:
        fixture = Fixture(served.running)
        try:
            yield fixture
        finally:
            for client in fixture.clients:
                await client.aclose()


def write_through(connection: Connection) -> WriteThrough:
    transport = connection.transport
    assert isinstance(transport, WriteThrough)
    return transport


async def test_the_connection_has_the_private_attributes_the_fast_path_reads(
    fixture: Fixture,
) -> None:
    with trio.fail_after(5):
        await fixture.client("alice")
    ws = write_through(fixture.connection("alice")).ws
    assert isinstance(ws, WebSocketConnection)
    for name in PRIVATE_ATTRIBUTES:
        assert hasattr(ws, name), name
    assert ws._close_reason is None
    assert isinstance(ws._stream_lock, trio.StrictFIFOLock)
    assert ws._wsproto.state is ConnectionState.OPEN
    assert isinstance(ws._stream, trio.abc.Stream)
    assert callable(ws._abort_web_socket)


@attrs.define(eq=False)
class StepCounter(trio.abc.Instrument):
    """Counts the scheduler steps of the task named ``name``."""

    name: str
    steps: int = 0

    def before_task_step(self, task: trio.lowlevel.Task) -> None:
        if task.name == self.name:
            self.steps += 1


async def test_each_delivery_costs_the_writer_one_scheduler_step(fixture: Fixture) -> None:
    count = 50
    with trio.fail_after(10):
        client = await fixture.client("alice")
        connection = fixture.connection("alice")
        transport = write_through(connection)
        # The writer's own path (queued events); the producer's is test_server_writethrough's.
        connection._through = None
        before = transport.written_through
        counter = StepCounter(f"{connection.connection_id}:writer")
        trio.lowlevel.add_instrument(counter)
        try:
            seqs = []
            for _ in range(count):  # one event at a time: nothing to batch
                await fixture.publish("alice", 1)
                seqs += await read_events(client, 1)
        finally:
            trio.lowlevel.remove_instrument(counter)
    assert seqs == list(range(1, count + 1))
    # trio-websocket's own send_message takes three: wake, the lock's yield, the socket's.
    assert counter.steps == count
    assert transport.written_through - before == count


async def test_a_frame_the_socket_takes_in_part_is_finished_intact_and_in_order(
    fixture: Fixture,
) -> None:
    count, size = 20, 50_000
    with trio.fail_after(10):
        client = await fixture.client("alice", receive_buffer=4096)
        transport = write_through(fixture.connection("alice"))
        # A small send buffer: a 50 KB frame cannot be taken in one write.
        transport._socket.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
        await fixture.publish("alice", count, size=size)
        seqs, texts = [], []
        while len(seqs) < count:
            frame = await read_json(client)
            seqs.append(frame["seq"])
            texts.append(frame["data"]["text"])  # type: ignore[index]
    assert seqs == list(range(1, count + 1))
    assert texts == [f"{n:06d}" + "x" * size for n in range(count)]
    assert transport.partial_writes >= 1


async def test_a_send_while_a_ping_holds_the_lock_waits_its_turn(fixture: Fixture) -> None:
    with trio.fail_after(10):
        client = await fixture.client("alice")
        transport = write_through(fixture.connection("alice"))
        before = transport.written_through
        lock = transport.ws._stream_lock
        sent = trio.Event()

        async def send() -> None:
            await transport.send_message('{"type":"heartbeat"}')
            sent.set()

        async with trio.open_nursery() as nursery:
            await lock.acquire()
            nursery.start_soon(send)
            await trio.testing.wait_all_tasks_blocked()
            assert not sent.is_set()  # it queued behind the holder, wrote nothing
            lock.release()
        assert await read_json(client) == {"type": "heartbeat"}
    assert transport.written_through == before


async def test_a_stream_without_a_plain_socket_keeps_the_library_send(fixture: Fixture) -> None:
    with trio.fail_after(5):
        await fixture.client("alice")
    ws = write_through(fixture.connection("alice")).ws
    left, right = trio.testing.memory_stream_pair()
    try:
        assert WriteThrough.wrap(ws, left) is ws
    finally:
        await left.aclose()
        await right.aclose()


async def test_a_trio_websocket_without_the_attributes_keeps_the_library_send(
    caplog: pytest.LogCaptureFixture,
) -> None:
    class Bare:
        subprotocol = None

    sock = trio.socket.socket()
    try:
        stream = trio.SocketStream(sock)
        bare = Bare()
        assert WriteThrough.wrap(bare, stream) is bare  # type: ignore[arg-type]
    finally:
        sock.close()
    assert "lacks _close_reason" in caplog.text

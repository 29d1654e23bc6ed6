"""The standalone server's own WebSocket connection (``server/_wsconn.py``), the pure decisions
under it (``server/_wsstate.py``) and the frame encoder (``_wsframe.py``).

The encoder, the 101 answer and the frame state are tested synchronously against wsproto's own
output. The connection is tested over real loopback sockets (port 0, every wait bounded by
``fail_after``) through the real server, whose ``serving()`` checks that no connection, task or
fd is left: the handler task ends at the upgrade and a connection holds two tasks, a delivery
costs the writer one scheduler step, a frame the socket takes only part of is finished intact
and in order with a ping queued behind it, frames sent with the head are handled, and the
client's close is answered.
"""

from __future__ import annotations

import base64
import json
import os
import socket
import struct
from collections.abc import AsyncIterator

import attrs
import pytest
import trio
import trio.testing
from wsproto import WSConnection
from wsproto.connection import Connection as WsprotoConnection
from wsproto.connection import ConnectionState, ConnectionType
from wsproto.events import (
    AcceptConnection,
    BytesMessage,
    CloseConnection,
    Ping,
    Pong,
    Request,
    TextMessage,
)

from agentcast import AgentEvent, Config, EventType, UserContext
from agentcast._connection import Connection
from agentcast._wsframe import data_frame
from agentcast.server import issue_token
from agentcast.server._serve import RunningServer
from agentcast.server._settings import ServerSettings
from agentcast.server._wsconn import ServerWebSocket, take_over
from agentcast.server._wsstate import Closed, ServerProtocol, accept_response

from .rawws import CLOSE, PING, PONG, TEXT, RawClient, encode_frame
from .serverkit import serving
from .test_server_http import handler_tasks

SECRET = "a-test-secret-that-is-long-enough-for-hs256"
SETTINGS = ServerSettings(
    port=0, secret=SECRET, handshake_timeout=2.0, ping_interval=30.0, ping_timeout=5.0,
    core=Config(send_queue_size=64, write_timeout=2.0, close_timeout=1.0, shutdown_timeout=2.0),
)
KEY = "dGhlIHNhbXBsZSBub25jZQ=="

# ---- the encoder (pure) ---------------------------------------------------------------------


@pytest.mark.parametrize("length", [0, 1, 125, 126, 127, 65535, 65536, 70000])
@pytest.mark.parametrize("kind", ["text", "bytes"])
def test_data_frame_is_what_wsproto_sends_for_a_server(length: int, kind: str) -> None:
    server = WsprotoConnection(ConnectionType.SERVER)
    message: str | bytes
    if kind == "text":
        message = text = "é" * (length // 2) + "x" * (length % 2)
        expected = server.send(TextMessage(data=text))
    else:
        message = data = bytes(range(256)) * (length // 256) + b"y" * (length % 256)
        expected = server.send(BytesMessage(data=data))
    assert data_frame(message) == expected


def test_data_frame_refuses_what_is_not_a_message() -> None:
    with pytest.raises(TypeError, match="str or bytes, not int"):
        data_frame(17)  # type: ignore[arg-type]


# ---- the handshake answer (pure) ------------------------------------------------------------


def response_headers(raw: bytes) -> tuple[str, dict[str, str]]:
    """The status line and the headers (names lowercased) of a complete response head."""
    assert raw.endswith(b"\r\n\r\n")
    status, *lines = raw[:-4].decode("ascii").split("\r\n")
    headers = dict(line.split(": ", 1) for line in lines)
    return status, {name.lower(): value for name, value in headers.items()}


@pytest.mark.parametrize("subprotocol", [None, "agentcast.ndjson"])
def test_the_101_is_what_wsprotos_handshake_answers(subprotocol: str | None) -> None:
    offered = "agentcast.ndjson, bearer.tok" if subprotocol else None
    lines = [f"Host: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: {KEY}",
             "Sec-WebSocket-Version: 13"]
    if offered:
        lines.append(f"Sec-WebSocket-Protocol: {offered}")
    wsproto = WSConnection(ConnectionType.SERVER)
    wsproto.receive_data(("GET /ws HTTP/1.1\r\n" + "\r\n".join(lines) + "\r\n\r\n").encode())
    assert isinstance(next(wsproto.events()), Request)
    expected = wsproto.send(AcceptConnection(subprotocol=subprotocol))
    status, headers = response_headers(accept_response(KEY, subprotocol))
    assert (status, headers) == response_headers(expected)
    assert status == "HTTP/1.1 101 Switching Protocols"
    assert headers.get("sec-websocket-protocol") == subprotocol
    # RFC 6455 section 1.3's example key and answer.
    assert b"Sec-WebSocket-Accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo=" in accept_response(KEY, None)


# ---- the frame state (pure) -----------------------------------------------------------------


def client_frames(*events: TextMessage | BytesMessage | Ping | Pong | CloseConnection) -> bytes:
    client = WsprotoConnection(ConnectionType.CLIENT)
    return b"".join(client.send(event) for event in events)


def test_messages_whole_and_in_fragments_are_delivered_in_order() -> None:
    protocol = ServerProtocol(max_message_bytes=100)
    data = client_frames(
        TextMessage("one"), TextMessage("tw", message_finished=False), TextMessage("o"),
        BytesMessage(b"three"),
    )
    received = protocol.receive(data)
    assert received.messages == ("one", "two", b"three")
    assert (received.reply, received.pongs, received.closed) == (b"", (), None)


def test_a_message_split_across_reads_is_joined() -> None:
    protocol = ServerProtocol(max_message_bytes=100)
    data = client_frames(TextMessage("hello world"))
    assert protocol.receive(data[:9]).messages == ()
    assert protocol.receive(data[9:]).messages == ("hello world",)


@pytest.mark.parametrize("fragments", [1, 3])
def test_a_message_over_the_limit_closes_with_1009(fragments: int) -> None:
    protocol = ServerProtocol(max_message_bytes=10)
    parts = [TextMessage("xxxx", message_finished=False) for _ in range(fragments - 1)]
    data = client_frames(*parts, TextMessage("x" * (11 - 4 * (fragments - 1))))
    received = protocol.receive(data)
    assert received.messages == ()
    assert received.closed == Closed(1009, "message longer than 10")
    assert struct.unpack("!BBH", received.reply[:4]) == (0x88, len(received.reply) - 2, 1009)
    assert protocol.state is ConnectionState.LOCAL_CLOSING
    assert protocol.receive(client_frames(TextMessage("late"))).messages == ()


def test_a_ping_is_answered_and_a_pong_reported() -> None:
    protocol = ServerProtocol(max_message_bytes=100)
    received = protocol.receive(client_frames(Ping(b"abc"), Pong(b"\x00\x00\x00\x01")))
    assert received.reply == b"\x8a\x03abc"
    assert received.pongs == (b"\x00\x00\x00\x01",)


def test_the_clients_close_is_answered_with_its_code() -> None:
    protocol = ServerProtocol(max_message_bytes=100)
    received = protocol.receive(client_frames(TextMessage("last"), CloseConnection(4000, "bye")))
    assert received.messages == ("last",)
    assert received.closed == Closed(4000, "bye")
    assert received.reply == b"\x88\x05\x0f\xa0bye"
    assert protocol.state is ConnectionState.CLOSED
    assert protocol.receive(b"more") == received.__class__()  # nothing after the end


@pytest.mark.parametrize(
    ("data", "code"),
    [
        pytest.param(encode_frame(TEXT, b"\xff\xfe"), 1007, id="invalid-utf8"),
        pytest.param(bytes((0x81, 0x01)) + b"x", 1002, id="unmasked"),
    ],
)
def test_what_wsproto_refuses_gets_the_close_frame_it_implies(data: bytes, code: int) -> None:
    protocol = ServerProtocol(max_message_bytes=100)
    received = protocol.receive(data)
    assert received.closed is not None
    assert received.closed.code == code
    assert struct.unpack("!H", received.reply[2:4]) == (code,)
    assert protocol.ping(b"x") is None  # closing: no more pings


def test_our_close_drops_what_comes_before_the_reply() -> None:
    protocol = ServerProtocol(max_message_bytes=100)
    assert protocol.close(4008, "slow")[:4] == b"\x88\x06\x0f\xa8"
    assert protocol.close(1000, None) == b""  # one close frame only
    received = protocol.receive(client_frames(TextMessage("ignored"), Ping(b"p")))
    assert (received.messages, received.reply) == ((), b"")
    ended = protocol.receive(client_frames(CloseConnection(4008)))
    assert ended.closed == Closed(4008, "slow")
    assert protocol.lost() == Closed(4008, "slow")


def test_a_lost_connection_is_1006() -> None:
    protocol = ServerProtocol(max_message_bytes=100)
    assert protocol.ping(b"\x00\x00\x00\x01") == b"\x89\x04\x00\x00\x00\x01"
    assert protocol.lost() == Closed(1006, "connection lost")


async def test_only_a_tcp_stream_can_be_taken_over() -> None:
    left, right = trio.testing.memory_stream_pair()
    with pytest.raises(TypeError, match=r"needs a trio\.SocketStream, got StapledStream"):
        take_over(left)
    await left.aclose()
    await right.aclose()


# ---- the connection, through the real server --------------------------------------------------


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
    seqs: list[int] = []
    while len(seqs) < count:
        frame = await read_json(client)
        assert frame["type"] == "agent_text"
        assert isinstance(frame["seq"], int)
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


def server_websocket(connection: Connection) -> ServerWebSocket:
    transport = connection.transport
    assert isinstance(transport, ServerWebSocket)
    return transport


async def test_an_open_connection_holds_two_tasks_and_no_handler_task(
    fixture: Fixture,
) -> None:
    with trio.fail_after(5):
        for _ in range(3):
            await fixture.client("alice")
        await trio.testing.wait_all_tasks_blocked()
    stats = fixture.session("alice").get_stats()
    assert stats.connections == 3
    # Each connection: its reader (which also reads the socket) and its writer.
    assert stats.live_tasks == 2 * 3
    assert handler_tasks() == 0  # the handler ended with the upgrade


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
        transport = server_websocket(connection)
        # The writer's own path (queued events); the producer's is test_server_writethrough's.
        connection._through = None
        before = transport.written_through
        counter = StepCounter(f"{connection.connection_id}:writer")
        trio.lowlevel.add_instrument(counter)
        try:
            seqs: list[int] = []
            for _ in range(count):  # one event at a time: nothing to batch
                await fixture.publish("alice", 1)
                seqs += await read_events(client, 1)
        finally:
            trio.lowlevel.remove_instrument(counter)
    assert seqs == list(range(1, count + 1))
    # trio-websocket's own send_message takes three: wake, the lock's yield, the socket's.
    assert counter.steps == count
    assert transport.written_through - before == count


async def test_a_frame_the_socket_takes_in_part_is_finished_intact_with_a_ping_after_it(
    fixture: Fixture,
) -> None:
    count, size = 20, 50_000
    with trio.fail_after(10):
        client = await fixture.client("alice", receive_buffer=4096)
        transport = server_websocket(fixture.connection("alice"))
        # A small send buffer: a 50 KB frame cannot be taken in one write.
        transport._sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
        await fixture.publish("alice", count, size=size)
        await trio.testing.wait_all_tasks_blocked()
        assert transport.waited_writes >= 1
        # A ping now waits behind the frame being written (a flush is running: no task).
        assert transport.send_ping(b"\x00\x00\x00\x07") is False
        seqs: list[int] = []
        texts: list[str] = []
        ping: tuple[int, bytes] | None = None
        while len(seqs) < count:
            first, second = await client._read_exactly(2)
            length = second & 0x7F
            if length == 126:
                (length,) = struct.unpack("!H", await client._read_exactly(2))
            payload = await client._read_exactly(length)
            if first & 0x0F == PING:
                ping = (len(seqs), payload)
                continue
            frame = json.loads(payload)
            seqs.append(frame["seq"])
            texts.append(frame["data"]["text"])
    assert seqs == list(range(1, count + 1))
    assert texts == [f"{n:06d}" + "x" * size for n in range(count)]
    assert ping is not None
    assert ping[1] == b"\x00\x00\x00\x07"
    assert ping[0] >= 1  # after the frame it was queued behind


async def test_frames_sent_with_the_head_are_handled(fixture: Fixture) -> None:
    key = base64.b64encode(os.urandom(16)).decode()
    token = issue_token(SECRET, "eager")
    head = (
        f"GET /ws?token={token} HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\n"
        f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n"
    ).encode()
    subscribe = encode_frame(TEXT, b'{"type": "subscribe", "thread_id": "t1"}')
    ping = encode_frame(PING, b"early")
    with trio.fail_after(5):
        stream = await trio.open_tcp_stream("127.0.0.1", fixture.running.port)
        client = RawClient(stream)
        fixture.clients.append(client)
        await stream.send_all(head + subscribe + ping)  # one segment
        assert (await client._read_until(b"\r\n\r\n")).startswith(b"HTTP/1.1 101")
        # The reader answers the ping as it reads it; the ack comes from the writer after.
        assert await client.read_frame() == (PONG, b"early")
        assert (await read_json(client))["type"] == "subscribed"


async def test_the_clients_close_is_answered_and_the_server_drops_tcp(fixture: Fixture) -> None:
    with trio.fail_after(5):
        client = await fixture.client("alice")
        connection = fixture.connection("alice")
        await client.send(CLOSE, struct.pack("!H", 4321) + b"done")
        opcode, payload = await client.read_frame()
        await connection.wait_closed()
        with pytest.raises(EOFError):
            await client.read_frame()
    assert (opcode, payload) == (CLOSE, struct.pack("!H", 4321) + b"done")
    assert connection.close_code == 4321
    assert server_websocket(connection).closed


async def test_a_ping_is_answered_with_its_payload(fixture: Fixture) -> None:
    with trio.fail_after(5):
        client = await fixture.client("alice")
        await client.send(PING, b"are you there")
        first, second = await client._read_exactly(2)
        payload = await client._read_exactly(second & 0x7F)
    assert (first & 0x0F, payload) == (PONG, b"are you there")

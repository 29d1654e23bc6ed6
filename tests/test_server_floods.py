"""Floods below the message level and frame-level protocol errors, over real sockets
(``../shared/FAULTS.md`` rows 9 and 29, issue 9): fragments, pings and bytes are limited per
connection, broken frames close with 1002. Each test checks the attacker's outcome, a bystander
user's complete and ordered stream, and (in the fixture) that no connection is counted, no
connection task is left and no file descriptor leaked afterwards."""

from __future__ import annotations

import base64
import json
import logging
import os
import struct
from collections.abc import AsyncIterator

import pytest
import trio

from agentcast import Config, Connection
from agentcast.server._inbound import InboundGuard, InboundStatistics
from agentcast.server._settings import ServerSettings

from .rawws import CLOSE, CONTINUATION, PING, PONG, TEXT, RawClient, encode_frame
from .test_frames import raw_frame
from .test_server_faults import SECRET, Bystander, Fixture, open_fixture, read_json, watching

#: Bytes per second and burst of the byte bucket: small, so a flood shows it within seconds.
BYTE_RATE = 64 * 1024
BYTE_BURST = 512 * 1024
CONTROL_BURST = 20
FRAME_RATE = 200.0
FRAME_BURST = 1000
#: The defaults where the issue names them (64 KiB messages, 64 fragments), a byte bucket small
#: enough to see, and a keepalive that never fires during a test (the flooders do not read).
SETTINGS = ServerSettings(
    port=0, secret=SECRET, handshake_timeout=2.0, ping_interval=60.0, ping_timeout=30.0,
    core=Config(
        send_queue_size=64, write_timeout=1.0, close_timeout=1.0, shutdown_timeout=2.0,
        inbound_rate=50.0, inbound_burst=20, rate_limit_strikes=5,
        max_fragments_per_message=64, inbound_bytes_per_second=BYTE_RATE,
        inbound_bytes_burst=BYTE_BURST, control_frames_per_second=5.0,
        control_frames_burst=CONTROL_BURST, inbound_frames_per_second=FRAME_RATE,
        inbound_frames_burst=FRAME_BURST,
    ),
)


@pytest.fixture
async def fixture(caplog: pytest.LogCaptureFixture) -> AsyncIterator[Fixture]:
    async with open_fixture(SETTINGS, reset=True) as fixture:
        yield fixture
    # No handler failed on the way (e.g. trio-websocket answering a ping after the close).
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]


@pytest.fixture
async def bystander(fixture: Fixture) -> AsyncIterator[Bystander]:
    async with watching(fixture) as watcher:
        yield watcher


def inbound(connection: Connection) -> InboundStatistics:
    """What the server's guard under this connection has read (test-only private access)."""
    # The server's transport is its own WebSocket (server/_wsconn.py), reading through a guard.
    guard = connection.transport.guard  # type: ignore[attr-defined]
    assert isinstance(guard, InboundGuard)
    return guard.statistics()


async def close_and_pongs(client: RawClient) -> tuple[int, bytes, int]:
    """Read until the server's close frame, not answering it (the server reads no more):
    (close code, reason, pongs received before it)."""
    pongs = 0
    while True:
        opcode, payload = await client.read_frame()
        if opcode == PONG:
            pongs += 1
        elif opcode == CLOSE:
            return struct.unpack("!H", payload[:2])[0], payload[2:], pongs


async def close_frame(client: RawClient) -> tuple[int, bytes]:
    code, reason, _ = await close_and_pongs(client)
    return code, reason


async def test_a_message_in_one_byte_fragments_is_closed_past_the_fragment_cap(
    fixture: Fixture, bystander: Bystander
) -> None:
    client = await fixture.raw("alice")
    connection = await fixture.connection("alice")
    size = 64 * 1024  # one allowed 64 KiB message, as 65 536 fragments of one byte
    frames = [encode_frame(TEXT, b"{", fin=False)]
    frames += [encode_frame(CONTINUATION, b" ", fin=False) for _ in range(size - 2)]
    frames.append(encode_frame(CONTINUATION, b"}"))
    flood = b"".join(frames)
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(client.stream.send_all, flood)
            code, reason = await close_frame(client)
            nursery.cancel_scope.cancel()  # the server stopped reading: the rest never goes
        await fixture.gone("alice")  # at close_timeout: the server reads no close reply
    assert code == 1008
    assert b"more than 64 fragments" in reason
    stats = inbound(connection)
    # wsproto got the first 64 fragments (7 bytes each), no more; the scanner stopped reading
    # within one read (4 KiB) after the 65th.
    assert stats.passed == 64 * 7
    assert stats.received <= 65 * 7 + 4096
    assert stats.frames.messages == 0
    assert connection.close_code == 1008


async def test_a_ping_flood_is_closed_with_4029_after_the_control_frame_burst(
    fixture: Fixture, bystander: Bystander
) -> None:
    client = await fixture.raw("alice")
    connection = await fixture.connection("alice")
    with trio.fail_after(10):
        await client.stream.send_all(encode_frame(PING, b"p") * 1000)
        code, _, pongs = await close_and_pongs(client)
        await fixture.gone("alice")
    assert code == 4029
    assert pongs <= CONTROL_BURST  # trio-websocket answered the burst, nothing after it
    assert connection.close_code == 4029
    assert inbound(connection).violation is not None


async def test_a_byte_flood_is_read_no_faster_than_the_byte_rate_and_stays_open(
    fixture: Fixture, bystander: Bystander
) -> None:
    started = trio.current_time()
    client = await fixture.raw("alice")
    connection = await fixture.connection("alice")
    # 60 KB messages the server answers with a small pong: within the message rate (the
    # burst of 512 KiB holds 8 of them, the message burst 20), far over the byte rate.
    message = json.dumps({"type": "ping", "pad": "x" * 60000}).encode()
    frame = encode_frame(TEXT, message)
    flood = frame * 60  # 3.6 MB
    with trio.fail_after(20):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(client.stream.send_all, flood)
            # Each message the server consumed is answered with a pong: read past the burst's
            # worth and two more, which the byte rate lets in only about a second apart.
            for _ in range(BYTE_BURST // len(frame) + 2):
                assert await read_json(client) == {"type": "pong"}
            stats = inbound(connection)
            elapsed = trio.current_time() - started
            # The bystander is served while the flooder waits on its bucket.
            await bystander.check_complete()
            nursery.cancel_scope.cancel()
    # Consumed no more than the burst plus the rate over the time since it connected (plus
    # one read in flight): the rest of what it sent waits in TCP buffers.
    assert stats.received <= BYTE_BURST + BYTE_RATE * elapsed + 4096
    assert stats.received < len(flood)
    assert stats.throttled > 0
    assert stats.violation is None
    assert connection.close_code is None  # throttled, not closed
    assert stats.frames.messages >= BYTE_BURST // len(frame) + 2


async def test_tiny_frames_within_every_other_limit_are_read_no_faster_than_the_frame_rate(
    fixture: Fixture, bystander: Bystander
) -> None:
    started = trio.current_time()
    client = await fixture.raw("alice")
    connection = await fixture.connection("alice")
    # Messages of 64 one-byte fragments (the cap): allowed, but each frame costs wsproto.
    text = b'{"type": "ping", "pad": "' + b"x" * (64 - 27) + b'"}'
    message = b"".join(
        encode_frame(TEXT if i == 0 else CONTINUATION, text[i:i + 1], fin=i == len(text) - 1)
        for i in range(len(text))
    )
    flood = message * 40  # 2 560 frames; the burst lets 1 000 in, 15 whole messages
    with trio.fail_after(20):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(client.stream.send_all, flood)
            # Four messages past the burst's worth take 256 frames at 200 per second.
            for _ in range(FRAME_BURST // 64 + 4):
                assert await read_json(client) == {"type": "pong"}
            stats = inbound(connection)
            elapsed = trio.current_time() - started
            await bystander.check_complete()
            nursery.cancel_scope.cancel()
    # No more frames than the burst plus the rate over the time since it connected, plus what
    # one read (4 KiB, 7-byte frames) holds.
    assert stats.frames.frames <= FRAME_BURST + FRAME_RATE * elapsed + 4096 // 7 + 1
    assert stats.frames.frames < 40 * 64
    assert stats.throttled > 0
    assert stats.violation is None
    assert connection.close_code is None


@pytest.mark.parametrize(
    "bad",
    [
        pytest.param(raw_frame(TEXT, b'{"type": "ping"}', masked=False), id="unmasked"),
        pytest.param(raw_frame(TEXT, b'{"type": "ping"}', rsv=0x40), id="reserved-bit"),
        pytest.param(raw_frame(0x3, b"hi"), id="unknown-opcode"),
        pytest.param(raw_frame(PING, b"hi", fin=False), id="fragmented-ping"),
        pytest.param(raw_frame(PING, b"x" * 126), id="oversized-ping"),
        pytest.param(raw_frame(CONTINUATION, b"hi"), id="continuation-without-start"),
        pytest.param(
            encode_frame(TEXT, b'{"type"', fin=False) + encode_frame(TEXT, b'{"type": "ping"}'),
            id="data-frame-inside-fragmented-message",
        ),
    ],
)
async def test_a_frame_level_protocol_violation_closes_with_1002(
    fixture: Fixture, bystander: Bystander, bad: bytes
) -> None:
    client = await fixture.raw("alice")
    connection = await fixture.connection("alice")
    with trio.fail_after(5):
        # A valid frame first, in the same write: it reaches the library, the broken one
        # does not (its pong may or may not beat the close, which drops queued frames).
        await client.stream.send_all(encode_frame(TEXT, b'{"type": "ping", "id": 1}') + bad)
        code, _ = await close_frame(client)
        await fixture.gone("alice")
    assert code == 1002
    assert connection.close_code == 1002
    stats = inbound(connection)
    assert stats.frames.messages == 1
    assert stats.violation is not None


async def test_frames_sent_with_the_handshake_are_scanned_too(
    fixture: Fixture, bystander: Bystander
) -> None:
    """Frames in the same segment as the request head reach the server with the head: the
    guard scans them before they are replayed into the WebSocket library."""
    sock = trio.socket.socket(trio.socket.AF_INET, trio.socket.SOCK_STREAM)
    await sock.connect(("127.0.0.1", fixture.port))
    client = RawClient(trio.SocketStream(sock))
    fixture.clients.append(client)
    key = base64.b64encode(os.urandom(16)).decode()
    head = (
        f"GET /ws?token={fixture.token('alice')} HTTP/1.1\r\nHost: 127.0.0.1\r\n"
        f"Upgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: {key}\r\n"
        "Sec-WebSocket-Version: 13\r\n\r\n"
    ).encode()
    with trio.fail_after(5):
        await client.stream.send_all(head + raw_frame(TEXT, b'{"type": "ping"}', masked=False))
        assert (await client._read_until(b"\r\n\r\n")).startswith(b"HTTP/1.1 101")
        code, _ = await close_frame(client)
        await fixture.gone("alice")
    assert code == 1002

"""The HTTP front reads one bounded request head; upgrades are replayed byte for byte."""

from __future__ import annotations

import pytest
import trio
import trio.testing

from agentcast.server._front import HeadError, read_request_head, send_response

UPGRADE = (
    b"GET /ws?token=abc HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\n"
    b"Connection: keep-alive, Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
    b"Sec-WebSocket-Version: 13\r\nOrigin: http://x\r\n\r\n"
)


async def feed(data: bytes, *, close: bool = True) -> tuple[trio.abc.Stream, trio.abc.Stream]:
    server, client = trio.testing.memory_stream_pair()
    await client.send_all(data)
    if close:
        await client.aclose()
    return server, client


async def test_an_upgrade_request_is_parsed_and_kept_raw() -> None:
    server, _ = await feed(UPGRADE, close=False)
    head = await read_request_head(server, max_bytes=8192)
    assert (head.method, head.path) == ("GET", "/ws")
    assert head.query == {"token": ["abc"]}
    assert head.is_websocket_upgrade
    assert head.header("origin") == "http://x"
    assert head.raw == UPGRADE


async def test_a_plain_get_is_not_an_upgrade() -> None:
    server, _ = await feed(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
    head = await read_request_head(server, max_bytes=8192)
    assert head.path == "/health"
    assert not head.is_websocket_upgrade


@pytest.mark.parametrize(
    ("data", "status"),
    [
        (b"\x16\x03\x01garbage that is not http\r\n\r\n", 400),
        (b"GET / HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 20000 + b"\r\n\r\n", 431),
        (b"GET / HTTP/1.1\r\nHo", 0),
        (b"", 0),
    ],
)
async def test_bad_heads_get_a_status_or_a_close(data: bytes, status: int) -> None:
    server, _ = await feed(data)
    with pytest.raises(HeadError) as failed:
        await read_request_head(server, max_bytes=8192)
    assert failed.value.status == status


async def test_a_silent_client_waits_until_the_callers_deadline(
    autojump_clock: trio.testing.MockClock,
) -> None:
    server, _client = trio.testing.memory_stream_pair()
    with trio.move_on_after(10) as deadline:
        await read_request_head(server, max_bytes=8192)
    assert deadline.cancelled_caught


async def test_send_response_writes_a_complete_closing_response() -> None:
    server, client = trio.testing.memory_stream_pair()
    await send_response(server, 403, b'{"error":"origin"}', extra_headers=[("X-A", "1")])
    data = await client.receive_some(4096)
    assert data.startswith(b"HTTP/1.1 403 Forbidden\r\n")
    assert b"Content-Length: 18\r\n" in data
    assert b"Connection: close\r\n" in data
    assert data.endswith(b'\r\n\r\n{"error":"origin"}')

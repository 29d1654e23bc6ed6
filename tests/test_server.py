"""The server over real loopback sockets: port 0, every wait bounded, nothing left running.

Each test starts ``serve`` in-process and stops it through its ``stop`` event, the same path
SIGTERM takes.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator

import pytest
import trio
import trio.testing
from trio_websocket import ConnectionClosed, WebSocketConnection, open_websocket_url

from agentcast import BATCH_SUBPROTOCOL, Config
from agentcast.server import issue_token
from agentcast.server._serve import RunningServer, serve
from agentcast.server._settings import ServerSettings

SECRET = "a-test-secret-that-is-long-enough-for-hs256"
KEY = b"dGhlIHNhbXBsZSBub25jZQ=="


class Running:
    def __init__(self, running: RunningServer, stop: trio.Event) -> None:
        self.server = running.server
        self.port = running.port
        self.stop = stop
        self.admin_token = running.admin_token

    def url(self, path: str = "/ws") -> str:
        return f"ws://127.0.0.1:{self.port}{path}"

    def token(self, user: str = "alice", **kwargs: object) -> str:
        return issue_token(SECRET, user, **kwargs)  # type: ignore[arg-type]

    async def raw(self, request: bytes) -> bytes:
        """Send raw bytes; return everything until the server closes."""
        stream = await trio.open_tcp_stream("127.0.0.1", self.port)
        async with stream:
            await stream.send_all(request)
            response = b""
            while chunk := await stream.receive_some(65536):
                response += chunk
        return response

    async def get(self, path: str, *, admin: bool = False) -> tuple[int, dict[str, object]]:
        """GET ``path``; ``admin`` sends the admin token that /stats, /config, /metrics need."""
        auth = f"Authorization: Bearer {self.admin_token}\r\n" if admin else ""
        response = await self.raw(f"GET {path} HTTP/1.1\r\nHost: x\r\n{auth}\r\n".encode())
        head, _, body = response.partition(b"\r\n\r\n")
        return int(head.split()[1]), json.loads(body)

    async def handshake(self, path: str, *headers: str, version: str = "13") -> int:
        lines = [f"GET {path} HTTP/1.1", "Host: x", "Upgrade: websocket", "Connection: Upgrade",
                 f"Sec-WebSocket-Key: {KEY.decode()}", f"Sec-WebSocket-Version: {version}",
                 *headers]
        stream = await trio.open_tcp_stream("127.0.0.1", self.port)
        async with stream:
            await stream.send_all(("\r\n".join(lines) + "\r\n\r\n").encode())
            response = b""
            while b"\r\n\r\n" not in response:  # an accepted upgrade stays open
                chunk = await stream.receive_some(65536)
                if not chunk:
                    break
                response += chunk
        return int(response.split()[1])


async def drain_until_closed(ws: WebSocketConnection) -> None:
    while True:
        await ws.get_message()


@pytest.fixture
async def server() -> AsyncIterator[Running]:
    settings = ServerSettings(
        port=0, secret=SECRET, max_connections_per_user=2, handshake_timeout=2.0,
        allowed_origins=("https://app.example.com",), demo=True, demo_speed=50.0,
        core=Config(max_message_bytes=4096, shutdown_timeout=2.0),
    )
    stop = trio.Event()
    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            running = await nursery.start(
                lambda task_status: serve(settings, stop=stop, task_status=task_status)
            )
            yield Running(running, stop)
            stop.set()


async def test_health_stats_config_and_unknown_paths(server: Running) -> None:
    assert await server.get("/health") == (200, {"status": "ok", "ready": True, "draining": False})
    status, stats = await server.get("/stats", admin=True)
    assert status == 200
    assert stats["connections"] == 0
    status, config = await server.get("/config", admin=True)
    assert status == 200
    assert config["secret"] == "***"
    assert SECRET not in json.dumps(config)
    assert (await server.get("/nope"))[0] == 404
    assert (await server.get("/ws"))[0] == 426


async def test_metrics_expose_connections_events_and_rejections(server: Running) -> None:
    assert await server.handshake("/ws") == 401
    async with open_websocket_url(f"{server.url()}?token={server.token()}") as ws:
        await ws.send_message(json.dumps({"type": "subscribe", "thread_id": "t1"}))
        await ws.get_message()
        await ws.send_message(json.dumps({"type": "user_message", "thread_id": "t1", "text": "x"}))
        delivered = 1
        while json.loads(await ws.get_message())["type"] != "agent_completed":
            delivered += 1
        text = (await server.raw(
            f"GET /metrics HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {server.admin_token}"
            "\r\n\r\n".encode()
        )).decode()
    assert text.startswith("HTTP/1.1 200")
    assert "agentcast_connections 1.0" in text
    assert 'agentcast_events_published_total{type="agent_started"} 1.0' in text
    assert 'agentcast_events_published_total{type="agent_completed"} 1.0' in text
    assert 'agentcast_handshake_rejections_total{reason="auth_missing"} 1.0' in text
    assert "agentcast_slow_consumer_closes_total 0.0" in text
    # Every live event the client read was observed once in the delivery latency histogram.
    assert f'agentcast_event_delivery_seconds_bucket{{le="+Inf"}} {float(delivered)}' in text
    assert f"agentcast_event_delivery_seconds_count {float(delivered)}" in text
    assert 'agentcast_event_delivery_seconds_bucket{le="0.0005"}' in text


async def test_garbage_and_bad_handshakes_get_clear_statuses(server: Running) -> None:
    assert (await server.raw(b"\x16\x03\x01 not http at all\r\n\r\n")).startswith(b"HTTP/1.1 400")
    big = b"GET / HTTP/1.1\r\nHost: x\r\nX-Pad: " + b"a" * 10000 + b"\r\n\r\n"
    assert (await server.raw(big)).startswith(b"HTTP/1.1 431")
    token = f"Sec-WebSocket-Protocol: bearer.{server.token()}"
    assert await server.handshake("/ws", token, version="8") == 426
    assert await server.handshake("/elsewhere", token) == 404


@pytest.mark.parametrize(
    "origin", ["https://evil.example", "https://app.example.com.evil.example", "null"]
)
async def test_origins_off_the_allow_list_get_403(server: Running, origin: str) -> None:
    token = f"Sec-WebSocket-Protocol: bearer.{server.token()}"
    assert await server.handshake("/ws", token, f"Origin: {origin}") == 403
    assert await server.handshake("/ws", token, "Origin: https://app.example.com") == 101


async def test_bad_tokens_get_401_and_are_counted(server: Running) -> None:
    forged = issue_token("another-secret-that-is-also-long-enough!", "alice")
    expired = issue_token(SECRET, "alice", ttl=1, now=0)
    assert await server.handshake("/ws") == 401
    assert await server.handshake(f"/ws?token={forged}") == 401
    assert await server.handshake(f"/ws?token={expired}") == 401
    assert await server.handshake(f"/ws?token={server.token()}&user=bob") == 401
    _, stats = await server.get("/stats", admin=True)
    rejections = stats["handshake_rejections"]
    assert isinstance(rejections, dict)
    assert sum(rejections.values()) == 4
    assert stats["connections"] == 0


async def test_a_demo_run_streams_in_order_over_a_real_socket(server: Running) -> None:
    protocols = [BATCH_SUBPROTOCOL, f"bearer.{server.token()}"]
    async with open_websocket_url(server.url(), subprotocols=protocols) as ws:
        assert ws.subprotocol == BATCH_SUBPROTOCOL
        await ws.send_message(json.dumps({"type": "subscribe", "thread_id": "t1"}))
        await ws.send_message(json.dumps({"type": "user_message", "thread_id": "t1", "text": "hi"}))
        frames: list[dict[str, object]] = []
        while not frames or frames[-1]["type"] != "agent_completed":
            message = await ws.get_message()
            assert isinstance(message, str)
            frames.extend(json.loads(line) for line in message.split("\n"))
    assert frames[0]["type"] == "subscribed"
    events = frames[1:]
    assert events[0]["type"] == "agent_started"
    assert [event["seq"] for event in events] == list(range(1, len(events) + 1))
    assert {"agent_thinking", "tool_executing", "tool_completed"} <= {e["type"] for e in events}


def websockets_client_run(url: str) -> list[dict[str, object]]:
    """A team's Python service: the websockets library's sync client, batching offered."""
    from websockets.sync.client import connect as ws_connect

    frames: list[dict[str, object]] = []
    with ws_connect(url, subprotocols=[BATCH_SUBPROTOCOL], open_timeout=10) as ws:  # type: ignore
        ws.send(json.dumps({"type": "subscribe", "thread_id": "t9"}))
        ws.send(json.dumps({"type": "user_message", "thread_id": "t9", "text": "hello"}))
        while not frames or frames[-1]["type"] != "agent_completed":
            message = ws.recv(timeout=10)
            assert isinstance(message, str)
            frames.extend(json.loads(line) for line in message.split("\n"))
    return frames


async def test_a_websockets_library_client_gets_the_same_stream(server: Running) -> None:
    url = f"{server.url()}?token={server.token('carol')}"
    frames = await trio.to_thread.run_sync(websockets_client_run, url)
    assert frames[0]["type"] == "subscribed"
    events = frames[1:]
    assert events[0]["type"] == "agent_started"
    assert [event["seq"] for event in events] == list(range(1, len(events) + 1))


async def test_the_connection_limit_refuses_one_more_with_429(server: Running) -> None:
    url = f"{server.url()}?token={server.token()}"
    async with open_websocket_url(url), open_websocket_url(url):
        assert await server.handshake(f"/ws?token={server.token()}") == 429
        assert await server.handshake(f"/ws?token={server.token('bob')}") == 101


async def test_a_silent_tcp_connection_is_dropped_at_the_handshake_deadline(
    server: Running,
) -> None:
    stream = await trio.open_tcp_stream("127.0.0.1", server.port)
    async with stream:
        with trio.fail_after(5):
            assert await stream.receive_some(10) == b""


async def test_stop_closes_every_connection_with_1001(server: Running) -> None:
    async with open_websocket_url(f"{server.url()}?token={server.token()}") as ws:
        await ws.send_message(json.dumps({"type": "ping"}))
        assert json.loads(await ws.get_message())["type"] == "pong"
        server.stop.set()
        with pytest.raises(ConnectionClosed) as closed:
            await drain_until_closed(ws)
        assert closed.value.reason is not None
        assert closed.value.reason.code == 1001
        # trio-websocket's client leaves its socket open after a close the server started
        # (its reader stops without closing the stream and aclose() returns early).
        await trio.aclose_forcefully(ws._stream)
    assert server.server.draining


async def test_a_token_naming_threads_subscribes_and_confines_the_client(
    server: Running,
) -> None:
    url = f"{server.url()}?token={server.token(threads=['t1'])}"
    async with open_websocket_url(url) as ws:
        ack = json.loads(await ws.get_message())
        assert (ack["type"], ack["thread_id"]) == ("subscribed", "t1")
        for frame in ({"type": "subscribe", "thread_id": "t2"},
                      {"type": "user_message", "thread_id": "t2", "text": "hi"}):
            await ws.send_message(json.dumps(frame))
            error = json.loads(await ws.get_message())
            assert (error["type"], error["code"]) == ("error", "forbidden_thread")
        await ws.send_message(json.dumps({"type": "user_message", "thread_id": "t1", "text": "x"}))
        event = json.loads(await ws.get_message())
        assert (event["type"], event["thread_id"]) == ("agent_started", "t1")

"""The threaded bridge (``agentcast.asgi.threaded``) under an in-process ``uvicorn`` on
127.0.0.1 port 0, so the manager's stats can be read through ``bridge.call``: a client that
stops reading is closed alone at the write deadline (and the asyncio side's write is cancelled
with it), a bystander's stream stays complete and in order, nothing stays counted.
Every wait is bounded by ``asyncio.timeout``.
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import socket
from typing import Any

import uvicorn
from starlette.applications import Starlette
from starlette.routing import WebSocketRoute
from websockets.asyncio.client import connect
from websockets.typing import Subprotocol

import agentcast
import agentcast.asgi
from agentcast import AgentEvent, EventType, UserContext

WRITE_TIMEOUT = 1.0
STEP = 20


def authenticate(scope: agentcast.asgi.Scope) -> UserContext:
    query = dict(part.split("=", 1) for part in scope["query_string"].decode().split("&"))
    return UserContext.from_request(user_id=query["user"])


def masked(payload: bytes) -> bytes:
    """One masked text frame (RFC 6455), small payloads only."""
    mask = os.urandom(4)
    return bytes([0x81, 0x80 | len(payload)]) + mask + bytes(
        b ^ mask[i % 4] for i, b in enumerate(payload))


async def slow_client(port: int) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """A raw client of user ``slow`` with a tiny receive buffer, subscribed to t1; it reads the
    handshake and then nothing."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.setblocking(False)
    await asyncio.get_running_loop().sock_connect(sock, ("127.0.0.1", port))
    reader, writer = await asyncio.open_connection(sock=sock)
    key = base64.b64encode(os.urandom(16)).decode()
    writer.write(
        f"GET /ws?user=slow HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\n"
        f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n"
        .encode()
    )
    head = await reader.readuntil(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 101"), head
    writer.write(masked(json.dumps({"type": "subscribe", "thread_id": "t1"}).encode()))
    await writer.drain()
    _, length = await reader.readexactly(2)  # the ack: one short unmasked text frame
    assert json.loads(await reader.readexactly(length))["type"] == "subscribed"
    return reader, writer


def asgi_tasks() -> set[asyncio.Task[Any]]:
    """uvicorn's request tasks (one per WebSocket)."""
    return {task for task in asyncio.all_tasks() if "run_asgi" in repr(task.get_coro())}


async def publish(manager: agentcast.ConnectionManager, user: str, count: int,
                  size: int) -> None:
    session = manager.get_websocket_manager(UserContext.from_request(user_id=user))
    for n in range(count):
        await session.send_to_thread(
            "t1", AgentEvent(EventType.AGENT_TEXT, {"text": f"{n:06d}" + "x" * size}))


async def wait_closed_of(manager: agentcast.ConnectionManager, user: str) -> int | None:
    session = manager.session(user)
    assert session is not None
    connection = session.connections()[0]
    await connection.wait_closed()
    return connection.close_code


async def all_closed(manager: agentcast.ConnectionManager) -> int:
    """Wait until every connection has finished closing; return how many are counted."""
    for user in manager.user_ids():
        session = manager.session(user)
        for connection in session.connections() if session else ():
            await connection.wait_closed()
    return manager.get_stats().connections


async def scenario() -> None:
    bridge = agentcast.asgi.threaded(
        agentcast.Config(write_timeout=WRITE_TIMEOUT, session_linger=0))
    app = Starlette(routes=[WebSocketRoute("/ws", agentcast.asgi.endpoint(
        authenticate=authenticate))], lifespan=bridge)
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
    # Bound here, so the port is known at once; uvicorn accepts once its lifespan has started.
    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]
    serving = asyncio.create_task(server.serve(sockets=[listener]))
    try:
        async with connect(f"ws://127.0.0.1:{port}/ws?user=bob",
                           subprotocols=[Subprotocol("agentcast.ndjson")]) as bob:
            async with asyncio.timeout(STEP):
                await bob.send(json.dumps({"type": "subscribe", "thread_id": "t1"}))
                assert json.loads(await bob.recv())["type"] == "subscribed"
                (bobs,) = asgi_tasks()
                _, writer = await slow_client(port)
                (slows,) = asgi_tasks() - {bobs}
                # 300 events of 16 KB: more than the buffers hold, fewer than the send queue.
                await bridge.call(publish, "slow", 300, 16_000)
                code = await bridge.call(wait_closed_of, "slow")
                assert code == 4008
                stats = await bridge.call(lambda m: m.get_stats())
                assert stats.slow_consumer_disconnects == 1
                assert stats.connections == 1  # bob's
                # The asyncio half's stuck write was cancelled: its request task ends.
                await asyncio.wait({slows})
                writer.close()

                await bridge.call(publish, "bob", 100, 100)
                seqs: list[int] = []
                while len(seqs) < 100:
                    message = await bob.recv()
                    assert isinstance(message, str)
                    seqs += [json.loads(line)["seq"] for line in message.split("\n")]
                assert seqs == list(range(1, 101))
        async with asyncio.timeout(STEP):
            assert await bridge.call(all_closed) == 0
    finally:
        server.should_exit = True
        async with asyncio.timeout(STEP):
            await serving
        listener.close()


def test_the_threaded_bridge_cuts_a_stuck_write_and_keeps_the_bystander_whole() -> None:
    asyncio.run(scenario())

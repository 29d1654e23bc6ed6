"""A real server on a loopback port for the token tests (expiry, refresh, revocation), with
the checks of ``test_server_faults``: afterwards no connection is counted, no connection task
is left and no file descriptor has leaked. Every wait is bounded by ``trio.fail_after``."""

from __future__ import annotations

import base64
import json
import os
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from typing import Any

import attrs
import trio
from trio_websocket import WebSocketConnection, open_websocket_url

from agentcast import AgentEvent, Config, EventType, UserContext
from agentcast.server import issue_token
from agentcast.server._serve import RunningServer
from agentcast.server._settings import ServerSettings

from .serverkit import serving

SECRET = "a-test-secret-that-is-long-enough-for-hs256"
ADMIN = "an-admin-token-that-is-at-least-32-bytes"
#: A write_timeout of 0.4 s makes the watchdog (and so the expiry check) sweep every 50 ms.
SETTINGS = ServerSettings(
    port=0, secret=SECRET, admin_token=ADMIN, handshake_timeout=2.0, token_leeway=0.0,
    core=Config(write_timeout=0.4, close_timeout=1.0, shutdown_timeout=2.0),
)


@attrs.define
class Node:
    """One running server and what the test opened against it."""

    running: RunningServer
    sockets: list[WebSocketConnection] = attrs.Factory(list)

    @property
    def port(self) -> int:
        return self.running.port

    @property
    def manager(self):  # type: ignore[no-untyped-def]
        return self.running.server.manager

    def url(self, token: str | None = None) -> str:
        query = "" if token is None else f"?token={token}"
        return f"ws://127.0.0.1:{self.port}/ws{query}"

    @asynccontextmanager
    async def connect(
        self, token: str, subprotocols: Sequence[str] = ()
    ) -> AsyncIterator[WebSocketConnection]:
        """A trio-websocket client; its socket is closed for certain afterwards."""
        url = self.url() if subprotocols else self.url(token)
        async with open_websocket_url(url, subprotocols=list(subprotocols) or None) as ws:
            try:
                yield ws
            finally:
                await trio.aclose_forcefully(ws._stream)

    async def handshake(self, token: str | None = None, *headers: str) -> bytes:
        """A raw upgrade request; returns the response head (the socket is then closed)."""
        key = base64.b64encode(os.urandom(16)).decode()
        lines = [f"GET /ws{'' if token is None else '?token=' + token} HTTP/1.1", "Host: x",
                 "Upgrade: websocket", "Connection: Upgrade", f"Sec-WebSocket-Key: {key}",
                 "Sec-WebSocket-Version: 13", *headers]
        stream = await trio.open_tcp_stream("127.0.0.1", self.port)
        async with stream:
            await stream.send_all(("\r\n".join(lines) + "\r\n\r\n").encode())
            response = b""
            while b"\r\n\r\n" not in response:
                chunk = await stream.receive_some(65536)
                if not chunk:
                    break
                response += chunk
        return response.partition(b"\r\n\r\n")[0]

    async def http(self, method: str, target: str, *headers: str) -> tuple[int, dict[str, Any]]:
        """A plain HTTP request; returns (status, JSON body)."""
        lines = [f"{method} {target} HTTP/1.1", "Host: x", "Content-Length: 0", *headers]
        stream = await trio.open_tcp_stream("127.0.0.1", self.port)
        async with stream:
            await stream.send_all(("\r\n".join(lines) + "\r\n\r\n").encode())
            response = b""
            while chunk := await stream.receive_some(65536):
                response += chunk
        head, _, body = response.partition(b"\r\n\r\n")
        return int(head.split()[1]), json.loads(body)

    async def revoke(self, user: str) -> tuple[int, dict[str, Any]]:
        return await self.http("POST", f"/admin/revoke?user={user}",
                               f"Authorization: Bearer {ADMIN}")

    async def publish(self, user: str, thread_id: str, count: int) -> None:
        session = self.manager.get_websocket_manager(UserContext.from_request(user_id=user))
        for n in range(count):
            await session.send_to_thread(
                thread_id, AgentEvent(EventType.AGENT_TEXT, {"text": f"{n:06d}"})
            )


@asynccontextmanager
async def running_node(settings: ServerSettings = SETTINGS) -> AsyncIterator[Node]:
    """Serve ``settings`` on a free port; on exit check that nothing was left behind."""
    async with serving(settings) as served:
        yield Node(served.running)


def token(user: str, **kwargs: Any) -> str:
    return issue_token(SECRET, user, **kwargs)


@attrs.define
class Bystander:
    """Another user's tab, subscribed to t1 for the whole test."""

    ws: WebSocketConnection
    node: Node
    published: int = 0

    async def check_complete(self, count: int = 50) -> None:
        """Publish ``count`` more events and read every one, in order, with no gap."""
        first = self.published + 1
        await self.node.publish("bystander", "t1", count)
        self.published += count
        seqs: list[int] = []
        while len(seqs) < count:
            frame = json.loads(await self.ws.get_message())
            if frame["type"] == "agent_text":
                seqs.append(frame["seq"])
        assert seqs == list(range(first, first + count))


@asynccontextmanager
async def bystander(node: Node) -> AsyncIterator[Bystander]:
    """A bystander whose stream is checked complete at the start and at the end."""
    async with node.connect(token("bystander", ttl=600)) as ws:
        await ws.send_message(json.dumps({"type": "subscribe", "thread_id": "t1"}))
        while json.loads(await ws.get_message())["type"] != "subscribed":
            pass
        watcher = Bystander(ws, node)
        await watcher.check_complete()
        yield watcher
        await watcher.check_complete()

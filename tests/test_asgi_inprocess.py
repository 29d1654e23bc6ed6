"""agentcast.asgi under an in-process ``hypercorn`` (trio worker) on 127.0.0.1 port 0, so the
manager's stats and the task tree can be inspected: a client that stops reading is cut by
agentcast's write deadline although hypercorn shields its socket writes, a bystander's stream
stays complete and in order, and nothing is left behind (connections, tasks, fds).
Every wait is bounded by ``fail_after``.
"""

from __future__ import annotations

import json
import os
from collections.abc import AsyncIterator, Iterator
from functools import partial
from typing import Any

import attrs
import pytest
import trio
from hypercorn.config import Config as HypercornConfig
from hypercorn.trio import serve
from starlette.applications import Starlette
from starlette.routing import WebSocketRoute
from websockets.exceptions import InvalidStatus
from websockets.trio.client import connect
from websockets.typing import Subprotocol

import agentcast
import agentcast.asgi
from agentcast import AgentEvent, EventType, UserContext
from agentcast.protocols import AGUI_SUBPROTOCOL, VERCEL_SUBPROTOCOL

from .rawws import TEXT, RawClient

#: Seconds one write may block before agentcast cuts it (short, so the test is quick).
WRITE_TIMEOUT = 1.0
#: Connections one user may hold in these tests.
MAX_PER_USER = 2


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def tasks_named(prefix: str) -> list[trio.lowlevel.Task]:
    """Every task in this trio run whose name starts with ``prefix``."""
    def walk(task: trio.lowlevel.Task) -> Iterator[trio.lowlevel.Task]:
        yield task
        for nursery in task.child_nurseries:
            for child in nursery.child_tasks:
                yield from walk(child)

    root = trio.lowlevel.current_root_task()
    assert root is not None
    return [t for t in walk(root) if t.name.startswith(prefix)]


def authenticate(scope: agentcast.asgi.Scope) -> UserContext:
    query = dict(part.split("=", 1) for part in scope["query_string"].decode().split("&"))
    if query.get("token") != "ok":
        raise agentcast.asgi.Refuse(401, "bad token")
    return UserContext.from_request(user_id=query["user"])


@attrs.define
class App:
    port: int
    lifespan: agentcast.asgi.Lifespan

    @property
    def manager(self) -> agentcast.ConnectionManager:
        return self.lifespan.manager

    def session(self, user: str) -> agentcast.UserSession:
        return self.manager.get_websocket_manager(UserContext.from_request(user_id=user))

    async def publish(self, user: str, count: int, size: int = 100) -> None:
        session = self.session(user)
        for n in range(count):
            await session.send_to_thread(
                "t1", AgentEvent(EventType.AGENT_TEXT, {"text": f"{n:06d}" + "x" * size})
            )


#: What the fixture's agent answers every user message with, in two deltas.
REPLY = ("Hi ", "there")


async def reply(session: agentcast.UserSession, connection: Any, frame: dict[str, Any]) -> None:
    """Answer a ``user_message`` with a run of :data:`REPLY` on its thread."""
    async def agent(run: Any, text: str) -> dict[str, str]:
        for delta in REPLY:
            await run.text(delta)
        return {"answer": "".join(REPLY)}

    await trio.lowlevel.checkpoint()
    session.start_run(frame["thread_id"], agent, frame["text"], agent_name="bot")


@pytest.fixture
async def app() -> AsyncIterator[App]:
    baseline = open_fds()
    config = agentcast.Config(
        write_timeout=WRITE_TIMEOUT, session_linger=0, max_connections_per_user=MAX_PER_USER
    )
    lifespan = agentcast.asgi.lifespan(config, message_handler=reply)
    starlette = Starlette(
        routes=[WebSocketRoute("/ws", agentcast.asgi.endpoint(authenticate=authenticate))],
        lifespan=lifespan,
    )
    hypercorn = HypercornConfig()
    hypercorn.bind = ["127.0.0.1:0"]
    hypercorn.graceful_timeout = 1
    hypercorn.accesslog = None
    stop = trio.Event()
    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            # hypercorn's ASGI type and Starlette's differ in name only (typeshed-style dicts
            # against MutableMapping); the app is a plain ASGI 3 callable.
            app: Any = starlette
            binds = await nursery.start(partial(serve, app, hypercorn,
                                                shutdown_trigger=stop.wait))
            fixture = App(int(binds[0].rsplit(":", 1)[1]), lifespan)
            baseline_tasks = fixture.manager.get_stats().live_tasks
            yield fixture
            for user in fixture.manager.user_ids():
                session = fixture.manager.session(user)
                for connection in session.connections() if session else ():
                    await connection.wait_closed()
            stats = fixture.manager.get_stats()
            assert stats.connections == 0
            while fixture.manager.get_stats().live_tasks > baseline_tasks:
                await trio.lowlevel.checkpoint()  # sessions (linger 0) finishing their close
            assert not tasks_named("agentcast.asgi.pump")
            stop.set()
    assert open_fds() <= baseline


async def test_a_refused_handshake_is_a_401_and_registers_nothing(app: App) -> None:
    with trio.fail_after(10):
        stream = await trio.open_tcp_stream("127.0.0.1", app.port)
        async with stream:
            await stream.send_all(
                b"GET /ws?user=mallory&token=no HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\n"
                b"Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
                b"Sec-WebSocket-Version: 13\r\n\r\n"
            )
            answer = b""
            while b'"}' not in answer:
                chunk = await stream.receive_some(4096)
                assert chunk, answer
                answer += chunk
    assert answer.startswith(b"HTTP/1.1 401")
    assert b'{"error":"bad token"}' in answer
    assert app.manager.session("mallory") is None


async def test_past_the_connection_limit_a_handshake_gets_429_and_the_others_go_on(
    app: App,
) -> None:
    url = f"ws://127.0.0.1:{app.port}/ws?user=carol&token=ok"
    with trio.fail_after(10):
        async with connect(url) as first, connect(url) as second:
            for ws in (first, second):
                await ws.send(json.dumps({"type": "subscribe", "thread_id": "t1"}))
                assert json.loads(await ws.recv())["type"] == "subscribed"
            with pytest.raises(InvalidStatus) as refused:
                async with connect(url):
                    pass
            assert refused.value.response.status_code == 429
            assert b"max_connections_per_user" in refused.value.response.body
            session = app.session("carol")
            assert len(session.connections()) == MAX_PER_USER
            assert session.get_stats().reserved_connections == 0  # the slot was given back
            await app.publish("carol", 3)
            for ws in (first, second):
                seqs = [json.loads(await ws.recv())["seq"] for _ in range(3)]
                assert seqs == [1, 2, 3]


async def test_a_client_that_stops_reading_is_cut_by_the_write_deadline(app: App) -> None:
    async with connect(f"ws://127.0.0.1:{app.port}/ws?user=bob&token=ok",
                       subprotocols=[Subprotocol("agentcast.ndjson")]) as bob:
        await bob.send(json.dumps({"type": "subscribe", "thread_id": "t1"}))
        assert json.loads(await bob.recv())["type"] == "subscribed"

        slow = await RawClient.open(app.port, "ok&user=slow", receive_buffer=4096)
        try:
            await slow.send(TEXT, json.dumps({"type": "subscribe", "thread_id": "t1"}).encode())
            assert json.loads((await slow.read_frame())[1])["type"] == "subscribed"
            connection = app.session("slow").connections()[0]
            with trio.fail_after(10 * WRITE_TIMEOUT):
                # 300 events of 16 KB: more than the socket buffers hold, fewer than the
                # send queue does, so only the write deadline can end it.
                await app.publish("slow", 300, size=16_000)
                started = trio.current_time()
                await connection.wait_closed()
                cut_after = trio.current_time() - started
            assert connection.close_code == 4008
            stats = app.manager.get_stats()
            assert stats.slow_consumer_disconnects == 1
            assert stats.per_user.get("slow") is None or stats.per_user["slow"].connections == 0
            print(f"agentcast closed the stuck connection {cut_after:.2f} s after the publish")
            # hypercorn's write is shielded: the pump (one task, one message) stays in it until
            # hypercorn closes the socket, which it does only when the peer goes. (Its
            # --read-timeout does not help: its reader then waits for the same send lock.)
            assert len(tasks_named("agentcast.asgi.pump")) == 2  # bob's and slow's
            await slow.aclose()
            with trio.fail_after(10):
                while len(tasks_named("agentcast.asgi.pump")) > 1:
                    await trio.lowlevel.checkpoint()  # hypercorn noticing the closed socket
        finally:
            await slow.aclose()

        # The bystander's stream is complete and in order.
        with trio.fail_after(10):
            await app.publish("bob", 100)
            seqs: list[int] = []
            while len(seqs) < 100:
                message = await bob.recv()
                assert isinstance(message, str)
                seqs += [json.loads(line)["seq"] for line in message.split("\n")]
        assert seqs == list(range(1, 101))


async def run_on(app: App, user: str, thread: str, deltas: list[str]) -> None:
    """One run of ``deltas`` on (user, thread), ended by its return value."""
    async with app.session(user).run(thread, agent_name="bot") as run:
        for delta in deltas:
            await run.text(delta)
        run.result = {"answer": "".join(deltas)}


async def test_an_agui_client_gets_translated_events_as_from_the_standalone_server(
    app: App,
) -> None:
    """The ASGI endpoint selects ``agentcast.agui`` and translates at the edge, by the same
    rule as ``agentcast serve`` (the subprotocol it offered no longer falls through to a
    native stream the AG-UI client cannot read)."""
    url = f"ws://127.0.0.1:{app.port}/ws?user=ann&token=ok"
    events: list[dict[str, Any]] = []
    with trio.fail_after(15):
        async with connect(url, subprotocols=[Subprotocol(AGUI_SUBPROTOCOL)]) as ws:
            assert ws.subprotocol == AGUI_SUBPROTOCOL
            await ws.send(json.dumps({"type": "subscribe", "thread_id": "t-a"}))
            # The subscription's ack, as AG-UI's CUSTOM event, before the run starts.
            ack = json.loads(str(await ws.recv()).split("\n")[0])
            assert (ack["type"], ack["name"]) == ("CUSTOM", "agentcast.subscribed")
            await run_on(app, "ann", "t-a", ["Hel", "lo"])
            while not any(e["type"] == "RUN_FINISHED" for e in events):
                events.extend(json.loads(line) for line in str(await ws.recv()).split("\n"))
    types = [e["type"] for e in events]
    assert types[0] == "RUN_STARTED"
    assert "".join(e["delta"] for e in events if e["type"] == "TEXT_MESSAGE_CONTENT") == "Hello"
    assert events[-1]["result"] == {"answer": "Hello"}


async def test_a_vercel_client_gets_ui_message_chunks(app: App) -> None:
    url = f"ws://127.0.0.1:{app.port}/ws?user=vic&token=ok"
    frames: list[dict[str, Any]] = []
    with trio.fail_after(15):
        async with connect(url, subprotocols=[Subprotocol(VERCEL_SUBPROTOCOL)]) as ws:
            assert ws.subprotocol == VERCEL_SUBPROTOCOL
            await ws.send(json.dumps({
                "type": "send", "requestId": "q1", "id": "chat-1",
                "messages": [{"id": "m1", "role": "user", "parts": [
                    {"type": "text", "text": "hi"}]}],
            }))
            while not any(f["type"] == "end" for f in frames):
                frames.append(json.loads(str(await ws.recv())))
    chunks = [f["chunk"] for f in frames if f["type"] == "chunk"]
    assert chunks[0]["type"] == "start"
    assert "".join(c["delta"] for c in chunks if c["type"] == "text-delta") == "".join(REPLY)
    assert chunks[-1]["type"] == "finish"

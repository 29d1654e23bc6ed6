"""A connection confined to some threads (the ``threads`` claim of its token) can subscribe,
message and cancel runs only there; everything else gets a ``forbidden_thread`` error frame
and the connection stays usable."""

from __future__ import annotations

from typing import Any

import trio

import agentcast
from agentcast import AgentEvent, ConnectionManager, EventType, Run, UserContext, UserSession
from agentcast.testing import MemoryTransport

from .helpers import Client, connect

ALICE = UserContext.from_request(user_id="alice")


async def _forever(run: Run) -> None:
    await trio.sleep_forever()


async def confined_client(session: UserSession) -> Client:
    client, _ = await connect(session, ("t1",), allowed_threads=("t1",))
    ack = await client.receive()
    assert (ack["type"], ack["thread_id"]) == ("subscribed", "t1")
    return client


async def test_subscribing_outside_the_allowed_threads_is_refused(
    manager: ConnectionManager,
) -> None:
    session = agentcast.get_websocket_manager(ALICE)
    client = await confined_client(session)
    await client.send({"type": "subscribe", "thread_id": "t2"})
    error = await client.receive()
    assert (error["type"], error["code"]) == ("error", "forbidden_thread")
    assert "t2" in error["message"]
    # Still usable, still subscribed to t1 only: a t2 event never arrives, a t1 event does.
    await session.send_to_thread("t2", AgentEvent(EventType.AGENT_THINKING, {"text": "no"}))
    await session.send_to_thread("t1", AgentEvent(EventType.AGENT_THINKING, {"text": "yes"}))
    event = await client.receive()
    assert (event["thread_id"], event["data"]["text"]) == ("t1", "yes")


async def test_custom_frames_naming_another_thread_never_reach_the_handler(config: Any) -> None:
    seen: list[dict[str, Any]] = []

    async def handler(session: UserSession, connection: Any, frame: dict[str, Any]) -> None:
        await trio.lowlevel.checkpoint()
        seen.append(frame)

    async with agentcast.open_manager(config, message_handler=handler):
        session = agentcast.get_websocket_manager(ALICE)
        client = await confined_client(session)
        await client.send({"type": "user_message", "thread_id": "t2", "text": "hi"})
        error = await client.receive()
        assert (error["type"], error["code"]) == ("error", "forbidden_thread")
        await client.send({"type": "user_message", "thread_id": "t1", "text": "hi"})
        await client.send({"type": "ping", "id": "fence"})
        assert (await client.receive()) == {"type": "pong", "id": "fence"}
        assert [frame["thread_id"] for frame in seen] == ["t1"]


async def test_a_confined_client_cannot_cancel_a_run_on_another_thread(
    manager: ConnectionManager,
) -> None:
    session = agentcast.get_websocket_manager(ALICE)
    client = await confined_client(session)
    other = session.start_run("t2", _forever)
    mine = session.start_run("t1", _forever)
    assert (await client.receive())["type"] == "agent_started"
    await client.send({"type": "cancel_run", "run_id": other})
    error = await client.receive()
    assert (error["type"], error["code"]) == ("error", "unknown_run")
    await client.send({"type": "cancel_run", "run_id": mine})
    ended = await client.receive()
    assert (ended["type"], ended["run_id"]) == ("agent_cancelled", mine)
    assert [run.run_id for run in session.active_runs()] == [other]
    assert session.cancel_run(other)


async def test_an_unconfined_connection_may_use_any_of_its_users_threads(
    manager: ConnectionManager,
) -> None:
    session = agentcast.get_websocket_manager(ALICE)
    server, transport = MemoryTransport.pair()
    connection = await session.add_connection(server)
    assert connection.allowed_threads is None
    client = Client(transport)
    await client.send({"type": "subscribe", "thread_id": "anything"})
    assert (await client.receive())["type"] == "subscribed"

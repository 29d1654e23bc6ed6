"""Edge cases found in review: stream continuity across long runs, closing before the tasks
ran, and what the ``events_sent`` statistic counts."""

from __future__ import annotations

from typing import Any

import trio

import agentcast
from agentcast import AgentEvent, Config, UserContext

from .helpers import connect, settle, thinking


async def test_a_quiet_stream_with_a_live_session_keeps_its_seq(
    autojump_clock: trio.testing.MockClock,
) -> None:
    config = Config(history_ttl=60.0)
    async with agentcast.open_manager(config) as manager:
        session = manager.get_websocket_manager(UserContext(user_id="alice"))
        client, _ = await connect(session, ("t1",))
        ack = await client.receive()
        async with session.run("t1") as run:
            await client.receive()  # agent_started, seq 1
            await trio.sleep(10 * config.history_ttl)  # a very long tool call; sweeps run
            await run.thinking("still here")
            event = await client.receive()
        assert event["seq"] == 2
        terminal = await client.receive()
        assert (terminal["type"], terminal["seq"]) == ("agent_completed", 3)
        recovery = await session.recover("t1", 0, ack["epoch"])
        assert recovery.epoch == ack["epoch"]


async def test_remove_connection_right_after_add_still_sends_ack_and_events(
    manager: agentcast.ConnectionManager,
) -> None:
    session = manager.get_websocket_manager(UserContext(user_id="alice"))
    client, connection = await connect(session, ("t1",))
    await session.send_to_thread("t1", thinking("one"))
    assert await session.remove_connection(connection.connection_id, 1000, "bye")
    frames, code = await client.receive_closed()
    assert [frame["type"] for frame in frames] == ["subscribed", "agent_thinking"]
    assert code == 1000


async def test_events_sent_counts_events_not_control_frames(
    manager: agentcast.ConnectionManager,
) -> None:
    session = manager.get_websocket_manager(UserContext(user_id="alice"))
    client, _ = await connect(session, ("t1",))
    await client.send({"type": "ping"})
    for index in range(3):
        await session.send_to_thread("t1", thinking(str(index)))
    frames = [await client.receive() for _ in range(5)]
    await settle()  # the counter moves when the writer's send returns, after the client read
    assert sorted(frame["type"] for frame in frames) == [
        "agent_thinking", "agent_thinking", "agent_thinking", "pong", "subscribed",
    ]
    stats = session.get_stats()
    assert stats.events_sent == 3
    assert stats.events_published == 3


async def test_known_fields_are_type_checked_so_events_always_fit_the_schema() -> None:
    import pytest

    cases: list[tuple[str, dict[str, Any]]] = [
        ("agent_started", {"agent_name": 5}),
        ("agent_thinking", {"text": "x", "progress": 2.0}),
        ("agent_thinking", {"text": "x", "step": True}),
        ("tool_executing", {"tool_name": "t", "arguments": [1]}),
        ("tool_completed", {"tool_name": "t", "result": 1, "duration_ms": -1, "ok": True}),
        ("tool_completed", {"tool_name": "t", "result": 1, "duration_ms": 1, "ok": "yes"}),
        ("agent_error", {"error_type": "E", "message": None}),
    ]
    for event_type, data in cases:
        with pytest.raises(agentcast.InvalidEvent, match="must be"):
            AgentEvent(event_type, data)
    assert AgentEvent("custom_event", {"progress": 5}).data == {"progress": 5}

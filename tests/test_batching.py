"""Batching: newline-delimited messages when the client asked for them, bounded by
``batch_max_events`` and ``batch_max_bytes``; and each event is encoded once, however many
connections it goes to."""

from __future__ import annotations

import json
from typing import Any

import pytest

import agentcast
from agentcast import AgentEvent, Config, EventType, UserContext
from agentcast._events import encode_envelope

from .helpers import Client, check_event, connect, settle, thinking


async def raw_messages(client: Client, frames: int) -> list[str]:
    """Read whole WebSocket messages until they hold ``frames`` frames in all."""
    messages: list[str] = []
    total = 0
    while total < frames:
        message = await client.transport.get_message()
        assert isinstance(message, str)
        messages.append(message)
        total += len(message.split("\n"))
    assert total == frames
    return messages


def lines_of(messages: list[str]) -> list[dict[str, Any]]:
    """Every line parsed as JSON (each must be a whole frame), in order."""
    frames = [json.loads(line) for message in messages for line in message.split("\n")]
    for frame in frames:
        if frame["type"] == "agent_thinking":
            check_event(frame)
    return frames


@pytest.mark.parametrize(
    ("batch", "subprotocol"),
    [(True, None), (None, agentcast.BATCH_SUBPROTOCOL), (True, agentcast.BATCH_SUBPROTOCOL)],
)
async def test_a_burst_arrives_in_fewer_messages_than_events_in_order(
    manager: agentcast.ConnectionManager, batch: bool | None, subprotocol: str | None
) -> None:
    session = manager.get_websocket_manager(UserContext(user_id="alice"))
    client, connection = await connect(session, ("t1",), batch=batch, subprotocol=subprotocol)
    assert connection.batch
    for index in range(50):
        await session.send_to_thread("t1", thinking(f"event {index}"))
    ack = await client.receive()
    assert ack["type"] == "subscribed"
    events = [await client.receive() for _ in range(50)]
    assert [event["seq"] for event in events] == list(range(1, 51))
    assert [event["data"]["text"] for event in events] == [f"event {i}" for i in range(50)]
    assert client.messages < 51
    await settle()  # the writer counts a message once its write has returned
    stats = session.get_stats()
    assert stats.events_sent == 50
    assert stats.messages_sent == client.messages


@pytest.mark.parametrize(
    ("batch", "subprotocol"), [(False, None), (None, None), (False, agentcast.BATCH_SUBPROTOCOL)]
)
async def test_without_batching_every_frame_is_its_own_message(
    manager: agentcast.ConnectionManager, batch: bool | None, subprotocol: str | None
) -> None:
    session = manager.get_websocket_manager(UserContext(user_id="alice"))
    client, connection = await connect(session, ("t1",), batch=batch, subprotocol=subprotocol)
    assert not connection.batch
    for index in range(50):
        await session.send_to_thread("t1", thinking(f"event {index}"))
    messages = await raw_messages(client, 51)
    assert len(messages) == 51
    assert all("\n" not in message for message in messages)
    frames = lines_of(messages)
    assert frames[0]["type"] == "subscribed"
    assert [frame["seq"] for frame in frames[1:]] == list(range(1, 51))


async def test_batch_max_events_bounds_every_message() -> None:
    async with agentcast.open_manager(Config(batch_max_events=4)) as manager:
        session = manager.get_websocket_manager(UserContext(user_id="alice"))
        client, _ = await connect(session, ("t1", "t2"), batch=True)
        for index in range(50):
            await session.send_to_thread("t1" if index % 3 else "t2", thinking(f"e{index}"))
        await client.send({"type": "ping", "id": "last"})
        messages = await raw_messages(client, 2 + 50 + 1)
        assert all(len(message.split("\n")) <= 4 for message in messages)
        assert any(len(message.split("\n")) > 1 for message in messages)  # it did batch
        frames = lines_of(messages)
        assert [frame["type"] for frame in frames[:2]] == ["subscribed", "subscribed"]
        assert frames[-1] == {"type": "pong", "id": "last"}
        events = frames[2:-1]
        assert [event["data"]["text"] for event in events] == [f"e{i}" for i in range(50)]
        for thread_id in ("t1", "t2"):
            seqs = [event["seq"] for event in events if event["thread_id"] == thread_id]
            assert seqs == list(range(1, len(seqs) + 1))


async def test_batch_max_bytes_bounds_messages_but_a_large_frame_goes_alone() -> None:
    limit = 400
    async with agentcast.open_manager(Config(batch_max_bytes=limit)) as manager:
        session = manager.get_websocket_manager(UserContext(user_id="alice"))
        client, _ = await connect(session, ("t1",), batch=True)
        texts = [f"small {index}" for index in range(20)]
        texts[7] = "x" * 1000  # one frame alone is larger than the limit
        texts[15] = "y" * 1000
        for text in texts:
            await session.send_to_thread("t1", thinking(text))
        messages = await raw_messages(client, 21)
        for message in messages:
            if "\n" in message:
                assert len(message) <= limit
        big = [message for message in messages if len(message) > limit]
        assert len(big) == 2
        assert all("\n" not in message for message in big)  # alone in its message
        assert any("\n" in message for message in messages)  # the small ones were batched
        frames = lines_of(messages)
        assert [frame["data"]["text"] for frame in frames[1:]] == texts
        assert [frame["seq"] for frame in frames[1:]] == list(range(1, 21))


async def test_each_event_is_encoded_once_for_all_connections(
    manager: agentcast.ConnectionManager, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls: list[dict[str, Any]] = []
    original = encode_envelope  # what the in-memory broker calls

    def counting(event: AgentEvent, **kwargs: Any) -> str:
        calls.append(kwargs)
        return original(event, **kwargs)

    monkeypatch.setattr("agentcast.backplane.memory.encode_envelope", counting)
    session = manager.get_websocket_manager(UserContext(user_id="alice"))
    clients = [(await connect(session, ("t1",), batch=batch))[0] for batch in (False, True, False)]
    for index in range(10):
        await session.send_to_thread("t1", thinking(f"event {index}"))
    assert len(calls) == 10
    assert [call["seq"] for call in calls] == list(range(1, 11))
    received: list[list[str]] = []
    for client in clients:
        messages = await raw_messages(client, 11)
        lines = [line for message in messages for line in message.split("\n")]
        assert json.loads(lines[0])["type"] == "subscribed"
        received.append(lines[1:])
    # The very same encoded frame went to every connection.
    assert received[0] == received[1] == received[2]
    assert [json.loads(line)["seq"] for line in received[0]] == list(range(1, 11))
    assert len(calls) == 10


async def test_live_only_events_are_encoded_once_for_every_connection(
    manager: agentcast.ConnectionManager, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls: list[dict[str, Any]] = []
    original = encode_envelope  # what the in-memory broker calls

    def counting(event: AgentEvent, **kwargs: Any) -> str:
        calls.append(kwargs)
        return original(event, **kwargs)

    monkeypatch.setattr("agentcast.backplane.memory.encode_envelope", counting)
    alice = manager.get_websocket_manager(UserContext(user_id="alice"))
    bob = manager.get_websocket_manager(UserContext(user_id="bob"))
    clients = [(await connect(alice))[0] for _ in range(3)] + [(await connect(bob))[0]]
    for index in range(4):
        await alice.send_to_user(thinking(f"to alice {index}"))
    await manager.broadcast(AgentEvent(EventType.SYSTEM_NOTICE, {"message": "to all"}))
    assert len(calls) == 5
    received = [await raw_messages(client, 5) for client in clients[:3]]
    assert received[0] == received[1] == received[2]
    assert [json.loads(m)["data"] for m in received[0]][-1] == {"message": "to all"}
    assert [json.loads(m)["data"] for m in await raw_messages(clients[3], 1)] == [
        {"message": "to all"}
    ]


async def test_a_replay_is_batched_after_its_ack(manager: agentcast.ConnectionManager) -> None:
    session = manager.get_websocket_manager(UserContext(user_id="alice"))
    for index in range(30):
        await session.send_to_thread("t1", thinking(f"event {index}"))
    client, _ = await connect(session, batch=True)
    await client.send({"type": "subscribe", "thread_id": "t1", "since_seq": 0})
    messages = await raw_messages(client, 31)
    assert len(messages) < 31
    frames = lines_of(messages)
    assert (frames[0]["type"], frames[0]["recovered"]) == ("subscribed", True)
    assert [frame["seq"] for frame in frames[1:]] == list(range(1, 31))
    await settle()
    stats = session.get_stats()
    assert stats.messages_sent == len(messages) < stats.events_sent + 1

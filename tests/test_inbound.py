"""Inbound frames: what a client may send, how each fault is answered (an error frame, the
connection staying usable; or a close with the documented code), the rate limit, and custom
frame types handed to the application's message handler."""

from __future__ import annotations

import contextlib
import json
from typing import Any

import pytest
import trio
import trio.testing
from trio_websocket import ConnectionClosed

import agentcast
from agentcast import (
    ClientError,
    CloseCode,
    Config,
    Connection,
    ConnectionManager,
    UserContext,
    UserSession,
)

from .helpers import Client, connect, thinking

ALICE = UserContext.from_request(user_id="alice")
BOB = UserContext.from_request(user_id="bob")



async def subscribed(session: UserSession, threads: tuple[str, ...] = ("t1",)) -> Client:
    client, _ = await connect(session, threads)
    for _ in threads:
        assert (await client.receive())["type"] == "subscribed"
    return client


async def assert_usable(client: Client, session: UserSession, ping_id: Any = "alive") -> None:
    """A ping gets its pong and an event on t1 still arrives, in that order."""
    await client.send({"type": "ping", "id": ping_id})
    assert await client.receive() == {"type": "pong", "id": ping_id}
    seq = await session.send_to_thread("t1", thinking("still flowing"))
    event = await client.receive()
    assert (event["type"], event["thread_id"], event["seq"]) == ("agent_thinking", "t1", seq)


# ---- ping ---------------------------------------------------------------------------------


@pytest.mark.parametrize("ping_id", [1, "abc", 0, [1, 2], {"nested": True}, 2.5, False])
async def test_ping_gets_a_pong_echoing_its_id(manager: ConnectionManager, ping_id: Any) -> None:
    session = manager.get_websocket_manager(ALICE)
    client, _ = await connect(session)
    await client.send({"type": "ping", "id": ping_id})
    assert await client.receive() == {"type": "pong", "id": ping_id}


async def test_ping_without_id_gets_a_bare_pong(manager: ConnectionManager) -> None:
    session = manager.get_websocket_manager(ALICE)
    client, _ = await connect(session)
    await client.send({"type": "ping"})
    assert await client.receive() == {"type": "pong"}


# ---- error frames: the connection stays usable ------------------------------------------------


@pytest.mark.parametrize(
    ("frame", "code"),
    [
        ("{not json", "bad_json"),
        ("", "bad_json"),
        ('{"type": "ping"', "bad_json"),
        ("[1, 2, 3]", "bad_frame"),
        ("42", "bad_frame"),
        ('"ping"', "bad_frame"),
        ("null", "bad_frame"),
        ("{}", "bad_frame"),
        ('{"type": 7}', "bad_frame"),
        ('{"type": ""}', "bad_frame"),
        ('{"type": "user_message", "text": "hi"}', "unknown_type"),
        ('{"type": "subscribe"}', "invalid_field"),
        ('{"type": "subscribe", "thread_id": 5}', "invalid_field"),
        ('{"type": "subscribe", "thread_id": ""}', "invalid_field"),
        ('{"type": "subscribe", "thread_id": "None"}', "invalid_field"),
        ('{"type": "subscribe", "thread_id": "no spaces"}', "invalid_field"),
        ('{"type": "subscribe", "thread_id": "t2", "since_seq": "3"}', "invalid_field"),
        ('{"type": "subscribe", "thread_id": "t2", "since_seq": -1}', "invalid_field"),
        ('{"type": "subscribe", "thread_id": "t2", "since_seq": 1.5}', "invalid_field"),
        ('{"type": "subscribe", "thread_id": "t2", "since_seq": true}', "invalid_field"),
        ('{"type": "subscribe", "thread_id": "t2", "epoch": 3}', "invalid_field"),
        ('{"type": "unsubscribe"}', "invalid_field"),
        ('{"type": "cancel_run"}', "invalid_field"),
        ('{"type": "cancel_run", "run_id": "run-nope"}', "unknown_run"),
    ],
)
async def test_a_bad_frame_gets_an_error_frame_and_the_connection_stays_usable(
    manager: ConnectionManager, frame: str, code: str
) -> None:
    session = manager.get_websocket_manager(ALICE)
    client = await subscribed(session)
    await client.send(frame)
    error = await client.receive()
    assert error["type"] == "error"
    assert error["code"] == code
    assert isinstance(error["message"], str)
    assert error["message"]
    await assert_usable(client, session)
    stats = session.get_stats()
    assert stats.protocol_errors == 1
    assert stats.connections == 1
    # The faulty frame changed nothing: still exactly the one subscription.
    assert [c.threads for c in session.connections()] == [frozenset({"t1"})]


async def test_many_bad_frames_in_a_row_are_each_answered(manager: ConnectionManager) -> None:
    session = manager.get_websocket_manager(ALICE)
    client = await subscribed(session)
    for frame in ("{", "[]", '{"type": "subscribe"}', '{"type": "nope"}') * 3:
        await client.send(frame)
    codes = [(await client.receive())["code"] for _ in range(12)]
    assert codes == ["bad_json", "bad_frame", "invalid_field", "unknown_type"] * 3
    await assert_usable(client, session)
    assert session.get_stats().protocol_errors == 12


# ---- faults that close the connection --------------------------------------------------------


async def test_a_binary_frame_closes_with_1003(manager: ConnectionManager) -> None:
    session = manager.get_websocket_manager(ALICE)
    client = await subscribed(session)
    await client.transport.send_message(b'{"type": "ping"}')
    frames, code = await client.receive_closed()
    assert frames == []
    assert code == CloseCode.UNSUPPORTED_DATA
    assert session.get_stats().protocol_errors == 1


async def test_an_oversize_frame_closes_with_1009() -> None:
    async with agentcast.open_manager(Config(max_message_bytes=1024)) as manager:
        session = manager.get_websocket_manager(ALICE)
        client = await subscribed(session)
        # Exactly at the limit is fine.
        frame = {"type": "ping", "id": ""}
        frame["id"] = "x" * (1024 - len(json.dumps(frame)))
        assert len(json.dumps(frame).encode()) == 1024
        await client.send(frame)
        assert (await client.receive())["type"] == "pong"
        # One byte over closes.
        frame["id"] += "x"
        await client.send(frame)
        frames, code = await client.receive_closed()
        assert frames == []
        assert code == CloseCode.MESSAGE_TOO_BIG


async def test_the_size_limit_counts_utf8_bytes_not_characters() -> None:
    async with agentcast.open_manager(Config(max_message_bytes=1024)) as manager:
        session = manager.get_websocket_manager(ALICE)
        client = await subscribed(session)
        text = json.dumps({"type": "ping", "id": "é" * 600}, ensure_ascii=False)
        assert len(text) < 1024 < len(text.encode())
        await client.send(text)
        frames, code = await client.receive_closed()
        assert frames == []
        assert code == CloseCode.MESSAGE_TOO_BIG


@pytest.mark.parametrize(
    ("message", "code"),
    [(b"binary", CloseCode.UNSUPPORTED_DATA), ("x" * 2000, CloseCode.MESSAGE_TOO_BIG)],
)
async def test_a_protocol_close_keeps_its_code_while_events_are_being_written(
    message: str | bytes, code: int
) -> None:
    # The writer is busy with a burst (one message after another) when the reader closes: no
    # write is cut part-way, so the close must be polite and carry its code, not abort (1006).
    async with agentcast.open_manager(Config(max_message_bytes=1024)) as manager:
        session = manager.get_websocket_manager(ALICE)
        client, connection = await connect(session, ("t1",))
        for index in range(20):
            await session.send_to_thread("t1", thinking(f"burst {index}"))
        await client.transport.send_message(message)
        frames, seen = await client.receive_closed()
        assert connection.close_code == code
        assert seen == code
        assert [f["seq"] for f in frames[1:]] == list(range(1, len(frames)))


async def test_other_users_are_unaffected_by_a_protocol_close(
    manager: ConnectionManager,
) -> None:
    alice = manager.get_websocket_manager(ALICE)
    bob = manager.get_websocket_manager(BOB)
    alice_client = await subscribed(alice)
    alice_other = await subscribed(alice)
    bob_client = await subscribed(bob)
    await alice_client.transport.send_message(b"\x00")
    _, code = await alice_client.receive_closed()
    assert code == CloseCode.UNSUPPORTED_DATA
    await assert_usable(alice_other, alice)
    await assert_usable(bob_client, bob)


# ---- the rate limit ---------------------------------------------------------------------------

RATE_LIMITED = Config(inbound_rate=5.0, inbound_burst=5, rate_limit_strikes=3)


async def test_a_flood_gets_rate_limited_error_frames_then_4029(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with agentcast.open_manager(RATE_LIMITED) as manager:
        alice = manager.get_websocket_manager(ALICE)
        bob = manager.get_websocket_manager(BOB)
        client = await subscribed(alice)
        bob_client = await subscribed(bob)
        start = trio.current_time()
        # One ping at a time, so every answer is read before the next ping (no time passes).
        for index in range(5):  # the burst allowance
            await client.send({"type": "ping", "id": index})
            assert await client.receive() == {"type": "pong", "id": index}
        for index in range(3):  # each frame past the limit is a strike, answered with an error
            await client.send({"type": "ping", "id": index})
            error = await client.receive()
            assert (error["type"], error["code"]) == ("error", "rate_limited")
            # Bob shares nothing with alice's limiter.
            await assert_usable(bob_client, bob, ping_id=index)
        await client.send({"type": "ping", "id": "one too many"})
        frames, code = await client.receive_closed()
        assert trio.current_time() == start
        assert frames == []
        assert code == CloseCode.RATE_LIMITED
        stats = manager.get_stats()
        assert stats.rate_limit_disconnects == 1
        assert stats.per_user["alice"].rate_limit_disconnects == 1
        assert stats.per_user["alice"].protocol_errors == 3
        assert stats.per_user["bob"].rate_limit_disconnects == 0
        await assert_usable(bob_client, bob, ping_id="after")


async def test_a_flood_sent_at_once_ends_with_4029(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with agentcast.open_manager(RATE_LIMITED) as manager:
        alice = manager.get_websocket_manager(ALICE)
        bob = manager.get_websocket_manager(BOB)
        client, connection = await connect(alice)
        bob_client = await subscribed(bob)
        sent = 0
        with contextlib.suppress(ConnectionClosed):  # the server may hang up mid-flood
            for index in range(30):
                await client.send({"type": "ping", "id": index})
                sent += 1
        await connection.wait_closed()
        assert sent >= 9
        assert connection.close_code == CloseCode.RATE_LIMITED
        frames, code = await client.receive_closed()
        # The close drains what was queued: the burst's pongs, one rate_limited error per
        # strike, then the close frame itself.
        assert code == CloseCode.RATE_LIMITED
        assert frames == [{"type": "pong", "id": index} for index in range(5)] + [
            {"type": "error", "code": "rate_limited", "message": frames[5]["message"]}
        ] * 3
        assert manager.get_stats().rate_limit_disconnects == 1
        await assert_usable(bob_client, bob)


async def test_the_rate_limit_refills_with_time(autojump_clock: trio.testing.MockClock) -> None:
    async with agentcast.open_manager(RATE_LIMITED) as manager:
        alice = manager.get_websocket_manager(ALICE)
        client = await subscribed(alice)
        for round_ in range(4):
            for index in range(5):
                await client.send({"type": "ping", "id": index})
                assert await client.receive() == {"type": "pong", "id": index}
            for _ in range(3):
                await client.send({"type": "ping"})
                assert (await client.receive())["code"] == "rate_limited"
            await trio.sleep(1.0)  # 5 tokens per second: the bucket is full again
            assert round_ < 4
        await assert_usable(client, alice)
        assert alice.get_stats().rate_limit_disconnects == 0


# ---- subscriptions ----------------------------------------------------------------------------


async def test_too_many_subscriptions_is_an_error_frame() -> None:
    async with agentcast.open_manager(Config(max_subscriptions=2)) as manager:
        session = manager.get_websocket_manager(ALICE)
        client = await subscribed(session, ("t1", "t2"))
        await client.send({"type": "subscribe", "thread_id": "t3"})
        error = await client.receive()
        assert (error["type"], error["code"]) == ("error", "too_many_subscriptions")
        # Re-subscribing to a thread already held is fine.
        await client.send({"type": "subscribe", "thread_id": "t1"})
        assert (await client.receive())["type"] == "subscribed"
        await session.send_to_thread("t3", thinking("not for this connection"))
        await assert_usable(client, session)
        # Freeing a slot makes room.
        await client.send({"type": "unsubscribe", "thread_id": "t2"})
        assert await client.receive() == {"type": "unsubscribed", "thread_id": "t2"}
        await client.send({"type": "subscribe", "thread_id": "t3"})
        ack = await client.receive()
        assert (ack["type"], ack["thread_id"], ack["seq"]) == ("subscribed", "t3", 1)
        assert [c.threads for c in session.connections()] == [frozenset({"t1", "t3"})]


async def test_unsubscribe_is_acked_and_stops_delivery(manager: ConnectionManager) -> None:
    session = manager.get_websocket_manager(ALICE)
    client = await subscribed(session, ("t1", "t2"))
    await session.send_to_thread("t1", thinking("before"))
    assert (await client.receive())["seq"] == 1
    await client.send({"type": "unsubscribe", "thread_id": "t1"})
    assert await client.receive() == {"type": "unsubscribed", "thread_id": "t1"}
    await session.send_to_thread("t1", thinking("after"))
    await session.send_to_thread("t2", thinking("other thread"))
    event = await client.receive()
    assert (event["thread_id"], event["seq"]) == ("t2", 1)
    # Unsubscribing from a thread not subscribed to is acked too.
    await client.send({"type": "unsubscribe", "thread_id": "t9"})
    assert await client.receive() == {"type": "unsubscribed", "thread_id": "t9"}
    await client.send({"type": "ping"})
    assert await client.receive() == {"type": "pong"}
    assert [c.threads for c in session.connections()] == [frozenset({"t2"})]


# ---- custom frame types -------------------------------------------------------------------------


async def test_a_custom_frame_reaches_the_message_handler() -> None:
    calls: list[tuple[UserSession, Connection, dict[str, Any]]] = []

    async def handler(
        session: UserSession, connection: Connection, payload: dict[str, Any]
    ) -> None:
        calls.append((session, connection, payload))
        if payload.get("text") == "refuse":
            raise ClientError("not_allowed", "no")
        await session.send_to_thread(payload["thread_id"], thinking(f"echo {payload['text']}"))

    async with agentcast.open_manager(message_handler=handler) as manager:
        session = manager.get_websocket_manager(ALICE)
        client, connection = await connect(session, ("t1",))
        assert (await client.receive())["type"] == "subscribed"
        frame = {"type": "user_message", "thread_id": "t1", "text": "hello", "extra": [1, 2]}
        await client.send(frame)
        event = await client.receive()
        assert (event["type"], event["data"]) == ("agent_thinking", {"text": "echo hello"})
        assert calls == [(session, connection, frame)]
        assert calls[0][1].user_id == "alice"

        await client.send({"type": "user_message", "thread_id": "t1", "text": "refuse"})
        assert await client.receive() == {
            "type": "error", "code": "not_allowed", "message": "no",
        }
        # A bad id passed on by the handler is the client's fault: an error frame, no crash.
        await client.send({"type": "user_message", "thread_id": "bad id", "text": "x"})
        error = await client.receive()
        assert (error["type"], error["code"]) == ("error", "invalid_field")
        await assert_usable(client, session)
        assert manager.get_stats().session_crashes == 0
        assert len(calls) == 3


# ---- invalid UTF-8 (lone surrogates) -----------------------------------------------------------


async def test_a_lone_surrogate_closes_with_1007(manager: ConnectionManager) -> None:
    # A text frame that is not valid UTF-8 (a real WebSocket library refuses it on receipt;
    # a str carrying a lone surrogate is how it reaches us through other transports).
    session = manager.get_websocket_manager(ALICE)
    client = await subscribed(session)
    await client.send('{"type": "ping", "id": "\ud800"}')
    frames, code = await client.receive_closed()
    assert frames == []
    assert code == CloseCode.INVALID_PAYLOAD

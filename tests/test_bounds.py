"""Bounded resources in the core (issue 9): runs per user, frames no reply can crash on,
connection slots per user, and streams and retained bytes per user and per manager.

Rules: no sockets here (tests/test_server_bounds.py has the real-socket versions), no sleeps
as synchronisation, ``autojump_clock`` or ``MockClock`` for anything timed.
"""

from __future__ import annotations

import gc
import json
import time
import tracemalloc
from typing import Any

import attrs
import coredis
import orjson
import pytest
import trio
import trio.testing
from hypothesis import given, settings
from hypothesis import strategies as st
from trio_websocket import ConnectionClosed

import agentcast
from agentcast import (
    AgentEvent,
    ClientError,
    Config,
    ConnectionManager,
    EventType,
    InMemoryBroker,
    RedisBroker,
    Run,
    TooManyConnections,
    TooManyRuns,
    TooManyThreads,
    UserContext,
    UserSession,
)
from agentcast._events import encode_envelope
from agentcast._protocol import (
    MAX_FRAME_DEPTH,
    Ping,
    ProtocolError,
    error_frame,
    parse_client_frame,
)
from agentcast.testing import MemoryTransport

from .helpers import connect, thinking
from .redis_server import RedisServer

ALICE = UserContext.from_request(user_id="alice")
MAX_BYTES = 64 * 1024


def nested(depth: int) -> str:
    """A ping whose id nests ``depth`` arrays (the frame object itself is one more level)."""
    return '{"type": "ping", "id": ' + "[" * depth + "]" * depth + "}"


# ---- parse-time depth cap (pure) ------------------------------------------------------------


def test_a_frame_at_the_depth_cap_parses_and_its_pong_encodes() -> None:
    frame = parse_client_frame(nested(MAX_FRAME_DEPTH - 1), max_bytes=MAX_BYTES)
    assert isinstance(frame, Ping)
    assert orjson.dumps(frame.id)  # the reply encoder accepts everything the parser lets in


@pytest.mark.parametrize("depth", [MAX_FRAME_DEPTH, 300, 1000])
def test_a_frame_past_the_depth_cap_is_bad_frame(depth: int) -> None:
    with pytest.raises(ProtocolError) as info:
        parse_client_frame(nested(depth), max_bytes=MAX_BYTES)
    assert info.value.code == "bad_frame"
    assert info.value.close_code is None  # an error frame; the connection stays usable
    assert str(MAX_FRAME_DEPTH) in info.value.message


def test_many_shallow_brackets_are_not_mistaken_for_depth() -> None:
    text = json.dumps({"type": "ping", "id": [[1]] * 1000, "s": "[[[[{{{{" * 10})
    assert isinstance(parse_client_frame(text, max_bytes=MAX_BYTES), Ping)


def test_an_error_frame_that_cannot_be_encoded_becomes_bad_frame() -> None:
    frame = json.loads(error_frame("oops", "echoing \ud800 from the client"))
    assert frame["type"] == "error"
    assert frame["code"] == "bad_frame"


# ---- runs per user --------------------------------------------------------------------------


async def wait_forever(run: Run) -> None:
    await trio.sleep_forever()


async def test_start_run_past_the_limit_raises_too_many_runs(autojump_clock: Any) -> None:
    config = Config(max_active_runs_per_user=3)
    async with agentcast.open_manager(config) as manager:
        session = manager.get_websocket_manager(ALICE)
        bob = manager.get_websocket_manager(UserContext.from_request(user_id="bob"))
        run_ids = [session.start_run("t1", wait_forever) for _ in range(3)]
        with pytest.raises(TooManyRuns, match="max_active_runs_per_user"):
            session.start_run("t1", wait_forever)
        with pytest.raises(TooManyRuns):
            async with session.run("t2"):
                raise AssertionError("the body of a refused run must not run")
        # Another user's limit is their own.
        bob.start_run("t1", wait_forever)
        # Ending one run frees its place.
        assert session.cancel_run(run_ids[0])
        await trio.testing.wait_all_tasks_blocked()
        assert len(session.active_runs()) == 2
        session.start_run("t1", wait_forever)
        assert session.get_stats().runs_started == 4
        assert issubclass(TooManyRuns, agentcast.AgentcastError)


async def test_a_handler_starting_too_many_runs_answers_too_many_runs(
    autojump_clock: Any,
) -> None:
    async def handler(session: UserSession, connection: Any, frame: dict[str, Any]) -> None:
        await trio.lowlevel.checkpoint()
        session.start_run(frame["thread_id"], wait_forever)

    config = Config(max_active_runs_per_user=2, inbound_rate=1000.0, inbound_burst=100)
    async with agentcast.open_manager(config, message_handler=handler) as manager:
        session = manager.get_websocket_manager(ALICE)
        client, _ = await connect(session, ("t1",))
        assert (await client.receive())["type"] == "subscribed"
        for _ in range(5):
            await client.send({"type": "user_message", "thread_id": "t1", "text": "hi"})
        await client.send({"type": "ping", "id": "after"})
        frames = await client.receive_until("pong")
        errors = [f for f in frames if f["type"] == "error"]
        assert [f["code"] for f in errors] == ["too_many_runs"] * 3
        assert len(session.active_runs()) == 2
        assert manager.get_stats().session_crashes == 0


# ---- no client input raises inside a session ------------------------------------------------

#: Close codes a hostile frame may legitimately end its connection with (docs/protocol.md).
DOCUMENTED_CLOSES = {1003, 1007, 1008, 1009, 4029}
#: Frame types that always get exactly one answer (a reply frame or an error frame).
ANSWERED = {"ping": "pong", "subscribe": "subscribed", "unsubscribe": "unsubscribed"}

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20),
    lambda children: st.lists(children, max_size=4)
    | st.dictionaries(st.text(max_size=8), children, max_size=4),
    max_leaves=20,
)
field_names = st.sampled_from(["id", "thread_id", "since_seq", "epoch", "run_id", "text"])
frame_types = st.sampled_from(
    ["ping", "subscribe", "unsubscribe", "cancel_run", "user_message", "other", ""]
)
hostile_texts = st.sampled_from([
    nested(40), nested(600), '{"type": "ping", "id": ' + "9" * 400 + "}",
    '{"type": "ping", "id": "\\ud800"}', '{"type": "subscribe", "thread_id": "\\udfff"}',
    '{"type": "ping", "id": NaN}', '{"type": "ping", "id": 1e999}',
    '{"type": "subscribe", "thread_id": "t1", "since_seq": 18446744073709551615}',
    '{"type": "subscribe", "thread_id": "t1", "since_seq": -1}',
    '{"type": "user_message", "thread_id": "t1", "text": "\\u0000"}', "[]", "null", '"x"',
])
frames = st.one_of(
    st.builds(
        lambda kind, fields: json.dumps({**fields, "type": kind}),
        frame_types, st.dictionaries(field_names, json_values, max_size=4),
    ),
    hostile_texts,
)


async def echo_agent(run: Run, text: str) -> None:
    await run.text(text)


async def start_a_run(session: UserSession, connection: Any, frame: dict[str, Any]) -> None:
    """Like the demo handler: a run on the client's thread id with the client's text."""
    await trio.lowlevel.checkpoint()
    thread_id, text = frame.get("thread_id"), frame.get("text")
    if not isinstance(text, str):
        raise ClientError("invalid_field", "text must be a string")
    session.start_run(thread_id, echo_agent, text)  # type: ignore[arg-type]


async def play_frames(texts: list[str]) -> None:
    config = Config(inbound_rate=1e6, inbound_burst=10_000, max_active_runs_per_user=4)
    async with agentcast.open_manager(config, message_handler=start_a_run) as manager:
        session = manager.get_websocket_manager(ALICE)
        client, connection = await connect(session, capacity=1024)
        for number, text in enumerate(texts):
            await client.send(text)
            await client.send({"type": "ping", "id": f"sentinel-{number}"})
            try:
                replies = await client.receive_until("pong")
                while replies[-1].get("id") != f"sentinel-{number}":
                    replies += await client.receive_until("pong")
            except ConnectionClosed:
                await connection.wait_closed()
                assert connection.close_code in DOCUMENTED_CLOSES, (text, connection.close_code)
                break
            answers = [f for f in replies[:-1] if f["type"] in {"pong", "subscribed",
                                                                "unsubscribed", "error"}]
            try:
                kind = json.loads(text).get("type")
            except (ValueError, AttributeError):
                kind = None
            if kind in ANSWERED:
                assert len(answers) == 1, (text, replies)
                assert answers[0]["type"] in {ANSWERED[kind], "error"}
        stats = manager.get_stats()
        assert stats.session_crashes == 0
        assert not session.closed


@settings(deadline=None, max_examples=150)
@given(texts=st.lists(frames, min_size=1, max_size=8))
def test_no_client_frame_crashes_the_session(texts: list[str]) -> None:
    trio.run(play_frames, texts, clock=trio.testing.MockClock(autojump_threshold=0))


async def test_a_deeply_nested_ping_gets_bad_frame_and_the_session_lives(
    manager: ConnectionManager,
) -> None:
    session = manager.get_websocket_manager(ALICE)
    client, _ = await connect(session, ("t1",))
    other, _ = await connect(session, ("t1",))
    assert (await client.receive())["type"] == (await other.receive())["type"] == "subscribed"
    await client.send(nested(600))
    error = await client.receive()
    assert (error["type"], error["code"]) == ("error", "bad_frame")
    seq = await session.send_to_thread("t1", thinking("still here"))
    assert (await client.receive())["seq"] == (await other.receive())["seq"] == seq
    assert manager.get_stats().session_crashes == 0


def test_config_names_the_new_limits() -> None:
    config = Config()
    assert config.max_active_runs_per_user == 8
    assert config.max_connections_per_user is None
    with pytest.raises(ValueError, match="max_active_runs_per_user"):
        attrs.evolve(config, max_active_runs_per_user=0)
    with pytest.raises(ValueError, match="max_connections_per_user"):
        attrs.evolve(config, max_connections_per_user=0)



# ---- connection slots per user (embedders get the server's limit) -------------------------


async def test_reserved_slots_count_against_the_limit_and_come_back() -> None:
    config = Config(max_connections_per_user=2, session_linger=5.0)
    async with agentcast.open_manager(config) as manager:
        session = manager.get_websocket_manager(ALICE)
        first = session.reserve_connection()
        second = session.reserve_connection()
        with pytest.raises(TooManyConnections, match="max_connections_per_user"):
            session.reserve_connection()
        with pytest.raises(TooManyConnections):
            await connect(session)  # add_connection without a slot reserves one itself
        assert session.get_stats().reserved_connections == 2
        server, _ = MemoryTransport.pair()
        connection = await session.add_connection(server, slot=first)
        stats = session.get_stats()
        assert (stats.connections, stats.reserved_connections) == (1, 1)
        with pytest.raises(ValueError, match="not a reserved slot"):
            await session.add_connection(MemoryTransport.pair()[0], slot=first)
        second.release()
        second.release()  # idempotent
        assert session.get_stats().reserved_connections == 0
        await connect(session)
        with pytest.raises(TooManyConnections):
            session.reserve_connection()
        await session.remove_connection(connection.connection_id)
        session.reserve_connection().release()


async def test_a_slot_is_released_when_add_connection_fails_or_is_cancelled() -> None:
    config = Config(max_connections_per_user=1, session_linger=5.0)
    async with agentcast.open_manager(config) as manager:
        # A fresh session: add_connection waits for its nursery, and is cancelled there.
        session = manager.get_websocket_manager(ALICE)
        slot = session.reserve_connection()
        with trio.CancelScope() as scope:
            scope.cancel()
            await session.add_connection(MemoryTransport.pair()[0], slot=slot)
        assert not slot.reserved
        assert session.get_stats().reserved_connections == 0
        # A bad thread id fails before anything is registered; the slot comes back too.
        slot = session.reserve_connection()
        with pytest.raises(agentcast.InvalidIdentifier):
            await session.add_connection(MemoryTransport.pair()[0], threads=["bad id"], slot=slot)
        assert session.get_stats().reserved_connections == 0
        await connect(session)  # the single place is free


async def test_a_reserved_slot_keeps_the_session_from_lingering_out(
    autojump_clock: Any,
) -> None:
    config = Config(max_connections_per_user=3, session_linger=1.0)
    async with agentcast.open_manager(config) as manager:
        session = manager.get_websocket_manager(ALICE)
        slot = session.reserve_connection()
        await trio.sleep(10 * config.session_linger)
        assert not session.closed
        await session.add_connection(MemoryTransport.pair()[0], slot=slot)
        assert session.get_stats().connections == 1


# ---- streams per user and retained bytes (in-memory broker) --------------------------------


@attrs.define
class UsageSink:
    """An EventSink whose "in use" threads the test decides."""

    in_use: set[tuple[str, str]] = attrs.Factory(set)

    def deliver_thread(self, user_id: str, thread_id: str, seq: int, frame: str) -> None:
        pass

    def deliver_user(self, user_id: str, frame: str) -> None:
        pass

    def deliver_all(self, frame: str) -> None:
        pass

    def holds_user(self, user_id: str) -> bool:
        return True

    def holds_thread(self, user_id: str, thread_id: str) -> bool:
        return (user_id, thread_id) in self.in_use

    def reset_connections(self, reason: str) -> None:
        pass


def text_event(size: int = 100) -> AgentEvent:
    return AgentEvent(EventType.AGENT_TEXT, {"text": "x" * size})


async def test_a_new_stream_at_the_cap_evicts_the_least_recently_used_idle_one() -> None:
    broker = InMemoryBroker(Config(max_threads_per_user=3))
    sink = UsageSink(in_use={("alice", "t0")})
    async with trio.open_nursery() as nursery:
        await nursery.start(broker.serve, sink)
        for n in range(3):
            await broker.publish("alice", f"t{n}", text_event())
        old_t1 = await broker.recover("alice", "t1", 1, None)
        await broker.publish("alice", "t1", text_event())  # t1 is now newer than t2
        await broker.publish("bob", "t0", text_event())  # another user's streams are apart
        await broker.recover("alice", "new", None, None)
        assert broker.statistics().streams == 4
        # t0 is in use and t1 was used after t2: t2 went.
        assert (await broker.recover("alice", "t0", 0, None)).recovered
        assert (await broker.recover("alice", "t1", 0, None)).recovered
        gone = await broker.recover("alice", "t2", 1, None)  # evicts the next idle one
        assert (gone.recovered, gone.latest_seq) == (False, 0)
        assert (await broker.recover("alice", "t1", 2, old_t1.epoch)).recovered
        nursery.cancel_scope.cancel()


async def test_a_subscribe_at_the_cap_with_every_stream_in_use_creates_nothing() -> None:
    broker = InMemoryBroker(Config(max_threads_per_user=2))
    sink = UsageSink(in_use={("alice", "t0"), ("alice", "t1")})
    async with trio.open_nursery() as nursery:
        await nursery.start(broker.serve, sink)
        await broker.recover("alice", "t0", None, None)
        await broker.recover("alice", "t1", None, None)
        with pytest.raises(TooManyThreads, match="max_threads_per_user"):
            await broker.recover("alice", "t2", None, None)
        assert broker.statistics().streams == 2
        # A run's publish is never refused (it must be able to send its terminal event).
        assert await broker.publish("alice", "t2", text_event()) == 1
        assert broker.statistics().streams == 3
        # Once a stream is free again, the next new one replaces it: back at the cap.
        sink.in_use = {("alice", "t0")}
        await broker.recover("alice", "t3", None, None)
        assert broker.statistics().streams == 3
        await broker.recover("alice", "t4", None, None)
        assert broker.statistics().streams == 3
        nursery.cancel_scope.cancel()


async def test_past_the_byte_budget_the_least_recently_used_stream_loses_its_oldest() -> None:
    one = len(encode_envelope(text_event(), thread_id="a", seq=1, ts=time.time()))
    budget = 10 * one + one // 2
    broker = InMemoryBroker(Config(max_retained_bytes=budget))
    async with trio.open_nursery() as nursery:
        await nursery.start(broker.serve, UsageSink())
        for _ in range(6):
            await broker.publish("alice", "a", text_event())
        epoch = (await broker.recover("alice", "a", 6, None)).epoch
        for _ in range(6):
            await broker.publish("alice", "b", text_event())
        stats = broker.statistics()
        assert stats.retained_bytes <= budget
        assert stats.retained_events == 10
        # "a" was used least recently: its two oldest events went, never a partial replay.
        assert not (await broker.recover("alice", "a", 0, epoch)).recovered
        replay = await broker.recover("alice", "a", 2, epoch)
        assert replay.recovered
        assert [json.loads(f)["seq"] for f in replay.frames] == [3, 4, 5, 6]
        # "b" was used last: it kept everything.
        assert len((await broker.recover("alice", "b", 0, None)).frames) == 6
        nursery.cancel_scope.cancel()


async def test_a_subscribe_past_the_users_thread_cap_gets_too_many_threads() -> None:
    config = Config(max_threads_per_user=3, session_linger=5.0)
    async with agentcast.open_manager(config) as manager:
        session = manager.get_websocket_manager(ALICE)
        client, connection = await connect(session, ("t0", "t1", "t2"))
        for _ in range(3):
            assert (await client.receive())["type"] == "subscribed"
        await client.send({"type": "subscribe", "thread_id": "t3"})
        error = await client.receive()
        assert (error["type"], error["code"]) == ("error", "too_many_threads")
        assert connection.threads == {"t0", "t1", "t2"}
        assert not session.holds_thread("t3")
        assert manager.get_stats().broker_streams == 3
        # Unsubscribing frees one: the next new thread takes its place.
        await client.send({"type": "unsubscribe", "thread_id": "t0"})
        assert (await client.receive())["type"] == "unsubscribed"
        await client.send({"type": "subscribe", "thread_id": "t3"})
        assert (await client.receive())["type"] == "subscribed"
        assert manager.get_stats().broker_streams == 3


async def test_one_user_subscribing_to_thousands_of_threads_stays_bounded() -> None:
    """FAULTS.md row 25: reconnecting resets max_subscriptions, so only the per-user stream
    cap and the byte budget bound this; memory stays flat (a generous bound, no timing)."""
    cap, budget, per_connection = 200, 300_000, 50
    config = Config(
        max_threads_per_user=cap, max_retained_bytes=budget, max_subscriptions=per_connection,
        inbound_rate=1e6, inbound_burst=10_000, session_linger=5.0,
    )
    async with agentcast.open_manager(config) as manager:
        session = manager.get_websocket_manager(ALICE)
        bystander = manager.get_websocket_manager(UserContext.from_request(user_id="bob"))
        watcher, _ = await connect(bystander, ("t1",))
        assert (await watcher.receive())["type"] == "subscribed"
        names = iter(range(10**9))

        async def one_round() -> None:
            client, connection = await connect(session, capacity=1024)
            for _ in range(per_connection):
                thread_id = f"t-{next(names)}"
                await client.send({"type": "subscribe", "thread_id": thread_id})
                assert (await client.receive())["type"] == "subscribed"
                # The server answers on each thread (like a run would): retained bytes.
                await session.send_to_thread(thread_id, text_event(400))
                assert (await client.receive())["thread_id"] == thread_id
            await session.remove_connection(connection.connection_id)
            stats = manager.get_stats()
            assert stats.broker_streams <= cap + 1  # bob's stream
            assert stats.broker_retained_bytes <= budget

        tracemalloc.start()
        try:
            for _ in range(10):  # warm up: the caps are reached
                await one_round()
            gc.collect()
            before = tracemalloc.get_traced_memory()[0]
            for _ in range(60):  # 3 000 more new thread ids
                await one_round()
            gc.collect()
            after = tracemalloc.get_traced_memory()[0]
        finally:
            tracemalloc.stop()
        # Unbounded, 3 000 streams with a 400-byte event each grow by several MB.
        assert after - before < 1_000_000, after - before
        stats = manager.get_stats()
        assert stats.broker_streams == cap + 1
        assert stats.per_user["alice"].connections == 0
        seq = await bystander.send_to_thread("t1", thinking("bob is fine"))
        assert (await watcher.receive())["seq"] == seq


# ---- the Redis broker bounds the keys a subscribe creates ----------------------------------


async def test_redis_subscribes_past_the_users_thread_cap_create_no_keys(
    redis_server: RedisServer,
) -> None:
    cap = 5
    config = Config(max_threads_per_user=cap, session_linger=0.2)
    with trio.fail_after(30):
        async with agentcast.open_manager(
            config, broker=RedisBroker(redis_server.url, config)
        ) as manager:
            session = manager.get_websocket_manager(ALICE)
            for round_number in range(4):  # reconnecting resets max_subscriptions
                client, connection = await connect(session)
                for n in range(cap):
                    thread_id = f"t-{round_number}-{n}"
                    await client.send({"type": "subscribe", "thread_id": thread_id})
                    frame = await client.receive()
                    expected = "subscribed" if round_number == 0 else "error"
                    assert frame["type"] == expected, frame
                    if expected == "error":
                        assert frame["code"] == "too_many_threads"
                await session.remove_connection(connection.connection_id)
            # A thread already known is still subscribable; a publish is never refused.
            client, _ = await connect(session, ("t-0-0",))
            assert (await client.receive())["recovered"] is False
            assert await session.send_to_thread("t-0-1", thinking("still works")) == 1
            bob = manager.get_websocket_manager(UserContext.from_request(user_id="bob"))
            bob_client, _ = await connect(bob, ("t-9",))
            assert (await bob_client.receive())["type"] == "subscribed"
        async with coredis.Redis.from_url(redis_server.url, decode_responses=True) as admin:
            metas = [key async for key in admin.scan_iter(match="agentcast:{alice}:t:*:meta")]
            assert len(metas) == cap
            assert await admin.zcard("agentcast:{alice}:threads") == cap
            assert 0 < await admin.ttl("agentcast:{alice}:threads") <= config.history_ttl + 86400

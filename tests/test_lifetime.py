"""Lifetimes: sessions linger then close without leftovers, a crash stays inside one user's
session, shutdown cancels runs and closes every connection in bounded time."""

from __future__ import annotations

import math
from typing import Any

import attrs
import pytest
import trio
import trio.testing
from hypothesis import given, settings
from hypothesis import strategies as st

import agentcast
from agentcast import (
    ClientError,
    CloseCode,
    Config,
    Connection,
    ConnectionManager,
    Run,
    UserContext,
    UserSession,
)
from agentcast.testing import MemoryTransport

from .helpers import Client, connect, settle

ALICE = UserContext.from_request(user_id="alice")
BOB = UserContext.from_request(user_id="bob")
LINGER = 5.0  # the conftest config's session_linger


async def subscribed(session: UserSession, thread_id: str = "t1", **kw: Any) -> Client:
    client, _ = await connect(session, (thread_id,), **kw)
    assert (await client.receive())["type"] == "subscribed"
    return client


def assert_fully_closed(session: UserSession) -> None:
    stats = session.get_stats()
    assert stats.connections == 0
    assert stats.open_channels == 0
    assert stats.live_tasks == 0
    assert stats.active_runs == 0
    assert stats.closed is True
    assert session.closed


async def _sleep_forever(run: Run) -> None:
    await trio.sleep_forever()


# ---- linger -------------------------------------------------------------------------------


async def test_an_idle_session_lingers_then_closes_without_leftovers(
    manager: ConnectionManager, config: Config, autojump_clock: trio.testing.MockClock
) -> None:
    assert config.session_linger == LINGER
    baseline_tasks = manager.get_stats().live_tasks
    assert baseline_tasks >= 1  # the broker

    session = agentcast.get_websocket_manager(ALICE)
    client, connection = await connect(session, ("t1",))
    assert (await client.receive())["type"] == "subscribed"
    assert manager.get_stats().live_tasks > baseline_tasks

    # The last connection closes: the session lingers.
    await client.transport.aclose()
    await connection.wait_closed()
    await trio.sleep(LINGER - 0.5)
    assert manager.session("alice") is session
    assert not session.closed
    assert session.get_stats().connections == 0

    # A reconnect within the linger finds the very same session.
    assert agentcast.get_websocket_manager(ALICE) is session
    client2, connection2 = await connect(session)
    await client2.send({"type": "ping", "id": 1})
    assert await client2.receive() == {"type": "pong", "id": 1}
    await client2.transport.aclose()
    await connection2.wait_closed()
    closed_at = trio.current_time()

    # Idle again: still there just before the linger ends, gone just after.
    await trio.sleep(LINGER - 0.1)
    assert manager.session("alice") is session
    assert not session.closed
    await trio.sleep(0.2)
    await settle()
    assert trio.current_time() - closed_at > LINGER
    assert session.closed
    assert manager.session("alice") is None
    assert_fully_closed(session)
    stats = manager.get_stats()
    assert stats.users == 0
    assert stats.connections == 0
    assert "alice" not in stats.per_user
    assert stats.live_tasks == baseline_tasks
    assert stats.sessions_closed == 1
    assert stats.session_crashes == 0
    assert stats.connections_opened == 2  # totals survive the session

    # The next call builds a new session, which works.
    fresh = agentcast.get_websocket_manager(ALICE)
    assert fresh is not session
    assert not fresh.closed
    client3 = await subscribed(fresh)
    async with fresh.run("t1"):
        pass
    assert [f["type"] for f in await client3.receive_until("agent_completed")] == [
        "agent_started", "agent_completed",
    ]


async def test_a_session_nobody_connects_to_closes_after_the_linger(
    manager: ConnectionManager, autojump_clock: trio.testing.MockClock
) -> None:
    baseline_tasks = manager.get_stats().live_tasks
    session = await agentcast.get_websocket_manager_async(ALICE)
    await trio.sleep(LINGER + 0.1)
    await settle()
    assert_fully_closed(session)
    assert manager.get_stats().users == 0
    assert manager.get_stats().live_tasks == baseline_tasks
    with pytest.raises(agentcast.SessionClosed):
        await connect(session)


async def test_a_running_agent_keeps_the_session_alive_past_the_linger(
    manager: ConnectionManager, autojump_clock: trio.testing.MockClock
) -> None:
    baseline_tasks = manager.get_stats().live_tasks

    async def long_agent(run: Run) -> str:
        await trio.sleep(20)
        return "done"

    start = trio.current_time()
    session = agentcast.get_websocket_manager(ALICE)
    run_id = session.start_run("t1", long_agent)
    await trio.sleep(LINGER * 3)
    assert manager.session("alice") is session
    assert not session.closed
    assert [r.run_id for r in session.active_runs()] == [run_id]

    # The run ends at start + 20; the session lingers until start + 20 + LINGER.
    await trio.sleep(start + 20 + LINGER - 0.1 - trio.current_time())
    assert session.active_runs() == []
    assert not session.closed
    await trio.sleep(0.2)
    await settle()
    assert_fully_closed(session)
    assert manager.get_stats().users == 0
    assert manager.get_stats().live_tasks == baseline_tasks
    assert manager.get_stats().runs_started == 1


# ---- crash isolation ----------------------------------------------------------------------


class Boom(RuntimeError):
    pass


async def fault_injecting_handler(
    session: UserSession, connection: Connection, frame: dict[str, Any]
) -> None:
    if frame["type"] == "boom":
        raise Boom("injected fault")
    if frame["type"] == "refuse":
        raise ClientError("not_allowed", "you may not do that")
    connection.enqueue('{"type":"handled"}')


async def test_a_crash_closes_only_that_users_connections_with_1011(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with agentcast.open_manager(
        Config(session_linger=5.0), message_handler=fault_injecting_handler
    ) as manager:
        alice = agentcast.get_websocket_manager(ALICE)
        bob = agentcast.get_websocket_manager(BOB)
        alice_1 = await subscribed(alice)
        alice_2 = await subscribed(alice, "t2")
        bob_client = await subscribed(bob)  # the same thread id name as alice_1

        gate = trio.Event()

        async def bob_agent(run: Run) -> str:
            await run.thinking("before")
            await gate.wait()
            await run.thinking("after")
            await run.text("still streaming")
            return "bob done"

        bob_run = bob.start_run("t1", bob_agent)
        alice_run = alice.start_run("t1", _sleep_forever)
        assert (await alice_1.receive())["type"] == "agent_started"
        before = await bob_client.receive_until("agent_thinking")

        await alice_1.send({"type": "boom"})
        frames_1, code_1 = await alice_1.receive_closed()
        frames_2, code_2 = await alice_2.receive_closed()
        assert code_1 == CloseCode.INTERNAL_ERROR
        assert code_2 == CloseCode.INTERNAL_ERROR
        assert all(f.get("run_id") != bob_run for f in frames_1 + frames_2)
        await settle()
        assert alice.closed
        assert manager.session("alice") is None
        assert_fully_closed(alice)
        stats = manager.get_stats()
        assert stats.session_crashes == 1
        assert stats.users == 1

        # Bob's run and connection carry on, in order, with no gap.
        gate.set()
        after = await bob_client.receive_until("agent_completed")
        frames = before + after
        assert [f["type"] for f in frames] == [
            "agent_started", "agent_thinking", "agent_thinking", "agent_text",
            "agent_completed",
        ]
        assert [f["seq"] for f in frames] == [1, 2, 3, 4, 5]
        assert {f["run_id"] for f in frames} == {bob_run}
        assert frames[-1]["data"]["result"] == "bob done"
        assert not bob.closed

        # Alice can start over with a new session.
        fresh = agentcast.get_websocket_manager(ALICE)
        assert fresh is not alice
        client = await subscribed(fresh)
        await client.send({"type": "hello"})
        assert await client.receive() == {"type": "handled"}
        async with fresh.run("t1") as run:
            await run.thinking("back")
        assert [f["type"] for f in await client.receive_until("agent_completed")] == [
            "agent_started", "agent_thinking", "agent_completed",
        ]
        assert fresh.cancel_run(alice_run) is False
        assert manager.get_stats().session_crashes == 1


async def test_a_client_error_from_the_handler_is_an_error_frame(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with agentcast.open_manager(message_handler=fault_injecting_handler) as manager:
        session = agentcast.get_websocket_manager(ALICE)
        client = await subscribed(session)
        await client.send({"type": "refuse"})
        error = await client.receive()
        assert error == {
            "type": "error", "code": "not_allowed", "message": "you may not do that",
        }
        # Still usable.
        await client.send({"type": "hello"})
        assert await client.receive() == {"type": "handled"}
        await client.send({"type": "ping", "id": 2})
        assert await client.receive() == {"type": "pong", "id": 2}
        assert not session.closed
        stats = manager.get_stats()
        assert stats.session_crashes == 0
        assert stats.protocol_errors == 1


async def test_without_a_handler_unknown_frames_get_an_error_frame(
    manager: ConnectionManager,
) -> None:
    session = agentcast.get_websocket_manager(ALICE)
    client = await subscribed(session)
    await client.send({"type": "user_message", "text": "hi"})
    error = await client.receive()
    assert error["type"] == "error"
    assert error["code"] == "unknown_type"
    await client.send({"type": "ping"})
    assert await client.receive() == {"type": "pong"}


# ---- shutdown -----------------------------------------------------------------------------


async def test_shutdown_cancels_runs_and_closes_every_connection_with_1001(
    autojump_clock: trio.testing.MockClock,
) -> None:
    config = Config(shutdown_timeout=5.0, close_timeout=2.0, write_timeout=30.0)
    async with agentcast.open_manager(config) as manager:
        alice = agentcast.get_websocket_manager(ALICE)
        bob = agentcast.get_websocket_manager(BOB)
        reader = await subscribed(alice)
        idle_bob = await subscribed(bob, "elsewhere")
        # A client that never reads, with room for a single message in flight.
        stuck, stuck_connection = await connect(alice, ("t1",), capacity=1)

        async def chatty(run: Run) -> None:
            for i in range(10):
                await run.thinking(f"thought {i}")
            await trio.sleep_forever()

        run_id = alice.start_run("t1", chatty)
        frames = await reader.receive_until("agent_thinking")
        assert [f["type"] for f in frames] == ["agent_started", "agent_thinking"]
        await settle()
        sessions = [alice, bob]
        left_at = trio.current_time()

    elapsed = trio.current_time() - left_at
    assert elapsed <= config.shutdown_timeout
    # The reading client got the rest of the run, agent_cancelled, then 1001.
    rest, code = await reader.receive_closed()
    assert code == CloseCode.GOING_AWAY
    assert rest[-1]["type"] == "agent_cancelled"
    assert rest[-1]["run_id"] == run_id
    assert rest[-1]["data"]["reason"] == "server shutting down"
    assert [f["type"] for f in rest[:-1]] == ["agent_thinking"] * 9
    # A connection with nothing to send is closed with 1001 too.
    assert await idle_bob.receive_closed() == ([], CloseCode.GOING_AWAY)
    # The client that never read was closed anyway (dropped after close_timeout).
    assert stuck_connection.closed
    assert stuck_connection.close_code == CloseCode.GOING_AWAY
    _, stuck_code = await stuck.receive_closed()
    assert stuck_code in (CloseCode.GOING_AWAY, 1006)
    assert stuck.transport.closed is not None
    # Nothing is left running.
    for session in sessions:
        assert_fully_closed(session)
    stats = manager.get_stats()
    assert stats.users == 0
    assert stats.connections == 0
    assert stats.active_runs == 0
    assert stats.live_tasks == 0
    assert stats.sessions_closed == 2
    assert stats.session_crashes == 0


async def test_shutdown_with_no_sessions_is_immediate(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with agentcast.open_manager() as manager:
        start = trio.current_time()
    assert trio.current_time() == start
    assert manager.get_stats().live_tasks == 0
    assert manager.closing


async def test_shutdown_on_cancellation_still_sends_agent_cancelled(
    autojump_clock: trio.testing.MockClock,
) -> None:
    with trio.move_on_after(10) as outer:
        async with agentcast.open_manager() as manager:
            session = agentcast.get_websocket_manager(ALICE)
            client = await subscribed(session)
            run_id = session.start_run("t1", _sleep_forever)
            await trio.sleep_forever()
    assert outer.cancelled_caught
    frames, code = await client.receive_closed()
    assert [f["type"] for f in frames] == ["agent_started", "agent_cancelled"]
    assert frames[-1]["run_id"] == run_id
    assert code == CloseCode.GOING_AWAY
    assert manager.get_stats().live_tasks == 0


@pytest.mark.parametrize(
    ("shutdown_timeout", "close_timeout"), [(5.0, 2.0), (1.0, 2.0), (0.5, 0.2)]
)
async def test_shutdown_is_bounded_even_when_a_client_never_reads(
    autojump_clock: trio.testing.MockClock, shutdown_timeout: float, close_timeout: float
) -> None:
    config = Config(
        shutdown_timeout=shutdown_timeout, close_timeout=close_timeout, write_timeout=60.0
    )
    async with agentcast.open_manager(config) as manager:
        session = agentcast.get_websocket_manager(ALICE)
        stuck, connection = await connect(session, ("t1",), capacity=1)

        async def chatty(run: Run) -> None:
            for i in range(20):
                await run.thinking(f"thought {i}")
            await trio.sleep_forever()

        session.start_run("t1", chatty)
        await trio.sleep(1.0)  # the writer is now blocked on the full transport
        assert not connection.closed
        left_at = trio.current_time()
    assert trio.current_time() - left_at <= shutdown_timeout
    assert connection.closed
    assert connection.close_code == CloseCode.GOING_AWAY
    _, code = await stuck.receive_closed()
    assert code in (CloseCode.GOING_AWAY, 1006)
    assert_fully_closed(session)
    assert manager.get_stats().live_tasks == 0


async def play_shutdown(events: int, readers: int, by_cancellation: bool) -> None:
    emitted = trio.Event()

    async def agent(run: Run) -> None:
        for i in range(events):
            await run.thinking(f"thought {i}")
        emitted.set()
        await trio.sleep_forever()

    with trio.move_on_after(10 if by_cancellation else math.inf) as outer:
        async with agentcast.open_manager() as manager:
            session = agentcast.get_websocket_manager(ALICE)
            clients = [await subscribed(session) for _ in range(readers)]
            run_id = session.start_run("t1", agent)
            await emitted.wait()
            if by_cancellation:
                await trio.sleep_forever()
    assert outer.cancelled_caught == by_cancellation
    for client in clients:
        frames, code = await client.receive_closed()
        assert code == CloseCode.GOING_AWAY
        assert [f["type"] for f in frames] == (
            ["agent_started"] + ["agent_thinking"] * events + ["agent_cancelled"]
        )
        assert {f["run_id"] for f in frames} == {run_id}
        assert frames[-1]["data"] == {"reason": "server shutting down"}
    assert manager.get_stats().live_tasks == 0
    assert_fully_closed(session)


@settings(deadline=None, max_examples=30)
@given(
    events=st.integers(min_value=0, max_value=20),
    readers=st.integers(min_value=1, max_value=3),
    by_cancellation=st.booleans(),
)
def test_shutdown_always_delivers_agent_cancelled_before_1001(
    events: int, readers: int, by_cancellation: bool
) -> None:
    # Repeated on purpose: trio randomises scheduling order, so one run can pass by luck.
    trio.run(
        play_shutdown, events, readers, by_cancellation,
        clock=trio.testing.MockClock(autojump_threshold=0),
    )


# ---- removing and serving connections -----------------------------------------------------


async def test_remove_connection_sends_queued_frames_then_closes_with_the_code(
    manager: ConnectionManager,
) -> None:
    session = agentcast.get_websocket_manager(ALICE)
    client, connection = await connect(session, ("t1",))
    assert (await client.receive())["type"] == "subscribed"
    keeper, _ = await connect(session)
    async with session.run("t1") as run:
        for i in range(3):
            await run.thinking(f"queued {i}")
        # Nothing has been read yet: the frames are still queued.
        removed = await session.remove_connection(
            connection.connection_id, CloseCode.POLICY_VIOLATION, "kicked"
        )
    assert removed is True
    assert connection.closed
    assert connection not in session.connections()
    frames, code = await client.receive_closed()
    assert code == CloseCode.POLICY_VIOLATION
    assert client.transport.closed is not None
    assert client.transport.closed.reason == "kicked"
    assert [f["type"] for f in frames] == ["agent_started"] + ["agent_thinking"] * 3
    # The session and its other connection are unaffected.
    assert not session.closed
    await keeper.send({"type": "ping", "id": 3})
    assert await keeper.receive() == {"type": "pong", "id": 3}


async def test_remove_connection_of_an_unknown_id_returns_false(
    manager: ConnectionManager,
) -> None:
    alice = agentcast.get_websocket_manager(ALICE)
    bob = agentcast.get_websocket_manager(BOB)
    _, bobs_connection = await connect(bob)
    assert await alice.remove_connection("c-does-not-exist") is False
    # Another user's connection id is unknown to this session.
    assert await alice.remove_connection(bobs_connection.connection_id) is False
    assert not bobs_connection.closed
    assert bob.connections() == [bobs_connection]


async def test_serve_connection_returns_when_the_client_closes(
    manager: ConnectionManager, autojump_clock: trio.testing.MockClock
) -> None:
    session = agentcast.get_websocket_manager(ALICE)
    server, client_side = MemoryTransport.pair()
    client = Client(client_side)
    returned = trio.Event()

    async def handler() -> None:
        await session.serve_connection(server, threads=("t1",))
        returned.set()

    with trio.fail_after(1):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(handler)
            assert (await client.receive())["type"] == "subscribed"
            assert not returned.is_set()
            await client_side.aclose(1000, "bye")
    assert returned.is_set()
    assert session.connections() == []


async def test_serve_connection_closes_with_1001_when_its_caller_is_cancelled(
    manager: ConnectionManager, autojump_clock: trio.testing.MockClock
) -> None:
    session = agentcast.get_websocket_manager(ALICE)
    server, client_side = MemoryTransport.pair()
    client = Client(client_side)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(session.serve_connection, server)
        await client.send({"type": "ping", "id": 1})
        assert await client.receive() == {"type": "pong", "id": 1}
        nursery.cancel_scope.cancel()
    frames, code = await client.receive_closed()
    assert frames == []
    assert code == CloseCode.GOING_AWAY
    assert session.connections() == []
    assert not session.closed


# ---- stats --------------------------------------------------------------------------------


async def test_stats_are_plain_attrs_snapshots(manager: ConnectionManager) -> None:
    session = agentcast.get_websocket_manager(ALICE)
    client = await subscribed(session)
    async with session.run("t1") as run:
        await run.thinking("one")
    await client.receive_until("agent_completed")
    bob = agentcast.get_websocket_manager(BOB)
    await connect(bob)

    stats = attrs.asdict(manager.get_stats())
    for key in (
        "users", "connections", "active_runs", "events_published", "events_sent",
        "events_dropped", "slow_consumer_disconnects", "live_tasks", "per_user",
    ):
        assert key in stats
    assert stats["users"] == 2
    assert stats["connections"] == 2
    assert stats["active_runs"] == 0
    assert stats["events_published"] == 3
    assert stats["events_sent"] >= 3  # (control frames such as the ack are counted too)
    assert stats["events_dropped"] == 0
    assert stats["slow_consumer_disconnects"] == 0
    assert stats["live_tasks"] > 0
    assert set(stats["per_user"]) == {"alice", "bob"}
    alice_stats = stats["per_user"]["alice"]
    assert isinstance(alice_stats, dict)
    assert alice_stats["user_id"] == "alice"
    assert alice_stats["connections"] == 1
    assert alice_stats["open_channels"] == 1
    assert alice_stats["subscriptions"] == 1
    assert alice_stats["events_published"] == 3
    assert alice_stats["closed"] is False
    assert alice_stats["live_tasks"] == 2  # the connection's task (its reader) and its writer

"""Runs always end: ``agent_started`` first, then exactly one terminal event, however the agent
returns, raises or is cancelled."""

from __future__ import annotations

import json
from typing import Any

import pytest
import trio
import trio.testing
from hypothesis import given, settings
from hypothesis import strategies as st

import agentcast
from agentcast import (
    AgentEvent,
    Config,
    ConnectionManager,
    EventType,
    InvalidEvent,
    Run,
    RunEnded,
    UserContext,
    UserSession,
)

from .helpers import Client, connect, settle

ALICE = UserContext.from_request(user_id="alice")
BOB = UserContext.from_request(user_id="bob")
TERMINAL = {"agent_completed", "agent_error", "agent_cancelled"}


async def subscribed_client(session: UserSession, thread_id: str = "t1") -> Client:
    client, _ = await connect(session, (thread_id,))
    ack = await client.receive()
    assert ack["type"] == "subscribed"
    assert ack["thread_id"] == thread_id
    return client


async def frames_until_terminal(client: Client) -> list[dict[str, Any]]:
    frames = []
    while True:
        frame = await client.receive()
        frames.append(frame)
        if frame["type"] in TERMINAL:
            return frames


async def assert_nothing_more_for(client: Client, run_id: str) -> list[dict[str, Any]]:
    """Round-trip a ping: everything queued before the pong must not belong to ``run_id``."""
    await client.send({"type": "ping", "id": "fence"})
    frames = await client.receive_until("pong")
    assert [f for f in frames if f.get("run_id") == run_id] == []
    return frames


def assert_envelopes(frames: list[dict[str, Any]], thread_id: str, run_id: str) -> None:
    seqs = [frame["seq"] for frame in frames]
    assert seqs == list(range(seqs[0], seqs[0] + len(frames)))
    for frame in frames:
        assert frame["thread_id"] == thread_id
        assert frame["run_id"] == run_id
        assert isinstance(frame["ts"], float)


# ---- the run scope ------------------------------------------------------------------------


async def test_a_run_streams_its_events_and_completes(
    manager: ConnectionManager, autojump_clock: trio.testing.MockClock
) -> None:
    session = agentcast.get_websocket_manager(ALICE)
    client = await subscribed_client(session)
    async with session.run("t1", agent_name="researcher") as run:
        assert not run.ended
        await run.thinking("reading", step=1, progress=0.25)
        call_id = await run.tool_executing("search", {"query": "trio"})
        await trio.sleep(0.5)
        await run.tool_completed("search", {"hits": 3})
        await run.emit("citation_found", {"url": "https://example.invalid"})
        await run.text("Structured ")
        await run.text("concurrency")
        await trio.sleep(1.0)
        run.result = {"answer": 42}
    assert run.ended

    frames = await frames_until_terminal(client)
    assert [f["type"] for f in frames] == [
        "agent_started", "agent_thinking", "tool_executing", "tool_completed",
        "citation_found", "agent_text", "agent_text", "agent_completed",
    ]
    assert_envelopes(frames, "t1", run.run_id)
    assert frames[0]["seq"] == 1
    started, thinking, executing, completed_tool, custom, *texts, done = frames
    assert started["data"] == {"agent_name": "researcher"}
    assert thinking["data"] == {"text": "reading", "step": 1, "progress": 0.25}
    assert executing["data"] == {
        "tool_name": "search", "arguments": {"query": "trio"}, "tool_call_id": call_id
    }
    assert completed_tool["data"]["tool_call_id"] == call_id  # paired by the oldest open call
    assert completed_tool["data"]["result"] == {"hits": 3}
    assert completed_tool["data"]["ok"] is True
    assert completed_tool["data"]["duration_ms"] == pytest.approx(500, abs=1)
    assert custom["data"] == {"url": "https://example.invalid"}
    assert [t["data"]["text"] for t in texts] == ["Structured ", "concurrency"]
    assert done["data"]["result"] == {"answer": 42}
    assert done["data"]["duration_ms"] == pytest.approx(1500, abs=1)
    await assert_nothing_more_for(client, run.run_id)
    assert session.active_runs() == []


async def test_emit_returns_consecutive_seqs(manager: ConnectionManager) -> None:
    session = agentcast.get_websocket_manager(ALICE)
    client = await subscribed_client(session)
    async with session.run("t1") as run:
        seqs = [await run.thinking(f"step {i}") for i in range(5)]
    assert seqs == [2, 3, 4, 5, 6]
    frames = await frames_until_terminal(client)
    assert [f["seq"] for f in frames] == [1, 2, 3, 4, 5, 6, 7]


async def test_an_exception_sends_one_agent_error_and_propagates(
    manager: ConnectionManager,
) -> None:
    session = agentcast.get_websocket_manager(ALICE)
    client = await subscribed_client(session)
    reached_after = False
    runs = []

    async def failing() -> None:
        nonlocal reached_after
        async with session.run("t1") as run:
            runs.append(run)
            await run.thinking("about to fail")
            missing: dict[str, int] = {}
            _ = missing["missing-key"]
        reached_after = True

    with pytest.raises(KeyError, match="missing-key"):
        await failing()
    assert not reached_after
    run = runs[0]
    frames = await frames_until_terminal(client)
    assert [f["type"] for f in frames] == ["agent_started", "agent_thinking", "agent_error"]
    error = frames[-1]
    assert error["data"]["error_type"] == "KeyError"
    assert "missing-key" in error["data"]["message"]
    raw = json.dumps(error)
    assert "Traceback" not in raw
    assert ".py" not in raw
    assert "File " not in raw
    await assert_nothing_more_for(client, run.run_id)
    assert session.active_runs() == []


async def test_a_long_error_message_is_trimmed(manager: ConnectionManager) -> None:
    session = agentcast.get_websocket_manager(ALICE)
    client = await subscribed_client(session)
    limit = manager.config.error_message_limit
    with pytest.raises(RuntimeError):
        async with session.run("t1"):
            raise RuntimeError("x" * (limit * 3))
    error = (await frames_until_terminal(client))[-1]
    assert error["type"] == "agent_error"
    assert error["data"]["message"] == "x" * limit


async def test_outer_cancellation_sends_agent_cancelled_and_propagates(
    manager: ConnectionManager, autojump_clock: trio.testing.MockClock
) -> None:
    session = agentcast.get_websocket_manager(ALICE)
    client = await subscribed_client(session)
    completed_block = False
    with trio.move_on_after(2.0) as outer:
        async with session.run("t1") as run:
            await run.thinking("working")
            await trio.sleep(60)
        completed_block = True
    assert outer.cancelled_caught
    assert not completed_block
    frames = await frames_until_terminal(client)
    assert [f["type"] for f in frames] == ["agent_started", "agent_thinking", "agent_cancelled"]
    assert isinstance(frames[-1]["data"]["reason"], str)
    assert run.ended
    await assert_nothing_more_for(client, run.run_id)


async def test_cancel_run_ends_the_block_quietly_with_its_reason(
    manager: ConnectionManager,
) -> None:
    session = agentcast.get_websocket_manager(ALICE)
    client = await subscribed_client(session)
    in_body = trio.Event()
    after_block = False

    async def runner() -> None:
        nonlocal after_block
        async with session.run("t1", run_id="run-1") as run:
            in_body.set()
            await trio.sleep_forever()
        after_block = True
        assert run.ended

    async with trio.open_nursery() as nursery:
        nursery.start_soon(runner)
        await in_body.wait()
        assert session.cancel_run("run-1", "user pressed stop") is True
    assert after_block
    frames = await frames_until_terminal(client)
    assert [f["type"] for f in frames] == ["agent_started", "agent_cancelled"]
    assert frames[-1]["data"] == {"reason": "user pressed stop"}
    assert session.cancel_run("run-1") is False  # it has ended
    await assert_nothing_more_for(client, "run-1")


async def test_cancel_run_of_an_unknown_id_returns_false(manager: ConnectionManager) -> None:
    session = agentcast.get_websocket_manager(ALICE)
    assert session.cancel_run("run-nope") is False
    assert session.cancel_run("run-nope", "why") is False


async def test_a_client_cancels_its_own_users_run(manager: ConnectionManager) -> None:
    session = agentcast.get_websocket_manager(ALICE)
    client = await subscribed_client(session)
    run_id = session.start_run("t1", _sleep_forever)
    assert (await client.receive())["type"] == "agent_started"
    await client.send({"type": "cancel_run", "run_id": run_id})
    frames = await frames_until_terminal(client)
    assert frames[-1]["type"] == "agent_cancelled"
    assert frames[-1]["run_id"] == run_id
    assert frames[-1]["data"] == {"reason": "cancelled by client"}
    await assert_nothing_more_for(client, run_id)
    assert session.active_runs() == []


async def test_a_client_cannot_cancel_another_users_run(manager: ConnectionManager) -> None:
    alice = agentcast.get_websocket_manager(ALICE)
    bob = agentcast.get_websocket_manager(BOB)
    alice_client = await subscribed_client(alice)
    bob_client = await subscribed_client(bob)
    go = trio.Event()

    async def agent(run: Run) -> str:
        await go.wait()
        await run.thinking("still here")
        return "done"

    run_id = alice.start_run("t1", agent)
    assert (await alice_client.receive())["type"] == "agent_started"
    await bob_client.send({"type": "cancel_run", "run_id": run_id})
    error = await bob_client.receive()
    assert error["type"] == "error"
    assert error["code"] == "unknown_run"
    assert [r.run_id for r in alice.active_runs()] == [run_id]
    go.set()
    frames = await frames_until_terminal(alice_client)
    assert [f["type"] for f in frames] == ["agent_thinking", "agent_completed"]
    assert frames[-1]["data"]["result"] == "done"
    # Bob saw nothing of Alice's run.
    assert await assert_nothing_more_for(bob_client, run_id) == [{"type": "pong", "id": "fence"}]


# ---- start_run ----------------------------------------------------------------------------


async def _sleep_forever(run: Run) -> None:
    await trio.sleep_forever()


async def test_start_run_is_synchronous_and_its_return_value_is_the_result(
    manager: ConnectionManager,
) -> None:
    seen: dict[str, Any] = {}

    async def add(run: Run, a: int, b: int) -> dict[str, int]:
        seen["run"] = run
        seen["task"] = trio.lowlevel.current_task()
        await run.thinking("adding")
        return {"sum": a + b}

    session = agentcast.get_websocket_manager(ALICE)
    # Nothing awaited yet: the session's nursery is not even open.
    run_id = session.start_run("t1", add, 2, 3, agent_name="adder")
    assert isinstance(run_id, str)
    assert run_id.startswith("run-")
    assert [r.run_id for r in session.active_runs()] == [run_id]
    assert session.get_stats().live_tasks == 0
    assert seen == {}

    client, _ = await connect(session)
    await client.send({"type": "subscribe", "thread_id": "t1", "since_seq": 0})
    frames = await frames_until_terminal(client)
    assert frames[0]["type"] == "subscribed"
    events = [f for f in frames if f["type"] != "subscribed"]
    assert [f["type"] for f in events] == ["agent_started", "agent_thinking", "agent_completed"]
    assert_envelopes(events, "t1", run_id)
    assert events[0]["data"] == {"agent_name": "adder"}
    assert events[-1]["data"]["result"] == {"sum": 5}
    # The agent ran in a task of the user's nursery.
    assert seen["run"].run_id == run_id
    assert seen["task"].name == f"agentcast.alice.{run_id}"
    assert session.active_runs() == []


async def test_start_run_with_an_explicit_run_id(manager: ConnectionManager) -> None:
    session = agentcast.get_websocket_manager(ALICE)
    client = await subscribed_client(session)
    assert session.start_run("t1", _sleep_forever, run_id="run-fixed") == "run-fixed"
    assert (await client.receive())["run_id"] == "run-fixed"
    assert session.cancel_run("run-fixed")
    assert (await client.receive())["type"] == "agent_cancelled"


async def test_an_agent_that_raises_sends_agent_error_and_the_session_survives(
    manager: ConnectionManager,
) -> None:
    async def broken(run: Run) -> None:
        await run.thinking("trying")
        raise ConnectionError("tool backend unreachable")

    session = agentcast.get_websocket_manager(ALICE)
    client = await subscribed_client(session)
    other, _ = await connect(session)
    run_id = session.start_run("t1", broken)
    frames = await frames_until_terminal(client)
    assert [f["type"] for f in frames] == ["agent_started", "agent_thinking", "agent_error"]
    assert frames[-1]["data"] == {
        "error_type": "ConnectionError", "message": "tool backend unreachable",
    }
    await assert_nothing_more_for(client, run_id)

    # The session is intact: same object, its other connection answers, new runs work.
    await settle()
    assert not session.closed
    assert manager.session("alice") is session
    await other.send({"type": "ping", "id": 7})
    assert await other.receive() == {"type": "pong", "id": 7}
    second = session.start_run("t1", _returns_ok)
    frames = await frames_until_terminal(client)
    assert frames[-1]["type"] == "agent_completed"
    assert frames[-1]["run_id"] == second
    stats = manager.get_stats()
    assert stats.session_crashes == 0
    assert stats.sessions_closed == 0
    assert stats.per_user["alice"].connections == 2


async def _returns_ok(run: Run) -> str:
    return "ok"


async def test_an_agent_cancelled_by_cancel_run_sends_agent_cancelled(
    manager: ConnectionManager, autojump_clock: trio.testing.MockClock
) -> None:
    cleaned_up = []

    async def slow(run: Run) -> str:
        try:
            await run.thinking("sleeping")
            await trio.sleep(3600)
        finally:
            cleaned_up.append(run.run_id)
        return "never"

    session = agentcast.get_websocket_manager(ALICE)
    client = await subscribed_client(session)
    run_id = session.start_run("t1", slow)
    assert [f["type"] for f in await client.receive_until("agent_thinking")] == [
        "agent_started", "agent_thinking",
    ]
    assert session.cancel_run(run_id, "superseded")
    frames = await frames_until_terminal(client)
    assert frames == [frames[-1]]
    assert frames[-1]["type"] == "agent_cancelled"
    assert frames[-1]["data"] == {"reason": "superseded"}
    assert cleaned_up == [run_id]
    assert trio.current_time() < 3600
    assert session.active_runs() == []


# ---- exactly one terminal event, whatever the script --------------------------------------

STEPS = st.lists(
    st.one_of(
        st.just(("thinking", 0.0)),
        st.just(("tool", 0.0)),
        st.just(("text", 0.0)),
        st.tuples(st.just("sleep"), st.floats(min_value=0.0, max_value=3.0)),
    ),
    max_size=6,
)
SCRIPTS = st.one_of(
    st.tuples(
        st.just("scope"),
        STEPS,
        st.sampled_from(["return", "raise", "cancel_run", "outer_cancel"]),
        st.floats(min_value=0.001, max_value=6.0),
    ),
    st.tuples(
        st.just("start_run"),
        STEPS,
        st.sampled_from(["return", "raise", "cancel_run"]),
        st.just(1.0),
    ),
)
EXPECTED = {
    "return": "agent_completed",
    "raise": "agent_error",
    "cancel_run": "agent_cancelled",
    "outer_cancel": "agent_cancelled",
}


class AgentFailed(Exception):
    pass


async def scripted_agent(
    run: Run, steps: list[tuple[str, float]], ending: str, session: UserSession
) -> str:
    for index, (step, seconds) in enumerate(steps):
        if step == "thinking":
            await run.thinking(f"step {index}", step=index)
        elif step == "tool":
            await run.tool_executing("search", {"i": index})
            await run.tool_completed("search", [index])
        elif step == "text":
            await run.text(f"token{index} ")
        else:
            await trio.sleep(seconds)
    if ending == "raise":
        raise AgentFailed("scripted failure")
    if ending == "cancel_run":
        assert session.cancel_run(run.run_id, "scripted cancel")
        await trio.sleep(1.0)
        raise AssertionError("cancel_run did not cancel")  # pragma: no cover
    if ending == "outer_cancel":
        await trio.sleep_forever()
    return "scripted result"


async def play_script(
    mode: str, steps: list[tuple[str, float]], ending: str, deadline: float
) -> None:
    async with agentcast.open_manager(Config(session_linger=1.0)):
        session = agentcast.get_websocket_manager(ALICE)
        client = await subscribed_client(session)
        if mode == "start_run":
            run_id = session.start_run("t1", scripted_agent, steps, ending, session)
        else:
            with trio.move_on_after(deadline if ending == "outer_cancel" else 3600):
                try:
                    async with session.run("t1") as run:
                        run_id = run.run_id
                        run.result = await scripted_agent(run, steps, ending, session)
                except AgentFailed:
                    assert ending == "raise"
        frames = await frames_until_terminal(client)
        await assert_nothing_more_for(client, run_id)

    assert frames[0]["type"] == "agent_started"
    assert [f for f in frames if f["type"] in TERMINAL] == [frames[-1]]
    assert frames[-1]["type"] == EXPECTED[ending]
    assert_envelopes(frames, "t1", run_id)
    if ending == "return":
        assert frames[-1]["data"]["result"] == "scripted result"
    elif ending == "raise":
        assert frames[-1]["data"] == {"error_type": "AgentFailed", "message": "scripted failure"}
    elif ending == "cancel_run":
        assert frames[-1]["data"] == {"reason": "scripted cancel"}
    # Everything before the terminal event came from the script, in order.
    expected_body = []
    for step, _ in steps:
        expected_body += {
            "thinking": ["agent_thinking"],
            "tool": ["tool_executing", "tool_completed"],
            "text": ["agent_text"],
            "sleep": [],
        }[step]
    body = [f["type"] for f in frames[1:-1]]
    if ending == "outer_cancel":
        assert body == expected_body[: len(body)]
    else:
        assert body == expected_body


@settings(deadline=None, max_examples=30)
@given(SCRIPTS)
def test_every_run_sends_exactly_one_matching_terminal_event(
    script: tuple[str, list[tuple[str, float]], str, float],
) -> None:
    trio.run(play_script, *script, clock=trio.testing.MockClock(autojump_threshold=0))


# ---- what a run refuses -------------------------------------------------------------------


@pytest.mark.parametrize(
    "event_type",
    [
        "agent_started", "agent_completed", "agent_error", "agent_cancelled",
        EventType.AGENT_STARTED, EventType.AGENT_COMPLETED, EventType.AGENT_ERROR,
        EventType.AGENT_CANCELLED,
    ],
)
async def test_emit_refuses_lifecycle_types(
    manager: ConnectionManager, event_type: str
) -> None:
    session = agentcast.get_websocket_manager(ALICE)
    client = await subscribed_client(session)
    async with session.run("t1") as run:
        with pytest.raises(InvalidEvent):
            await run.emit(event_type, {"agent_name": "x", "result": 1, "duration_ms": 1.0,
                                        "error_type": "E", "message": "m", "reason": "r"})
    frames = await frames_until_terminal(client)
    assert [f["type"] for f in frames] == ["agent_started", "agent_completed"]


async def test_emitting_after_the_run_ended_raises_run_ended(
    manager: ConnectionManager,
) -> None:
    session = agentcast.get_websocket_manager(ALICE)
    client = await subscribed_client(session)
    async with session.run("t1") as run:
        pass
    with pytest.raises(RunEnded):
        await run.thinking("too late")
    with pytest.raises(RunEnded):
        await run.emit("custom_note", {"x": 1})
    with pytest.raises(RunEnded):
        await run.text("late")
    frames = await frames_until_terminal(client)
    assert [f["type"] for f in frames] == ["agent_started", "agent_completed"]
    await assert_nothing_more_for(client, run.run_id)


async def test_an_unserialisable_result_sends_agent_error_and_raises(
    manager: ConnectionManager,
) -> None:
    session = agentcast.get_websocket_manager(ALICE)
    client = await subscribed_client(session)
    with pytest.raises(InvalidEvent, match=r"run\.result"):
        async with session.run("t1") as run:
            run.result = {"value": object()}
    frames = await frames_until_terminal(client)
    assert [f["type"] for f in frames] == ["agent_started", "agent_error"]
    assert frames[-1]["data"]["error_type"] == "InvalidEvent"
    assert run.ended
    await assert_nothing_more_for(client, run.run_id)
    assert session.active_runs() == []


async def test_an_unserialisable_agent_return_value_sends_agent_error(
    manager: ConnectionManager,
) -> None:
    async def agent(run: Run) -> object:
        return {1, 2}

    session = agentcast.get_websocket_manager(ALICE)
    client = await subscribed_client(session)
    run_id = session.start_run("t1", agent)
    frames = await frames_until_terminal(client)
    assert frames[-1]["type"] == "agent_error"
    assert frames[-1]["run_id"] == run_id
    assert frames[-1]["data"]["error_type"] == "InvalidEvent"
    await settle()
    assert not session.closed
    assert manager.get_stats().session_crashes == 0


async def test_invalid_event_data_is_refused_and_the_run_continues(
    manager: ConnectionManager,
) -> None:
    session = agentcast.get_websocket_manager(ALICE)
    client = await subscribed_client(session)
    async with session.run("t1") as run:
        with pytest.raises(InvalidEvent):
            await run.emit("agent_thinking", {"no_text": 1})
        with pytest.raises(InvalidEvent):
            await run.emit("custom", {"bad": float("nan")})
        await run.thinking("fine")
    frames = await frames_until_terminal(client)
    assert [f["type"] for f in frames] == ["agent_started", "agent_thinking", "agent_completed"]


async def test_a_duplicate_active_run_id_is_refused(manager: ConnectionManager) -> None:
    session = agentcast.get_websocket_manager(ALICE)
    client = await subscribed_client(session)
    async with session.run("t1", run_id="run-dup") as run:
        with pytest.raises(ValueError, match="run-dup"):
            async with session.run("t1", run_id="run-dup"):
                pass  # pragma: no cover
        with pytest.raises(ValueError, match="run-dup"):
            session.start_run("t2", _returns_ok, run_id="run-dup")
        assert session.active_runs() == [run]
    # Once it has ended, the id may be used again.
    async with session.run("t1", run_id="run-dup"):
        pass
    frames = await client.receive_until("agent_completed")
    frames += await client.receive_until("agent_completed")
    assert [f["type"] for f in frames] == [
        "agent_started", "agent_completed", "agent_started", "agent_completed",
    ]
    assert {f["run_id"] for f in frames} == {"run-dup"}


async def test_send_to_thread_events_reach_subscribers_between_runs(
    manager: ConnectionManager,
) -> None:
    session = agentcast.get_websocket_manager(ALICE)
    client = await subscribed_client(session)
    seq = await session.send_to_thread("t1", AgentEvent("agent_thinking", {"text": "hi"}))
    frame = await client.receive()
    assert frame["seq"] == seq
    assert frame["run_id"] is None

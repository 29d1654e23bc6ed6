"""Resume: per-(user, thread) seqs without gaps, and ``subscribe`` with ``since_seq`` replaying
exactly what was missed, then going live with no duplicate and no gap."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import attrs
import coredis
import pytest
import trio
import trio.testing
from benchmarks.reload import measure
from hypothesis import given, settings
from hypothesis import strategies as st

import agentcast
from agentcast import (
    Config,
    ConnectionManager,
    InMemoryBroker,
    Recovery,
    RedisBroker,
    RedisPublisher,
    RunTooLarge,
    UserContext,
    UserSession,
)
from agentcast._run_history import apply_replay

from .helpers import Client, connect, settle, thinking

ALICE = UserContext.from_request(user_id="alice")
BOB = UserContext.from_request(user_id="bob")



async def publish(session: UserSession, thread_id: str, count: int) -> list[int]:
    return [
        await session.send_to_thread(thread_id, thinking(f"{thread_id} event"))
        for _ in range(count)
    ]


async def subscribe(client: Client, thread_id: str = "t1", **fields: Any) -> dict[str, Any]:
    """Send a subscribe frame; return its ack, which must be the next frame."""
    await client.send({"type": "subscribe", "thread_id": thread_id, **fields})
    ack = await client.receive()
    assert ack["type"] == "subscribed"
    assert set(ack) == {"type", "thread_id", "seq", "epoch", "recovered", "active_runs"}
    assert ack["thread_id"] == thread_id
    return ack


async def seqs_of(client: Client, count: int) -> list[int]:
    frames = [await client.receive() for _ in range(count)]
    assert all(f["type"] == "agent_thinking" for f in frames), frames
    return [f["seq"] for f in frames]


async def assert_nothing_pending(client: Client) -> None:
    """The next frame is the pong to a fresh ping: nothing else was queued before it."""
    await client.send({"type": "ping", "id": "probe"})
    assert await client.receive() == {"type": "pong", "id": "probe"}


async def epoch_of(session: UserSession, thread_id: str = "t1") -> str:
    return (await session.recover(thread_id, None, None)).epoch


# ---- seqs ---------------------------------------------------------------------------------


async def test_seq_starts_at_one_and_grows_by_one_per_user_and_thread(
    manager: ConnectionManager,
) -> None:
    alice = manager.get_websocket_manager(ALICE)
    bob = manager.get_websocket_manager(BOB)
    client, _ = await connect(alice, ("t1", "t2"))
    assert [(await client.receive())["seq"] for _ in range(2)] == [0, 0]  # the two acks
    assert await publish(alice, "t1", 5) == [1, 2, 3, 4, 5]
    assert await publish(alice, "t2", 3) == [1, 2, 3]
    assert await publish(bob, "t1", 2) == [1, 2]
    assert await publish(alice, "t1", 2) == [6, 7]
    frames = [await client.receive() for _ in range(10)]
    by_thread: dict[str, list[int]] = {}
    for frame in frames:
        by_thread.setdefault(frame["thread_id"], []).append(frame["seq"])
    assert by_thread == {"t1": [1, 2, 3, 4, 5, 6, 7], "t2": [1, 2, 3]}
    await assert_nothing_pending(client)


# ---- subscribe with since_seq -----------------------------------------------------------------


async def test_since_seq_replays_exactly_the_missed_events_then_live(
    manager: ConnectionManager,
) -> None:
    session = manager.get_websocket_manager(ALICE)
    await publish(session, "t1", 10)
    client, _ = await connect(session)
    ack = await subscribe(client, since_seq=4, epoch=await epoch_of(session))
    assert ack == {
        "type": "subscribed", "thread_id": "t1", "seq": 10,
        "epoch": await epoch_of(session), "recovered": True, "active_runs": [],
    }
    assert await seqs_of(client, 6) == [5, 6, 7, 8, 9, 10]
    await publish(session, "t1", 3)
    assert await seqs_of(client, 3) == [11, 12, 13]
    await assert_nothing_pending(client)


async def test_since_seq_zero_replays_the_whole_retained_stream(
    manager: ConnectionManager,
) -> None:
    session = manager.get_websocket_manager(ALICE)
    await publish(session, "t1", 4)
    client, _ = await connect(session)
    ack = await subscribe(client, since_seq=0)
    assert (ack["seq"], ack["recovered"]) == (4, True)
    assert await seqs_of(client, 4) == [1, 2, 3, 4]
    await assert_nothing_pending(client)


async def test_since_seq_equal_to_latest_recovers_with_nothing_replayed(
    manager: ConnectionManager,
) -> None:
    session = manager.get_websocket_manager(ALICE)
    await publish(session, "t1", 7)
    client, _ = await connect(session)
    ack = await subscribe(client, since_seq=7, epoch=await epoch_of(session))
    assert (ack["seq"], ack["recovered"]) == (7, True)
    await assert_nothing_pending(client)
    await publish(session, "t1", 1)
    assert await seqs_of(client, 1) == [8]


async def test_since_seq_on_a_stream_nobody_published_to_recovers_empty(
    manager: ConnectionManager,
) -> None:
    session = manager.get_websocket_manager(ALICE)
    client, _ = await connect(session)
    ack = await subscribe(client, "fresh", since_seq=0)
    assert (ack["seq"], ack["recovered"]) == (0, True)
    await assert_nothing_pending(client)
    assert await session.send_to_thread("fresh", thinking("first")) == 1
    assert await seqs_of(client, 1) == [1]


async def test_since_seq_older_than_the_retained_history_replays_nothing() -> None:
    async with agentcast.open_manager(Config(history_size=5)) as manager:
        session = manager.get_websocket_manager(ALICE)
        await publish(session, "t1", 10)  # 6..10 retained
        client, _ = await connect(session)
        epoch = await epoch_of(session)
        ack = await subscribe(client, since_seq=4, epoch=epoch)
        # A partial replay would look complete to the client: nothing is replayed at all.
        assert (ack["seq"], ack["recovered"]) == (10, False)
        await assert_nothing_pending(client)
        await publish(session, "t1", 1)
        assert await seqs_of(client, 1) == [11]

        # The boundary, now that 7..11 are retained: since_seq=5 would need 6, which fell out
        # when 11 was published; since_seq=6 needs exactly what is retained.
        other, _ = await connect(session)
        ack = await subscribe(other, since_seq=5, epoch=epoch)
        assert (ack["seq"], ack["recovered"]) == (11, False)
        await assert_nothing_pending(other)
        ack = await subscribe(other, since_seq=6, epoch=epoch)
        assert (ack["seq"], ack["recovered"]) == (11, True)
        assert await seqs_of(other, 5) == [7, 8, 9, 10, 11]
        await assert_nothing_pending(other)


async def test_events_older_than_history_ttl_are_not_resumable(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with agentcast.open_manager(Config(history_ttl=10.0)) as manager:
        session = manager.get_websocket_manager(ALICE)
        keeper, _ = await connect(session)  # keeps the session (and the stream) alive
        epoch = await epoch_of(session)
        await publish(session, "t1", 3)  # at t=0
        await trio.sleep(6)
        await publish(session, "t1", 2)  # at t=6
        await trio.sleep(6)  # t=12: 1..3 expired, 4..5 retained

        client, _ = await connect(session)
        ack = await subscribe(client, since_seq=1, epoch=epoch)
        assert (ack["seq"], ack["epoch"], ack["recovered"]) == (5, epoch, False)
        await assert_nothing_pending(client)

        ack = await subscribe(client, since_seq=3, epoch=epoch)
        assert (ack["seq"], ack["recovered"]) == (5, True)
        assert await seqs_of(client, 2) == [4, 5]

        await trio.sleep(11)  # everything expired; the stream keeps its seq and epoch
        ack = await subscribe(client, since_seq=3, epoch=epoch)
        assert (ack["seq"], ack["epoch"], ack["recovered"]) == (5, epoch, False)
        await assert_nothing_pending(client)
        assert await session.send_to_thread("t1", thinking("late")) == 6
        assert await seqs_of(client, 1) == [6]
        await assert_nothing_pending(keeper)


async def test_a_wrong_epoch_replays_nothing(manager: ConnectionManager) -> None:
    session = manager.get_websocket_manager(ALICE)
    await publish(session, "t1", 5)
    client, _ = await connect(session)
    ack = await subscribe(client, since_seq=2, epoch="not-the-epoch")
    assert ack["recovered"] is False
    assert ack["epoch"] == await epoch_of(session)
    assert ack["seq"] == 5
    await assert_nothing_pending(client)
    await publish(session, "t1", 1)
    assert await seqs_of(client, 1) == [6]


async def test_since_seq_beyond_latest_replays_nothing(manager: ConnectionManager) -> None:
    session = manager.get_websocket_manager(ALICE)
    await publish(session, "t1", 3)
    client, _ = await connect(session)
    ack = await subscribe(client, since_seq=9, epoch=await epoch_of(session))
    assert (ack["seq"], ack["recovered"]) == (3, False)
    await assert_nothing_pending(client)
    await publish(session, "t1", 1)
    assert await seqs_of(client, 1) == [4]


async def test_subscribe_without_since_seq_is_live_only(manager: ConnectionManager) -> None:
    session = manager.get_websocket_manager(ALICE)
    await publish(session, "t1", 3)
    client, _ = await connect(session)
    ack = await subscribe(client)
    assert (ack["seq"], ack["recovered"]) == (3, False)
    await assert_nothing_pending(client)


# ---- replay racing live events ----------------------------------------------------------------


async def test_events_published_during_the_replay_follow_it_without_gap_or_duplicate(
    manager: ConnectionManager,
) -> None:
    session = manager.get_websocket_manager(ALICE)
    await publish(session, "t1", 50)
    total = 250
    client, _ = await connect(session)
    async with trio.open_nursery() as nursery:

        async def producer() -> None:
            for _ in range(total - 50):
                await session.send_to_thread("t1", thinking("live"))
                await trio.lowlevel.checkpoint()

        await client.send({"type": "subscribe", "thread_id": "t1", "since_seq": 20,
                           "epoch": await epoch_of(session)})
        nursery.start_soon(producer)
        ack = await client.receive()
        assert ack["type"] == "subscribed"
        assert ack["recovered"] is True
        seqs = [f["seq"] for f in [await client.receive() for _ in range(total - 20)]]
    assert seqs == list(range(21, total + 1))
    await assert_nothing_pending(client)


@attrs.define(eq=False)
class GatedBroker(InMemoryBroker):
    """An in-memory broker whose ``recover`` pauses (before or after reading the history)
    while the test publishes, the way a networked broker's round trip would."""

    gate_before: bool = True
    entered: trio.Event = attrs.Factory(trio.Event)
    release: trio.Event = attrs.Factory(trio.Event)
    #: Recoveries pass straight through until the test arms the gate.
    armed: bool = False

    async def recover(
        self, user_id: str, thread_id: str, since_seq: int | None, epoch: str | None,
        *, compact: bool = True,
    ) -> Recovery:
        if not self.armed:
            return await super().recover(user_id, thread_id, since_seq, epoch, compact=compact)
        if self.gate_before:
            self.entered.set()
            await self.release.wait()
        recovery = await super().recover(user_id, thread_id, since_seq, epoch, compact=compact)
        if not self.gate_before:
            self.entered.set()
            await self.release.wait()
        return recovery


@pytest.mark.parametrize("gate_before", [True, False], ids=["before-read", "after-read"])
@pytest.mark.parametrize("since_seq", [3, None], ids=["resume", "live-only"])
async def test_events_published_while_the_replay_is_fetched_are_held_then_released(
    gate_before: bool, since_seq: int | None
) -> None:
    broker = GatedBroker(Config(), gate_before=gate_before)
    async with agentcast.open_manager(broker=broker) as manager:
        session = manager.get_websocket_manager(ALICE)
        await publish(session, "t1", 5)
        client, connection = await connect(session)
        epoch = await epoch_of(session)
        broker.armed = True
        await client.send(
            {"type": "subscribe", "thread_id": "t1", "since_seq": since_seq, "epoch": epoch}
        )
        await broker.entered.wait()
        await publish(session, "t1", 4)  # 6..9, while recover() is in flight
        broker.release.set()
        ack = await client.receive()
        await publish(session, "t1", 2)  # 10..11
        if since_seq is None:
            # Live only: the stream starts when the route was registered, before 6.
            assert (ack["recovered"], ack["seq"]) == (False, 5)
            expected = list(range(6, 12))
        else:
            assert ack["recovered"] is True
            # Read before the publishes the replay ends at 5; after, at 9.
            assert ack["seq"] == (9 if gate_before else 5)
            expected = list(range(since_seq + 1, 12))
        assert await seqs_of(client, len(expected)) == expected
        await assert_nothing_pending(client)
        assert connection.threads == frozenset({"t1"})


async def test_frames_sent_while_the_replay_is_fetched_are_handled_after_it() -> None:
    broker = GatedBroker(Config(), armed=True)
    async with agentcast.open_manager(broker=broker) as manager:
        session = manager.get_websocket_manager(ALICE)
        await publish(session, "t1", 5)
        client, connection = await connect(session)
        await client.send({"type": "subscribe", "thread_id": "t1", "since_seq": 0})
        await broker.entered.wait()
        await client.send({"type": "unsubscribe", "thread_id": "t1"})
        await publish(session, "t1", 2)  # 6, 7: held, and also in the replay read after them
        broker.release.set()
        ack = await client.receive()
        assert (ack["type"], ack["seq"], ack["recovered"]) == ("subscribed", 7, True)
        assert await seqs_of(client, 7) == [1, 2, 3, 4, 5, 6, 7]
        assert await client.receive() == {"type": "unsubscribed", "thread_id": "t1"}
        await publish(session, "t1", 2)
        await assert_nothing_pending(client)
        assert connection.threads == frozenset()


# ---- reconnecting ------------------------------------------------------------------------------


async def test_a_reconnecting_client_gets_exactly_what_it_missed(
    manager: ConnectionManager,
) -> None:
    session = manager.get_websocket_manager(ALICE)
    client, connection = await connect(session, ("t1",))
    ack = await client.receive()
    await publish(session, "t1", 3)
    assert await seqs_of(client, 3) == [1, 2, 3]
    await client.transport.aclose()
    await connection.wait_closed()

    await publish(session, "t1", 5)  # missed: 4..8

    again, _ = await connect(session)
    resumed = await subscribe(again, since_seq=3, epoch=ack["epoch"])
    assert (resumed["seq"], resumed["epoch"], resumed["recovered"]) == (8, ack["epoch"], True)
    assert await seqs_of(again, 5) == [4, 5, 6, 7, 8]
    await publish(session, "t1", 1)
    assert await seqs_of(again, 1) == [9]
    await assert_nothing_pending(again)


async def test_history_outlives_the_session(autojump_clock: trio.testing.MockClock) -> None:
    async with agentcast.open_manager(Config(session_linger=5.0)) as manager:
        session = manager.get_websocket_manager(ALICE)
        client, connection = await connect(session, ("t1",))
        ack = await client.receive()
        await publish(session, "t1", 3)
        assert await seqs_of(client, 3) == [1, 2, 3]
        await client.transport.aclose()
        await connection.wait_closed()
        await publish(session, "t1", 2)  # missed while lingering: 4, 5

        await trio.sleep(6)  # the linger expires; the session closes
        await settle()
        assert session.closed
        assert manager.session("alice") is None

        fresh = manager.get_websocket_manager(ALICE)
        assert fresh is not session
        again, _ = await connect(fresh)
        resumed = await subscribe(again, since_seq=3, epoch=ack["epoch"])
        assert (resumed["seq"], resumed["epoch"], resumed["recovered"]) == (5, ack["epoch"], True)
        assert await seqs_of(again, 2) == [4, 5]
        assert await fresh.send_to_thread("t1", thinking("next")) == 6
        assert await seqs_of(again, 1) == [6]


# ---- the replay window, as a property ------------------------------------------------------


async def play_resume(history_size: int, published: int, since_seq: int, same_epoch: bool) -> None:
    async with agentcast.open_manager(Config(history_size=history_size)) as manager:
        session = manager.get_websocket_manager(ALICE)
        await publish(session, "t1", published)
        client, _ = await connect(session)
        epoch = await epoch_of(session) if same_epoch else "elsewhere"
        ack = await subscribe(client, since_seq=since_seq, epoch=epoch)
        oldest = max(1, published - history_size + 1)
        recoverable = same_epoch and oldest - 1 <= since_seq <= published
        assert ack["recovered"] is recoverable
        assert ack["seq"] == published
        if recoverable:
            assert await seqs_of(client, published - since_seq) == list(
                range(since_seq + 1, published + 1)
            )
        await assert_nothing_pending(client)
        await publish(session, "t1", 1)
        assert await seqs_of(client, 1) == [published + 1]


@settings(deadline=None, max_examples=40)
@given(
    history_size=st.integers(1, 8),
    published=st.integers(0, 15),
    since_seq=st.integers(0, 18),
    same_epoch=st.booleans(),
)
def test_a_replay_is_complete_or_not_attempted(
    history_size: int, published: int, since_seq: int, same_epoch: bool
) -> None:
    trio.run(
        play_resume, history_size, published, since_seq, same_epoch,
        clock=trio.testing.MockClock(autojump_threshold=0),
    )


# ---- one suite, both brokers: missing epochs, active runs, reload mid-run ----------------------
#
# Parametrized over the in-memory broker and a real redis-server (real sockets, so every wait
# is bounded by fail_after and none is a sleep).

#: Seconds any single step of the two-broker tests may take.
STEP = 10.0


@asynccontextmanager
async def broker_manager(
    kind: str, request: pytest.FixtureRequest, **fields: Any
) -> AsyncIterator[ConnectionManager]:
    """A manager on the in-memory broker, or on a RedisBroker over the test's redis-server."""
    config = Config(**{"session_linger": 0.5, **fields})
    if kind == "memory":
        async with agentcast.open_manager(config) as running:
            yield running
    else:
        url = request.getfixturevalue("redis_server").url
        async with agentcast.open_manager(config, broker=RedisBroker(url, config)) as running:
            yield running


def redis_url(request: pytest.FixtureRequest) -> str:
    return str(request.getfixturevalue("redis_server").url)


async def flushall(url: str) -> None:
    async with coredis.Redis.from_url(url, decode_responses=True) as admin:
        await admin.flushall()


async def ack_and_replay(
    client: Client, thread_id: str = "t1", **fields: Any
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Subscribe; return the ack and every frame up to the last seq the ack names."""
    with trio.fail_after(STEP):
        ack = await subscribe(client, thread_id, **fields)
        frames: list[dict[str, Any]] = []
        if ack["recovered"]:
            while not frames or frames[-1]["seq"] < ack["seq"]:
                frames.append(await client.receive())
    return ack, frames


BROKERS = pytest.mark.parametrize("kind", ["memory", "redis"])


@BROKERS
async def test_since_seq_without_epoch_is_never_recovered_after_a_restart(
    kind: str, request: pytest.FixtureRequest
) -> None:
    async with broker_manager(kind, request) as first:
        await publish(first.get_websocket_manager(ALICE), "t1", 5)
        old = await epoch_of(first.get_websocket_manager(ALICE))
    if kind == "redis":
        await flushall(redis_url(request))
    # The restarted server (a new manager; on Redis, after FLUSHALL) has a new t1 stream.
    async with broker_manager(kind, request) as second:
        session = second.get_websocket_manager(ALICE)
        await publish(session, "t1", 6)
        client, _ = await connect(session)
        ack, frames = await ack_and_replay(client, since_seq=3)
        assert (ack["recovered"], frames) == (False, [])
        assert ack["epoch"] != old
        await assert_nothing_pending(client)
        ack, frames = await ack_and_replay(client, "t1", since_seq=3, epoch=old)
        assert (ack["recovered"], frames) == (False, [])
        await assert_nothing_pending(client)
        other, _ = await connect(session)
        ack, frames = await ack_and_replay(other, since_seq=0)  # the whole stream: no epoch
        assert ack["recovered"] is True
        assert [f["seq"] for f in frames] == [1, 2, 3, 4, 5, 6]
        await assert_nothing_pending(other)


async def stream_answer(
    run: Any, deltas: list[str], started: trio.Event, proceed: trio.Event
) -> None:
    """An agent body: a thinking step, half the deltas, a tool call, then (after ``proceed``)
    the rest."""
    await run.thinking("planning", step=1)
    half = len(deltas) // 2
    for piece in deltas[:half]:
        await run.text(piece)
    await run.tool_executing("search", {"q": "x"})
    await run.tool_completed("search", {"hits": 1})
    started.set()
    with trio.fail_after(STEP):
        await proceed.wait()
    for piece in deltas[half:]:
        await run.text(piece)
    run.result = "done"


@pytest.mark.parametrize(
    ("kind", "producer"),
    [("memory", "session"), ("redis", "session"), ("redis", "publisher")],
)
async def test_a_reload_mid_run_rebuilds_the_whole_answer(
    kind: str, producer: str, request: pytest.FixtureRequest
) -> None:
    # history_size is far below the run's 400 events: the run is kept whole anyway.
    deltas = [f"w{n} " for n in range(400)]
    async with broker_manager(kind, request, history_size=5) as manager:
        session = manager.get_websocket_manager(ALICE)
        await publish(session, "t1", 3)  # before the run
        # A tab already watching: once it has the tool call, this node has delivered every
        # event published so far (a publisher's reach it over pub/sub after they are stored),
        # so none of them can arrive live after the reloaded page's first ack.
        watcher, _ = await connect(session, ("t1",), capacity=1024)
        started, proceed = trio.Event(), trio.Event()
        async with trio.open_nursery() as nursery:

            async def agent() -> None:
                if producer == "session":
                    async with session.run("t1", run_id="r1") as run:
                        await stream_answer(run, deltas, started, proceed)
                else:
                    async with RedisPublisher(redis_url(request)) as pub, pub.run(
                        "alice", "t1", run_id="r1"
                    ) as run:
                        await stream_answer(run, deltas, started, proceed)

            nursery.start_soon(agent)
            with trio.fail_after(STEP):
                await started.wait()
                await watcher.receive_until("tool_completed")
            # The reloaded page knows nothing: a plain subscribe names the run in progress.
            page, _ = await connect(session, capacity=1024)
            ack, _ = await ack_and_replay(page)
            assert ack["recovered"] is False
            assert ack["active_runs"] == [{"run_id": "r1", "first_seq": 4}]
            await page.send({"type": "unsubscribe", "thread_id": "t1"})
            assert (await page.receive())["type"] == "unsubscribed"
            # One resume from first_seq - 1 with the epoch brings the whole run so far.
            ack, replay = await ack_and_replay(page, since_seq=3, epoch=ack["epoch"])
            assert ack["recovered"] is True
            assert ack["active_runs"] == [{"run_id": "r1", "first_seq": 4}]
            assert [f["type"] for f in replay] == [
                "agent_started", "agent_thinking", "agent_text", "tool_executing",
                "tool_completed",
            ]
            assert replay[2]["data"]["from_seq"] == 6  # compacted: 200 deltas in one frame
            proceed.set()
            with trio.fail_after(STEP):
                live = await page.receive_until("agent_completed")
        texts, last = apply_replay([*replay, *live], last_seq=3)
        assert texts == {"r1": "".join(deltas)}
        assert last == ack["seq"] + len(live)
        # The run has ended: no longer active, and still resumable whole.
        other, _ = await connect(session, capacity=1024)
        ack, again = await ack_and_replay(other, since_seq=3, epoch=ack["epoch"])
        assert ack["active_runs"] == []
        assert apply_replay(again, last_seq=3)[0] == {"r1": "".join(deltas)}


@BROKERS
async def test_compact_false_replays_one_frame_per_delta_on_both_brokers(
    kind: str, request: pytest.FixtureRequest
) -> None:
    """``"compact": false`` (what the Vercel AI translator's resume sends): the replay has the
    live stream's frames, one per delta, so a client counting frames stays aligned."""
    deltas = [f"d{n} " for n in range(60)]
    async with broker_manager(kind, request) as manager:
        session = manager.get_websocket_manager(ALICE)
        async with session.run("t1", run_id="r1") as run:
            for piece in deltas:
                await run.text(piece)
        client, _ = await connect(session, capacity=1024)
        ack, compacted = await ack_and_replay(client, since_seq=0)
        await client.send({"type": "unsubscribe", "thread_id": "t1"})
        with trio.fail_after(STEP):
            assert (await client.receive())["type"] == "unsubscribed"
        ack, expanded = await ack_and_replay(client, since_seq=20, epoch=ack["epoch"],
                                             compact=False)
        assert ack["recovered"] is True
        assert [f["seq"] for f in expanded] == list(range(21, ack["seq"] + 1))
        texts = [f["data"] for f in expanded if f["type"] == "agent_text"]
        assert texts == [{"text": piece} for piece in deltas[19:]]  # seq 1 is agent_started
        assert any("from_seq" in f["data"] for f in compacted)
        assert apply_replay(compacted)[0] == {"r1": "".join(deltas)}
        await assert_nothing_pending(client)


@pytest.mark.parametrize(
    ("kind", "producer"),
    [("memory", "session"), ("redis", "session"), ("redis", "publisher")],
)
async def test_a_run_past_max_run_bytes_ends_with_agent_error_run_too_large(
    kind: str, producer: str, request: pytest.FixtureRequest
) -> None:
    async with broker_manager(kind, request, max_run_bytes=4000) as manager:
        session = manager.get_websocket_manager(ALICE)
        client, _ = await connect(session, ("t1",), capacity=256)
        assert (await client.receive())["type"] == "subscribed"
        published = 0

        async def body(run: Any) -> None:
            nonlocal published
            while True:
                await run.thinking("x" * 200)
                published += 1

        # coredis's client wraps what escapes its block in an exception group.
        too_large = pytest.RaisesGroup(
            pytest.RaisesExc(RunTooLarge, match="max_run_bytes"),
            allow_unwrapped=True, flatten_subgroups=True,
        )
        with too_large:
            if producer == "session":
                async with session.run("t1", run_id="big") as run:
                    await body(run)
            else:
                config = Config(max_run_bytes=4000)
                async with RedisPublisher(redis_url(request), config) as pub, pub.run(
                    "alice", "t1", run_id="big"
                ) as publisher_run:
                    await body(publisher_run)
        assert 5 < published < 20
        with trio.fail_after(STEP):
            frames = await client.receive_until("agent_error")
        assert frames[-1]["data"]["error_type"] == "RunTooLarge"
        assert len(frames) == published + 2  # agent_started, the admitted steps, agent_error
        # Everything it did publish is still resumable whole.
        page, _ = await connect(session, capacity=256)
        ack, replay = await ack_and_replay(page, since_seq=0)
        assert (ack["recovered"], ack["active_runs"]) == (True, [])
        assert [f["type"] for f in replay] == [f["type"] for f in frames]


@pytest.mark.parametrize("compact", [True, False])
async def test_the_reload_benchmark_rebuilds_the_answer(compact: bool) -> None:
    # The reload scenario of benchmarks/, at a tiny size: its pages rebuild the exact text.
    config = Config(compact_text=compact, send_queue_size=10_000, session_linger=0.1)
    row = await measure(config, deltas=400, delta="abcd", clients=3, redis_url=None)
    # Each reload: ack, unsubscribed, ack, agent_started, then the 200 deltas so far.
    assert row["frames_per_reload"] == (5 if compact else 204)
    assert row["text_bytes"] == 800
    if compact:
        assert row["retained_bytes_accounted"] <= 2 * 800 + 1000

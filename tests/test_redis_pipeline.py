"""Pipelined publishing on a real redis-server: ``queue_to_thread`` next to the seq-returning
``send_to_thread``, one script call per thread and batch, one channel message per call.

Rules: real sockets, so no ``autojump_clock`` (the queue's timing rules are tested with it in
test_publish_queue.py); every wait is on a condition within a bound; a frozen redis-server is
always thawed. What is checked: order and gap-free seqs, what Redis stores (read back with
XRANGE), what a node's clients receive, and that a queued event's failure is never silent.
"""

from __future__ import annotations

import asyncio
import itertools
import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import coredis
import pytest
import trio
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import agentcast
from agentcast import (
    AgentEvent,
    BrokerUnavailable,
    Config,
    ConnectionManager,
    EventType,
    RedisBroker,
    RedisPublisher,
    RunTooLarge,
    UserContext,
)
from agentcast.backplane.redis.keys import stream_key
from agentcast.backplane.redis.queue import QueueBudget

from .helpers import Client, connect, thinking
from .redis_server import RedisServer
from .test_redis import wait_for
from .test_redis_liveness import SLACK, TIMEOUT, broker_of, frozen

#: Seconds any single step of these tests may take.
STEP = 10.0


@asynccontextmanager
async def node(url: str, **config: Any) -> AsyncIterator[ConnectionManager]:
    cfg = Config(**{"session_linger": 0.2, **config})
    broker = RedisBroker(url, cfg, timeout=TIMEOUT, outage_grace=60.0)
    async with agentcast.open_manager(cfg, broker=broker) as manager:
        await manager.wait_ready()
        yield manager


def session(manager: ConnectionManager, user: str = "alice") -> agentcast.UserSession:
    return manager.get_websocket_manager(UserContext.from_request(user_id=user))


async def stored(url: str, user: str, thread: str) -> list[tuple[int, dict[str, Any]]]:
    """(seq, frame) of every event Redis keeps for (user, thread), oldest first."""
    async with coredis.Redis.from_url(url, decode_responses=True) as client:
        entries = await client.xrange(stream_key(user, thread))
    return [(int(str(entry.identifier).split("-")[0]), json.loads(entry.field_values["f"]))
            for entry in entries]


async def events_until(client: Client, count: int) -> list[dict[str, Any]]:
    """The next ``count`` event frames (those with a seq) the client receives."""
    frames: list[dict[str, Any]] = []
    with trio.fail_after(STEP):
        while len(frames) < count:
            frame = await client.receive()
            if frame.get("seq") is not None:
                frames.append(frame)
    return frames


async def subscribed(manager: ConnectionManager, user: str, threads: tuple[str, ...]) -> Client:
    client, _ = await connect(session(manager, user), threads, capacity=4096, batch=True)
    for _ in threads:
        assert (await client.receive())["type"] == "subscribed"
    return client


# ---- order ---------------------------------------------------------------------------------

#: Fresh user ids for hypothesis examples sharing one redis-server.
USERS = itertools.count()
#: A producer's script: (thread, "queue" or "send") per event.
SCRIPTS = st.lists(
    st.tuples(st.sampled_from(["t1", "t2", "t3"]), st.sampled_from(["queue", "send"])),
    min_size=1, max_size=60,
)


async def interleave(url: str, user: str, script: list[tuple[str, str]]) -> None:
    threads = ("t1", "t2", "t3")
    async with node(url) as a, node(url) as b:
        watcher = await subscribed(b, user, threads)
        made: dict[str, list[str]] = {t: [] for t in threads}
        returned: dict[str, list[int]] = {t: [] for t in threads}
        with trio.fail_after(STEP):
            for index, (thread, how) in enumerate(script):
                text = f"{thread}:{index}"
                made[thread].append(text)
                if how == "queue":
                    await session(a, user).queue_to_thread(thread, thinking(text))
                else:
                    seq = await session(a, user).send_to_thread(thread, thinking(text))
                    returned[thread].append(seq)
                    # Every event made before it on the thread is stored before it.
                    assert seq == len(made[thread])
            await session(a, user).flush()
        frames = await events_until(watcher, len(script))
        for thread in threads:
            mine = [f for f in frames if f["thread_id"] == thread]
            assert [f["seq"] for f in mine] == list(range(1, len(made[thread]) + 1))
            assert [f["data"]["text"] for f in mine] == made[thread]
            kept = await stored(url, user, thread)
            assert [(seq, f["data"]["text"]) for seq, f in kept] == list(
                enumerate(made[thread], start=1)
            )


@settings(
    max_examples=12, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(script=SCRIPTS)
def test_queued_and_sent_events_of_interleaved_threads_keep_order_and_gap_free_seqs(
    redis_server: RedisServer, script: list[tuple[str, str]]
) -> None:
    # Each example is a fresh user on the same redis-server, so examples cannot meet.
    trio.run(interleave, redis_server.url, f"user{next(USERS)}", script)


async def test_concurrent_producers_on_one_thread_get_distinct_gap_free_seqs(
    redis_server: RedisServer,
) -> None:
    async with node(redis_server.url) as a:
        watcher = await subscribed(a, "alice", ("t1",))
        sent: list[int] = []

        async def producer(name: str) -> None:
            for i in range(50):
                if i % 10 == 9:
                    sent.append(await session(a).send_to_thread("t1", thinking(f"{name}{i}")))
                else:
                    await session(a).queue_to_thread("t1", thinking(f"{name}{i}"))

        with trio.fail_after(STEP):
            async with trio.open_nursery() as nursery:
                for name in "abcd":
                    nursery.start_soon(producer, name)
            await session(a).flush()
        frames = await events_until(watcher, 200)
        assert [f["seq"] for f in frames] == list(range(1, 201))
        for name in "abcd":  # each producer's own events in its order
            mine = [f["data"]["text"] for f in frames if f["data"]["text"].startswith(name)]
            assert mine == [f"{name}{i}" for i in range(50)]
        assert len(set(sent)) == 20


# ---- batches across nodes ------------------------------------------------------------------


async def test_a_burst_reaches_both_nodes_as_few_channel_messages_and_batched_writes(
    redis_server: RedisServer,
) -> None:
    async with node(redis_server.url) as a, node(redis_server.url) as b:
        here, there = await subscribed(a, "alice", ("t1",)), await subscribed(b, "alice", ("t1",))
        received_before = broker_of(b).backplane_stats().pubsub_messages
        with trio.fail_after(STEP):
            for i in range(300):
                await session(a).queue_to_thread("t1", thinking(str(i)))
            await session(a).flush()
        for client in (here, there):
            frames = await events_until(client, 300)
            assert [f["seq"] for f in frames] == list(range(1, 301))
            assert [f["data"]["text"] for f in frames] == [str(i) for i in range(300)]
        messages = broker_of(b).backplane_stats().pubsub_messages - received_before
        # One channel message per script call, many events per call; the writers batch.
        assert messages < 100
        assert there.messages < 150


async def test_a_resume_after_a_batch_replays_exactly_what_was_missed(
    redis_server: RedisServer,
) -> None:
    async with node(redis_server.url) as a, node(redis_server.url) as b:
        first = await subscribed(a, "alice", ("t1",))
        with trio.fail_after(STEP):
            for i in range(60):
                await session(a).queue_to_thread("t1", thinking(str(i)))
            await session(a).flush()
        assert len(await events_until(first, 60)) == 60
        epoch = (await session(b).recover("t1", None, None)).epoch
        back, _ = await connect(session(b), capacity=4096, batch=True)
        await back.send({"type": "subscribe", "thread_id": "t1", "since_seq": 20,
                         "epoch": epoch, "compact": False})
        with trio.fail_after(STEP):
            ack = await back.receive()
        assert (ack["type"], ack["recovered"]) == ("subscribed", True)
        replay = await events_until(back, 40)
        assert [f["seq"] for f in replay] == list(range(21, 61))
        assert [f["data"]["text"] for f in replay] == [str(i) for i in range(20, 60)]


# ---- refusals inside a batch ---------------------------------------------------------------


def text(run_id: str, size: int) -> AgentEvent:
    return AgentEvent(EventType.AGENT_TEXT, {"text": "x" * size}, run_id=run_id)


async def test_run_too_large_inside_a_batch_refuses_from_the_crossing_event_on(
    redis_server: RedisServer,
) -> None:
    cap = 4000
    async with node(redis_server.url, max_run_bytes=cap) as a:
        watcher = await subscribed(a, "alice", ("t1",))
        run = "run-big"
        with trio.fail_after(STEP):
            await session(a).queue_to_thread(
                "t1", AgentEvent(EventType.AGENT_STARTED, {"agent_name": "w"}, run_id=run)
            )
            for _ in range(30):  # ~300 bytes each: the cap falls inside the batch
                await session(a).queue_to_thread("t1", text(run, 200))
            done = {"result": None, "duration_ms": 1}
            await session(a).queue_to_thread(
                "t1", AgentEvent(EventType.AGENT_COMPLETED, done, run_id=run)
            )
            await session(a).queue_to_thread("t1", thinking("after the run"))
            with pytest.raises(RunTooLarge, match=r"events queued earlier on thread 't1'.*run-big"):
                await session(a).flush()
            await session(a).flush()  # reported once
        kept = await stored(redis_server.url, "alice", "t1")
        types = [f["type"] for _, f in kept]
        assert [seq for seq, _ in kept] == list(range(1, len(kept) + 1))  # no gap
        assert types[0] == "agent_started"
        assert types[-2:] == ["agent_completed", "agent_thinking"]  # never refused
        assert 1 < types.count("agent_text") < 30
        assert sum(len(json.dumps(f, separators=(",", ":"))) for _, f in kept[:-1]) <= cap
        frames = await events_until(watcher, len(kept))
        assert [f["seq"] for f in frames] == [seq for seq, _ in kept]


async def test_a_refused_queued_event_is_raised_by_the_threads_next_call(
    redis_server: RedisServer,
) -> None:
    async with node(redis_server.url, max_run_bytes=2000) as a:
        run = "run-big"
        with trio.fail_after(STEP):
            await session(a).queue_to_thread(
                "t1", AgentEvent(EventType.AGENT_STARTED, {"agent_name": "w"}, run_id=run)
            )
            await session(a).queue_to_thread("t2", thinking("other thread"))
            for _ in range(12):
                await session(a).queue_to_thread("t1", text(run, 300))
            await wait_for(lambda: broker_of(a).backplane_stats().pipeline_depth == 0)
            assert await session(a).send_to_thread("t2", thinking("t2 is fine")) == 2
            with pytest.raises(RunTooLarge, match="queued earlier on thread 't1'"):
                await session(a).send_to_thread("t1", thinking("not published"))
            seq = await session(a).send_to_thread("t1", thinking("published"))
        kept = await stored(redis_server.url, "alice", "t1")
        assert kept[-1] == (seq, kept[-1][1])
        assert kept[-1][1]["data"]["text"] == "published"
        assert "not published" not in [f["data"].get("text") for _, f in kept]


# ---- backpressure and failures ------------------------------------------------------------


async def test_producers_wait_for_room_in_a_full_queue_and_lose_nothing(
    redis_server: RedisServer,
) -> None:
    async with node(redis_server.url) as a, node(redis_server.url) as b:
        broker = broker_of(a)
        broker._pipeline.budget = QueueBudget(max_events=8)
        threads = ("t1", "t2", "t3", "t4")
        watcher = await subscribed(b, "alice", threads)
        depths: list[int] = []

        async def producer(thread: str) -> None:
            for i in range(100):
                await session(a).queue_to_thread(thread, thinking(f"{thread}:{i}"))
                depths.append(broker.backplane_stats().pipeline_depth)

        with trio.fail_after(STEP):
            async with trio.open_nursery() as nursery:
                for thread in threads:
                    nursery.start_soon(producer, thread)
            await session(a).flush()
        assert max(depths) <= 8
        frames = await events_until(watcher, 400)
        for thread in threads:
            mine = [f for f in frames if f["thread_id"] == thread]
            assert [f["seq"] for f in mine] == list(range(1, 101))
            assert [f["data"]["text"] for f in mine] == [f"{thread}:{i}" for i in range(100)]


async def test_a_frozen_redis_fails_queued_events_loudly_and_reports_nothing_unstored(
    redis_server: RedisServer,
) -> None:
    async with node(redis_server.url) as a:
        broker = broker_of(a)
        with trio.fail_after(STEP):
            for i in range(5):
                await session(a).queue_to_thread("t1", thinking(f"stored {i}"))
            await session(a).flush()  # returned: all five are stored
        assert len(await stored(redis_server.url, "alice", "t1")) == 5
        with frozen(redis_server):
            # Queued before the node notices the freeze: each call returns at once.
            with trio.fail_after(SLACK):
                for thread in ("t1", "t2"):
                    for i in range(3):
                        await session(a).queue_to_thread(thread, thinking(f"frozen {i}"))
            with trio.fail_after(2 * TIMEOUT + SLACK), pytest.raises(
                BrokerUnavailable, match=r"events queued earlier on thread 't1' not stored"
            ):
                await session(a).flush()
            assert broker.backplane_stats().pipeline_depth == 0
            with trio.fail_after(SLACK), pytest.raises(BrokerUnavailable):
                await session(a).queue_to_thread("t1", thinking("refused while frozen"))
        with trio.fail_after(STEP):
            await a.wait_ready()
            # t2's failure was not reported yet: its next call raises it and publishes nothing.
            with pytest.raises(BrokerUnavailable, match="queued earlier on thread 't2'"):
                await session(a).queue_to_thread("t2", thinking("not published"))
            seq = await session(a).send_to_thread("t1", thinking("after"))
            await session(a).flush()
        kept = await stored(redis_server.url, "alice", "t1")
        # Every event reported stored is there, seqs have no gap, and the batch that was on the
        # wire when Redis froze may have been stored when it woke (its error said so).
        texts = [f["data"]["text"] for _, f in kept]
        assert texts[:5] == [f"stored {i}" for i in range(5)]
        assert texts[-1] == "after"
        assert [s for s, _ in kept] == list(range(1, seq + 1))
        assert set(texts[5:-1]) <= {f"frozen {i}" for i in range(3)}
        assert "not published" not in [
            f["data"]["text"] for _, f in await stored(redis_server.url, "alice", "t2")
        ]


# ---- the publisher -------------------------------------------------------------------------


async def test_the_publisher_queues_in_order_with_its_sends_and_flushes_on_exit(
    redis_server: RedisServer,
) -> None:
    async with node(redis_server.url) as a:
        watcher = await subscribed(a, "alice", ("t1",))
        with trio.fail_after(STEP):
            async with RedisPublisher(redis_server.url, timeout=TIMEOUT) as pub:
                for i in range(40):
                    await pub.queue_to_thread("alice", "t1", thinking(str(i)))
                assert await pub.send_to_thread("alice", "t1", thinking("40")) == 41
                for i in range(41, 80):
                    await pub.queue_to_thread("alice", "t1", thinking(str(i)))
            # Leaving the block flushed the last 39.
        frames = await events_until(watcher, 80)
        assert [f["seq"] for f in frames] == list(range(1, 81))
        assert [f["data"]["text"] for f in frames] == [str(i) for i in range(80)]
        assert len(await stored(redis_server.url, "alice", "t1")) == 80


def test_the_publisher_queues_and_flushes_under_asyncio(redis_server: RedisServer) -> None:
    async def main() -> list[int]:
        async with RedisPublisher(redis_server.url, timeout=TIMEOUT) as pub:
            for i in range(30):
                await pub.queue_to_thread("alice", "t1", thinking(str(i)))
            await pub.flush()
            return [await pub.send_to_thread("alice", "t1", thinking("last"))]

    assert asyncio.run(asyncio.wait_for(main(), STEP)) == [31]


async def test_a_publisher_on_a_frozen_redis_raises_a_queued_failure_from_flush(
    redis_server: RedisServer,
) -> None:
    async with RedisPublisher(redis_server.url, timeout=TIMEOUT) as pub:
        with trio.fail_after(STEP):
            await pub.queue_to_thread("alice", "t1", thinking("stored"))
            await pub.flush()
        with frozen(redis_server):
            await pub.queue_to_thread("alice", "t1", thinking("frozen"))
            with trio.fail_after(2 * TIMEOUT + SLACK), pytest.raises(
                BrokerUnavailable, match="an event queued earlier on thread 't1' not stored"
            ):
                await pub.flush()
        with trio.fail_after(STEP):
            await pub.flush()  # reported once; nothing else queued
            seq = await pub.send_to_thread("alice", "t1", thinking("after"))
    assert seq in (2, 3)  # the frozen one may have been stored when Redis woke

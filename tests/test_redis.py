"""The Redis backplane against a real redis-server: two managers in one trio run are two nodes.

Rules: real sockets, so no ``autojump_clock``; every wait is on a condition within a bound.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

import coredis
import pytest
import trio

import agentcast
from agentcast import (
    AgentEvent,
    Config,
    ConnectionManager,
    RedisBroker,
    RedisPublisher,
    UserContext,
)
from agentcast.backplane.redis.streams import StreamOps

from .helpers import Client, connect, thinking
from .redis_server import RedisServer, free_port

#: Seconds any single step of these tests may take.
STEP = 10.0


@asynccontextmanager
async def node(url: str, **config: Any) -> AsyncIterator[ConnectionManager]:
    """One node: a manager on a RedisBroker."""
    cfg = Config(**{"session_linger": 0.2, **config})
    async with agentcast.open_manager(cfg, broker=RedisBroker(url, cfg)) as manager:
        yield manager


async def wait_for(condition: Callable[[], bool]) -> None:
    """Poll ``condition`` (state changed by Redis, outside any trio event) until true, failing
    after ``STEP`` seconds."""
    with trio.fail_after(STEP):
        while not condition():  # noqa: ASYNC110 - the change comes from another process
            await trio.sleep(0.01)


async def flushall(url: str) -> None:
    async with coredis.Redis.from_url(url, decode_responses=True) as client:
        await client.flushall()


async def numsub(url: str, user_id: str) -> int:
    async with coredis.Redis.from_url(url, decode_responses=True) as client:
        channel = f"agentcast:{{{user_id}}}:live"
        return int((await client.pubsub_numsub(channel))[channel])


async def seqs_until(client: Client, count: int) -> list[int]:
    seqs: list[int] = []
    with trio.fail_after(STEP):
        while len(seqs) < count:
            frame = await client.receive()
            if frame["type"] == "agent_thinking":
                seqs.append(frame["seq"])
    return seqs


def session(manager: ConnectionManager, user: str = "alice") -> agentcast.UserSession:
    return manager.get_websocket_manager(UserContext.from_request(user_id=user))


async def test_two_nodes_deliver_every_event_in_order_once(redis_server: RedisServer) -> None:
    async with node(redis_server.url) as a, node(redis_server.url) as b:
        on_a, _ = await connect(session(a), ("t1",), capacity=1024)
        on_b, _ = await connect(session(b), ("t1",), capacity=1024)
        for client in (on_a, on_b):
            assert (await client.receive())["type"] == "subscribed"
        for i in range(100):
            await session(a if i % 2 else b).send_to_thread("t1", thinking(str(i)))
        expected = list(range(1, 101))
        assert await seqs_until(on_a, 100) == expected
        assert await seqs_until(on_b, 100) == expected


async def test_concurrent_publishes_are_pipelined_and_keep_each_threads_order(
    redis_server: RedisServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    pipelines: list[int] = []
    send = StreamOps._pipeline

    async def counted(ops: StreamOps, batch: list[Any]) -> None:
        pipelines.append(len(batch))
        await send(ops, batch)

    monkeypatch.setattr(StreamOps, "_pipeline", counted)
    users = [f"user{index}" for index in range(20)]
    async with node(redis_server.url) as a, node(redis_server.url) as b:
        clients = {}
        for user in users:
            clients[user], _ = await connect(session(b, user), ("t1",), capacity=1024)
            assert (await clients[user].receive())["type"] == "subscribed"
        returned: dict[str, list[int]] = {user: [] for user in users}

        async def emit(user: str) -> None:
            for i in range(25):
                returned[user].append(await session(a, user).send_to_thread("t1", thinking(str(i))))

        async with trio.open_nursery() as nursery:
            for user in users:
                nursery.start_soon(emit, user)
        expected = list(range(1, 26))
        for user in users:
            assert returned[user] == expected  # each publish got its own seq, in order
            assert await seqs_until(clients[user], 25) == expected  # delivered on the other node
    assert sum(pipelines) == 20 * 25
    assert max(pipelines) > 1  # publishes made meanwhile shared a round trip


async def test_a_flushed_script_cache_is_reloaded_and_the_publish_succeeds(
    redis_server: RedisServer,
) -> None:
    async with node(redis_server.url) as a:
        client, _ = await connect(session(a), ("t1",))
        assert (await client.receive())["type"] == "subscribed"
        assert await session(a).send_to_thread("t1", thinking("before")) == 1
        async with coredis.Redis.from_url(redis_server.url, decode_responses=True) as admin:
            await admin.script_flush()
        assert await session(a).send_to_thread("t1", thinking("after")) == 2
        assert await seqs_until(client, 2) == [1, 2]


async def test_publisher_events_and_run_reach_a_node(redis_server: RedisServer) -> None:
    async with node(redis_server.url) as a:
        client, _ = await connect(session(a), ("t1",))
        await client.receive()
        async with RedisPublisher(redis_server.url) as pub:
            assert await pub.send_to_thread("alice", "t1", thinking("hi")) == 1
            await pub.send_to_user("alice", AgentEvent("notice_custom", {"x": 1}))
            async with pub.run("alice", "t1", agent_name="worker") as run:
                await run.text("partial")
                run.result = "done"
            with pytest.raises(ValueError, match="boom"):
                async with pub.run("alice", "t1"):
                    raise ValueError("boom")
        with trio.fail_after(STEP):
            frames = await client.receive_until("agent_error")
        types = [frame["type"] for frame in frames]
        assert types == ["agent_thinking", "notice_custom", "agent_started", "agent_text",
                         "agent_completed", "agent_started", "agent_error"]
        assert frames[4]["data"]["result"] == "done"
        assert [f["seq"] for f in frames if f["seq"] is not None] == [1, 2, 3, 4, 5, 6]


async def test_resume_on_another_node_replays_exactly_what_was_missed(
    redis_server: RedisServer,
) -> None:
    async with node(redis_server.url) as a, node(redis_server.url) as b:
        client, connection = await connect(session(a), ("t1",), capacity=256)
        ack = await client.receive()
        for i in range(5):
            await session(a).send_to_thread("t1", thinking(str(i)))
        assert await seqs_until(client, 5) == [1, 2, 3, 4, 5]
        await session(a).remove_connection(connection.connection_id)
        async with RedisPublisher(redis_server.url) as pub:
            for i in range(5, 12):
                await pub.send_to_thread("alice", "t1", thinking(str(i)))
        moved, _ = await connect(session(b), capacity=256)
        await moved.send({"type": "subscribe", "thread_id": "t1", "since_seq": 5,
                          "epoch": ack["epoch"]})
        resumed = await moved.receive()
        assert resumed["recovered"] is True
        assert resumed["seq"] == 12
        assert await seqs_until(moved, 7) == list(range(6, 13))


async def test_flushed_history_is_a_new_epoch_and_not_recovered(
    redis_server: RedisServer,
) -> None:
    async with node(redis_server.url) as a:
        client, _ = await connect(session(a), ("t1",))
        ack = await client.receive()
        await session(a).send_to_thread("t1", thinking("x"))
        await seqs_until(client, 1)
        await flushall(redis_server.url)
        again, _ = await connect(session(a))
        await again.send({"type": "subscribe", "thread_id": "t1", "since_seq": 1,
                          "epoch": ack["epoch"]})
        resumed = await again.receive()
        assert resumed["recovered"] is False
        assert resumed["epoch"] != ack["epoch"]


async def test_a_node_subscribes_only_to_users_it_holds(redis_server: RedisServer) -> None:
    url = redis_server.url
    async with node(url) as a, node(url) as b:
        assert await numsub(url, "alice") == 0
        client, connection = await connect(session(a), ("t1",))
        await client.receive()
        assert await numsub(url, "alice") == 1
        assert await numsub(url, "bob") == 0
        bob, _ = await connect(session(b, "bob"), ("t1",))
        await bob.receive()
        assert await numsub(url, "bob") == 1
        assert await numsub(url, "alice") == 1
        await session(a).remove_connection(connection.connection_id)
        await wait_for(lambda: a.session("alice") is None)
        assert await numsub(url, "alice") == 0


async def test_redis_restart_closes_with_1012_and_resume_loses_nothing_kept(
    persistent_redis: RedisServer,
) -> None:
    url = persistent_redis.url
    async with node(url) as a:
        broker = a.broker
        client, _ = await connect(session(a), ("t1",), capacity=256)
        ack = await client.receive()
        for i in range(3):
            await session(a).send_to_thread("t1", thinking(str(i)))
        assert await seqs_until(client, 3) == [1, 2, 3]
        assert broker.statistics().ready
        await trio.to_thread.run_sync(persistent_redis.stop)
        with trio.fail_after(STEP):
            _, code = await client.receive_closed()
        assert code == 1012
        await wait_for(lambda: not broker.statistics().ready)
        assert "redis unavailable" in broker.statistics().reason
        with pytest.raises(agentcast.BrokerUnavailable):
            await session(a).send_to_thread("t1", thinking("lost"))
        await trio.to_thread.run_sync(persistent_redis.start)
        await wait_for(lambda: broker.statistics().ready)
        async with RedisPublisher(url) as pub:
            await pub.send_to_thread("alice", "t1", thinking("after"))
        back, _ = await connect(session(a), capacity=256)
        await back.send({"type": "subscribe", "thread_id": "t1", "since_seq": 3,
                         "epoch": ack["epoch"]})
        resumed = await back.receive()
        assert resumed["recovered"] is True
        assert resumed["epoch"] == ack["epoch"]
        assert await seqs_until(back, 1) == [4]
        await session(a).send_to_thread("t1", thinking("live"))
        assert await seqs_until(back, 1) == [5]


async def test_unreachable_at_start_then_connects(tmp_path: Any) -> None:
    from .redis_server import redis_binary

    server = RedisServer(redis_binary(), tmp_path, free_port())
    async with node(server.url) as a:
        stats = a.broker.statistics()
        assert not stats.ready
        assert "redis unavailable" in stats.reason
        await trio.to_thread.run_sync(server.start)
        try:
            await wait_for(lambda: a.broker.statistics().ready)
            client, _ = await connect(session(a), ("t1",))
            await client.receive()
            await session(a).send_to_thread("t1", thinking("x"))
            assert await seqs_until(client, 1) == [1]
        finally:
            await trio.to_thread.run_sync(server.stop)


def test_publisher_works_under_asyncio(redis_server: RedisServer) -> None:
    url = redis_server.url

    async def timed_out_run(pub: RedisPublisher) -> None:
        # asyncio.timeout cancels the body the way asyncio programs do, then raises TimeoutError.
        async with asyncio.timeout(0.05), pub.run("alice", "t9"):
            await asyncio.sleep(STEP)

    async def main() -> list[str]:
        async with RedisPublisher(url) as pub:
            await pub.send_to_thread("alice", "t9", thinking("from asyncio"))
            async with pub.run("alice", "t9") as run:
                await run.thinking("step")
            with pytest.raises(TimeoutError):
                await timed_out_run(pub)
        async with coredis.Redis.from_url(url, decode_responses=True) as client:
            entries = await client.xrange("agentcast:{alice}:t:t9:events")
        return [str(entry.field_values["f"]) for entry in entries]

    frames = asyncio.run(main())
    types = [frame.split('"type":"')[1].split('"')[0] for frame in frames]
    assert types == ["agent_thinking", "agent_started", "agent_thinking", "agent_completed",
                     "agent_started", "agent_cancelled"]
    assert all(f'"seq":{i},' in frame for i, frame in enumerate(frames, 1))

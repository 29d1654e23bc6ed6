"""Presence and the per-user connection limit: on one node, and across a cluster of nodes on a
real redis-server (in-process managers, and ``agentcast serve`` processes one of which is
SIGKILLed).

Rules: the in-memory tests use no sockets; the Redis ones use real sockets, so no
``autojump_clock``, and every wait is on a condition within a bound.
"""

from __future__ import annotations

import gc
import signal
import subprocess
import warnings
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import coredis
import pytest
import trio
import trio.testing
from trio_websocket import ConnectionRejected, open_websocket_url

import agentcast
from agentcast import (
    Config,
    ConnectionManager,
    Presence,
    RedisBroker,
    RedisPublisher,
    TooManyConnections,
    UserContext,
)
from agentcast.backplane.redis.keys import PRESENCE_TTL
from agentcast.backplane.redis.streams import StreamOps
from agentcast.server import issue_token

from .helpers import connect
from .redis_server import RedisServer
from .test_redis_nodes import agentcast_serve

#: Seconds any single step may take.
STEP = 10.0
SECRET = "a-test-secret-that-is-long-enough-for-hs256"


def alice(manager: ConnectionManager) -> agentcast.UserSession:
    return manager.get_websocket_manager(UserContext.from_request(user_id="alice"))


async def test_presence_on_one_node_counts_open_connections(manager: ConnectionManager) -> None:
    assert await manager.presence("alice") == Presence(0, 0)
    assert not (await manager.presence("alice")).online
    session = alice(manager)
    _, first = await connect(session)
    await connect(session)
    assert await manager.presence("alice") == Presence(2, 1)
    assert await manager.presence("bob") == Presence(0, 0)
    assert await session.remove_connection(first.connection_id)
    assert await manager.presence("alice") == Presence(1, 1)


async def test_presence_counts_a_handshake_in_flight_like_the_limit_does(
    manager: ConnectionManager,
) -> None:
    session = alice(manager)
    slot = session.reserve_connection()
    assert await manager.presence("alice") == Presence(1, 1)
    slot.release()
    assert await manager.presence("alice") == Presence(0, 0)


@asynccontextmanager
async def node(url: str, **config: Any) -> AsyncIterator[ConnectionManager]:
    cfg = Config(**{"session_linger": 0.2, "max_connections_per_user": 3, **config})
    async with agentcast.open_manager(cfg, broker=RedisBroker(url, cfg)) as manager:
        await manager.wait_ready()
        yield manager


async def wait_presence(pub: RedisPublisher, expected: Presence) -> None:
    """Poll until the cluster reports ``expected`` (nodes rewrite their entries each
    ``PRESENCE_POLL``; killed nodes' expire after ``PRESENCE_TTL``)."""
    with trio.fail_after(PRESENCE_TTL + STEP):
        while await pub.presence("alice") != expected:  # noqa: ASYNC110 - state in Redis
            await trio.sleep(0.05)


async def test_the_limit_holds_across_two_nodes_and_a_closed_place_comes_back(
    redis_server: RedisServer,
) -> None:
    url = redis_server.url
    async with node(url) as a, node(url) as b, RedisPublisher(url) as pub:
        _, on_a = await connect(alice(a))
        await connect(alice(a))
        await connect(alice(b))
        for full in (a, b):
            with pytest.raises(TooManyConnections, match="over the cluster"):
                await connect(alice(full))
        assert await a.presence("alice") == Presence(3, 2)
        assert await b.presence("alice") == Presence(3, 2)
        assert await pub.presence("alice") == Presence(3, 2)
        # The refusals gave their places back: still 3 places, on this node and in Redis.
        assert alice(a).connection_places == 2
        assert alice(b).connection_places == 1
        await alice(a).remove_connection(on_a.connection_id)
        await wait_presence(pub, Presence(2, 2))
        await connect(alice(b))
        assert await pub.presence("alice") == Presence(3, 2)
        with pytest.raises(TooManyConnections):
            await connect(alice(a))


async def test_simultaneous_connections_on_two_nodes_never_pass_the_limit(
    redis_server: RedisServer,
) -> None:
    url = redis_server.url
    admitted: list[str] = []
    refused: list[str] = []
    async with node(url) as a, node(url) as b, RedisPublisher(url) as pub:

        async def attempt(manager: ConnectionManager, name: str) -> None:
            try:
                await connect(alice(manager))
            except TooManyConnections:
                refused.append(name)
            else:
                admitted.append(name)

        with trio.fail_after(STEP):
            async with trio.open_nursery() as nursery:
                for i in range(8):
                    nursery.start_soon(attempt, a, f"a{i}")
                    nursery.start_soon(attempt, b, f"b{i}")
        assert len(admitted) + len(refused) == 16
        assert 1 <= len(admitted) <= 3
        places = alice(a).connection_places + alice(b).connection_places
        assert places == len(admitted)
        # Whatever a refusal over-counted for a moment, the nodes' heartbeats settle it.
        await wait_presence(pub, Presence(places, sum(
            1 for m in (a, b) if alice(m).connection_places
        )))


async def test_a_nodes_late_smaller_count_never_overwrites_a_newer_one(
    redis_server: RedisServer,
) -> None:
    async with coredis.Redis.from_url(redis_server.url, decode_responses=True) as client:
        ops = StreamOps(client, Config())
        await ops.load_scripts()
        assert await ops.sync_presence("alice", "n1", 2, 3, seq=2) == (True, 2, 1)
        # Counted earlier (seq 1) but arriving later: the newer count stays, and since it
        # includes this place, the place is admitted.
        assert await ops.sync_presence("alice", "n1", 1, 3, seq=1) == (True, 2, 1)
        assert await ops.sync_presence("alice", "n2", 2, 3, seq=1) == (False, 3, 2)
        assert await ops.presence("alice") == Presence(3, 2)
        assert await ops.sync_presence("alice", "n1", 0, None, seq=3) == (True, 1, 1)
        assert await ops.presence("alice") == Presence(1, 1)


async def refused_status(port: int) -> int | None:
    """The HTTP status a 4th handshake gets, or None if it was admitted."""
    url = f"ws://127.0.0.1:{port}/ws?token={issue_token(SECRET, 'alice')}"
    try:
        async with open_websocket_url(url):
            return None
    except ConnectionRejected as exc:
        return exc.status_code


# trio-websocket leaves the socket of a connection whose peer vanished to the garbage collector.
@pytest.mark.filterwarnings("ignore:unclosed <socket:ResourceWarning")
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
async def test_serve_processes_share_the_limit_and_a_killed_nodes_places_expire(
    redis_server: RedisServer,
) -> None:
    url = redis_server.url
    flags = ("--redis-url", url, "--max-connections-per-user", "3")
    token = issue_token(SECRET, "alice")
    with agentcast_serve(*flags) as (doomed, port_a), agentcast_serve(*flags) as (_, port_b):
        async with RedisPublisher(url) as pub:
            await holding_then_killed(pub, doomed, port_a, port_b, token)
            # Closed connections give their places back without waiting for an expiry.
            await wait_presence(pub, Presence(0, 0))
    with warnings.catch_warnings():  # collect the killed node's sockets here, not later
        warnings.simplefilter("ignore", ResourceWarning)
        gc.collect()


async def holding_then_killed(
    pub: RedisPublisher, doomed: subprocess.Popen[str], port_a: int, port_b: int, token: str
) -> None:
    """Alice holds 2 connections on A and 1 on B (the limit, 3); A is SIGKILLed; its places
    expire and B admits 2 more, then refuses again."""
    async with trio.open_nursery() as holders:
        stop = trio.Event()

        async def hold(port: int, *, task_status: trio.TaskStatus[None]) -> None:
            ws_url = f"ws://127.0.0.1:{port}/ws?token={token}"
            async with open_websocket_url(ws_url):
                task_status.started()
                await stop.wait()

        with trio.fail_after(STEP):
            await holders.start(hold, port_a)
            await holders.start(hold, port_a)
            await holders.start(hold, port_b)
            assert await pub.presence("alice") == Presence(3, 2)
            assert await refused_status(port_b) == 429
            assert await refused_status(port_a) == 429
        doomed.send_signal(signal.SIGKILL)
        doomed.wait(STEP)
        # The killed node never says goodbye: its entry stops counting at its expiry.
        await wait_presence(pub, Presence(1, 1))
        with trio.fail_after(STEP):
            await holders.start(hold, port_b)
            await holders.start(hold, port_b)
            assert await pub.presence("alice") == Presence(3, 1)
            assert await refused_status(port_b) == 429
        stop.set()


async def test_without_redis_a_limited_connection_is_refused_and_its_slot_given_back(
    redis_server: RedisServer,
) -> None:
    async with node(redis_server.url) as a:
        _, first = await connect(alice(a))
        await trio.to_thread.run_sync(redis_server.stop)
        with trio.fail_after(STEP):
            while a.broker.statistics().ready:  # noqa: ASYNC110 - Redis is another process
                await trio.sleep(0.01)
        with pytest.raises(agentcast.BrokerUnavailable):
            await connect(alice(a))
        # The connection that was open got 1012 and is gone; the refused one left no slot.
        with trio.fail_after(STEP):
            await first.wait_closed()
        assert first.close_code == 1012
        await trio.testing.wait_all_tasks_blocked()
        assert alice(a).connection_places == 0
        with pytest.raises(agentcast.BrokerUnavailable):
            await a.presence("alice")

"""Racing subscribes through a real ``Connection``, on both brokers (issue 10, item 1).

The server subscribes a connection to its token's threads itself; a client that resumes at
once races that subscribe. Every subscribe must get its own ack with its own replay, in the
order they began, and after the last ack the client sees ``S+1, S+2, …`` without a gap or a
duplicate. The property drives interleavings of server subscribes, client subscribes with and
without ``since_seq``/``epoch``, live publishes and unsubscribes; a broker wrapper records the
order in which subscribes asked for their replay and stretches each fetch by a few scheduler
steps (before and after the read), so the in-memory broker races as Redis does.

Rules: the in-memory runs use trio's ``MockClock`` (autojump); the Redis runs use a real
``redis-server`` (every wait bounded by ``trio.fail_after``); the server test uses real
loopback sockets on port 0 and checks that nothing is left behind.
"""

from __future__ import annotations

import itertools
import json
import uuid
from collections.abc import Callable
from typing import Any

import attrs
import pytest
import trio
import trio.testing
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from trio_websocket import WebSocketConnection

import agentcast
from agentcast import Config, InMemoryBroker, Recovery, RedisBroker, UserContext
from agentcast.testing import MemoryTransport

from .helpers import Client, thinking
from .redis_server import RedisServer
from .tokenserver import SETTINGS, bystander, running_node, token

T = "t1"
#: Seconds any one example (or step of the server test) may take in real time.
STEP = 20.0
#: Events retained per thread: small, so "old" resumes fall out of the window.
HISTORY = 5


@attrs.define(eq=False)
class RacingBroker:
    """Delegates to a real broker; records each replay request (in the order subscribes
    began: a connection asks synchronously after it starts a subscribe) and stretches each
    fetch by the scheduler steps ``delays`` give, before and after the read."""

    inner: Any
    delays: list[tuple[int, int]]
    #: since_seq of every replay asked for, in order.
    requests: list[int | None] = attrs.Factory(list)
    _turn: itertools.count[int] = attrs.Factory(itertools.count)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    async def recover(
        self, user_id: str, thread_id: str, since_seq: int | None, epoch: str | None,
        *, compact: bool = True,
    ) -> Recovery:
        self.requests.append(since_seq)
        before, after = self.delays[next(self._turn) % len(self.delays)]
        for _ in range(before):
            await trio.lowlevel.checkpoint()
        recovery: Recovery = await self.inner.recover(
            user_id, thread_id, since_seq, epoch, compact=compact
        )
        for _ in range(after):
            await trio.lowlevel.checkpoint()
        return recovery


#: How a client subscribe asks: live only, from a recent seq, the whole stream, from a seq
#: too old for the window, or with an epoch that is not the stream's.
KINDS = ["live", "recent", "zero", "old", "wrong_epoch"]
SCRIPTS = st.lists(
    st.one_of(
        st.just(("publish",)),
        st.just(("server_subscribe",)),
        st.tuples(st.just("subscribe"), st.sampled_from(KINDS)),
        st.just(("unsubscribe",)),
        st.tuples(st.just("yield"), st.integers(1, 6)),
    ),
    max_size=24,
)
DELAYS = st.lists(st.tuples(st.integers(0, 4), st.integers(0, 4)), min_size=1, max_size=6)
#: What the client sends first, before the connection is even attached: nothing, or a resume.
OPENINGS = st.sampled_from([None, *KINDS])


@attrs.define
class Play:
    """One example: a connection subscribed by the server to T, and its client."""

    session: agentcast.UserSession
    broker: RacingBroker
    client: Client
    nursery: trio.Nursery
    #: Every frame the client has read, in order.
    frames: list[dict[str, Any]] = attrs.Factory(list)
    #: Acks expected since the last unsubscribe (subscribes started, client or server).
    expected: int = 0
    acked: int = 0
    latest: int = 0
    epoch: str = ""

    async def read(self) -> dict[str, Any]:
        frame = await self.client.receive()
        self.frames.append(frame)
        if frame["type"] == "subscribed":
            self.acked += 1
            self.epoch = frame["epoch"]
        return frame

    async def read_acks(self) -> None:
        while self.acked < self.expected:
            await self.read()

    async def client_subscribe(self, kind: str) -> None:
        latest = self.latest
        since, epoch = {
            "live": (None, None),
            "recent": (max(0, latest - 2), self.epoch or None),
            "zero": (0, self.epoch or None),
            "old": (0 if latest <= HISTORY else latest - HISTORY - 2, self.epoch or None),
            "wrong_epoch": (latest, "not-the-epoch"),
        }[kind]
        frame: dict[str, Any] = {"type": "subscribe", "thread_id": T}
        if since is not None:
            frame["since_seq"] = since
        if epoch is not None:
            frame["epoch"] = epoch
        self.expected += 1
        await self.client.send(frame)

    def server_subscribe(self) -> None:
        [connection] = self.session.connections()
        self.expected += 1
        self.nursery.start_soon(connection.subscribe, T)

    async def unsubscribe(self) -> None:
        # Only between subscribes: one that is still in flight is ignored once unsubscribed
        # (tests/test_subscriptions.py covers that), so its ack could not be expected here.
        await self.read_acks()
        await self.client.send({"type": "unsubscribe", "thread_id": T})
        while (await self.read())["type"] != "unsubscribed":
            pass
        self.broker.requests.clear()
        self.expected = self.acked = 0


async def play(
    make_broker: Callable[[Config], Any],
    opening: str | None,
    script: list[tuple[Any, ...]],
    delays: list[tuple[int, int]],
) -> None:
    config = Config(history_size=HISTORY, session_linger=0.0, send_queue_size=4096)
    broker = RacingBroker(make_broker(config), delays)
    user = UserContext.from_request(user_id=f"u-{uuid.uuid4().hex[:8]}")
    with trio.fail_after(STEP):
        async with agentcast.open_manager(config, broker=broker) as manager:
            session = manager.get_websocket_manager(user)
            server_side, client_side = MemoryTransport.pair(capacity=4096)
            async with trio.open_nursery() as nursery:
                game = Play(session, broker, Client(client_side), nursery)
                if opening is not None:
                    await game.client_subscribe(opening)  # queued before the connection exists
                game.expected += 1  # the server's own subscribe of the token's thread
                nursery.start_soon(
                    lambda: session.add_connection(server_side, threads=(T,), batch=True)
                )
                while not session.connections():
                    await trio.lowlevel.checkpoint()
                for step in script:
                    match step:
                        case ("publish",):
                            game.latest = await session.send_to_thread(T, thinking("x"))
                        case ("server_subscribe",):
                            game.server_subscribe()
                        case ("subscribe", kind):
                            await game.client_subscribe(kind)
                        case ("unsubscribe",):
                            await game.unsubscribe()
                        case ("yield", steps):
                            for _ in range(steps):
                                await trio.lowlevel.checkpoint()
                # Every subscribe answered, a few more live events: the view must end at them.
                await game.read_acks()
                for _ in range(3):
                    game.latest = await session.send_to_thread(T, thinking("x"))
                if game.expected:
                    while game.frames[-1]["type"] == "subscribed" or (
                        game.frames[-1]["seq"] != game.latest
                    ):
                        await game.read()
                else:
                    # Unsubscribed at the end: nothing of T may follow; a ping proves it.
                    await game.client.send({"type": "ping", "id": "probe"})
                    while (await game.read())["type"] != "pong":
                        pass
                    assert game.frames[-2]["type"] == "unsubscribed"
                check_client_view(game.frames, broker.requests, game.latest)
                await client_side.aclose()
                connections = session.connections()
                connection = connections[0] if connections else None
                if connection is not None:
                    await connection.wait_closed()
            assert session.connections() == []
            assert session.get_stats().subscriptions == 0


def check_client_view(
    frames: list[dict[str, Any]], requests: list[int | None], latest: int
) -> None:
    """Since the last ``unsubscribed``: one ack per subscribe, each recovered one followed by
    exactly its replay; after the last ack every seq up to ``latest`` once, in order."""
    last_reset = max((i for i, f in enumerate(frames) if f["type"] == "unsubscribed"),
                     default=-1)
    frames = frames[last_reset + 1:]
    acks = [i for i, f in enumerate(frames) if f["type"] == "subscribed"]
    assert len(acks) == len(requests), "every subscribe gets exactly one ack"
    if not requests:
        return
    for index, since in zip(acks, requests, strict=True):
        ack = frames[index]
        if ack["recovered"]:
            assert since is not None
            replay = [f.get("seq") for f in frames[index + 1:index + 1 + ack["seq"] - since]]
            assert replay == list(range(since + 1, ack["seq"] + 1))
    last = frames[acks[-1]]
    since = requests[-1]
    start = since + 1 if last["recovered"] and since is not None else last["seq"] + 1
    after = [f["seq"] for f in frames[acks[-1] + 1:]]
    assert after == list(range(start, latest + 1))


@settings(max_examples=150, deadline=None)
@given(OPENINGS, SCRIPTS, DELAYS)
def test_racing_subscribes_on_the_in_memory_broker(
    opening: str | None, script: list[tuple[Any, ...]], delays: list[tuple[int, int]]
) -> None:
    trio.run(
        play, InMemoryBroker, opening, script, delays,
        clock=trio.testing.MockClock(autojump_threshold=0),
    )


@settings(
    max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(opening=OPENINGS, script=SCRIPTS, delays=DELAYS)
def test_racing_subscribes_on_redis(
    redis_server: RedisServer,
    opening: str | None,
    script: list[tuple[Any, ...]],
    delays: list[tuple[int, int]],
) -> None:
    # Each example is a fresh user on the same redis-server, so examples cannot meet.
    trio.run(play, lambda config: RedisBroker(redis_server.url, config), opening, script, delays)


# ---- the reported bug, over real sockets ---------------------------------------------------


async def resume_at_once(ws: WebSocketConnection, since: int, epoch: str) -> list[dict[str, Any]]:
    """Resume T right after connecting; return the frames up to the end of the second ack's
    replay (the event with seq 10)."""
    await ws.send_message(
        json.dumps({"type": "subscribe", "thread_id": T, "since_seq": since, "epoch": epoch})
    )
    frames: list[dict[str, Any]] = []
    acks = 0
    while acks < 2 or frames[-1]["type"] == "subscribed" or frames[-1]["seq"] != 10:
        message = await ws.get_message()
        assert isinstance(message, str)
        for line in message.split("\n"):
            frames.append(json.loads(line))
            acks += frames[-1]["type"] == "subscribed"
    return frames


@pytest.mark.parametrize("backend", ["memory", "redis"])
async def test_a_resume_right_after_connecting_gets_its_own_recovered_ack(
    backend: str, request: pytest.FixtureRequest
) -> None:
    """A token naming t1, history intact: the client resumes at once after connecting and
    gets the server's own ack, then its own ``recovered: true`` ack and the replay, every time
    (20 connections in a row)."""
    settings_ = SETTINGS
    if backend == "redis":
        server: RedisServer = request.getfixturevalue("redis_server")
        settings_ = attrs.evolve(SETTINGS, redis_url=server.url)
    async with running_node(settings_) as node, bystander(node) as watcher:
        with trio.fail_after(STEP):
            session = node.manager.get_websocket_manager(UserContext.from_request(user_id="al"))
            await node.publish("al", T, 10)
            epoch = (await session.recover(T, None, None)).epoch
        for attempt in range(20):
            with trio.fail_after(STEP):
                async with node.connect(token("al", threads=[T], ttl=600)) as ws:
                    frames = await resume_at_once(ws, 4, epoch)
            acks = [f for f in frames if f["type"] == "subscribed"]
            assert len(acks) == 2, (attempt, frames)
            assert acks[0]["recovered"] is False, attempt  # the server's own, live only
            resumed = {key: acks[1][key] for key in ("thread_id", "seq", "epoch", "recovered")}
            assert resumed == {"thread_id": T, "seq": 10, "epoch": epoch, "recovered": True}
            after = frames[frames.index(acks[1]) + 1:]
            assert [f["seq"] for f in after] == list(range(5, 11)), attempt
        await watcher.check_complete()

"""Isolation: a user's events reach only that user's connections, whatever the thread names.

The property test drives random interleavings of connects, disconnects, subscribe and
unsubscribe frames and publishes over a few users that share thread names, and checks every
client got exactly the events of its own user for the threads it was subscribed to when each
event was published: in order, without duplicates, nothing from anyone else.
"""

from __future__ import annotations

from typing import Any

import attrs
import trio
import trio.testing
from hypothesis import given, settings
from hypothesis import strategies as st
from trio_websocket import ConnectionClosed

import agentcast
from agentcast import AgentEvent, Config, Connection, ConnectionManager, EventType, UserContext

from .helpers import EVENT_TYPES, Client, connect, settle, thinking

USERS = ("alice", "bob", "carol")
THREADS = ("t1", "t2", "t3")
MAX_CONNECTIONS = 4


def ctx(user: str) -> UserContext:
    return UserContext.from_request(user_id=user)



def notice(text: str) -> AgentEvent:
    return AgentEvent(EventType.SYSTEM_NOTICE, {"message": text})


def summary(frame: dict[str, Any]) -> tuple[str, str | None, int | None, str]:
    """What identifies an event frame: type, thread, seq and the marker text in its data."""
    data = frame["data"]
    return frame["type"], frame["thread_id"], frame["seq"], data.get("text", data.get("message"))


@attrs.define(eq=False)
class Recorder:
    """A client read by a background task; remembers every frame it got."""

    user: str
    client: Client
    connection: Connection
    #: Threads the model says this connection is subscribed to.
    threads: set[str]
    frames: list[dict[str, Any]] = attrs.Factory(list)
    #: (control frame type, thread id) -> how many have arrived.
    acks: dict[tuple[str, str], int] = attrs.Factory(dict)
    #: (control frame type, thread id) -> how many the driver has asked for.
    asked: dict[tuple[str, str], int] = attrs.Factory(dict)
    expected: list[tuple[str, str | None, int | None, str]] = attrs.Factory(list)
    open: bool = True
    closed_code: int | None = None
    _changed: trio.Event = attrs.Factory(trio.Event)

    async def read(self) -> None:
        try:
            while True:
                frame = await self.client.receive()
                self.frames.append(frame)
                if frame["type"] in ("subscribed", "unsubscribed"):
                    key = (frame["type"], frame["thread_id"])
                    self.acks[key] = self.acks.get(key, 0) + 1
                self._changed.set()
                self._changed = trio.Event()
        except ConnectionClosed as exc:
            self.closed_code = exc.reason.code if exc.reason is not None else 1006

    def expect_ack(self, kind: str, thread_id: str) -> None:
        key = (kind, thread_id)
        self.asked[key] = self.asked.get(key, 0) + 1

    async def wait_acks(self) -> None:
        """Wait until every ack asked for so far has arrived."""
        while any(self.acks.get(key, 0) < n for key, n in self.asked.items()):
            await self._changed.wait()

    def events(self) -> list[tuple[str, str | None, int | None, str]]:
        return [summary(f) for f in self.frames if f["type"] in EVENT_TYPES]


# ---- the property test ----------------------------------------------------------------------

connects = st.tuples(
    st.just("connect"), st.sampled_from(USERS), st.frozensets(st.sampled_from(THREADS))
)
disconnects = st.tuples(st.just("disconnect"), st.integers(0, MAX_CONNECTIONS - 1))
subscribes = st.tuples(
    st.sampled_from(["subscribe", "unsubscribe"]),
    st.integers(0, MAX_CONNECTIONS - 1),
    st.sampled_from(THREADS),
)
sends = st.tuples(st.just("send"), st.sampled_from(USERS), st.sampled_from(THREADS))
user_sends = st.tuples(st.just("send_user"), st.sampled_from(USERS))
broadcasts = st.tuples(st.just("broadcast"))
operations = st.lists(
    st.one_of(connects, disconnects, subscribes, sends, sends, user_sends, broadcasts),
    max_size=40,
)


@attrs.define(eq=False)
class World:
    """The manager under test plus the model of what every client should receive."""

    manager: ConnectionManager
    nursery: trio.Nursery
    recorders: list[Recorder] = attrs.Factory(list)
    #: (user, thread) -> latest seq published.
    seqs: dict[tuple[str, str], int] = attrs.Factory(dict)
    counter: int = 0

    def live(self) -> list[Recorder]:
        return [r for r in self.recorders if r.open]

    def marker(self, prefix: str) -> str:
        self.counter += 1
        return f"{prefix}/{self.counter}"

    async def apply(self, op: tuple[Any, ...]) -> None:
        kind = op[0]
        if kind == "connect":
            await self.connect(op[1], op[2])
        elif kind == "send":
            await self.send(op[1], op[2])
        elif kind == "send_user":
            await self.send_user(op[1])
        elif kind == "broadcast":
            await self.broadcast()
        elif self.live():
            recorder = self.live()[op[1] % len(self.live())]
            if kind == "disconnect":
                await self.disconnect(recorder)
            else:
                await self.frame(recorder, kind, op[2])

    async def connect(self, user: str, threads: frozenset[str]) -> None:
        if len(self.live()) >= MAX_CONNECTIONS:
            return
        session = self.manager.get_websocket_manager(ctx(user))
        client, connection = await connect(session, tuple(sorted(threads)))
        recorder = Recorder(user, client, connection, set(threads))
        for thread_id in threads:
            recorder.expect_ack("subscribed", thread_id)
        self.recorders.append(recorder)
        self.nursery.start_soon(recorder.read)

    async def disconnect(self, recorder: Recorder) -> None:
        await settle()  # everything sent so far has been read
        recorder.open = False
        await recorder.client.transport.aclose()
        await recorder.connection.wait_closed()

    async def frame(self, recorder: Recorder, kind: str, thread_id: str) -> None:
        await recorder.client.send({"type": kind, "thread_id": thread_id})
        recorder.expect_ack(f"{kind}d", thread_id)
        await recorder.wait_acks()
        if kind == "subscribe":
            recorder.threads.add(thread_id)
        else:
            recorder.threads.discard(thread_id)

    async def send(self, user: str, thread_id: str) -> None:
        marker = self.marker(f"{user}/{thread_id}")
        session = self.manager.get_websocket_manager(ctx(user))
        seq = await session.send_to_thread(thread_id, thinking(marker))
        assert seq == self.seqs.get((user, thread_id), 0) + 1
        self.seqs[user, thread_id] = seq
        for recorder in self.live():
            if recorder.user == user and thread_id in recorder.threads:
                recorder.expected.append(("agent_thinking", thread_id, seq, marker))

    async def send_user(self, user: str) -> None:
        marker = self.marker(f"{user}/*")
        await self.manager.get_websocket_manager(ctx(user)).send_to_user(thinking(marker))
        for recorder in self.live():
            if recorder.user == user:
                recorder.expected.append(("agent_thinking", None, None, marker))

    async def broadcast(self) -> None:
        marker = self.marker("all")
        await self.manager.broadcast(notice(marker))
        for recorder in self.live():
            recorder.expected.append(("system_notice", None, None, marker))

    def check(self) -> None:
        for recorder in self.recorders:
            assert recorder.events() == recorder.expected, recorder
            assert recorder.acks == recorder.asked
        for recorder in self.live():
            assert recorder.closed_code is None
            assert recorder.connection.threads == frozenset(recorder.threads)


async def play_isolation(ops: list[tuple[Any, ...]]) -> None:
    # A long linger and a generous inbound budget: only isolation is under test here.
    config = Config(session_linger=1000.0, inbound_burst=1000)
    with trio.fail_after(600):
        async with agentcast.open_manager(config) as manager, trio.open_nursery() as nursery:
            world = World(manager, nursery)
            for op in ops:
                await world.apply(op)
            await settle()
            world.check()
            nursery.cancel_scope.cancel()


@settings(deadline=None, max_examples=50)
@given(ops=operations)
def test_random_interleavings_deliver_exactly_each_users_own_events(
    ops: list[tuple[Any, ...]],
) -> None:
    trio.run(play_isolation, ops, clock=trio.testing.MockClock(autojump_threshold=0))


# ---- explicit cases -------------------------------------------------------------------------


async def test_same_thread_name_for_two_users_never_crosses(manager: ConnectionManager) -> None:
    alice = manager.get_websocket_manager(ctx("alice"))
    bob = manager.get_websocket_manager(ctx("bob"))
    alice_client, _ = await connect(alice, ("t1",))
    bob_client, _ = await connect(bob, ("t1",))
    alice_ack = await alice_client.receive()
    bob_ack = await bob_client.receive()
    assert alice_ack["type"] == bob_ack["type"] == "subscribed"

    assert await alice.send_to_thread("t1", thinking("for alice 1")) == 1
    assert await alice.send_to_thread("t1", thinking("for alice 2")) == 2
    # Bob's stream of the same thread name starts at 1: the streams are separate.
    assert await bob.send_to_thread("t1", thinking("for bob 1")) == 1

    assert [summary(await alice_client.receive()) for _ in range(2)] == [
        ("agent_thinking", "t1", 1, "for alice 1"),
        ("agent_thinking", "t1", 2, "for alice 2"),
    ]
    assert summary(await bob_client.receive()) == ("agent_thinking", "t1", 1, "for bob 1")
    # Nothing else is pending for either: the next frame is the answer to a ping.
    for client in (alice_client, bob_client):
        await client.send({"type": "ping", "id": "end"})
        assert await client.receive() == {"type": "pong", "id": "end"}


async def test_no_frame_lets_a_client_reach_another_users_thread(
    manager: ConnectionManager,
) -> None:
    alice = manager.get_websocket_manager(ctx("alice"))
    bob = manager.get_websocket_manager(ctx("bob"))
    alice_client, _ = await connect(alice, ("t1",))
    alice_ack = await alice_client.receive()
    async with alice.run("t1", run_id="run-alice") as run:
        await run.thinking("secret")
        alice_frames = [await alice_client.receive() for _ in range(2)]
        assert [f["type"] for f in alice_frames] == ["agent_started", "agent_thinking"]

        bob_client, bob_connection = await connect(bob, ("t1",))
        bob_ack = await bob_client.receive()
        # Bob's t1 is his own stream: empty, under its own epoch.
        assert bob_ack["seq"] == 0
        assert bob_ack["epoch"] != alice_ack["epoch"]
        attempts: list[dict[str, Any]] = [
            {"type": "subscribe", "thread_id": "t1"},
            {"type": "subscribe", "thread_id": "t1", "since_seq": 0},
            {"type": "subscribe", "thread_id": "t1", "since_seq": 0,
             "epoch": alice_ack["epoch"]},
            # Frames have no way to name a user; extra fields are ignored.
            {"type": "subscribe", "thread_id": "t1", "since_seq": 0, "user_id": "alice"},
            {"type": "subscribe", "thread_id": "alice:t1", "since_seq": 0},
            {"type": "subscribe", "thread_id": "alice/t1"},
        ]
        for frame in attempts:
            await bob_client.send(frame)
            reply = await bob_client.receive()
            if frame["thread_id"] == "alice/t1":
                assert (reply["type"], reply["code"]) == ("error", "invalid_field")
                continue
            assert reply["type"] == "subscribed"
            assert reply["epoch"] != alice_ack["epoch"]
            assert reply["seq"] == 0
            # A wrong epoch or nothing to resume: never alice's history.
            assert reply["recovered"] is (
                frame.get("since_seq") == 0 and "epoch" not in frame
            )
        # Cancelling alice's run from bob's connection is refused as unknown.
        await bob_client.send({"type": "cancel_run", "run_id": "run-alice"})
        reply = await bob_client.receive()
        assert (reply["type"], reply["code"]) == ("error", "unknown_run")
        assert [r.run_id for r in alice.active_runs()] == ["run-alice"]
        assert not run.ended

        await run.thinking("more secret")
        assert summary(await alice_client.receive())[:3] == ("agent_thinking", "t1", 3)
    assert (await alice_client.receive())["type"] == "agent_completed"
    await settle()
    # Bob got nothing but his replies; a ping proves the stream is otherwise empty.
    await bob_client.send({"type": "ping", "id": 1})
    assert await bob_client.receive() == {"type": "pong", "id": 1}
    assert bob_connection.threads == frozenset({"t1", "alice:t1"})
    assert bob.get_stats().events_sent == 0


async def test_send_to_user_reaches_all_of_that_users_connections_only(
    manager: ConnectionManager,
) -> None:
    alice = manager.get_websocket_manager(ctx("alice"))
    bob = manager.get_websocket_manager(ctx("bob"))
    alice_clients = [(await connect(alice, threads))[0] for threads in [(), ("t1",), ("t2",)]]
    bob_client, _ = await connect(bob, ("t1",))
    await alice.send_to_user(thinking("hello alice"))
    for client in alice_clients:
        frames = await client.receive_until("agent_thinking")
        assert [f["type"] for f in frames[:-1]] in ([], ["subscribed"])
        assert summary(frames[-1]) == ("agent_thinking", None, None, "hello alice")
    assert (await bob_client.receive())["type"] == "subscribed"
    await bob_client.send({"type": "ping"})
    assert await bob_client.receive() == {"type": "pong"}


async def test_broadcast_reaches_every_connection_of_every_user(
    manager: ConnectionManager,
) -> None:
    clients = []
    for user in USERS:
        session = manager.get_websocket_manager(ctx(user))
        clients.append((await connect(session))[0])
        clients.append((await connect(session, ("t1",)))[0])
    await manager.broadcast(notice("maintenance at noon"))
    for client in clients:
        frames = await client.receive_until("system_notice")
        assert summary(frames[-1]) == ("system_notice", None, None, "maintenance at noon")
        await client.send({"type": "ping"})
        assert await client.receive() == {"type": "pong"}  # exactly once

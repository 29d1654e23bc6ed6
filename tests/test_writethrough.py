"""The write-through decision (``_writethrough.py``), synchronously: when a live event may be
written in the producer's step, and, over hypothesis' interleavings of publishes, subscribes
with replays in flight, writer wake-ups, sockets that take all, part or none of a frame and
time passing, that a connection following the rule (``_connection.py``'s shell, modelled here
step for step) shows the client every subscribe's ack and replay, then each following seq once,
in order."""

from __future__ import annotations

import collections
from typing import Any

import attrs
import pytest
from hypothesis import given
from hypothesis import strategies as st
from trio_websocket import WebSocketConnection

from agentcast._connection import FINISH_SEND
from agentcast._history import ThreadHistory
from agentcast._subscriptions import Subscriptions
from agentcast._transport import Transport, WritesThrough, Written
from agentcast._writethrough import BATCH_GAP, may_write_through
from agentcast.asgi._threaded import _BridgeTransport
from agentcast.asgi._transport import ASGITransport
from agentcast.protocols._adapter import TranslatingTransport
from agentcast.server._wsconn import ServerWebSocket
from agentcast.testing import MemoryTransport

from .test_subscriptions import T, check_client_view, frame

IDLE: dict[str, Any] = {
    "closing": False, "writer_idle": True, "writing": False, "batch": False, "now": 10.0,
    "last_sent": 10.0,
}


def test_an_idle_unbatched_connection_writes_through() -> None:
    assert may_write_through(**IDLE)


@pytest.mark.parametrize(
    "change",
    [
        pytest.param({"closing": True}, id="closing"),
        pytest.param({"writer_idle": False}, id="writer-busy-or-something-queued"),
        pytest.param({"writing": True}, id="part-written"),
        pytest.param({"batch": True}, id="batching-just-after-a-send"),
        pytest.param({"batch": True, "now": 10.0 + BATCH_GAP / 2}, id="batching-within-gap"),
    ],
)
def test_anything_queued_in_progress_closing_or_batchable_is_queued(
    change: dict[str, Any]
) -> None:
    assert not may_write_through(**{**IDLE, **change})


def test_a_batching_connection_writes_through_after_a_quiet_gap() -> None:
    assert may_write_through(**{**IDLE, "batch": True, "now": 10.0 + 2 * BATCH_GAP})
    assert may_write_through(**{**IDLE, "batch": True, "now": 0.5, "last_sent": 0.25,
                                "gap": 0.25})
    assert may_write_through(**{**IDLE, "batch": True, "now": 11.0, "gap": 0.5})
    assert not may_write_through(**{**IDLE, "batch": True, "now": 10.2, "gap": 0.5})


# ---- the property: the rule in a connection keeps the subscribe/replay merge's order --------


@attrs.define
class Shell:
    """The connection's delivery path as ``_connection.py`` runs it, without trio: a FIFO
    queue, a writer that is idle only when parked on an empty queue, a socket whose next
    ``send_nowait`` outcome the test chooses, and the wire the client reads in order."""

    batch: bool
    wire: list[str | tuple[str, ...]] = attrs.Factory(list)
    queue: collections.deque[str | tuple[str, ...]] = attrs.Factory(collections.deque)
    writer_idle: bool = True
    writing: bool = False
    now: float = 0.0
    last_sent: float = 0.0
    room: Written = Written.ALL
    written_through: int = 0

    def enqueue(self, item: str | tuple[str, ...]) -> None:
        self.writer_idle = False
        self.queue.append(item)

    def offer(self, live: str) -> None:
        through = may_write_through(
            closing=False, writer_idle=self.writer_idle, writing=self.writing,
            batch=self.batch, now=self.now, last_sent=self.last_sent,
        )
        if through and self.room is not Written.NONE:
            # The frame's first bytes are on the wire; for PART its rest follows before
            # anything else (the writer finishes it first, the transport's own frames go
            # after it), so to the client it is whole and in this place.
            self.wire.append(live)
            self.written_through += 1
            self.last_sent = self.now
            if self.room is Written.PART:
                assert not self.queue, "FINISH_SEND is always the first item queued"
                self.writing = True
                self.enqueue(FINISH_SEND)
            return
        self.enqueue(live)

    def forget(self) -> None:
        """Unsubscribed: what was queued goes out, and the client forgets what it saw."""
        self.run_writer(10_000)
        self.wire.clear()

    def run_writer(self, items: int) -> None:
        """The writer takes up to ``items`` queued items, or parks on the empty queue."""
        for _ in range(items):
            if not self.queue:
                self.writer_idle = True
                return
            item = self.queue.popleft()
            if not item:
                assert self.writing
                self.writing = False
                continue
            self.wire.append(item)
            self.last_sent = self.now


#: One step: the subscription steps of ``test_subscriptions``' property, plus the writer running
#: for a few items, the socket's next outcome, and time passing (for the batching gap).
shell_steps = st.lists(
    st.one_of(
        st.just(("publish",)),
        st.tuples(st.just("subscribe"), st.sampled_from(["live", "recent", "zero", "old",
                                                         "wrong_epoch"])),
        st.tuples(st.just("read"), st.integers(0, 5)),
        st.tuples(st.just("answer"), st.integers(0, 5)),
        st.just(("unsubscribe",)),
        st.tuples(st.just("writer"), st.integers(1, 4)),
        st.tuples(st.just("room"), st.sampled_from(list(Written))),
        st.tuples(st.just("tick"), st.sampled_from([0.0, BATCH_GAP / 4, BATCH_GAP, 1.0])),
    ),
    max_size=60,
)


def asked(history: ThreadHistory, how: str) -> tuple[int | None, str | None]:
    """(since_seq, epoch) of a subscribe: live only, from a recent seq, from 0, from a seq too
    old for the window, or with a wrong epoch."""
    latest = history.latest_seq
    return {
        "live": (None, None),
        "recent": (max(0, latest - 2), history.epoch),
        "zero": (0, history.epoch),
        "old": (0 if latest <= 5 else latest - 7, history.epoch),
        "wrong_epoch": (latest, "not-the-epoch"),
    }[how]


@given(shell_steps, st.booleans(), st.randoms(use_true_random=False))
def test_write_through_keeps_every_ack_replay_and_seq_in_order(
    script: list[tuple[Any, ...]], batch: bool, rng: Any
) -> None:
    history = ThreadHistory(max_size=5, ttl=1e9)
    subs = Subscriptions(max_held=1000)
    shell = Shell(batch)
    #: ticket -> [since_seq asked, epoch asked, Recovery once read]
    flight: dict[int, list[Any]] = {}
    requests: dict[int, int | None] = {}

    def publish() -> None:
        seq = history.next_seq()
        history.append(seq, frame(seq), 0.0)
        if T in subs:
            live = subs.offer(T, seq, frame(seq))
            if live is not None:
                shell.offer(live)

    def read(ticket: int) -> None:
        since, epoch, answered = flight[ticket]
        if answered is None:  # the broker's answer is read once, at some point in flight
            flight[ticket][2] = history.recover(since, epoch, 0.0)

    def answer(ticket: int) -> None:
        read(ticket)
        for group in subs.complete(T, ticket, flight.pop(ticket)[2]):
            shell.enqueue(group)

    for step in script:
        match step:
            case ("publish",):
                publish()
            case ("subscribe", how):
                since, epoch = asked(history, how)
                ticket, _ = subs.begin(T)
                flight[ticket] = [since, epoch, None]
                requests[ticket] = since
            case ("read", index) if flight:
                read(sorted(flight)[index % len(flight)])
            case ("answer", index) if flight:
                answer(sorted(flight)[index % len(flight)])
            case ("unsubscribe",):
                subs.remove(T)
                requests.clear()
                shell.forget()
            case ("writer", items):
                shell.run_writer(items)
            case ("room", written):
                shell.room = written
            case ("tick", seconds):
                shell.now += seconds
    pending = sorted(flight)
    rng.shuffle(pending)
    for ticket in pending:
        answer(ticket)
    for _ in range(3):
        publish()
    shell.run_writer(10_000)

    assert not shell.queue
    assert not shell.writing
    check_client_view(shell.wire, list(requests.values()), history.latest_seq)


def test_the_model_writes_through_and_queues_both() -> None:
    """The property's shell is not vacuous: idle, it writes through; a burst on a batching
    connection is queued behind the first event; a full socket queues."""
    shell = Shell(batch=True, now=1.0)
    for seq in (1, 2, 3):
        shell.offer(frame(seq))
    assert shell.written_through == 1
    assert list(shell.queue) == [frame(2), frame(3)]
    shell.run_writer(3)
    assert shell.writer_idle
    shell.room = Written.NONE
    shell.now += 1.0
    shell.offer(frame(4))
    assert shell.written_through == 1
    assert shell.wire == [frame(1), frame(2), frame(3)]
    assert list(shell.queue) == [frame(4)]


# ---- who offers send_nowait: only a transport that writes to its socket itself --------------


@pytest.mark.parametrize(
    "cls",
    [MemoryTransport, ASGITransport, TranslatingTransport, _BridgeTransport, WebSocketConnection],
)
def test_adapters_and_other_transports_keep_the_queued_path(cls: type) -> None:
    assert not hasattr(cls, "send_nowait")
    assert not hasattr(cls, "finish_send")


async def test_a_translator_around_a_write_through_transport_does_not_pretend() -> None:
    server, client = MemoryTransport.pair()
    translated = TranslatingTransport(server, "agentcast.agui", lambda m: [str(m)], lambda m: [m])
    assert isinstance(server, Transport)
    assert not isinstance(server, WritesThrough)
    assert not isinstance(translated, WritesThrough)
    assert hasattr(ServerWebSocket, "send_nowait")
    assert hasattr(ServerWebSocket, "finish_send")
    await server.aclose()
    await client.aclose()

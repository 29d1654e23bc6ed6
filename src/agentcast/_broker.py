"""Brokers: where seqs are assigned, history is kept, and events are fanned out to nodes.

The manager talks to a broker only through :class:`Broker`; the in-memory broker below serves
one process, and a Redis broker can serve many without the manager changing.
"""

from __future__ import annotations

import time
from typing import Protocol

import attrs
import trio

from ._config import Config
from ._events import AgentEvent, encode_envelope
from ._history import Recovery, ThreadHistory

__all__ = ["Broker", "BrokerStats", "EventSink", "InMemoryBroker"]


class EventSink(Protocol):
    """Where a broker delivers encoded events on this node (the manager implements it)."""

    def deliver_thread(self, user_id: str, thread_id: str, seq: int, frame: str) -> None:
        """An event of (user, thread) with its seq."""

    def deliver_user(self, user_id: str, frame: str) -> None:
        """A live-only event for every connection of one user."""

    def deliver_all(self, frame: str) -> None:
        """A live-only event for every connection on this node."""

    def holds_user(self, user_id: str) -> bool:
        """True while this node has a live session for ``user_id`` (its streams stay put)."""

    def reset_connections(self, reason: str) -> None:
        """The broker lost events it cannot replay live (its backend went away): close every
        connection on this node with 1012 so clients resume with ``since_seq``."""

    def close_user(self, user_id: str, code: int, reason: str) -> int:
        """Close every connection of ``user_id`` on this node (a ``disconnect_user`` made on
        any node); returns how many were open."""


@attrs.frozen
class BrokerStats:
    """What a broker holds."""

    #: Streams (user, thread) with a seq counter.
    streams: int
    #: Events retained for replay across all streams.
    retained_events: int
    #: Whether the broker can accept publishes.
    ready: bool
    #: Why it is not ready (e.g. "redis unavailable at ..."); empty when ready.
    reason: str = ""


class Broker(Protocol):
    """Seq assignment, bounded history and fan-out; implementations must keep per-stream order."""

    async def serve(self, sink: EventSink, *, task_status: trio.TaskStatus[None]) -> None:
        """Run background work for the manager's lifetime; call ``task_status.started()`` once
        the broker can accept publishes."""

    async def publish(self, user_id: str, thread_id: str, event: AgentEvent) -> int:
        """Assign the next seq, retain the event and deliver it; return the seq."""

    async def publish_user(self, user_id: str, event: AgentEvent) -> None:
        """Deliver a live-only event to every connection of ``user_id``."""

    async def publish_all(self, event: AgentEvent) -> None:
        """Deliver a live-only event to every connection."""

    async def publish_disconnect(self, user_id: str, code: int, reason: str) -> None:
        """Have every other node close ``user_id``'s connections (``EventSink.close_user``);
        the calling node closes its own."""

    async def recover(
        self, user_id: str, thread_id: str, since_seq: int | None, epoch: str | None
    ) -> Recovery:
        """The (user, thread) events after ``since_seq``; see ``ThreadHistory.recover``."""

    async def attach_user(self, user_id: str) -> None:
        """A session for ``user_id`` opened on this node: from when this returns, every event
        of the user published anywhere is delivered here (called before any replay)."""

    async def detach_user(self, user_id: str) -> None:
        """A session for ``user_id`` on this node has closed (one call per ``attach_user``)."""

    def statistics(self) -> BrokerStats:
        """A snapshot of what the broker holds."""


@attrs.define(eq=False)
class InMemoryBroker:
    """The single-process broker: histories in a dict, delivery by a direct call.

    Publishing never yields, so the seq order, the history order and the delivery order are the
    same by construction. Idle streams are forgotten ``history_ttl`` after their last event.
    """

    config: Config
    _streams: dict[tuple[str, str], ThreadHistory] = attrs.field(factory=dict)
    _last_used: dict[tuple[str, str], float] = attrs.field(factory=dict)
    _sink: EventSink | None = None

    async def serve(self, sink: EventSink, *, task_status: trio.TaskStatus[None]) -> None:
        """Deliver to ``sink`` and sweep idle streams until cancelled."""
        self._sink = sink
        task_status.started()
        interval = min(60.0, self.config.history_ttl)
        while True:
            await trio.sleep(interval)
            self.sweep(trio.current_time())

    def sweep(self, now: float) -> None:
        """Forget streams with nothing retained, no event for ``history_ttl`` seconds, and no
        live session: forgetting restarts the seq under a new epoch, which must never happen
        to a stream someone is subscribed to or a run is still writing to."""
        horizon = now - self.config.history_ttl
        sink = self._sink
        for key in [key for key, used in self._last_used.items() if used < horizon]:
            if sink is not None and sink.holds_user(key[0]):
                continue
            stream = self._streams[key]
            stream.prune(now)
            if not len(stream):
                del self._streams[key], self._last_used[key]

    def _stream(self, user_id: str, thread_id: str, now: float) -> ThreadHistory:
        # A stream is created on first publish *or* first subscribe, so the epoch a subscriber
        # is told stays the epoch of the events that follow.
        key = (user_id, thread_id)
        stream = self._streams.get(key)
        if stream is None:
            stream = self._streams[key] = ThreadHistory(
                self.config.history_size, self.config.history_ttl
            )
        self._last_used[key] = now
        return stream

    def _require_sink(self) -> EventSink:
        if self._sink is None:
            raise RuntimeError("InMemoryBroker.serve() has not started")
        return self._sink

    async def publish(self, user_id: str, thread_id: str, event: AgentEvent) -> int:
        """Assign the seq, retain and deliver, all without yielding."""
        sink = self._require_sink()
        now = trio.current_time()
        stream = self._stream(user_id, thread_id, now)
        seq = stream.next_seq()
        frame = encode_envelope(event, thread_id=thread_id, seq=seq, ts=time.time())
        stream.append(seq, frame, now)
        sink.deliver_thread(user_id, thread_id, seq, frame)
        return seq

    async def publish_user(self, user_id: str, event: AgentEvent) -> None:
        """Deliver a live-only event to one user's connections."""
        frame = encode_envelope(event, thread_id=None, seq=None, ts=time.time())
        self._require_sink().deliver_user(user_id, frame)

    async def publish_all(self, event: AgentEvent) -> None:
        """Deliver a live-only event to every connection."""
        frame = encode_envelope(event, thread_id=None, seq=None, ts=time.time())
        self._require_sink().deliver_all(frame)

    async def publish_disconnect(self, user_id: str, code: int, reason: str) -> None:
        """Nothing to do: there are no other nodes."""
        await trio.lowlevel.checkpoint()

    async def recover(
        self, user_id: str, thread_id: str, since_seq: int | None, epoch: str | None
    ) -> Recovery:
        """Answer from the retained history; a stream never seen starts at seq 0."""
        now = trio.current_time()
        return self._stream(user_id, thread_id, now).recover(since_seq, epoch, now)

    async def attach_user(self, user_id: str) -> None:
        """Nothing to do: every publish on this node is delivered here."""
        await trio.lowlevel.checkpoint()

    async def detach_user(self, user_id: str) -> None:
        """Nothing to do (idle streams are swept by ``serve``)."""
        await trio.lowlevel.checkpoint()

    def statistics(self) -> BrokerStats:
        """Streams and retained events held in memory."""
        return BrokerStats(
            streams=len(self._streams),
            retained_events=sum(len(stream) for stream in self._streams.values()),
            ready=self._sink is not None,
        )


"""The broker protocol: where seqs are assigned, history is kept, and events are fanned out to
nodes, as the manager sees it.

The manager talks to a broker only through :class:`Broker`; ``backplane.memory`` serves one
process, ``backplane.redis`` many, without the manager changing. Rules of this module: types
only, no I/O.
"""

from __future__ import annotations

from typing import Protocol

import attrs
import trio

from .._events import AgentEvent
from .._history import Recovery
from .._presence import Presence

__all__ = ["Broker", "BrokerStats", "EventSink"]


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

    def holds_thread(self, user_id: str, thread_id: str) -> bool:
        """True while a connection here is subscribed to (user, thread) or a run writes to it:
        such a stream must keep its epoch and seq, so it is never forgotten or evicted."""

    def reset_connections(self, reason: str) -> None:
        """The broker lost events it cannot replay live (its backend went away): close every
        connection on this node with 1012 so clients resume with ``since_seq``."""

    def close_user(self, user_id: str, code: int, reason: str) -> int:
        """Close every connection of ``user_id`` on this node (a ``disconnect_user`` made on
        any node); returns how many were open."""

    def connection_places(self, user_id: str) -> int:
        """Connections ``user_id`` holds on this node, open or reserved by a handshake in
        flight (what presence and the per-user limit count)."""


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
    #: Characters (bytes, for ASCII JSON) of the retained events; 0 when the broker does not
    #: hold them in this process (Redis).
    retained_bytes: int = 0


class Broker(Protocol):
    """Seq assignment, bounded history and fan-out; implementations must keep per-stream order."""

    async def serve(self, sink: EventSink, *, task_status: trio.TaskStatus[None]) -> None:
        """Run background work for the manager's lifetime; call ``task_status.started()`` once
        the broker can accept publishes."""

    async def publish(self, user_id: str, thread_id: str, event: AgentEvent) -> int:
        """Assign the next seq, retain the event and deliver it; return the seq."""

    async def enqueue(self, user_id: str, thread_id: str, event: AgentEvent) -> None:
        """Publish like :meth:`publish`, returning once the event is queued, in order with
        every publish of the thread made before it; a failure afterwards is raised by the
        thread's next ``publish``/``enqueue`` or by :meth:`flush` (never silent)."""

    async def flush(self, user_id: str) -> None:
        """Wait until everything queued by :meth:`enqueue` before the call is stored; raise
        the first failure of ``user_id``'s queued events not yet raised."""

    async def publish_user(self, user_id: str, event: AgentEvent) -> None:
        """Deliver a live-only event to every connection of ``user_id``."""

    async def publish_all(self, event: AgentEvent) -> None:
        """Deliver a live-only event to every connection."""

    async def publish_disconnect(self, user_id: str, code: int, reason: str) -> None:
        """Have every other node close ``user_id``'s connections (``EventSink.close_user``);
        the calling node closes its own."""

    async def recover(
        self, user_id: str, thread_id: str, since_seq: int | None, epoch: str | None,
        *, compact: bool = True,
    ) -> Recovery:
        """The (user, thread) events after ``since_seq``; see ``ThreadHistory.recover``.
        ``compact`` False gives one frame per ``agent_text`` delta, as delivered live.

        Raises:
            TooManyThreads: the stream is new and the user already holds
                ``Config.max_threads_per_user`` streams that are all in use.
        """

    async def attach_user(self, user_id: str) -> None:
        """A session for ``user_id`` opened on this node: from when this returns, every event
        of the user published anywhere is delivered here (called before any replay)."""

    async def detach_user(self, user_id: str) -> None:
        """A session for ``user_id`` on this node has closed (one call per ``attach_user``)."""

    def statistics(self) -> BrokerStats:
        """A snapshot of what the broker holds."""

    async def wait_ready(self) -> None:
        """Wait until the broker accepts publishes (its backend connected and answering); the
        caller bounds the wait."""

    async def presence(self, user_id: str) -> Presence:
        """How many connections ``user_id`` holds and on how many nodes (every node the broker
        spans).

        Raises:
            BrokerUnavailable: the backend could not be asked.
        """

    async def reserve_connection(self, user_id: str, places: int, limit: int | None) -> None:
        """Claim over every node the connection place this node has just reserved: this node
        holds ``places`` of the user's connections, the new one included; refuse when all nodes
        together then exceed ``limit``. A place is given back by the node's count dropping
        (the broker keeps it in step), so there is no release call to forget.

        Raises:
            TooManyConnections: over the limit across nodes (nothing is claimed).
            BrokerUnavailable: the backend could not be asked.
        """

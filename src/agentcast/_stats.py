"""Statistics: mutable counters on the hot path, frozen snapshots for callers."""

from __future__ import annotations

from collections.abc import Mapping

import attrs
import trio

from ._latency import LatencySnapshot

__all__ = ["Counters", "ManagerStats", "SessionStats", "count_tasks"]


@attrs.define
class Counters:
    """Running totals; each session owns one, and the manager one that every session also
    counts into (so its totals, closed sessions included, need no summing)."""

    events_published: int = 0
    events_sent: int = 0
    messages_sent: int = 0
    events_dropped: int = 0
    slow_consumer_disconnects: int = 0
    rate_limit_disconnects: int = 0
    protocol_errors: int = 0
    connections_opened: int = 0
    runs_started: int = 0

    def add(self, other: Counters) -> None:
        """Add ``other``'s totals into these."""
        for field in attrs.fields(Counters):
            setattr(self, field.name, getattr(self, field.name) + getattr(other, field.name))


def count_tasks(nursery: trio.Nursery | None) -> int:
    """Count the live tasks under ``nursery``, recursively."""
    if nursery is None:
        return 0
    total = 0
    for task in nursery.child_tasks:
        total += 1
        for child in task.child_nurseries:
            total += count_tasks(child)
    return total


@attrs.frozen(kw_only=True)
class SessionStats:
    """A snapshot of one user's session."""

    #: The user the session belongs to.
    user_id: str
    #: Open connections (each owns one bounded send channel).
    connections: int
    #: Connection slots reserved for handshakes in flight (``reserve_connection``), not yet
    #: connections; counted with ``connections`` against ``Config.max_connections_per_user``.
    reserved_connections: int
    #: Send channels still open; equals ``connections`` unless one is closing.
    open_channels: int
    #: Thread subscriptions summed over connections.
    subscriptions: int
    #: Runs that have not sent their terminal event yet.
    active_runs: int
    #: Tasks alive in the session's nursery, counted recursively.
    live_tasks: int
    #: True once the session has closed (linger expired, crash or shutdown).
    closed: bool
    #: Events accepted by ``send_to_thread``.
    events_published: int
    #: Events written to a transport (each batched event counts once).
    events_sent: int
    #: WebSocket messages written (fewer than events when batching).
    messages_sent: int
    #: Events not written because their connection was closing or too slow.
    events_dropped: int
    #: Connections closed with 4008 because they did not keep up.
    slow_consumer_disconnects: int
    #: Connections closed with 4029 for flooding.
    rate_limit_disconnects: int
    #: Client frames answered with an error frame or a protocol close code.
    protocol_errors: int
    #: Connections ever added to this session.
    connections_opened: int
    #: Runs ever started in this session.
    runs_started: int


@attrs.frozen(kw_only=True)
class ManagerStats:
    """A snapshot of the whole manager; totals include sessions that have closed."""

    #: Users with a live session.
    users: int
    #: Open connections over all users.
    connections: int
    #: Runs that have not ended, over all users.
    active_runs: int
    #: Tasks alive under the manager's root nursery (broker and sessions), recursively.
    live_tasks: int
    #: Events accepted by ``send_to_thread`` since start.
    events_published: int
    #: Events written to transports since start.
    events_sent: int
    #: WebSocket messages written since start.
    messages_sent: int
    #: Events not written because their connection was closing or too slow.
    events_dropped: int
    #: Connections closed with 4008 since start.
    slow_consumer_disconnects: int
    #: Connections closed with 4029 since start.
    rate_limit_disconnects: int
    #: Client frames refused since start.
    protocol_errors: int
    #: Connections added since start.
    connections_opened: int
    #: Runs started since start.
    runs_started: int
    #: Sessions closed since start (after linger, crash or shutdown).
    sessions_closed: int
    #: Sessions that ended with an unexpected exception (their connections got 1011).
    session_crashes: int
    #: Streams (user, thread) the broker holds.
    broker_streams: int
    #: Events the broker retains for resume.
    broker_retained_events: int
    #: Characters (bytes, for ASCII JSON) of those events, bounded by
    #: ``Config.max_retained_bytes`` (0 with Redis, where Redis holds them).
    broker_retained_bytes: int
    #: Publish-to-written latency of live events (see ``agentcast._latency``).
    delivery_latency: LatencySnapshot
    #: Per-user snapshots, keyed by user id.
    per_user: Mapping[str, SessionStats]

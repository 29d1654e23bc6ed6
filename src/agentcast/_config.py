"""Every tunable default of agentcast, named and documented in one frozen value."""

from __future__ import annotations

from typing import Any, Final

import attrs

__all__ = ["Config"]

#: Events queued per connection before it counts as a slow consumer.
SEND_QUEUE_SIZE: Final = 1024
#: Seconds one WebSocket write may take before the client counts as a slow consumer.
WRITE_TIMEOUT: Final = 5.0
#: Seconds a close handshake may take before the transport is abandoned.
CLOSE_TIMEOUT: Final = 2.0
#: Seconds an idle session (no connections, no runs) lives on so a page reload resumes.
SESSION_LINGER: Final = 30.0
#: Seconds ``get_websocket_manager_async`` waits for readiness.
READY_TIMEOUT: Final = 10.0
#: Events retained per (user, thread) for resume.
HISTORY_SIZE: Final = 1000
#: Seconds an event stays resumable.
HISTORY_TTL: Final = 600.0
#: Most events joined into one batched WebSocket message.
BATCH_MAX_EVENTS: Final = 256
#: Most bytes (approximately: characters) in one batched WebSocket message.
BATCH_MAX_BYTES: Final = 64 * 1024
#: Largest inbound client frame, in bytes of UTF-8.
MAX_MESSAGE_BYTES: Final = 64 * 1024
#: Sustained inbound client frames per second per connection.
INBOUND_RATE: Final = 20.0
#: Inbound frames a connection may send in a burst above the sustained rate.
INBOUND_BURST: Final = 40
#: Frames over the rate limit tolerated (each answered with an error frame) before closing.
RATE_LIMIT_STRIKES: Final = 10
#: Threads one connection may subscribe to at once.
MAX_SUBSCRIPTIONS: Final = 64
#: Seconds the terminal event of a cancelled run may take to publish (it is shielded).
TERMINAL_EVENT_TIMEOUT: Final = 2.0
#: Seconds a graceful manager shutdown may take before the rest is cancelled.
SHUTDOWN_TIMEOUT: Final = 5.0
#: Characters of an agent's exception message carried by ``agent_error``.
ERROR_MESSAGE_LIMIT: Final = 500
#: Streams (threads with a seq counter and history) one user may hold in the broker.
MAX_THREADS_PER_USER: Final = 1000
#: Characters (bytes, for the ASCII JSON agentcast writes) of encoded events the in-memory
#: broker retains for resume, over all streams.
MAX_RETAINED_BYTES: Final = 256 * 1024 * 1024
#: Runs one user may have active at once.
MAX_ACTIVE_RUNS_PER_USER: Final = 8
#: Frames one inbound message may be split into (browsers send one; libraries a few dozen).
MAX_FRAGMENTS_PER_MESSAGE: Final = 64
#: Sustained inbound bytes per second per connection (standalone server; over it, reads wait).
INBOUND_BYTES_PER_SECOND: Final = 256 * 1024
#: Inbound bytes a connection may send at once above the sustained byte rate.
INBOUND_BYTES_BURST: Final = 1024 * 1024
#: Sustained inbound frames (data and control) per second per connection (standalone server).
INBOUND_FRAMES_PER_SECOND: Final = 200.0
#: Inbound frames a connection may send at once above the sustained frame rate.
INBOUND_FRAMES_BURST: Final = 1000
#: Sustained inbound control frames (ping, pong, close) per second per connection.
CONTROL_FRAMES_PER_SECOND: Final = 5.0
#: Inbound control frames a connection may send in a burst above the sustained rate.
CONTROL_FRAMES_BURST: Final = 20
#: Bytes one run may retain for resume (its compacted text plus its other events' frames).
MAX_RUN_BYTES: Final = 4 * 1024 * 1024
#: Bytes of retained events per (user, thread) outside runs kept whole (see ``history_size``).
HISTORY_BYTES: Final = 1024 * 1024


def positive(instance: object, attribute: attrs.Attribute[Any], value: float) -> None:
    """attrs validator: the field must be greater than zero."""
    if not value > 0:
        raise ValueError(f"{type(instance).__name__}.{attribute.name} must be > 0, got {value!r}")


def _positive_or_none(
    instance: object, attribute: attrs.Attribute[Any], value: float | None
) -> None:
    if value is not None:
        positive(instance, attribute, value)


def _non_negative(instance: object, attribute: attrs.Attribute[Any], value: float) -> None:
    if not value >= 0:
        raise ValueError(f"{type(instance).__name__}.{attribute.name} must be >= 0, got {value!r}")


@attrs.frozen(kw_only=True)
class Config:
    """Settings of one :class:`ConnectionManager`; every field has a safe default.

    Use ``attrs.evolve(Config(), write_timeout=1.0)`` to change a few.
    """

    #: Events (and control frames) queued per connection; a full queue closes it with 4008.
    send_queue_size: int = attrs.field(default=SEND_QUEUE_SIZE, validator=positive)
    #: Seconds one socket write may block before the connection is aborted as a slow consumer
    #: (the manager's watchdog checks every eighth of it, so within 1.125 times this).
    write_timeout: float = attrs.field(default=WRITE_TIMEOUT, validator=positive)
    #: Seconds a close handshake may take; past it the transport is dropped.
    close_timeout: float = attrs.field(default=CLOSE_TIMEOUT, validator=positive)
    #: Seconds an idle session lingers before its nursery closes.
    session_linger: float = attrs.field(default=SESSION_LINGER, validator=_non_negative)
    #: Seconds ``get_websocket_manager_async`` waits for manager and broker readiness.
    ready_timeout: float = attrs.field(default=READY_TIMEOUT, validator=positive)
    #: Events retained per (user, thread) for resume.
    history_size: int = attrs.field(default=HISTORY_SIZE, validator=positive)
    #: Seconds an event stays in history.
    history_ttl: float = attrs.field(default=HISTORY_TTL, validator=positive)
    #: Most events joined into one batched message.
    batch_max_events: int = attrs.field(default=BATCH_MAX_EVENTS, validator=positive)
    #: Most characters in one batched message (a single larger event is still sent alone).
    batch_max_bytes: int = attrs.field(default=BATCH_MAX_BYTES, validator=positive)
    #: Largest inbound client frame; larger ones close the connection with 1009.
    max_message_bytes: int = attrs.field(default=MAX_MESSAGE_BYTES, validator=positive)
    #: Sustained inbound frames per second per connection.
    inbound_rate: float = attrs.field(default=INBOUND_RATE, validator=positive)
    #: Inbound burst allowance (token bucket capacity).
    inbound_burst: int = attrs.field(default=INBOUND_BURST, validator=positive)
    #: Frames over the limit answered with an error frame before the connection is closed (4029).
    rate_limit_strikes: int = attrs.field(default=RATE_LIMIT_STRIKES, validator=positive)
    #: Threads one connection may subscribe to at once.
    max_subscriptions: int = attrs.field(default=MAX_SUBSCRIPTIONS, validator=positive)
    #: Seconds the shielded terminal event of a cancelled run may take.
    terminal_event_timeout: float = attrs.field(
        default=TERMINAL_EVENT_TIMEOUT, validator=positive
    )
    #: Seconds a graceful manager shutdown may take.
    shutdown_timeout: float = attrs.field(default=SHUTDOWN_TIMEOUT, validator=positive)
    #: Characters of an agent exception's message sent in ``agent_error``.
    error_message_limit: int = attrs.field(default=ERROR_MESSAGE_LIMIT, validator=_non_negative)
    #: Streams one user may hold in the broker. A new one past it first evicts the user's
    #: least recently used stream that no connection is subscribed to and no run writes to;
    #: if every one is in use, a subscribe is refused with ``too_many_threads``.
    max_threads_per_user: int = attrs.field(default=MAX_THREADS_PER_USER, validator=positive)
    #: Bytes of encoded events the in-memory broker retains; past it, the stream that has gone
    #: longest without use loses its oldest events first (its resumers get ``recovered: false``).
    max_retained_bytes: int = attrs.field(default=MAX_RETAINED_BYTES, validator=positive)
    #: Runs one user may have active; ``start_run`` and ``run()`` past it raise ``TooManyRuns``.
    max_active_runs_per_user: int = attrs.field(
        default=MAX_ACTIVE_RUNS_PER_USER, validator=positive
    )
    #: Connections one user may hold (open or being opened) on this manager; None: no limit.
    #: ``UserSession.reserve_connection`` past it raises ``TooManyConnections``.
    max_connections_per_user: int | None = attrs.field(
        default=None, validator=_positive_or_none
    )
    #: Frames one inbound message may arrive in (standalone server); one more closes the
    #: connection with 1008: each frame costs the server CPU however small it is.
    max_fragments_per_message: int = attrs.field(
        default=MAX_FRAGMENTS_PER_MESSAGE, validator=positive
    )
    #: Sustained inbound bytes per second per connection (standalone server). Past the burst,
    #: the server reads the socket later (TCP backpressure): the client is slowed, not closed.
    inbound_bytes_per_second: float = attrs.field(
        default=INBOUND_BYTES_PER_SECOND, validator=positive
    )
    #: Inbound bytes allowed at once above the sustained byte rate (token bucket capacity).
    inbound_bytes_burst: int = attrs.field(default=INBOUND_BYTES_BURST, validator=positive)
    #: Sustained inbound control frames (ping, pong, close) per second per connection
    #: (standalone server); past the burst the connection is closed with 4029.
    control_frames_per_second: float = attrs.field(
        default=CONTROL_FRAMES_PER_SECOND, validator=positive
    )
    #: Inbound control frames allowed in a burst above the sustained rate.
    control_frames_burst: int = attrs.field(default=CONTROL_FRAMES_BURST, validator=positive)
    #: Sustained inbound frames per second per connection (standalone server), whatever their
    #: size: each costs wsproto ~15-25 µs. Past the burst the server reads later, as for bytes.
    inbound_frames_per_second: float = attrs.field(
        default=INBOUND_FRAMES_PER_SECOND, validator=positive
    )
    #: Inbound frames allowed at once above the sustained frame rate.
    inbound_frames_burst: int = attrs.field(default=INBOUND_FRAMES_BURST, validator=positive)
    #: Seconds without anything sent on a connection after which the server sends a
    #: ``{"type":"heartbeat"}`` data frame, for proxies that drop idle sockets and ignore
    #: WebSocket pings; None: off. The manager's watchdog checks every quarter of it (or every
    #: eighth of ``write_timeout``, if that is shorter), so one goes out within 1.25 times this.
    heartbeat_interval: float | None = attrs.field(default=None, validator=_positive_or_none)
    #: Bytes one run may retain for resume: while a run is active, and for ``history_ttl``
    #: after it ends, all of its events stay retained whatever ``history_size`` and
    #: ``history_bytes`` say; the publish that would pass this cap raises ``RunTooLarge`` (the
    #: run then ends with ``agent_error``). In memory a compacted ``agent_text`` delta costs its
    #: UTF-8 bytes plus 2, on Redis its whole frame (Redis keeps one entry per delta).
    max_run_bytes: int = attrs.field(default=MAX_RUN_BYTES, validator=positive)
    #: Bytes of retained events per (user, thread), like ``history_size`` counts them: the
    #: oldest events go when either limit is passed, except events of runs kept whole.
    history_bytes: int = attrs.field(default=HISTORY_BYTES, validator=positive)
    #: Store a run's consecutive ``agent_text`` deltas as one growing text (in memory); off
    #: only to measure what compaction saves (the ``reload`` benchmark).
    compact_text: bool = True

"""RedisBroker: the backplane that lets many processes and machines serve one set of users.

Seqs and history live in Redis (one Lua script assigns the seq, appends to the thread's
stream and publishes, atomically; see ``keys``); live fan-out is Redis pub/sub on one
channel per user, which a node subscribes to only while it holds that user's session.

Rules of this module: the broker task owns one coredis client and one pub/sub connection at a
time, and every call on them has a deadline (``timeout``). Two kinds of outage:

- **Lost connection** (Redis restarted, killed, unreachable): pub/sub messages published while
  this node was away are gone, so the broker goes not-ready, closes every local connection
  with 1012 (service restart) at once so clients resume with ``since_seq`` from the streams,
  and reconnects with bounded exponential backoff, re-subscribing the users it still holds
  before it reports ready again.
- **Frozen Redis** (``SIGSTOP``, a stall): the connections stay open and Redis keeps what it
  was sent, so nothing is lost yet. A liveness ping every ``timeout / 2`` seconds, each with a
  ``timeout / 2`` deadline, notices within ``timeout``: the broker goes not-ready (``/health``
  says why) and publishes fail fast with BrokerUnavailable; if Redis answers again within
  ``outage_grace`` seconds the broker is ready again and clients never noticed; past the grace
  it is treated as a lost connection (1012, reconnect).

Presence (see ``keys``): the node rewrites, every ``PRESENCE_POLL`` seconds, the entries
of users whose connection count changed here and, every ``PRESENCE_TTL / 3`` seconds, all of
its entries, so a killed node's entries stop counting within ``PRESENCE_TTL``.
"""

from __future__ import annotations

import collections
import logging
import math
from typing import TYPE_CHECKING, Final

import attrs
import trio

from ..._config import Config
from ..._errors import BrokerUnavailable, TooManyConnections
from ..._events import AgentEvent
from ..._history import Recovery
from ..._ids import new_id
from ..._latency import LatencySnapshot
from ..._presence import Presence
from ..._redact import redact_text, redact_url
from ..protocol import BrokerStats, EventSink
from .keys import (
    ALL_CHANNEL,
    PRESENCE_TTL,
    parse_disconnect_message,
    parse_thread_message,
    parse_user_message,
    user_channel,
)
from .pipeline import PublishPipeline
from .streams import (
    REDIS_TIMEOUT,
    StreamOps,
    describe,
    first_leaf,
    redis_client,
    redis_down,
)

if TYPE_CHECKING:
    from coredis.patterns.pubsub import PubSub

__all__ = ["BackplaneStats", "RedisBroker"]

log = logging.getLogger("agentcast")

#: First wait before reconnecting to Redis, in seconds; doubled after each failure.
RECONNECT_MIN: Final = 0.1
#: Longest wait between reconnection attempts, in seconds.
RECONNECT_MAX: Final = 5.0
#: Reason given to clients when the backplane connection is lost.
RESTART_REASON: Final = "backplane reconnecting; resume with since_seq"
#: Seconds a frozen Redis may stay silent before the node gives up on its connections and
#: closes every client with 1012 (``--redis-grace``); shorter stalls cost clients nothing.
OUTAGE_GRACE: Final = 10.0
#: Seconds between checks for users whose connection count on this node changed.
PRESENCE_POLL: Final = 0.5
#: Seconds between rewrites of every presence entry of this node (renewing their expiry).
PRESENCE_HEARTBEAT: Final = PRESENCE_TTL / 3


class _Frozen(Exception):
    """Redis stopped answering for longer than the outage grace (an internal signal)."""


@attrs.frozen
class BackplaneStats:
    """The Redis backplane's own figures (``/metrics``)."""

    #: Seconds from a publish being made to Redis returning its seq.
    publish_latency: LatencySnapshot
    #: Publishes queued for the pipeline or on the wire now.
    pipeline_depth: int
    #: Times the connection to Redis was re-established after being lost.
    reconnects: int
    #: Pub/sub messages received from Redis.
    pubsub_messages: int
    #: Times Redis stopped answering within the timeout (frozen, overloaded).
    stalls: int



@attrs.define(eq=False)
class RedisBroker:
    """A :class:`Broker` on Redis: pass it to ``open_manager(broker=...)``.

    Args:
        url: ``redis://HOST:PORT/DB`` (``rediss://`` for TLS).
        config: the manager's config (history size and TTL).
        timeout: seconds any one Redis call may take (``--redis-timeout``); also how soon a
            frozen Redis makes the broker not-ready.
        outage_grace: seconds Redis may stay frozen before every connection here is closed
            with 1012 (``--redis-grace``).
    """

    url: str = attrs.field(repr=redact_url)
    config: Config = attrs.Factory(Config)
    timeout: float = attrs.field(default=REDIS_TIMEOUT, kw_only=True)
    outage_grace: float = attrs.field(default=OUTAGE_GRACE, kw_only=True)
    #: This node's id in presence entries (unique per broker).
    node_id: str = attrs.field(factory=lambda: new_id("node"), kw_only=True)
    _ops: StreamOps | None = None
    _pubsub: PubSub[str] | None = None
    _sink: EventSink | None = None
    #: user id -> local sessions holding it (a closing and a new session may overlap).
    _held: collections.Counter[str] = attrs.Factory(collections.Counter)
    _reason: str = "not connected yet"
    _failures: int = 0
    _announced: bool = False
    #: Set while ready; replaced by a fresh event when the broker goes not-ready.
    _ready_event: trio.Event = attrs.Factory(trio.Event)
    #: Since when (trio clock) Redis has not answered a liveness ping; None while it answers.
    _stalled_since: float | None = None
    #: user id -> places last written to Redis for this node.
    _written: dict[str, int] = attrs.Factory(dict)
    #: The publish queue (and its latency figures and unreported failures): it outlives
    #: each connection, so a failure noticed when one was lost is reported on the next.
    _pipeline: PublishPipeline = attrs.Factory(PublishPipeline)
    _reconnects: int = 0
    _was_connected: bool = False
    _pubsub_messages: int = 0
    _stalls: int = 0
    #: Orders this node's presence writes (see ``PRESENCE_SCRIPT``): taken with each count.
    _presence_seq: int = 0

    def __attrs_post_init__(self) -> None:
        if not self.timeout > 0 or not self.outage_grace >= 0:
            raise ValueError(
                f"RedisBroker needs timeout > 0 and outage_grace >= 0, got {self.timeout!r} and "
                f"{self.outage_grace!r}"
            )
        self._pipeline.timeout = self.timeout

    # ---- lifetime ---------------------------------------------------------------------------

    async def serve(self, sink: EventSink, *, task_status: trio.TaskStatus[None]) -> None:
        """Stay connected to Redis and deliver its messages to ``sink`` until cancelled.

        Reports started after the first connection attempt, whether or not it succeeded, so
        a server starts (not ready, with the reason) while Redis is unreachable.
        """
        self._sink = sink
        delay = RECONNECT_MIN
        outages: tuple[type[BaseException], ...] = (
            *redis_down(), trio.TooSlowError, BrokerUnavailable, _Frozen
        )
        while True:
            try:
                await self._connected_session(None if self._announced else task_status)
            except* outages as group:
                if trio.current_effective_deadline() == -math.inf:
                    # Being cancelled (a clean shutdown): coredis's connections closing under
                    # their pending reads are no outage, and nothing is worth a log line (the
                    # sleep below raises the Cancelled).
                    self._ops = self._pubsub = None
                    self._set_ready(False)
                    self._reason = "shutting down"
                else:
                    # After a lost connection the first retry is quick; each failure doubles.
                    delay = RECONNECT_MIN if self._ops is not None else min(
                        delay * 2, RECONNECT_MAX
                    )
                    self._went_down(first_leaf(group))
            if not self._announced:
                self._announced = True
                task_status.started()
            await trio.sleep(delay)

    def _set_ready(self, ready: bool) -> None:
        if ready:
            self._ready_event.set()
        elif self._ready_event.is_set():
            self._ready_event = trio.Event()

    def _went_down(self, exc: BaseException) -> None:
        was_connected = self._ops is not None
        self._ops = self._pubsub = None
        self._stalled_since = None
        self._set_ready(False)
        # The reason reaches /health and the logs: never the URL's password.
        error = redact_text(describe(exc, self.timeout), self.url)
        self._reason = f"redis unavailable at {redact_url(self.url)}: {error}"
        self._failures += 1
        if was_connected:
            log.warning("lost the Redis backplane (%s); closing connections with 1012", error)
            sink = self._sink
            if sink is not None:
                sink.reset_connections(RESTART_REASON)
        elif self._failures == 1 or math.log2(self._failures).is_integer():
            # One line per doubling of the failure count: a long outage does not flood logs.
            log.warning("Redis backplane unavailable (attempt %d): %s", self._failures, error)

    async def _connected_session(self, task_status: trio.TaskStatus[None] | None) -> None:
        # Two clients: coredis multiplexes plain calls over one pooled connection, but a
        # pipeline holds a connection of its own and the pool opens another for every call
        # made meanwhile. With the flusher's pipelines on their own client, each pool keeps
        # exactly the connections it opened here (plus the pub/sub one), whatever the load.
        client = redis_client(self.url, self.timeout)
        pipelines = redis_client(self.url, self.timeout)
        async with client, pipelines:
            ops = StreamOps(
                client, self.config, timeout=self.timeout, pipeline=self._pipeline,
                pipeline_client=pipelines,
            )
            with trio.fail_after(self.timeout):
                await client.ping()
                await pipelines.ping()
            pubsub = client.pubsub(
                retry_policy=None,
                ignore_subscribe_messages=True,
                subscription_timeout=self.timeout,
            )
            async with pubsub:
                with trio.fail_after(self.timeout):
                    await pubsub.subscribe(ALL_CHANNEL)
                    for user_id in list(self._held):
                        await pubsub.subscribe(user_channel(user_id))
                # After the pub/sub took the pinged connection for itself: this opens the one
                # the plain calls share, now rather than under load.
                await ops.load_scripts()
                async with trio.open_nursery() as tasks:
                    # Publishes from every session go out as pipelines: one round trip and
                    # a fraction of coredis's per-call CPU for all made meanwhile.
                    await tasks.start(ops.flush_publishes, name="agentcast.redis.publisher")
                    tasks.start_soon(self._watch_liveness, ops, name="agentcast.redis.liveness")
                    # Redis may have restarted empty: rewrite every entry of this node.
                    self._written.clear()
                    tasks.start_soon(self._keep_presence, ops, name="agentcast.redis.presence")
                    self._ops, self._pubsub = ops, pubsub
                    if self._was_connected:
                        self._reconnects += 1
                    self._was_connected = True
                    self._failures = 0
                    self._reason = ""
                    self._set_ready(True)
                    log.info("connected to the Redis backplane at %s", redact_url(self.url))
                    if task_status is not None:
                        self._announced = True
                        task_status.started()
                    await self._consume(pubsub)

    async def _watch_liveness(self, ops: StreamOps) -> None:
        """Ping Redis every ``timeout / 2`` seconds with a ``timeout / 2`` deadline: not-ready
        within ``timeout`` of Redis freezing, ready again at its first answer, and
        :class:`_Frozen` once it has been silent past ``outage_grace``."""
        period = self.timeout / 2
        while True:
            await trio.sleep(period)
            answered = False
            with trio.move_on_after(period):
                try:
                    await ops.client.ping()
                    answered = True
                except* redis_down():
                    pass  # counted as silence below; a lost connection also ends _consume
            now = trio.current_time()
            if answered:
                if self._stalled_since is not None:
                    log.warning(
                        "the Redis backplane answers again after %.1f s; ready",
                        now - self._stalled_since,
                    )
                    self._stalled_since = None
                    self._reason = ""
                    # Entries may have expired meanwhile: rewrite them all on the next poll.
                    self._written.clear()
                    self._set_ready(True)
                continue
            if self._stalled_since is None:
                self._stalled_since = now - period
                self._stalls += 1
                self._reason = (
                    f"redis at {redact_url(self.url)} did not answer within {period:g} s"
                )
                self._set_ready(False)
                log.warning(
                    "the Redis backplane stopped answering; not ready, connections close with "
                    "1012 if it lasts %g s", self.outage_grace,
                )
            elif now - self._stalled_since >= self.outage_grace:
                raise _Frozen(f"Redis did not answer for {now - self._stalled_since:.1f} s")

    async def _keep_presence(self, ops: StreamOps) -> None:
        """Keep this node's presence entries in Redis in step with its connections."""
        sink = self._sink
        assert sink is not None
        renewed = -math.inf
        while True:
            now = trio.current_time()
            renew = now - renewed >= PRESENCE_HEARTBEAT
            changes: dict[str, int] = {}
            for user_id in set(self._held) | set(self._written):
                places = sink.connection_places(user_id)
                if places != self._written.get(user_id, 0) or (renew and places):
                    changes[user_id] = places
            if changes and self._stalled_since is None:
                self._presence_seq += 1
                try:
                    await ops.heartbeat(self.node_id, changes, self._presence_seq)
                except BrokerUnavailable as exc:
                    log.debug("presence heartbeat failed, retrying: %s", exc)
                else:
                    for user_id, places in changes.items():
                        if places:
                            self._written[user_id] = places
                        else:
                            self._written.pop(user_id, None)
                    if renew:
                        renewed = now
            elif renew:
                renewed = now
            await trio.sleep(PRESENCE_POLL)

    async def _consume(self, pubsub: PubSub[str]) -> None:
        sink = self._sink
        assert sink is not None
        while True:
            # No deadline: silence is normal here; _watch_liveness notices a frozen Redis.
            message = await pubsub.get_message()
            if message is None or message["type"] != "message":
                continue
            self._pubsub_messages += 1
            channel, data = message["channel"], message["data"]
            if not isinstance(data, str) or not isinstance(channel, str):
                continue
            if channel == ALL_CHANNEL:
                sink.deliver_all(data)
                continue
            user_id = _user_of_channel(channel)
            try:
                batch = parse_thread_message(data)
                if batch is None:
                    disconnect = parse_disconnect_message(data)
                    if disconnect is not None:
                        sink.close_user(user_id, *disconnect)
                    else:
                        sink.deliver_user(user_id, parse_user_message(data))
                    continue
            except ValueError:
                log.warning("ignored a malformed message on %s", channel)
                continue
            # Every event of the batch reaches the connections' channels before any writer
            # runs, so each writer wakes with the whole batch queued and sends it at once.
            thread_id, events = batch
            for seq, frame in events:
                sink.deliver_thread(user_id, thread_id, seq, frame)

    @property
    def ready(self) -> bool:
        """True while connected to Redis, with the subscriptions in place, and Redis answers."""
        return self._ops is not None and self._stalled_since is None

    @property
    def reason(self) -> str:
        """Why the broker is not ready ("" when it is)."""
        return self._reason

    async def wait_ready(self) -> None:
        """Wait until connected and answering (the caller bounds the wait)."""
        while not self.ready:
            await self._ready_event.wait()

    def statistics(self) -> BrokerStats:
        """Streams live in Redis, so only readiness is known locally."""
        return BrokerStats(streams=0, retained_events=0, ready=self.ready, reason=self._reason)

    def backplane_stats(self) -> BackplaneStats:
        """Publish latency, pipeline depth, reconnects and pub/sub traffic so far."""
        return BackplaneStats(
            publish_latency=self._pipeline.latency.snapshot(),
            pipeline_depth=self._pipeline.depth,
            reconnects=self._reconnects,
            pubsub_messages=self._pubsub_messages,
            stalls=self._stalls,
        )

    def _require_ops(self) -> StreamOps:
        ops = self._ops
        if ops is None or self._stalled_since is not None:
            raise BrokerUnavailable(self._reason or "the Redis broker is not connected")
        return ops

    # ---- subscriptions ----------------------------------------------------------------------

    async def attach_user(self, user_id: str) -> None:
        """Subscribe to the user's channel (on the first local session) before it returns, so
        replays computed afterwards leave no gap before live events."""
        self._held[user_id] += 1
        pubsub = self._pubsub
        if self._held[user_id] == 1 and pubsub is not None:
            with trio.move_on_after(self.timeout):
                try:
                    await pubsub.subscribe(user_channel(user_id))
                except* redis_down():
                    pass  # the broker task sees the loss too and re-subscribes held users

    async def detach_user(self, user_id: str) -> None:
        """Drop one local holder; unsubscribe when it was the last."""
        self._held[user_id] -= 1
        if self._held[user_id] > 0:
            return
        del self._held[user_id]
        pubsub = self._pubsub
        if pubsub is not None:
            with trio.move_on_after(self.timeout):
                try:
                    await pubsub.unsubscribe(user_channel(user_id))
                except* redis_down():
                    pass  # a lost connection drops every subscription anyway

    def held_users(self) -> set[str]:
        """Users whose channel this node subscribes to."""
        return set(self._held)

    # ---- presence ---------------------------------------------------------------------------

    async def presence(self, user_id: str) -> Presence:
        """The user's connections over every node of the cluster.

        Raises:
            BrokerUnavailable: Redis is not ready or did not answer within ``timeout``.
        """
        return await self._require_ops().presence(user_id)

    async def reserve_connection(self, user_id: str, places: int, limit: int | None) -> None:
        """Claim, over the whole cluster, the place this node has just reserved locally:
        record that it holds ``places`` of the user's connections (the new one included) and
        check them with every other node's against ``limit``, atomically in Redis.

        Raises:
            TooManyConnections: the user already holds ``limit`` places over the cluster.
            BrokerUnavailable: Redis is not ready or did not answer within ``timeout``.
        """
        self._presence_seq += 1  # taken with ``places``: no await since it was counted
        admitted, total, nodes = await self._require_ops().sync_presence(
            user_id, self.node_id, places, limit, self._presence_seq
        )
        written = places if admitted else places - 1
        if written > 0:
            self._written[user_id] = written
        else:
            self._written.pop(user_id, None)
        if not admitted:
            raise TooManyConnections(
                f"user {user_id!r} already holds {total} connections on {nodes} nodes "
                f"(Config.max_connections_per_user is {limit}, counted over the cluster); "
                "close one first"
            )

    # ---- publishing -------------------------------------------------------------------------

    async def publish(self, user_id: str, thread_id: str, event: AgentEvent) -> int:
        """Queue the event for Redis (seq assigned there, in queue order) and wait for its seq.

        Raises:
            BrokerUnavailable: Redis is not connected (or the call failed), or an earlier
                queued event of the thread was not stored (see ``StreamOps.publish``).
            RunTooLarge: this event, or an earlier queued one of the thread, was refused by
                ``Config.max_run_bytes``.
        """
        self._pipeline.check(user_id, thread_id)
        return await self._require_ops().publish(user_id, thread_id, event)

    async def enqueue(self, user_id: str, thread_id: str, event: AgentEvent) -> None:
        """Queue the event for Redis behind every publish made before it and return; a later
        failure is raised by the thread's next publish or by :meth:`flush`.

        Raises:
            BrokerUnavailable: Redis is not connected, the queue stayed full for ``timeout``,
                or an earlier queued event of the thread was not stored (this one not queued).
            RunTooLarge: an earlier queued event of the thread was refused (this one not
                queued).
        """
        self._pipeline.check(user_id, thread_id)
        await self._require_ops().enqueue(user_id, thread_id, event)

    async def flush(self, user_id: str) -> None:
        """Wait until every event this node queued before the call is stored or failed; raise
        the oldest unreported failure of ``user_id``'s threads.

        Raises:
            BrokerUnavailable: Redis stored nothing for twice ``timeout``, or that failure.
            RunTooLarge: that failure.
        """
        await self._pipeline.wait_flushed(user_id)

    async def publish_user(self, user_id: str, event: AgentEvent) -> None:
        """Publish a live-only event on the user's channel (every node holding the user)."""
        await self._require_ops().publish_user(user_id, event)

    async def publish_all(self, event: AgentEvent) -> None:
        """Publish a live-only event to every connection on every node."""
        await self._require_ops().publish_all(event)

    async def publish_disconnect(self, user_id: str, code: int, reason: str) -> None:
        """Publish a disconnect on the user's channel: every node holding the user closes its
        connections (this one too, again: closing is idempotent)."""
        await self._require_ops().publish_disconnect(user_id, code, reason)

    async def set_revocation(self, user_id: str, cutoff: float) -> None:
        """Store the user's revocation cut-off in Redis (see ``keys``)."""
        await self._require_ops().set_revocation(user_id, cutoff)

    async def revocation(self, user_id: str) -> float | None:
        """The user's revocation cut-off from Redis, Unix seconds, or None."""
        return await self._require_ops().revocation(user_id)

    async def recover(
        self, user_id: str, thread_id: str, since_seq: int | None, epoch: str | None,
        *, compact: bool = True,
    ) -> Recovery:
        """Read what was missed from the thread's stream: complete, or ``recovered`` False;
        ``compact`` False skips the replay's text compaction.

        Raises:
            BrokerUnavailable: Redis is not connected (or the call failed).
        """
        return await self._require_ops().recover(
            user_id, thread_id, since_seq, epoch, compact=compact
        )


def _user_of_channel(channel: str) -> str:
    # "agentcast:{user}:live" -> "user"
    return channel[channel.index("{") + 1 : channel.rindex("}")]

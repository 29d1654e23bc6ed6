"""RedisBroker: the backplane that lets many processes and machines serve one set of users.

Seqs and history live in Redis (one Lua script assigns the seq, appends to the thread's
stream and publishes, atomically; see ``_redis_keys``); live fan-out is Redis pub/sub on one
channel per user, which a node subscribes to only while it holds that user's session.

Rules of this module: the broker task owns one coredis client and one pub/sub connection at a
time. When either fails, the broker goes not-ready, closes every local connection with 1012
(service restart) so clients resume with ``since_seq`` from the streams (pub/sub messages sent
while a node was away are gone, the streams are not), and reconnects with bounded exponential
backoff, re-subscribing the users it still holds before it reports ready again.
"""

from __future__ import annotations

import collections
import logging
from typing import TYPE_CHECKING, Final

import attrs
import trio

from ._broker import BrokerStats, EventSink
from ._config import Config
from ._errors import BrokerUnavailable
from ._events import AgentEvent
from ._history import Recovery
from ._redact import redact_text, redact_url
from ._redis_keys import ALL_CHANNEL, parse_disconnect_message, parse_user_message, user_channel
from ._redis_streams import CONNECT_TIMEOUT, StreamOps, first_leaf, redis_client, redis_down

if TYPE_CHECKING:
    from coredis.patterns.pubsub import PubSub

__all__ = ["RedisBroker"]

log = logging.getLogger("agentcast")

#: First wait before reconnecting to Redis, in seconds; doubled after each failure.
RECONNECT_MIN: Final = 0.1
#: Longest wait between reconnection attempts, in seconds.
RECONNECT_MAX: Final = 5.0
#: Reason given to clients when the backplane connection is lost.
RESTART_REASON: Final = "backplane reconnecting; resume with since_seq"


@attrs.define(eq=False)
class RedisBroker:
    """A :class:`Broker` on Redis: pass it to ``open_manager(broker=...)``.

    Args:
        url: ``redis://HOST:PORT/DB`` (``rediss://`` for TLS).
        config: the manager's config (history size and TTL).
    """

    url: str = attrs.field(repr=redact_url)
    config: Config = attrs.Factory(Config)
    _ops: StreamOps | None = None
    _pubsub: PubSub[str] | None = None
    _sink: EventSink | None = None
    #: user id -> local sessions holding it (a closing and a new session may overlap).
    _held: collections.Counter[str] = attrs.Factory(collections.Counter)
    _reason: str = "not connected yet"
    _reconnects: int = 0
    _announced: bool = False

    # ---- lifetime ---------------------------------------------------------------------------

    async def serve(self, sink: EventSink, *, task_status: trio.TaskStatus[None]) -> None:
        """Stay connected to Redis and deliver its messages to ``sink`` until cancelled.

        Reports started after the first connection attempt, whether or not it succeeded, so
        a server starts (not ready, with the reason) while Redis is unreachable.
        """
        self._sink = sink
        delay = RECONNECT_MIN
        while True:
            try:
                await self._connected_session(None if self._announced else task_status)
            except* redis_down() as group:
                # After a lost connection the first retry is quick; each failure doubles it.
                delay = RECONNECT_MIN if self.ready else min(delay * 2, RECONNECT_MAX)
                self._went_down(first_leaf(group))
            if not self._announced:
                self._announced = True
                task_status.started()
            await trio.sleep(delay)

    def _went_down(self, exc: BaseException) -> None:
        was_ready = self.ready
        self._ops = self._pubsub = None
        # The reason reaches /health and the logs: never the URL's password.
        error = redact_text(str(exc), self.url)
        self._reason = f"redis unavailable at {redact_url(self.url)}: {error}"
        self._reconnects += 1
        if was_ready:
            log.warning("lost the Redis backplane (%s); closing connections with 1012", error)
            sink = self._sink
            if sink is not None:
                sink.reset_connections(RESTART_REASON)
        else:
            log.info("Redis backplane still unavailable: %s", error)

    async def _connected_session(self, task_status: trio.TaskStatus[None] | None) -> None:
        client = redis_client(self.url)
        async with client:
            with trio.fail_after(CONNECT_TIMEOUT):
                await client.ping()
            pubsub = client.pubsub(
                retry_policy=None,
                ignore_subscribe_messages=True,
                subscription_timeout=CONNECT_TIMEOUT,
            )
            async with pubsub:
                await pubsub.subscribe(ALL_CHANNEL)
                for user_id in list(self._held):
                    await pubsub.subscribe(user_channel(user_id))
                ops = StreamOps(client, self.config)
                async with trio.open_nursery() as flushing:
                    # Publishes from every session go out as pipelines: one round trip and
                    # a fraction of coredis's per-call CPU for all made meanwhile.
                    flushing.start_soon(ops.flush_publishes, name="agentcast.redis.publisher")
                    self._ops, self._pubsub = ops, pubsub
                    self._reconnects = 0
                    self._reason = ""
                    log.info("connected to the Redis backplane at %s", redact_url(self.url))
                    if task_status is not None:
                        self._announced = True
                        task_status.started()
                    await self._consume(pubsub)

    async def _consume(self, pubsub: PubSub[str]) -> None:
        sink = self._sink
        assert sink is not None
        while True:
            message = await pubsub.get_message()
            if message is None or message["type"] != "message":
                continue
            channel, data = message["channel"], message["data"]
            if not isinstance(data, str) or not isinstance(channel, str):
                continue
            if channel == ALL_CHANNEL:
                sink.deliver_all(data)
                continue
            user_id = _user_of_channel(channel)
            try:
                disconnect = parse_disconnect_message(data)
                if disconnect is not None:
                    sink.close_user(user_id, *disconnect)
                    continue
                thread_id, seq, frame = parse_user_message(data)
            except ValueError:
                log.warning("ignored a malformed message on %s", channel)
                continue
            if thread_id is None or seq is None:
                sink.deliver_user(user_id, frame)
            else:
                sink.deliver_thread(user_id, thread_id, seq, frame)

    @property
    def ready(self) -> bool:
        """True while connected to Redis with the subscriptions in place."""
        return self._ops is not None

    @property
    def reason(self) -> str:
        """Why the broker is not ready ("" when it is)."""
        return self._reason

    def statistics(self) -> BrokerStats:
        """Streams live in Redis, so only readiness is known locally."""
        return BrokerStats(streams=0, retained_events=0, ready=self.ready, reason=self._reason)

    def _require_ops(self) -> StreamOps:
        ops = self._ops
        if ops is None:
            raise BrokerUnavailable(self._reason or "the Redis broker is not connected")
        return ops

    # ---- subscriptions ----------------------------------------------------------------------

    async def attach_user(self, user_id: str) -> None:
        """Subscribe to the user's channel (on the first local session) before it returns, so
        replays computed afterwards leave no gap before live events."""
        self._held[user_id] += 1
        pubsub = self._pubsub
        if self._held[user_id] == 1 and pubsub is not None:
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
            try:
                await pubsub.unsubscribe(user_channel(user_id))
            except* redis_down():
                pass  # a lost connection drops every subscription anyway

    def held_users(self) -> set[str]:
        """Users whose channel this node subscribes to."""
        return set(self._held)

    # ---- publishing -------------------------------------------------------------------------

    async def publish(self, user_id: str, thread_id: str, event: AgentEvent) -> int:
        """Assign the seq, append and publish in one script call; return the seq.

        Raises:
            BrokerUnavailable: Redis is not connected (or the call failed).
        """
        return await self._require_ops().publish(user_id, thread_id, event)

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
        """Store the user's revocation cut-off in Redis (see ``_redis_keys``)."""
        await self._require_ops().set_revocation(user_id, cutoff)

    async def revocation(self, user_id: str) -> float | None:
        """The user's revocation cut-off from Redis, Unix seconds, or None."""
        return await self._require_ops().revocation(user_id)

    async def recover(
        self, user_id: str, thread_id: str, since_seq: int | None, epoch: str | None
    ) -> Recovery:
        """Read what was missed from the thread's stream: complete, or ``recovered`` False.

        Raises:
            BrokerUnavailable: Redis is not connected (or the call failed).
        """
        return await self._require_ops().recover(user_id, thread_id, since_seq, epoch)


def _user_of_channel(channel: str) -> str:
    # "agentcast:{user}:live" -> "user"
    return channel[channel.index("{") + 1 : channel.rindex("}")]

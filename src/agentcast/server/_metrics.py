"""Prometheus metrics for ``GET /metrics``, read from the manager's own statistics.

Everything is collected at scrape time: from ``get_stats()``, the server's rejection counts,
the Redis backplane's own figures (``RedisBroker.backplane_stats``) when it runs on one, and
the per-type publish counts that :class:`MeteredBroker` keeps in a plain ``Counter`` (one dict
increment per published event, not per delivery: a prometheus-client ``labels().inc()`` per
event cost more than the rest of publishing).
"""

from __future__ import annotations

import collections
from collections.abc import Callable, Iterator
from typing import Final

import attrs
import trio
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector

from .._events import AgentEvent
from .._history import Recovery
from .._manager import ConnectionManager
from .._presence import Presence
from ..backplane.protocol import Broker, BrokerStats, EventSink
from ..backplane.redis.broker import BackplaneStats, RedisBroker

__all__ = ["CONTENT_TYPE", "MeteredBroker", "Metrics"]

#: The Prometheus text exposition content type.
CONTENT_TYPE: Final = "text/plain; version=0.0.4; charset=utf-8"


@attrs.define(eq=False)
class MeteredBroker:
    """A broker that counts published events by type, then delegates."""

    inner: Broker
    #: event type -> events published.
    published: collections.Counter[str]

    async def serve(self, sink: EventSink, *, task_status: trio.TaskStatus[None]) -> None:
        await self.inner.serve(sink, task_status=task_status)

    async def publish(self, user_id: str, thread_id: str, event: AgentEvent) -> int:
        seq = await self.inner.publish(user_id, thread_id, event)
        self.published[event.type] += 1
        return seq

    async def enqueue(self, user_id: str, thread_id: str, event: AgentEvent) -> None:
        await self.inner.enqueue(user_id, thread_id, event)
        self.published[event.type] += 1

    async def flush(self, user_id: str) -> None:
        await self.inner.flush(user_id)

    async def publish_user(self, user_id: str, event: AgentEvent) -> None:
        await self.inner.publish_user(user_id, event)
        self.published[event.type] += 1

    async def publish_all(self, event: AgentEvent) -> None:
        await self.inner.publish_all(event)
        self.published[event.type] += 1

    async def publish_disconnect(self, user_id: str, code: int, reason: str) -> None:
        await self.inner.publish_disconnect(user_id, code, reason)

    async def recover(
        self, user_id: str, thread_id: str, since_seq: int | None, epoch: str | None,
        *, compact: bool = True,
    ) -> Recovery:
        return await self.inner.recover(user_id, thread_id, since_seq, epoch, compact=compact)

    async def attach_user(self, user_id: str) -> None:
        await self.inner.attach_user(user_id)

    async def detach_user(self, user_id: str) -> None:
        await self.inner.detach_user(user_id)

    def statistics(self) -> BrokerStats:
        return self.inner.statistics()

    async def wait_ready(self) -> None:
        await self.inner.wait_ready()

    async def presence(self, user_id: str) -> Presence:
        return await self.inner.presence(user_id)

    async def reserve_connection(self, user_id: str, places: int, limit: int | None) -> None:
        await self.inner.reserve_connection(user_id, places, limit)


@attrs.define(eq=False)
class _StatsCollector(Collector):
    manager: Callable[[], ConnectionManager | None]
    rejections: Callable[[], dict[str, int]]
    published: Callable[[], collections.Counter[str]]
    backplane: Callable[[], BackplaneStats | None]

    def collect(self) -> Iterator[Metric]:
        published = CounterMetricFamily(
            "agentcast_events_published", "Events published, by type.", labels=["type"]
        )
        for event_type, count in sorted(self.published().items()):
            published.add_metric([event_type], count)
        yield published
        manager = self.manager()
        if manager is None:
            return
        stats = manager.get_stats(per_user=False)
        for name, value, text in [
            ("agentcast_connections", stats.connections, "Open WebSocket connections."),
            ("agentcast_users", stats.users, "Users with a live session."),
            ("agentcast_active_runs", stats.active_runs, "Agent runs not yet ended."),
            ("agentcast_live_tasks", stats.live_tasks, "Tasks under the manager's nursery."),
        ]:
            yield GaugeMetricFamily(name, text, value=value)
        for name, value, text in [
            ("agentcast_events_sent", stats.events_sent, "Events written to clients."),
            ("agentcast_messages_sent", stats.messages_sent, "WebSocket messages written."),
            ("agentcast_events_dropped", stats.events_dropped,
             "Events not written because their connection was closing or too slow."),
            ("agentcast_slow_consumer_closes", stats.slow_consumer_disconnects,
             "Connections closed because they did not keep up (4008)."),
            ("agentcast_rate_limit_closes", stats.rate_limit_disconnects,
             "Connections closed for flooding (4029)."),
            ("agentcast_session_crashes", stats.session_crashes,
             "Sessions that ended with an unexpected error (1011)."),
        ]:
            yield CounterMetricFamily(name, text, value=value)
        rejected = CounterMetricFamily(
            "agentcast_handshake_rejections", "WebSocket handshakes refused, by reason.",
            labels=["reason"],
        )
        for reason, count in sorted(self.rejections().items()):
            rejected.add_metric([reason], count)
        yield rejected
        latency = stats.delivery_latency
        buckets = [(repr(bound), count) for bound, count in zip(
            latency.bounds, latency.counts, strict=True
        )]
        buckets.append(("+Inf", latency.count))
        yield HistogramMetricFamily(
            "agentcast_event_delivery_seconds",
            "Seconds from publishing a live event to the end of its socket write (each batch's "
            "oldest event, counted for every event in the batch).",
            buckets=buckets, sum_value=latency.sum,
        )
        backplane = self.backplane()
        if backplane is not None:
            yield from _backplane_metrics(backplane)


def _backplane_metrics(stats: BackplaneStats) -> Iterator[Metric]:
    """The Redis backplane's figures: publish latency, pipeline depth, reconnects, pub/sub."""
    latency = stats.publish_latency
    buckets = [(repr(bound), count) for bound, count in zip(
        latency.bounds, latency.counts, strict=True
    )]
    buckets.append(("+Inf", latency.count))
    yield HistogramMetricFamily(
        "agentcast_redis_publish_seconds",
        "Seconds from a publish being made to Redis returning its seq (queue and round trip).",
        buckets=buckets, sum_value=latency.sum,
    )
    yield GaugeMetricFamily(
        "agentcast_redis_pipeline_depth", "Publishes queued for Redis or on the wire now.",
        value=stats.pipeline_depth,
    )
    for name, value, text in [
        ("agentcast_redis_reconnects", stats.reconnects,
         "Times the connection to Redis was re-established after being lost."),
        ("agentcast_redis_pubsub_messages", stats.pubsub_messages,
         "Pub/sub messages received from Redis."),
        ("agentcast_redis_stalls", stats.stalls,
         "Times Redis stopped answering within --redis-timeout."),
    ]:
        yield CounterMetricFamily(name, text, value=value)


@attrs.define(eq=False)
class Metrics:
    """The registry behind ``/metrics``; one per server, so tests can run several."""

    registry: CollectorRegistry = attrs.Factory(CollectorRegistry)
    #: event type -> events published through :meth:`wrap`'s broker.
    published: collections.Counter[str] = attrs.Factory(collections.Counter)
    _manager: ConnectionManager | None = None
    _rejections: dict[str, int] = attrs.Factory(dict)
    _redis: RedisBroker | None = None

    def __attrs_post_init__(self) -> None:
        self.registry.register(_StatsCollector(
            lambda: self._manager, lambda: self._rejections, lambda: self.published,
            lambda: None if self._redis is None else self._redis.backplane_stats(),
        ))

    def watch(self, manager: ConnectionManager, rejections: dict[str, int]) -> None:
        """Report this manager's statistics and this rejection table."""
        self._manager = manager
        self._rejections = rejections

    def wrap(self, broker: Broker) -> MeteredBroker:
        """Count ``broker``'s publishes by event type (and report a Redis broker's figures)."""
        if isinstance(broker, RedisBroker):
            self._redis = broker
        return MeteredBroker(broker, self.published)

    def render(self) -> bytes:
        """The text exposition of every metric."""
        return generate_latest(self.registry)

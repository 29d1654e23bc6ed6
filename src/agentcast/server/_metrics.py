"""Prometheus metrics for ``GET /metrics``, read from the manager's own statistics.

Everything but the per-type event counter is collected at scrape time from ``get_stats()`` and
the server's rejection counts, so the hot path pays nothing for them; the per-type counter is
incremented once per published event (not per delivery) by :class:`MeteredBroker`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Final

import attrs
import trio
from prometheus_client import CollectorRegistry, Counter, generate_latest
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector

from .._broker import Broker, BrokerStats, EventSink
from .._events import AgentEvent
from .._history import Recovery
from .._manager import ConnectionManager

__all__ = ["CONTENT_TYPE", "MeteredBroker", "Metrics"]

#: The Prometheus text exposition content type.
CONTENT_TYPE: Final = "text/plain; version=0.0.4; charset=utf-8"


@attrs.define(eq=False)
class MeteredBroker:
    """A broker that counts published events by type, then delegates."""

    inner: Broker
    published: Counter

    async def serve(self, sink: EventSink, *, task_status: trio.TaskStatus[None]) -> None:
        await self.inner.serve(sink, task_status=task_status)

    async def publish(self, user_id: str, thread_id: str, event: AgentEvent) -> int:
        seq = await self.inner.publish(user_id, thread_id, event)
        self.published.labels(event.type).inc()
        return seq

    async def publish_user(self, user_id: str, event: AgentEvent) -> None:
        await self.inner.publish_user(user_id, event)
        self.published.labels(event.type).inc()

    async def publish_all(self, event: AgentEvent) -> None:
        await self.inner.publish_all(event)
        self.published.labels(event.type).inc()

    async def recover(
        self, user_id: str, thread_id: str, since_seq: int | None, epoch: str | None
    ) -> Recovery:
        return await self.inner.recover(user_id, thread_id, since_seq, epoch)

    async def attach_user(self, user_id: str) -> None:
        await self.inner.attach_user(user_id)

    async def detach_user(self, user_id: str) -> None:
        await self.inner.detach_user(user_id)

    def statistics(self) -> BrokerStats:
        return self.inner.statistics()


@attrs.define(eq=False)
class _StatsCollector(Collector):
    manager: Callable[[], ConnectionManager | None]
    rejections: Callable[[], dict[str, int]]

    def collect(self) -> Iterator[Metric]:
        manager = self.manager()
        if manager is None:
            return
        stats = manager.get_stats()
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


@attrs.define(eq=False)
class Metrics:
    """The registry behind ``/metrics``; one per server, so tests can run several."""

    registry: CollectorRegistry = attrs.Factory(CollectorRegistry)
    published: Counter = attrs.field(init=False)
    _manager: ConnectionManager | None = None
    _rejections: dict[str, int] = attrs.Factory(dict)

    def __attrs_post_init__(self) -> None:
        self.published = Counter(
            "agentcast_events_published", "Events published, by type.", ["type"],
            registry=self.registry,
        )
        self.registry.register(_StatsCollector(lambda: self._manager, lambda: self._rejections))

    def watch(self, manager: ConnectionManager, rejections: dict[str, int]) -> None:
        """Report this manager's statistics and this rejection table."""
        self._manager = manager
        self._rejections = rejections

    def wrap(self, broker: Broker) -> MeteredBroker:
        """Count ``broker``'s publishes by event type."""
        return MeteredBroker(broker, self.published)

    def render(self) -> bytes:
        """The text exposition of every metric."""
        return generate_latest(self.registry)

"""Delivery latency: how long a live event took from publish to the end of its socket write.

Each writer observes, once per batch it writes, the age of the batch's oldest live event and
counts it for every live event in the batch: an upper bound for each of them, for the cost of
one clock read and one bisect per batch. Replayed events are not observed (their age is the
time the client was away, not a delivery delay).
"""

from __future__ import annotations

import bisect
import time
from typing import Final

import attrs

__all__ = ["DELIVERY_BUCKETS", "DeliveryLatency", "LatencySnapshot", "event_ts"]

#: Histogram upper bounds in seconds (Prometheus-style ``le``), from sub-millisecond loopback
#: delivery to the default write timeout.
DELIVERY_BUCKETS: Final = (
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
)
_TS_FIELD: Final = '"ts":'


def event_ts(frame: str) -> float | None:
    """The envelope's ``ts`` (publish time, Unix seconds) of an encoded event, if it has one.

    The envelope is assembled with ``ts`` before ``data`` (see ``encode_envelope``), so the
    first ``"ts":`` in the frame is the envelope's own.
    """
    start = frame.find(_TS_FIELD)
    if start < 0:
        return None
    start += len(_TS_FIELD)
    end = frame.find(",", start)
    try:
        return float(frame[start:end])
    except ValueError:
        return None


@attrs.frozen
class LatencySnapshot:
    """A copy of the histogram: ``counts[i]`` events took at most ``bounds[i]`` seconds
    (cumulative, like Prometheus buckets); ``count`` includes those over the last bound."""

    bounds: tuple[float, ...]
    counts: tuple[int, ...]
    count: int
    sum: float


@attrs.define(eq=False)
class DeliveryLatency:
    """A fixed-bucket histogram of delivery latencies, shared by a manager's connections."""

    bounds: tuple[float, ...] = DELIVERY_BUCKETS
    _buckets: list[int] = attrs.field(init=False)
    _sum: float = 0.0

    def __attrs_post_init__(self) -> None:
        self._buckets = [0] * (len(self.bounds) + 1)

    def observe_frame(self, frame: str, events: int) -> None:
        """Count ``events`` delivered now, as old as the event encoded in ``frame``."""
        published = event_ts(frame)
        if published is not None:
            self.observe(max(0.0, time.time() - published), events)

    def observe(self, seconds: float, events: int = 1) -> None:
        """Count ``events`` deliveries that each took ``seconds``."""
        self._buckets[bisect.bisect_left(self.bounds, seconds)] += events
        self._sum += seconds * events

    def snapshot(self) -> LatencySnapshot:
        """The cumulative bucket counts, total count and sum so far."""
        cumulative, running = [], 0
        for bucket in self._buckets[:-1]:
            running += bucket
            cumulative.append(running)
        return LatencySnapshot(
            self.bounds, tuple(cumulative), running + self._buckets[-1], self._sum
        )

"""Pure accounting of what a client received: latency histogram and per-stream checks.

No I/O here, so the unit tests cover it directly. A load generator process keeps one
:class:`Histogram` and one :class:`StreamCheck` per (connection, thread); the orchestrator merges
histograms from several processes, which percentiles of percentiles could not do.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from typing import Final

import attrs

#: Relative width of a histogram bucket: percentiles are exact to within 1%.
BUCKET_RATIO: Final = 1.01
#: Smallest latency resolved (seconds); anything below lands in bucket 0.
MIN_LATENCY: Final = 1e-6
_LOG_RATIO: Final = math.log(BUCKET_RATIO)


def bucket_of(seconds: float) -> int:
    """Bucket index of a latency in seconds (0 for anything at or below ``MIN_LATENCY``)."""
    if seconds <= MIN_LATENCY:
        return 0
    return int(math.log(seconds / MIN_LATENCY) / _LOG_RATIO) + 1


def bucket_value(index: int) -> float:
    """Upper edge of bucket ``index`` in seconds (the value reported for a percentile)."""
    return MIN_LATENCY * BUCKET_RATIO**index


@attrs.define
class Histogram:
    """Log-bucketed latency counts; mergeable, and serialisable as ``{bucket: count}``."""

    counts: dict[int, int] = attrs.Factory(dict)
    total: int = 0

    def record(self, seconds: float) -> None:
        index = bucket_of(seconds)
        self.counts[index] = self.counts.get(index, 0) + 1
        self.total += 1

    def merge(self, other: Histogram) -> None:
        for index, count in other.counts.items():
            self.counts[index] = self.counts.get(index, 0) + count
        self.total += other.total

    def to_json(self) -> dict[str, int]:
        return {str(index): count for index, count in self.counts.items()}

    @classmethod
    def from_json(cls, data: Mapping[str, int]) -> Histogram:
        counts = {int(index): int(count) for index, count in data.items()}
        return cls(counts, sum(counts.values()))

    def percentile(self, q: float) -> float | None:
        """Latency (s) at or below which a fraction ``q`` of samples fall; None when empty."""
        if self.total == 0:
            return None
        rank = max(1, math.ceil(q * self.total))
        seen = 0
        for index in sorted(self.counts):
            seen += self.counts[index]
            if seen >= rank:
                return bucket_value(index)
        return bucket_value(max(self.counts))  # pragma: no cover - rank <= total


def percentiles_ms(
    histogram: Histogram, qs: Iterable[float] = (0.5, 0.99, 0.999)
) -> dict[str, float | None]:
    """``{"p50": ms, "p99": ms, ...}`` of a histogram."""
    out: dict[str, float | None] = {}
    for q in qs:
        value = histogram.percentile(q)
        label = f"p{q * 100:g}".replace(".", "")
        out[label] = None if value is None else round(value * 1000, 3)
    return out


@attrs.define
class StreamCheck:
    """Counts for one (connection, thread) stream whose events are numbered 1..N by ``data.n``.

    A duplicate is an ``n`` seen before; an order violation an ``n`` below the highest seen
    (and new); losses are the numbers up to ``expected`` never seen.
    """

    seen: set[int] = attrs.Factory(set)
    highest: int = 0
    duplicates: int = 0
    order_violations: int = 0

    def observe(self, n: int) -> None:
        if n in self.seen:
            self.duplicates += 1
            return
        if n < self.highest:
            self.order_violations += 1
        self.seen.add(n)
        self.highest = max(self.highest, n)

    def received(self) -> int:
        return len(self.seen)

    def losses(self, expected: int) -> int:
        return sum(1 for n in range(1, expected + 1) if n not in self.seen)


@attrs.define
class Tally:
    """Totals over many streams plus cross-user deliveries (events of another user)."""

    delivered: int = 0
    losses: int = 0
    duplicates: int = 0
    order_violations: int = 0
    cross_user: int = 0

    def add_stream(self, check: StreamCheck, expected: int) -> None:
        self.delivered += check.received()
        self.losses += check.losses(expected)
        self.duplicates += check.duplicates
        self.order_violations += check.order_violations

    def merge(self, other: Tally) -> None:
        for field in attrs.fields(Tally):
            setattr(self, field.name, getattr(self, field.name) + getattr(other, field.name))

    def failures(self) -> int:
        """Losses, duplicates, order violations and cross-user deliveries together."""
        return self.losses + self.duplicates + self.order_violations + self.cross_user

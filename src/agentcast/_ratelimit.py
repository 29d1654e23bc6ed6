"""Token buckets, and the inbound message-rate policy of a connection.

Rules of this module: pure, no I/O, no trio; time (monotonic seconds) is an argument, so the
tests need no clock. :class:`TokenBucket` is the one bucket agentcast uses: for the inbound
message rate here and for the frame guard's byte, frame and control-frame rates.
:class:`InboundLimiter` is the message-rate policy: over the rate a frame is refused (the client
gets ``rate_limited``), and more than ``max_strikes`` refusals in a row close the connection
(4029); one accepted frame forgives the strikes.
"""

from __future__ import annotations

import enum

import attrs

__all__ = ["Admission", "InboundLimiter", "TokenBucket"]


@attrs.define
class TokenBucket:
    """A token bucket: ``rate`` tokens per second up to ``capacity``; starts full."""

    rate: float
    capacity: float
    tokens: float
    updated: float

    @classmethod
    def full(cls, rate: float, capacity: float, now: float) -> TokenBucket:
        return cls(rate, capacity, capacity, now)

    def _refill(self, now: float) -> None:
        if now > self.updated:
            self.tokens = min(self.capacity, self.tokens + (now - self.updated) * self.rate)
            self.updated = now

    def take(self, amount: float, now: float) -> bool:
        """Take ``amount`` tokens if there are that many; False (nothing taken) otherwise."""
        self._refill(now)
        if self.tokens >= amount:
            self.tokens -= amount
            return True
        return False

    def charge(self, amount: float, now: float) -> None:
        """Take ``amount`` tokens even if that leaves the bucket in debt."""
        self._refill(now)
        self.tokens -= amount

    def available(self, now: float) -> float:
        """Tokens in the bucket at ``now`` (negative while in debt)."""
        self._refill(now)
        return self.tokens

    def delay(self, now: float, want: float = 1.0) -> float:
        """Seconds until the bucket holds ``want`` tokens (0 when it has a token to spare);
        ``want`` is capped at the capacity."""
        self._refill(now)
        if self.tokens > 0 and want <= 1.0:
            return 0.0
        return max(0.0, min(want, self.capacity) - self.tokens) / self.rate


class Admission(enum.Enum):
    """What to do with one inbound frame."""

    #: Within the rate: handle it.
    ACCEPT = "accept"
    #: Over the rate: answer ``rate_limited`` and drop it unprocessed.
    REFUSE = "refuse"
    #: Over the rate once too often in a row: close the connection (4029).
    CLOSE = "close"


@attrs.define
class InboundLimiter:
    """The inbound message rate of one connection (``Config.inbound_rate``/``inbound_burst``/
    ``rate_limit_strikes``)."""

    bucket: TokenBucket
    #: Refusals in a row tolerated; the one after closes.
    max_strikes: int
    #: Refusals since the last accepted frame.
    strikes: int = 0

    @classmethod
    def create(cls, rate: float, burst: int, max_strikes: int, now: float) -> InboundLimiter:
        return cls(TokenBucket.full(rate, float(burst), now), max_strikes)

    def admit(self, now: float) -> Admission:
        """Charge one frame arriving at ``now``."""
        if self.bucket.take(1.0, now):
            self.strikes = 0
            return Admission.ACCEPT
        self.strikes += 1
        return Admission.CLOSE if self.strikes > self.max_strikes else Admission.REFUSE

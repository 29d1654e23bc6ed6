"""The inbound guard: what the server's WebSocket asks before and after each read of a client's
socket, to limit what the client sends below the message level.

The standalone server owns each client's TCP socket, so it can see every frame header before
wsproto does. :class:`InboundGuard` says how much to read and when (:meth:`InboundGuard.
wait_to_read`) and feeds each chunk read (:meth:`InboundGuard.scan`) to a
pure :class:`~agentcast._frames.FrameScanner` (RFC 6455 rules, fragments per message, control
frames per second) and charges it to a byte and a frame :class:`~agentcast._frames.TokenBucket`:

* over the byte rate or the frame rate it simply reads later: TCP backpressure slows the
  client, costing the server no CPU, and the connection stays open (tiny frames within every
  other limit still cost wsproto ~15-25 µs each: the frame rate bounds that work);
* on the first broken rule it calls the callback the server set (``Connection.close``), with
  1002, 1008 or 4029, and stops reading that client: the close frame still goes out, but
  whatever the client sends after the offending frame (including a close reply) is neither
  read nor parsed, so a flood costs no more CPU and TCP backpressure stalls the flooder. The
  close then ends at ``Config.close_timeout``, when the connection's own deadline drops it.

No task or stream object is added per connection: the guard runs in the task that reads the
connection (``_wsconn.ServerWebSocket.get_message``, the connection's reader), which does the
reads itself.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Final

import attrs
import trio

from .._config import Config
from .._frames import (
    MIN_FRAME_BYTES,
    FrameCounts,
    FrameLimits,
    FrameScanner,
    FrameViolation,
    TokenBucket,
)

__all__ = ["READ_CHUNK", "InboundGuard", "InboundStatistics"]

log = logging.getLogger("agentcast.server")

#: Bytes read per call at most (trio-websocket's default too).
READ_CHUNK: Final = 4096
#: Frames one read may hold once a client is over its frame rate: it is then read in small
#: steps (at most this many frames each, ~1-2 ms of wsproto's time), not one 4 KiB read of
#: ~600 tiny frames every few seconds, a burst of work that delays every other client.
THROTTLED_READ_FRAMES: Final = 32
#: End of an HTTP request head.
HEAD_END: Final = b"\r\n\r\n"

#: What the guard calls on the first broken rule: ``(close code, reason)``.
OnViolation = Callable[[int, str], None]


@attrs.frozen
class InboundStatistics:
    """What one guarded connection sent, for tests and diagnostics."""

    #: Bytes read from the client's socket after the request head.
    received: int
    #: Bytes of those passed on to the WebSocket library.
    passed: int
    #: Frames, control frames and messages the scanner saw.
    frames: FrameCounts
    #: Seconds reads were postponed by the byte or frame rate.
    throttled: float
    #: The first rule the client broke, or None.
    violation: FrameViolation | None


@attrs.define(eq=False)
class InboundGuard:
    """One client's frame scanner and byte and frame buckets, consulted around every read."""

    scanner: FrameScanner
    _bytes: TokenBucket
    _frames: TokenBucket
    _on_violation: OnViolation | None = None
    _reported: bool = False
    #: The reader has handled everything passed (it asked for more after a violation).
    _drained: bool = False
    _received: int = 0
    _passed: int = 0
    _throttled: float = 0.0

    @classmethod
    def create(cls, raw_head: bytes, config: Config) -> tuple[InboundGuard, bytes]:
        """A guard for one client; returns it and the client's first frame bytes to handle.

        ``raw_head`` is every byte read while reading the request head: a client may send its
        first frames in the same segment, so what follows the head goes through the scanner
        too (and is handed on only as far as the scanner lets it).
        """
        now = trio.current_time()
        limits = FrameLimits.from_config(config)
        guard = cls(
            FrameScanner.create(limits, now),
            TokenBucket.full(limits.inbound_bytes_per_second, limits.inbound_bytes_burst, now),
            TokenBucket.full(limits.inbound_frames_per_second, limits.inbound_frames_burst, now),
        )
        end = raw_head.find(HEAD_END)
        end = len(raw_head) if end < 0 else end + len(HEAD_END)
        early = raw_head[end:]
        if not early:
            return guard, b""
        return guard, guard.scan(early)

    def on_violation(self, callback: OnViolation) -> None:
        """Call ``callback(code, reason)`` on the first broken rule (at once if one was and
        the reader has handled everything passed before it)."""
        self._on_violation = callback
        self._report()

    def statistics(self) -> InboundStatistics:
        return InboundStatistics(
            self._received, self._passed, self.scanner.counts(), self._throttled,
            self.scanner.violation,
        )

    def _report(self) -> None:
        violation = self.scanner.violation
        if violation is None or not self._drained or self._reported or self._on_violation is None:
            return
        self._reported = True
        log.info("closing a connection with %d: %s", violation.close_code, violation.reason)
        self._on_violation(violation.close_code, violation.reason)

    async def wait_to_read(self, size: int = READ_CHUNK) -> int:
        """How many bytes (at most ``size``) to read next; waits first while the client is
        over its byte or frame rate, and for ever once it broke a rule.

        The wait is bounded: each bucket is at most one read in debt (a read of ``size`` bytes
        holds at most ``size / 6`` frames), so it lasts at most that (plus
        :data:`THROTTLED_READ_FRAMES`) divided by the rate. Returns at once, without a
        checkpoint, while the client is within its rates.
        """
        size = min(size, int(self._bytes.capacity))
        if self.scanner.violation is not None:
            # The reader asks for more, so it has handled every frame passed before the
            # offending one (each ping answered as it was handled; a close sent earlier
            # would drop the pongs after it). Now close, and read nothing more: the
            # connection's close deadline cancels this wait.
            self._drained = True
            self._report()
            await trio.sleep_forever()
        # Stale balances (refilling only adds tokens) are enough to take the fast path.
        frames_short = self._frames.tokens * MIN_FRAME_BYTES < size
        if self._bytes.tokens > 0 and not frames_short:
            return size
        now = trio.current_time()
        want = THROTTLED_READ_FRAMES if frames_short else 1.0
        delay = max(self._bytes.delay(now), self._frames.delay(now, want))
        if delay:
            self._throttled += delay
            await trio.sleep(delay)
        if not frames_short:
            return size
        # Read no more bytes than could hold the frames the bucket has.
        tokens = self._frames.available(trio.current_time())
        return min(size, int(max(tokens, want)) * MIN_FRAME_BYTES)

    def scan(self, data: bytes) -> bytes:
        """Charge and scan what was read; return what to pass on (b"" for part of a frame
        header, or from the first broken rule on)."""
        now = trio.current_time()
        self._received += len(data)
        self._bytes.charge(len(data), now)
        frames = self.scanner.frames
        passed = self.scanner.feed(data, now)
        self._frames.charge(self.scanner.frames - frames, now)
        self._passed += len(passed)
        return passed

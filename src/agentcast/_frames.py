"""A sans-I/O scanner of the WebSocket frame headers a client sends, and the limits it enforces.

Rules of this module: pure, no I/O, no trio; time is an argument. The standalone server feeds
every chunk it reads from a client's TCP stream to :meth:`FrameScanner.feed` before
trio-websocket sees it. The scanner follows frame headers across chunk boundaries (FIN, RSV,
opcode, mask, 7/16/64-bit lengths) and skips payloads without touching them, so its cost grows
with the number of frames, not bytes. It counts frames, and checks each header against:

* RFC 6455 (client frames masked, no reserved bits, known opcodes, unfragmented control frames
  of at most 125 bytes, continuations only inside a fragmented message, no new data frame
  inside one, minimal length encoding): a violation closes with 1002;
* ``max_fragments_per_message``: one frame more closes with 1008 (policy);
* a token bucket of control frames (ping, pong, close) per second: past it, 4029.

After the first violation the scanner stops: it passes nothing more and parses nothing more
(the I/O shell stops reading that client altogether, so what it still sends costs no CPU and
TCP backpressure stops it). The byte and frame rates are :class:`TokenBucket` values the I/O
shell charges per chunk and waits on before reading again (TCP backpressure, no CPU).
"""

from __future__ import annotations

from typing import Final

import attrs

from ._config import Config
from ._protocol import CloseCode
from ._ratelimit import TokenBucket  # the one bucket, shared with the message-rate limiter

__all__ = ["FrameLimits", "FrameScanner", "FrameViolation", "TokenBucket"]

#: Opcodes (RFC 6455 section 5.2).
CONTINUATION: Final = 0x0
TEXT: Final = 0x1
BINARY: Final = 0x2
CLOSE: Final = 0x8
PING: Final = 0x9
PONG: Final = 0xA
#: Largest control frame payload (RFC 6455 section 5.5).
MAX_CONTROL_PAYLOAD: Final = 125
#: Longest frame header: 2 bytes, 8 of extended length, 4 of mask.
MAX_HEADER_BYTES: Final = 14
#: Shortest valid client frame: 2 header bytes and a 4-byte mask, no payload.
MIN_FRAME_BYTES: Final = 6


@attrs.frozen
class FrameLimits:
    """What one connection may send below the message level (see :class:`Config`)."""

    max_fragments_per_message: int
    control_frames_per_second: float
    control_frames_burst: int
    inbound_bytes_per_second: float
    inbound_bytes_burst: int
    inbound_frames_per_second: float
    inbound_frames_burst: int

    @classmethod
    def from_config(cls, config: Config) -> FrameLimits:
        return cls(
            config.max_fragments_per_message, config.control_frames_per_second,
            config.control_frames_burst, config.inbound_bytes_per_second,
            config.inbound_bytes_burst, config.inbound_frames_per_second,
            config.inbound_frames_burst,
        )


@attrs.frozen
class FrameViolation:
    """Why a client's frames were refused: the close code to send and a short reason."""

    close_code: CloseCode
    reason: str


@attrs.frozen
class FrameCounts:
    """What a scanner has seen so far."""

    #: Bytes fed, headers and payloads.
    bytes: int
    #: Complete frame headers parsed (data and control).
    frames: int
    #: Control frame headers (ping, pong, close).
    control_frames: int
    #: Data messages whose final frame has arrived.
    messages: int


def _check(first: int, second: int, length: int) -> str | None:
    """The RFC 6455 rule the header (first two bytes, payload length) breaks, or None."""
    opcode = first & 0x0F
    extended = second & 0x7F
    if first & 0x70:
        return "reserved bits set (no extension was negotiated)"
    if opcode not in (CONTINUATION, TEXT, BINARY, CLOSE, PING, PONG):
        return f"unknown opcode {opcode:#x}"
    if not second & 0x80:
        return "client frames must be masked"
    if extended == 126 and length <= MAX_CONTROL_PAYLOAD:
        return "frame length not minimally encoded"
    if extended == 127 and (length < 1 << 16 or length >> 63):
        return "frame length not minimally encoded or too large"
    if opcode >= CLOSE:
        if not first & 0x80:
            return "fragmented control frame"
        if length > MAX_CONTROL_PAYLOAD:
            return f"control frame of {length} bytes (at most {MAX_CONTROL_PAYLOAD})"
    return None


@attrs.define
class FrameScanner:
    """Follows one client's frame headers; create one per connection.

    :meth:`feed` returns the bytes to pass on to the WebSocket library: all of them while the
    client keeps the rules, those before the offending frame when it breaks one (see
    :attr:`violation`), and nothing after that.
    """

    limits: FrameLimits
    _control: TokenBucket
    #: The first rule broken; None while the client keeps them.
    violation: FrameViolation | None = None
    #: Header bytes of a frame whose header was split across chunks.
    _partial: bytes = b""
    #: Payload bytes of the current frame still to skip.
    _remaining: int = 0
    #: Frames of the data message in progress (0: none in progress).
    _fragments: int = 0
    _bytes: int = 0
    _frames: int = 0
    _control_frames: int = 0
    _messages: int = 0

    @classmethod
    def create(cls, limits: FrameLimits, now: float) -> FrameScanner:
        bucket = TokenBucket.full(
            limits.control_frames_per_second, limits.control_frames_burst, now
        )
        return cls(limits, bucket)

    @property
    def frames(self) -> int:
        """Frame headers parsed so far (cheaper than :meth:`counts` per chunk)."""
        return self._frames

    def counts(self) -> FrameCounts:
        return FrameCounts(self._bytes, self._frames, self._control_frames, self._messages)

    def feed(self, data: bytes, now: float) -> bytes:
        """Scan the next ``data`` a client sent at time ``now``; return what to pass on.

        Sets :attr:`violation` (once) when a header breaks a rule; the bytes before that
        frame are passed on, nothing from it on. A header split across chunks is held back
        until it is whole, so the library never holds part of a frame the scanner refused.
        """
        if self.violation is not None:
            return b""
        self._bytes += len(data)
        if not self._partial and self._remaining >= len(data):
            self._remaining -= len(data)  # inside a payload: the common case for big messages
            return data
        if self._partial:
            data, self._partial = self._partial + data, b""
        size = len(data)
        pos = 0
        while pos < size:
            if self._remaining:
                step = min(self._remaining, size - pos)
                self._remaining -= step
                pos += step
                continue
            # A frame header starts here.
            start = pos
            head = data[pos:pos + MAX_HEADER_BYTES]
            header_size = 2
            if len(head) >= 2:
                second = head[1]
                extended = second & 0x7F
                header_size += (2 if extended == 126 else 8 if extended == 127 else 0) + (
                    4 if second & 0x80 else 0
                )
            if len(head) < header_size:
                self._partial = head  # held back until the rest of the header arrives
                return data[:start]
            pos += header_size
            first = head[0]
            length = extended if extended < 126 else int.from_bytes(
                head[2:4] if extended == 126 else head[2:10], "big"
            )
            self._remaining = length
            self._frames += 1
            if first & 0x0F >= CLOSE:
                self._control_frames += 1
            violation = self._judge(first, second, length, now)
            if violation is not None:
                self.violation = violation
                return data[:start]
        return data

    def _judge(self, first: int, second: int, length: int, now: float) -> FrameViolation | None:
        """Check one header against RFC 6455 and the limits; count a finished message."""
        broken = _check(first, second, length)
        if broken is not None:
            return FrameViolation(CloseCode.PROTOCOL_ERROR, broken)
        opcode = first & 0x0F
        if opcode >= CLOSE:
            if not self._control.take(1, now):
                return FrameViolation(CloseCode.RATE_LIMITED, "too many control frames")
            return None
        if opcode == CONTINUATION:
            if not self._fragments:
                return FrameViolation(CloseCode.PROTOCOL_ERROR, "continuation without a start")
            self._fragments += 1
            if self._fragments > self.limits.max_fragments_per_message:
                return FrameViolation(
                    CloseCode.POLICY_VIOLATION,
                    f"message in more than {self.limits.max_fragments_per_message} fragments",
                )
        elif self._fragments:
            return FrameViolation(
                CloseCode.PROTOCOL_ERROR, "new data frame inside a fragmented message"
            )
        else:
            self._fragments = 1
        if first & 0x80:
            self._fragments = 0
            self._messages += 1
        return None

"""Per-thread sequence numbers and bounded replay history.

Rules of this module: pure, no trio; time is passed in (monotonic seconds) so tests need no
clock. Invariants: seqs of one stream start at 1 and grow by exactly 1; the retained entries
are a contiguous suffix of the stream; a replay is either complete or not attempted.
"""

from __future__ import annotations

import itertools
import uuid
from collections import deque
from collections.abc import Sequence

import attrs

__all__ = ["Recovery", "ThreadHistory"]


@attrs.frozen
class Recovery:
    """The answer to "what did I miss since seq N?" for one stream."""

    #: True when every event after the asked-for seq is in ``frames`` (possibly none).
    recovered: bool
    #: The stream's epoch; it changes when the history is reset, e.g. after a restart.
    epoch: str
    #: The latest seq assigned in this stream (0 if none yet).
    latest_seq: int
    #: Encoded events after the asked-for seq, in order; empty unless ``recovered``.
    frames: Sequence[str]


def new_epoch() -> str:
    """A fresh stream epoch."""
    return uuid.uuid4().hex[:12]


@attrs.define(eq=False)
class ThreadHistory:
    """The seq counter and retained events of one (user, thread) stream."""

    max_size: int
    ttl: float
    epoch: str = attrs.field(factory=new_epoch)
    latest_seq: int = 0
    #: Encoded frames of seqs ``oldest_seq`` .. ``latest_seq``, oldest first, and the monotonic
    #: time each was appended. Two deques of str and float rather than one of tuples: neither
    #: is tracked by the garbage collector, whose full passes over thousands of retained
    #: tuples per thread were a fifth of a busy server's CPU.
    _frames: deque[str] = attrs.field(factory=deque)
    _times: deque[float] = attrs.field(factory=deque)
    #: The seq of ``_frames[0]`` (meaningless while it is empty).
    _oldest: int = 0
    #: Characters of the retained frames (their bytes, for the ASCII JSON agentcast writes).
    _bytes: int = 0

    def next_seq(self) -> int:
        """Reserve and return the next seq."""
        self.latest_seq += 1
        return self.latest_seq

    def append(self, seq: int, frame: str, now: float) -> None:
        """Retain ``frame`` (which must carry ``seq == latest_seq``) and prune old entries."""
        if seq != self.latest_seq:
            raise ValueError(f"seq {seq} is not the latest reserved seq {self.latest_seq}")
        frames = self._frames
        if frames and self._oldest + len(frames) != seq:
            # A reserved seq was never appended: retained seqs must stay contiguous, so
            # history restarts here (a client that missed the gap is told to resync).
            frames.clear()
            self._times.clear()
            self._bytes = 0
        if not frames:
            self._oldest = seq
        frames.append(frame)
        self._times.append(now)
        self._bytes += len(frame)
        if len(frames) > self.max_size:
            self.drop_oldest()
        self.prune(now)

    def drop_oldest(self) -> None:
        """Forget the oldest retained entry (a client asking from before it gets
        ``recovered`` False); a no-op when nothing is retained."""
        if self._frames:
            self._bytes -= len(self._frames.popleft())
            self._times.popleft()
            self._oldest += 1

    @property
    def retained_bytes(self) -> int:
        """Characters of the retained frames (bytes for ASCII JSON)."""
        return self._bytes

    def prune(self, now: float) -> None:
        """Forget entries older than ``ttl``."""
        horizon = now - self.ttl
        times = self._times
        while times and times[0] < horizon:
            self.drop_oldest()

    def __len__(self) -> int:
        return len(self._frames)

    @property
    def oldest_seq(self) -> int:
        """The oldest retained seq, or ``latest_seq + 1`` when nothing is retained."""
        return self._oldest if self._frames else self.latest_seq + 1

    def recover(self, since_seq: int | None, epoch: str | None, now: float) -> Recovery:
        """Return the events after ``since_seq`` if all of them are still retained.

        ``since_seq=None`` asks for live events only (nothing replayed, ``recovered`` False).
        A different ``epoch`` or a seq outside the retained window gives ``recovered`` False and
        no frames: a client must never mistake a partial replay for a complete one.
        """
        self.prune(now)
        latest = self.latest_seq
        if since_seq is None or (epoch is not None and epoch != self.epoch):
            return Recovery(False, self.epoch, latest, ())
        if since_seq > latest or since_seq < self.oldest_seq - 1:
            return Recovery(False, self.epoch, latest, ())
        skip = since_seq - self.oldest_seq + 1
        frames = list(itertools.islice(self._frames, skip, None))
        return Recovery(True, self.epoch, latest, frames)

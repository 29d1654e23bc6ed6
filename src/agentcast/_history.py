"""Per-thread sequence numbers and bounded replay history.

Rules of this module: pure, no trio; time is passed in (monotonic seconds) so tests need no
clock. Invariants: seqs of one stream start at 1 and grow by exactly 1; the retained entries
are a contiguous suffix of the stream; a replay is either complete or not attempted; a
``since_seq`` above 0 without the stream's epoch is never recovered (it may name another
stream's seq, e.g. from before a restart).

Limits (docs/protocol.md, "Resume"): the oldest entries go while more than ``max_size``
events or ``max_bytes`` bytes are retained, or the oldest is older than ``ttl``, but never an
event of a kept run (active, or ended less than ``ttl`` ago; see ``_run_history``): retention
is a contiguous suffix, so everything from the oldest kept run's ``agent_started`` on stays.
Each run is bounded by ``max_run_bytes``; the broker's ``max_retained_bytes`` may still cut
a kept run (memory first), and its resume then answers ``recovered: false``.
"""

from __future__ import annotations

import bisect
import itertools
import uuid
from collections import deque
from collections.abc import Sequence
from typing import Final

import attrs

from ._events import AgentEvent
from ._run_history import (
    DELTA_COST,
    MAX_DELTA_BYTES,
    SPAN_OVERHEAD,
    ActiveRun,
    RunTracker,
    TextSpan,
    compactable_text,
)

__all__ = ["ActiveRun", "Recovery", "ThreadHistory"]

#: Bytes a run is charged for an event's envelope beyond its data (ids, seq, ts, keys).
ENVELOPE_BYTES: Final = 128


@attrs.frozen
class Recovery:
    """The answer to "what did I miss since seq N?" for one stream."""

    #: True when every event after the asked-for seq is in ``frames`` (possibly none).
    recovered: bool
    #: The stream's epoch; it changes when the history is reset, e.g. after a restart.
    epoch: str
    #: The latest seq assigned in this stream (0 if none yet).
    latest_seq: int
    #: Encoded events after the asked-for seq, in order; empty unless ``recovered``. A run's
    #: consecutive ``agent_text`` deltas may come as one compacted frame (``data.from_seq``).
    frames: Sequence[str]
    #: The thread's runs that have not ended, oldest first, whatever was asked for.
    active_runs: Sequence[ActiveRun] = ()


def new_epoch() -> str:
    """A fresh stream epoch."""
    return uuid.uuid4().hex[:12]


@attrs.define(eq=False)
class ThreadHistory:
    """The seq counter, retained events and runs of one (user, thread) stream."""

    max_size: int
    ttl: float
    epoch: str = attrs.field(factory=new_epoch)
    latest_seq: int = 0
    #: Bytes of retained events outside kept runs before the oldest go (see module rules).
    max_bytes: int = 2**62
    #: Bytes one run may retain (``RunTooLarge`` past it).
    max_run_bytes: int = 2**62
    #: Whether a run's consecutive ``agent_text`` deltas are stored as one :class:`TextSpan`.
    compact: bool = True
    #: Retained entries, oldest first: an encoded frame (one seq) or a span (its seqs); the
    #: monotonic time each was last appended to; and each one's first seq. Deques of str,
    #: float and int are not tracked by the garbage collector, whose full passes over
    #: thousands of retained tuples per thread were a fifth of a busy server's CPU.
    _entries: deque[str | TextSpan] = attrs.field(factory=deque)
    _times: deque[float] = attrs.field(factory=deque)
    _starts: deque[int] = attrs.field(factory=deque)
    #: The seq of the last retained entry's last event (meaningless while none is retained).
    _last: int = 0
    #: Bytes charged for the retained entries: a frame's characters (its bytes, for ASCII
    #: JSON), a span's ``TextSpan.cost``.
    _bytes: int = 0
    _runs: RunTracker = attrs.field(init=False)

    def __attrs_post_init__(self) -> None:
        self._runs = RunTracker(self.max_run_bytes, self.ttl)

    def next_seq(self) -> int:
        """Reserve and return the next seq."""
        self.latest_seq += 1
        return self.latest_seq

    def _delta(self, event: AgentEvent | None) -> bytes | None:
        if event is None or not self.compact:
            return None
        text = compactable_text(event)
        if text is None:
            return None
        delta = text.encode()
        return delta if len(delta) <= MAX_DELTA_BYTES else None

    def _extends(self, event: AgentEvent, delta: bytes | None) -> bool:
        entries = self._entries
        if delta is None or not entries:
            return False
        span = entries[-1]
        return isinstance(span, TextSpan) and span.run_id == event.run_id

    def _run_cost(self, event: AgentEvent, delta: bytes | None) -> int:
        if delta is not None and self._extends(event, delta):
            return len(delta) + DELTA_COST
        extra = SPAN_OVERHEAD if delta is not None else 0
        return len(event.data_json) + ENVELOPE_BYTES + extra

    def admit(self, event: AgentEvent) -> None:
        """Check, before a seq is reserved for it, that ``event`` may join its run.

        Raises:
            RunTooLarge: its run would retain more than ``max_run_bytes`` (terminal events
                are always admitted).
        """
        self._runs.admit(event, self._run_cost(event, self._delta(event)))

    def append(
        self, seq: int, frame: str, now: float, event: AgentEvent | None = None,
        ts: float = 0.0,
    ) -> None:
        """Retain ``frame`` (which must carry ``seq == latest_seq``) and prune old entries.

        With ``event`` (the event ``frame`` encodes, sent at Unix time ``ts``) its run is
        tracked and a run's ``agent_text`` delta is compacted into the run's current span.
        """
        if seq != self.latest_seq:
            raise ValueError(f"seq {seq} is not the latest reserved seq {self.latest_seq}")
        entries = self._entries
        if entries and self._last + 1 != seq:
            # A reserved seq was never appended: retained seqs must stay contiguous, so
            # history restarts here (a client that missed the gap is told to resync).
            entries.clear()
            self._times.clear()
            self._starts.clear()
            self._bytes = 0
        if event is not None:
            delta = self._delta(event)
            cost = self._run_cost(event, delta)
            if delta is not None and self._extends(event, delta):
                span = entries[-1]
                assert isinstance(span, TextSpan)
                span.extend(ts, delta)
                self._bytes += len(delta) + DELTA_COST
                self._times[-1] = now
                self._last = seq
                self._runs.record(event, seq, cost, now)
                self.prune(now)
                return
            self._runs.record(event, seq, cost, now)
            if delta is not None:
                assert event.run_id is not None
                span = TextSpan.start(event.run_id, seq, frame, ts, delta)
                self._push(span, seq, now, span.cost)
                self.prune(now)
                return
        self._push(frame, seq, now, len(frame))
        self.prune(now)

    def _push(self, entry: str | TextSpan, seq: int, now: float, cost: int) -> None:
        self._entries.append(entry)
        self._times.append(now)
        self._starts.append(seq)
        self._last = seq
        self._bytes += cost

    def drop_oldest(self) -> None:
        """Forget the oldest retained entry (a client asking from before it gets
        ``recovered`` False); a no-op when nothing is retained."""
        if self._entries:
            entry = self._entries.popleft()
            self._bytes -= len(entry) if isinstance(entry, str) else entry.cost
            self._times.popleft()
            self._starts.popleft()

    @property
    def retained_bytes(self) -> int:
        """Bytes charged for the retained entries (see ``_bytes``)."""
        return self._bytes

    def prune(self, now: float) -> None:
        """Forget the oldest entries while over ``max_size``, ``max_bytes`` or older than
        ``ttl``, stopping at the first event of a kept run."""
        floor = self._runs.floor(now)
        horizon = now - self.ttl
        entries, times, starts = self._entries, self._times, self._starts
        while entries:
            end = starts[1] - 1 if len(starts) > 1 else self._last
            if floor is not None and end >= floor:
                break
            if not (
                times[0] < horizon or self._bytes > self.max_bytes
                or self._last - starts[0] + 1 > self.max_size
            ):
                break
            self.drop_oldest()

    def __len__(self) -> int:
        """Events (seqs) retained."""
        return self._last - self._starts[0] + 1 if self._entries else 0

    @property
    def oldest_seq(self) -> int:
        """The oldest retained seq, or ``latest_seq + 1`` when nothing is retained."""
        return self._starts[0] if self._entries else self.latest_seq + 1

    def active_runs(self, now: float) -> list[ActiveRun]:
        """The thread's runs that have not ended, oldest first."""
        return self._runs.active(now)

    def recover(
        self, since_seq: int | None, epoch: str | None, now: float, *, compact: bool = True
    ) -> Recovery:
        """Return the events after ``since_seq`` if all of them are still retained.

        ``since_seq=None`` asks for live events only (nothing replayed, ``recovered`` False).
        A different ``epoch``, no epoch with ``since_seq > 0``, or a seq outside the retained
        window gives ``recovered`` False and no frames: a client must never mistake a partial
        replay, or another stream's events, for a complete one. ``active_runs`` is always set.
        ``compact`` False expands each text span back into one frame per delta (the
        subscribe's ``compact: false``, for clients that count frames).
        """
        self.prune(now)
        latest = self.latest_seq
        active = tuple(self._runs.active(now))
        if since_seq is None or (epoch is not None and epoch != self.epoch) or (
            epoch is None and since_seq > 0
        ):
            return Recovery(False, self.epoch, latest, (), active)
        if since_seq > latest or since_seq < self.oldest_seq - 1:
            return Recovery(False, self.epoch, latest, (), active)
        return Recovery(
            True, self.epoch, latest, self._frames_after(since_seq, compact), active
        )

    def _frames_after(self, since_seq: int, compact: bool = True) -> list[str]:
        if since_seq >= self._last or not self._entries:
            return []
        starts = self._starts
        index = bisect.bisect_right(starts, since_seq + 1) - 1
        frames: list[str] = []
        for entry in itertools.islice(self._entries, index, None):
            if isinstance(entry, str):
                frames.append(entry)
            elif compact:
                frames.append(entry.frame_from(max(since_seq + 1, entry.first_seq)))
            else:
                frames.extend(entry.frames_from(max(since_seq + 1, entry.first_seq)))
        return frames

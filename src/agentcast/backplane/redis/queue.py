"""The publish queue's decisions: its bound, how a batch becomes script calls, and which
failure of a queued event is reported to whom.

Rules of this module: pure, no I/O, no trio, no anyio (``pipeline`` is the async shell
around it, for the trio broker and the anyio publisher alike). A queued event is never lost
silently: if it fails after its producer moved on, the failure is kept for its thread until
the next publish of that thread, or a flush, reports it (at most ``MAX_KEPT_FAILURES`` threads'
failures are kept; past that the oldest is dropped and counted in ``FailureBook.dropped``, for
the owner to log).
"""

from __future__ import annotations

import collections
from collections.abc import Callable, Hashable, Sequence
from typing import Final, TypeVar

import attrs

from ..._errors import AgentcastError

__all__ = [
    "CALL_MAX_BYTES",
    "CALL_MAX_EVENTS",
    "MAX_KEPT_FAILURES",
    "QUEUE_MAX_BYTES",
    "QUEUE_MAX_EVENTS",
    "FailureBook",
    "QueueBudget",
    "group_calls",
]

#: Events a node (or publisher) may hold queued for Redis or in flight; a producer past it
#: waits (at most the Redis timeout) for the flusher to make room.
QUEUE_MAX_EVENTS: Final = 8192
#: Encoded bytes (frames without their seq) the queue may hold; a single event larger than
#: this is still taken when the queue is empty, alone.
QUEUE_MAX_BYTES: Final = 8 * 1024 * 1024
#: Most events one publish script call carries (its ARGV and its one channel message).
CALL_MAX_EVENTS: Final = 256
#: Most encoded bytes one publish script call carries (one channel message: it must stay well
#: under Redis's pub/sub output buffer limit); an event larger than this goes alone.
CALL_MAX_BYTES: Final = 1024 * 1024
#: Threads whose failures are kept until reported.
MAX_KEPT_FAILURES: Final = 10_000

T = TypeVar("T")


@attrs.define
class QueueBudget:
    """Events and bytes the queue holds against its bounds (queued and in flight)."""

    max_events: int = QUEUE_MAX_EVENTS
    max_bytes: int = QUEUE_MAX_BYTES
    events: int = 0
    bytes: int = 0

    def __attrs_post_init__(self) -> None:
        if self.max_events < 1 or self.max_bytes < 1:
            raise ValueError(
                f"a publish queue needs room for at least one event and one byte, got "
                f"max_events={self.max_events!r}, max_bytes={self.max_bytes!r}"
            )

    def fits(self, size: int) -> bool:
        """Whether an event of ``size`` bytes may be queued now (always, into an empty queue)."""
        if self.events == 0:
            return True
        return self.events < self.max_events and self.bytes + size <= self.max_bytes

    def take(self, size: int) -> None:
        """Count an event of ``size`` bytes in."""
        self.events += 1
        self.bytes += size

    def give(self, size: int) -> None:
        """Count an event of ``size`` bytes out (stored, failed or withdrawn)."""
        self.events -= 1
        self.bytes -= size


def group_calls(
    batch: Sequence[T],
    key: Callable[[T], Hashable],
    size: Callable[[T], int],
    max_events: int = CALL_MAX_EVENTS,
    max_bytes: int = CALL_MAX_BYTES,
) -> list[list[T]]:
    """Split a batch taken from the queue into script calls: every entry of one key (one
    (user, thread)) in one call, in queue order, calls ordered by their key's first entry.

    A key's entries are split over several calls (one after another) past ``max_events`` or
    ``max_bytes``; an entry larger than ``max_bytes`` has a call of its own. Entries of
    different keys may change relative order: their seqs are independent.
    """
    calls: list[list[T]] = []
    open_calls: dict[Hashable, tuple[list[T], int]] = {}
    for entry in batch:
        k, n = key(entry), size(entry)
        current = open_calls.get(k)
        if current is not None:
            entries, used = current
            if len(entries) < max_events and used + n <= max_bytes:
                entries.append(entry)
                open_calls[k] = (entries, used + n)
                continue
        entries = [entry]
        calls.append(entries)
        open_calls[k] = (entries, n)
    return calls


@attrs.define
class _Failure:
    error: AgentcastError
    #: Events of the thread that failed since the failure was last reported.
    count: int = 1


@attrs.define
class FailureBook:
    """Failures of queued events, one entry per (user, thread), oldest first, until reported.

    What a producer sees: the first failure of a thread's queued events since the last report,
    as an error of the same class (``BrokerUnavailable`` or ``RunTooLarge``) whose message
    names the thread and how many queued events were not stored, raised by the thread's next
    ``queue_to_thread`` / ``send_to_thread`` (which then publishes nothing) or by a flush.
    """

    max_kept: int = MAX_KEPT_FAILURES
    _failures: collections.OrderedDict[tuple[str, str], _Failure] = attrs.Factory(
        collections.OrderedDict
    )
    #: Failures dropped unreported because ``max_kept`` threads already had one.
    dropped: int = 0

    def __len__(self) -> int:
        return len(self._failures)

    def record(self, user_id: str, thread_id: str, error: AgentcastError) -> None:
        """A queued event of (user, thread) was not stored because of ``error``."""
        key = (user_id, thread_id)
        failure = self._failures.get(key)
        if failure is not None:
            failure.count += 1
            return
        if len(self._failures) >= self.max_kept:
            self._failures.popitem(last=False)
            self.dropped += 1
        self._failures[key] = _Failure(error)

    def take(self, user_id: str, thread_id: str) -> AgentcastError | None:
        """The thread's unreported failure, as the error to raise (then reported), or None."""
        failure = self._failures.pop((user_id, thread_id), None)
        return None if failure is None else _report(thread_id, failure)

    def take_first(self, user_id: str | None = None) -> AgentcastError | None:
        """The oldest unreported failure, of ``user_id``'s threads or of any (None), as the
        error to raise (then reported), or None."""
        for key in self._failures:
            if user_id is None or key[0] == user_id:
                return _report(key[1], self._failures.pop(key))
        return None


def _report(thread_id: str, failure: _Failure) -> AgentcastError:
    error = failure.error
    events = "an event" if failure.count == 1 else f"{failure.count} events"
    report = type(error)(
        f"{events} queued earlier on thread {thread_id!r} not stored: {error}"
    )
    report.__cause__ = error
    return report

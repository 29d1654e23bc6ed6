"""The publish pipeline: a bounded FIFO of events waiting for Redis, shared by every producer
of one broker (or publisher) and drained by one flusher.

Rules of this module: no trio import (the publisher runs under asyncio too); the decisions
(bound, grouping, failure reports) are ``_publish_queue``'s, this is their async shell. It
outlives any one Redis connection (its owner keeps it), so a failure recorded when a
connection was lost is still reported on the next one.

Order: every publish of the process goes through the one queue, admitted strictly first come
first served (a producer that has to wait for room keeps its place), and the flusher sends
batches one after another in queue order, so each thread's events are stored in the order
their calls were made. While no flusher runs (not connected), nothing is admitted.
"""

from __future__ import annotations

import collections
import logging
import time
from typing import Final

import anyio
import attrs

from ..._errors import AgentcastError, BrokerUnavailable
from ..._latency import DeliveryLatency
from .queue import FailureBook, QueueBudget

__all__ = ["PIPELINE_MAX", "PublishPipeline", "QueuedPublish"]

log = logging.getLogger("agentcast")

#: Most events the flusher takes from the queue for one pipeline (one round trip).
PIPELINE_MAX: Final = 1024


@attrs.define(eq=False, slots=True)
class QueuedPublish:
    """One event waiting for Redis: what the script needs, then its seq or its error."""

    user_id: str
    thread_id: str
    #: The frame around its seq (``split_envelope``).
    prefix: str
    suffix: str
    run_id: str | None
    #: The script's kind: 0 other, 1 agent_started, 2 terminal.
    kind: int
    #: Set when its producer waits for the seq (``send_to_thread``); None when it moved on
    #: (``queue_to_thread``: a failure is then recorded for its thread).
    done: anyio.Event | None = None
    seq: int | None = None
    error: AgentcastError | None = None
    #: ``time.perf_counter()`` when it was made (publish latency).
    made: float = attrs.Factory(time.perf_counter)
    #: Queue position, increasing (what a flush waits for).
    ticket: int = 0

    @property
    def size(self) -> int:
        """Encoded bytes, without the seq."""
        return len(self.prefix) + len(self.suffix)


@attrs.define(eq=False)
class PublishPipeline:
    """The queue between producers and the flusher (see the module docstring)."""

    #: Seconds a producer waits for room, and half of how long a flush waits for progress
    #: (the owner's Redis timeout).
    timeout: float = 2.0
    budget: QueueBudget = attrs.Factory(QueueBudget)
    failures: FailureBook = attrs.Factory(FailureBook)
    #: Seconds from a publish being made to Redis storing it.
    latency: DeliveryLatency = attrs.Factory(DeliveryLatency)
    _queue: collections.deque[QueuedPublish] = attrs.Factory(collections.deque)
    #: Producers waiting for room, first come first served, with their admission event.
    _waiting: collections.deque[tuple[QueuedPublish, anyio.Event]] = attrs.Factory(
        collections.deque
    )
    #: The batch the flusher is sending now.
    _in_flight: list[QueuedPublish] = attrs.Factory(list)
    _next_ticket: int = 1
    _open: bool = False
    #: Set to wake the flusher when the queue gets an event (made while it waits: events
    #: need a running event loop, and the owner may be built before one runs).
    _wakeup: anyio.Event | None = None
    #: Set (and dropped) whenever a batch ends or an event leaves the queue; made by a flush
    #: that waits for it.
    _progress: anyio.Event | None = None
    _dropped_logged: int = 0

    @property
    def depth(self) -> int:
        """Events queued or in flight now."""
        return len(self._queue) + len(self._in_flight)

    # ---- producers ----------------------------------------------------------------------

    def check(self, user_id: str, thread_id: str) -> None:
        """Raise the thread's unreported failure of an earlier queued event, if any."""
        error = self.failures.take(user_id, thread_id)
        if error is not None:
            raise error

    async def put(self, entry: QueuedPublish) -> None:
        """Queue ``entry`` behind every publish made before it; wait at most ``timeout``
        seconds for room.

        Raises:
            BrokerUnavailable: no flusher runs (not connected), or the queue stayed full for
                ``timeout`` seconds (the event was not queued).
            RunTooLarge: (or BrokerUnavailable) an earlier queued event of the thread failed;
                this one was not queued.
        """
        self.check(entry.user_id, entry.thread_id)
        self._require_open()
        if not self._waiting and self.budget.fits(entry.size):
            self._admit(entry)
            await anyio.lowlevel.checkpoint_if_cancelled()
            return
        timeout = self.timeout
        admitted = anyio.Event()
        place = (entry, admitted)
        self._waiting.append(place)
        try:
            with anyio.move_on_after(timeout):
                await admitted.wait()
        finally:
            if not admitted.is_set():
                self._waiting.remove(place)
        if not admitted.is_set():
            raise BrokerUnavailable(
                f"publish failed: the publish queue stayed full for {timeout:g} s "
                f"({self.budget.events} events, {self.budget.bytes} bytes queued for Redis); "
                "the event was not queued. Redis is slow or the producers outrun it"
            )
        if entry.error is not None:  # the flusher stopped while it waited
            raise entry.error

    def withdraw(self, entry: QueuedPublish) -> bool:
        """Take ``entry`` back if it is still queued (not sent yet); True if it was."""
        try:
            self._queue.remove(entry)
        except ValueError:
            return False
        self._release(entry)
        self._wake_progress()
        return True

    async def wait_flushed(self, user_id: str | None) -> None:
        """Wait until every event queued before this call is stored or has failed, then raise
        the oldest unreported failure of ``user_id``'s threads (any thread for None).

        Raises:
            BrokerUnavailable: the flusher made no progress for twice ``timeout`` seconds (a
                batch's deadline and as much again), or that failure.
            RunTooLarge: that failure.
        """
        timeout = 2 * self.timeout
        target = self._next_ticket - 1
        while self._oldest_ticket() <= target:
            if self._progress is None:
                self._progress = anyio.Event()
            progress = self._progress
            with anyio.move_on_after(timeout):
                await progress.wait()
            if not progress.is_set():
                raise BrokerUnavailable(
                    f"flush failed: Redis stored nothing for {timeout:g} s; "
                    f"{self.depth} events are still queued"
                )
        await anyio.lowlevel.checkpoint()
        error = self.failures.take_first(user_id)
        if error is not None:
            raise error

    # ---- the flusher --------------------------------------------------------------------

    def open(self) -> None:
        """A flusher runs from now on: admit publishes."""
        self._open = True

    def close(self, error: BrokerUnavailable) -> None:
        """The flusher stopped: every queued, in-flight or waiting event fails with ``error``."""
        self._open = False
        self.fail_queued(error, in_flight=True)
        while self._waiting:
            entry, admitted = self._waiting.popleft()
            entry.error = error
            admitted.set()

    def fail_queued(self, error: BrokerUnavailable, *, in_flight: bool = False) -> None:
        """Fail every event still queued (and the batch in flight, with ``in_flight``) with
        ``error``: after a batch Redis did not answer, the events behind it would each wait
        for a deadline of their own."""
        lost = [*self._in_flight] if in_flight else []
        lost += self._queue
        self._queue.clear()
        if in_flight:
            self._in_flight = []
        self.finish(lost, error)

    async def take(self) -> list[QueuedPublish]:
        """The next batch, in queue order (waits until there is one); it is in flight until
        :meth:`finish`."""
        while not self._queue:
            self._wakeup = anyio.Event()
            await self._wakeup.wait()
        count = min(len(self._queue), PIPELINE_MAX)
        batch = [self._queue.popleft() for _ in range(count)]
        self._in_flight = batch
        return batch

    def finish(self, batch: list[QueuedPublish], error: BrokerUnavailable | None = None) -> None:
        """The batch is done: each entry has its seq or its error (``error`` for those with
        neither). Wakes the producers that wait, records the failures of those that do not,
        and makes room."""
        if batch is self._in_flight:
            self._in_flight = []
        now = time.perf_counter()
        for entry in batch:
            if entry.seq is None and entry.error is None:
                entry.error = error or BrokerUnavailable(
                    "publish failed: the Redis connection was lost"
                )
            self._release(entry)
            if entry.seq is not None:
                self.latency.observe(now - entry.made)
            if entry.done is not None:
                entry.done.set()
            elif entry.error is not None:
                self.failures.record(entry.user_id, entry.thread_id, entry.error)
        self._log_dropped()
        self._wake_progress()

    # ---- internals ----------------------------------------------------------------------

    def _require_open(self) -> None:
        if not self._open:
            raise BrokerUnavailable("publish failed: not connected to Redis")

    def _admit(self, entry: QueuedPublish) -> None:
        self.budget.take(entry.size)
        entry.ticket = self._next_ticket
        self._next_ticket += 1
        self._queue.append(entry)
        if self._wakeup is not None:
            self._wakeup.set()

    def _release(self, entry: QueuedPublish) -> None:
        self.budget.give(entry.size)
        while self._open and self._waiting and self.budget.fits(self._waiting[0][0].size):
            waiter, admitted = self._waiting.popleft()
            self._admit(waiter)
            admitted.set()

    def _oldest_ticket(self) -> int:
        if self._in_flight:
            return self._in_flight[0].ticket
        if self._queue:
            return self._queue[0].ticket
        return self._next_ticket

    def _wake_progress(self) -> None:
        if self._progress is not None:
            self._progress.set()
            self._progress = None

    def _log_dropped(self) -> None:
        dropped = self.failures.dropped
        if dropped > self._dropped_logged:
            log.warning(
                "%d failures of queued publishes were never reported (more than %d threads "
                "had one; call flush() or publish on those threads to see them)",
                dropped - self._dropped_logged, self.failures.max_kept,
            )
            self._dropped_logged = dropped

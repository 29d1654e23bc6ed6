"""The in-memory broker: the single-process :class:`~agentcast.backplane.protocol.Broker`."""

from __future__ import annotations

import time

import attrs
import trio

from .._config import Config
from .._errors import TooManyThreads
from .._events import AgentEvent, encode_envelope
from .._history import Recovery, ThreadHistory
from .._presence import Presence
from .protocol import BrokerStats, EventSink

__all__ = ["InMemoryBroker"]


@attrs.define(eq=False)
class InMemoryBroker:
    """The single-process broker: histories in a dict, delivery by a direct call.

    Publishing never yields, so the seq order, the history order and the delivery order are the
    same by construction. Bounds (docs/protocol.md, "Limits"):

    - Streams per user: at most ``Config.max_threads_per_user``. A new stream past it first
      evicts the user's least recently used stream that is not in use (no subscribed connection
      here, no run writing to it); if all are in use, a subscribe raises ``TooManyThreads``
      and nothing is created, while a publish still creates its stream (only runs and
      subscriptions hold streams in use, and both are capped).
    - Retained bytes over all streams: at most ``Config.max_retained_bytes``. Past it, the
      stream used least recently loses its oldest events first.
    - Per stream: ``history_size`` events and ``history_bytes`` bytes, except that runs stay
      whole while active and for ``history_ttl`` after they end, each within
      ``max_run_bytes`` (``ThreadHistory``). The manager-wide cap above wins over run
      retention: memory first; such a run's resume then answers ``recovered: false``.
    - Idle streams: forgotten ``history_ttl`` after their last use once nothing is retained,
      unless in use; live sessions' idle streams included.
    """

    config: Config
    _streams: dict[tuple[str, str], ThreadHistory] = attrs.field(factory=dict)
    #: Last use (publish or recover) of each stream; insertion order is least recently used
    #: first (a use moves the key to the end).
    _last_used: dict[tuple[str, str], float] = attrs.field(factory=dict)
    #: user -> that user's thread ids, least recently used first (for eviction at the cap).
    _user_threads: dict[str, dict[str, None]] = attrs.field(factory=dict)
    #: Sum of ``retained_bytes`` over all streams.
    _retained_bytes: int = 0
    _sink: EventSink | None = None
    _serving: trio.Event = attrs.Factory(trio.Event)

    async def serve(self, sink: EventSink, *, task_status: trio.TaskStatus[None]) -> None:
        """Deliver to ``sink`` and sweep idle streams until cancelled."""
        self._sink = sink
        self._serving.set()
        task_status.started()
        interval = min(60.0, self.config.history_ttl)
        while True:
            await trio.sleep(interval)
            self.sweep(trio.current_time())

    def _in_use(self, user_id: str, thread_id: str) -> bool:
        sink = self._sink
        return sink is not None and sink.holds_thread(user_id, thread_id)

    def sweep(self, now: float) -> None:
        """Forget streams not in use with nothing retained and no use for ``history_ttl``.

        Forgetting restarts the seq under a new epoch, so it never happens to a stream a
        connection is subscribed to or a run writes to; a live session's other streams go
        too. A client that later resumes a forgotten stream names the old epoch and is told
        ``recovered: false``: never a partial replay. (A stream that never had an event could
        go at once, but keeping it lets a reloaded page resume it with ``recovered: true``; the
        per-user cap bounds how many there are.)
        """
        horizon = now - self.config.history_ttl
        for key, used in list(self._last_used.items()):
            if used >= horizon:
                break  # least recently used first: the rest are younger
            stream = self._streams[key]
            self._prune(stream, now)
            if not len(stream) and not self._in_use(*key):
                self._forget(key)

    def _prune(self, stream: ThreadHistory, now: float) -> None:
        before = stream.retained_bytes
        stream.prune(now)
        self._retained_bytes += stream.retained_bytes - before

    def _forget(self, key: tuple[str, str]) -> None:
        user_id, thread_id = key
        stream = self._streams.pop(key)
        self._retained_bytes -= stream.retained_bytes
        del self._last_used[key]
        threads = self._user_threads[user_id]
        del threads[thread_id]
        if not threads:
            del self._user_threads[user_id]

    def _evict_idle(self, user_id: str, threads: dict[str, None]) -> bool:
        """Forget the user's least recently used stream not in use; False if all are."""
        for thread_id in threads:
            if not self._in_use(user_id, thread_id):
                self._forget((user_id, thread_id))
                return True
        return False

    def _stream(
        self, user_id: str, thread_id: str, now: float, *, subscribing: bool = False
    ) -> ThreadHistory:
        # A stream is created on first publish *or* first subscribe, so the epoch a subscriber
        # is told stays the epoch of the events that follow.
        key = (user_id, thread_id)
        stream = self._streams.get(key)
        if stream is None:
            threads = self._user_threads.get(user_id, {})
            limit = self.config.max_threads_per_user
            if len(threads) >= limit and not self._evict_idle(user_id, threads) and subscribing:
                raise TooManyThreads(
                    f"user {user_id!r} already uses {limit} threads "
                    "(Config.max_threads_per_user); unsubscribe from one first"
                )
            config = self.config
            stream = self._streams[key] = ThreadHistory(
                config.history_size, config.history_ttl, max_bytes=config.history_bytes,
                max_run_bytes=config.max_run_bytes, compact=config.compact_text,
            )
        else:
            del self._last_used[key], self._user_threads[user_id][thread_id]
        self._last_used[key] = now
        self._user_threads.setdefault(user_id, {})[thread_id] = None
        return stream

    def _trim(self, now: float) -> None:
        """Drop retained events, least recently used stream first, until within
        ``max_retained_bytes``; emptied streams not in use are forgotten."""
        budget = self.config.max_retained_bytes
        while self._retained_bytes > budget:
            key = next(iter(self._last_used))
            stream = self._streams[key]
            if not len(stream):
                if self._in_use(*key):
                    del self._last_used[key]  # in use, nothing to drop: count it as used now
                    self._last_used[key] = now
                else:
                    self._forget(key)
                continue
            before = stream.retained_bytes
            stream.drop_oldest()
            self._retained_bytes += stream.retained_bytes - before

    def _require_sink(self) -> EventSink:
        if self._sink is None:
            raise RuntimeError("InMemoryBroker.serve() has not started")
        return self._sink

    async def publish(self, user_id: str, thread_id: str, event: AgentEvent) -> int:
        """Assign the seq, retain and deliver, all without yielding.

        Raises:
            RunTooLarge: the event's run would retain more than ``Config.max_run_bytes``
                (nothing is published; a terminal event is never refused).
        """
        sink = self._require_sink()
        now = trio.current_time()
        stream = self._stream(user_id, thread_id, now)
        stream.admit(event)
        seq = stream.next_seq()
        ts = time.time()
        frame = encode_envelope(event, thread_id=thread_id, seq=seq, ts=ts)
        before = stream.retained_bytes
        stream.append(seq, frame, now, event, ts)
        self._retained_bytes += stream.retained_bytes - before
        if self._retained_bytes > self.config.max_retained_bytes:
            self._trim(now)
        sink.deliver_thread(user_id, thread_id, seq, frame)
        return seq

    async def enqueue(self, user_id: str, thread_id: str, event: AgentEvent) -> None:
        """Publish at once (nothing to wait for in memory): the same as :meth:`publish`
        without its seq.

        Raises:
            RunTooLarge: as :meth:`publish` (right away: nothing is left queued to fail later).
        """
        await self.publish(user_id, thread_id, event)

    async def flush(self, user_id: str) -> None:
        """Nothing to wait for: every publish is stored before it returns."""
        await trio.lowlevel.checkpoint()

    async def publish_user(self, user_id: str, event: AgentEvent) -> None:
        """Deliver a live-only event to one user's connections."""
        frame = encode_envelope(event, thread_id=None, seq=None, ts=time.time())
        self._require_sink().deliver_user(user_id, frame)

    async def publish_all(self, event: AgentEvent) -> None:
        """Deliver a live-only event to every connection."""
        frame = encode_envelope(event, thread_id=None, seq=None, ts=time.time())
        self._require_sink().deliver_all(frame)

    async def publish_disconnect(self, user_id: str, code: int, reason: str) -> None:
        """Nothing to do: there are no other nodes."""
        await trio.lowlevel.checkpoint()

    async def recover(
        self, user_id: str, thread_id: str, since_seq: int | None, epoch: str | None,
        *, compact: bool = True,
    ) -> Recovery:
        """Answer from the retained history; a stream never seen starts at seq 0.

        Raises:
            TooManyThreads: see :meth:`Broker.recover`.
        """
        now = trio.current_time()
        stream = self._stream(user_id, thread_id, now, subscribing=True)
        self._prune(stream, now)
        return stream.recover(since_seq, epoch, now, compact=compact)

    async def attach_user(self, user_id: str) -> None:
        """Nothing to do: every publish on this node is delivered here."""
        await trio.lowlevel.checkpoint()

    async def detach_user(self, user_id: str) -> None:
        """Nothing to do (idle streams are swept by ``serve``)."""
        await trio.lowlevel.checkpoint()

    async def wait_ready(self) -> None:
        """Ready as soon as ``serve`` has started."""
        await self._serving.wait()

    async def presence(self, user_id: str) -> Presence:
        """This node is the whole cluster: the session's places, on 0 or 1 node."""
        await trio.lowlevel.checkpoint()
        places = self._require_sink().connection_places(user_id)
        return Presence(places, 1 if places else 0)

    async def reserve_connection(self, user_id: str, places: int, limit: int | None) -> None:
        """Nothing to claim: the session's own reservation already is the whole count."""
        await trio.lowlevel.checkpoint()

    def statistics(self) -> BrokerStats:
        """Streams and retained events held in memory."""
        return BrokerStats(
            streams=len(self._streams),
            retained_events=sum(len(stream) for stream in self._streams.values()),
            ready=self._sink is not None,
            retained_bytes=self._retained_bytes,
        )


"""The Redis calls shared by :class:`RedisBroker` (trio) and :class:`RedisPublisher` (any
anyio backend): publish with an atomically assigned seq, live-only publish, and recovery.

Rules of this module: no trio import (the publisher must run under asyncio too); every Redis
failure surfaces as :class:`BrokerUnavailable`, whatever nesting of exception groups coredis
and anyio wrap it in; every call has a deadline (``StreamOps.timeout``): a frozen Redis
(``SIGSTOP``) answers nothing but keeps its TCP connections, so without one a call waits forever.
coredis multiplexes commands over pooled connections and matches replies to requests in order;
a command abandoned at its deadline stays queued and its late reply is consumed, so the
connection stays in step (an abandoned pipeline invalidates its connection instead).
"""

from __future__ import annotations

import contextlib
import functools
import logging
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any, Final

import anyio
import anyio.abc
import attrs

from ..._config import Config
from ..._errors import BrokerUnavailable, TooManyThreads
from ..._events import TERMINAL_TYPES, AgentEvent, EventType, encode_envelope
from ..._history import Recovery, new_epoch
from ..._latency import DeliveryLatency
from ..._presence import Presence
from ..._run_history import MAX_TRACKED_RUNS, ActiveRun, compact_frames, run_too_large
from .keys import (
    ALL_CHANNEL,
    META_GRACE,
    PRESENCE_SCRIPT,
    PRESENCE_TTL,
    PUBLISH_SCRIPT,
    RECOVER_SCRIPT,
    REVOCATION_TTL,
    disconnect_message,
    kept_key,
    meta_key,
    presence_key,
    revocation_key,
    runinfo_key,
    runs_key,
    split_envelope,
    stream_key,
    threads_key,
    user_channel,
    user_message,
)
from .pipeline import PublishPipeline, QueuedPublish
from .queue import group_calls

if TYPE_CHECKING:
    import coredis

__all__ = [
    "REDIS_TIMEOUT", "StreamOps", "first_leaf", "redis_client", "redis_down", "redis_errors",
]

#: Seconds one connection attempt to Redis may take.
CONNECT_TIMEOUT: Final = 2.0
#: Seconds any one Redis call (a command, a pipeline, a publish waiting for its seq) may take
#: before it fails with BrokerUnavailable (``--redis-timeout``): long enough for a loaded
#: Redis, short enough that a producer never hangs on a frozen one.
REDIS_TIMEOUT: Final = 2.0
#: Most presence entries written at once by :meth:`StreamOps.heartbeat`.
PRESENCE_BATCH: Final = 256
#: Most events one recovery reads from a stream (a kept run may pass ``history_size``; its
#: size is bounded by ``Config.max_run_bytes``, this bounds one script call's reply).
REPLAY_MAX_EVENTS: Final = 200_000
#: What the publish script answers for an event refused by ``Config.max_run_bytes``.
REFUSED_TOO_LARGE: Final = -2


def _run_kind(event: AgentEvent) -> int:
    """The publish script's kind of ``event``: 1 agent_started, 2 terminal, 0 other."""
    if event.type == EventType.AGENT_STARTED:
        return 1
    return 2 if event.type in TERMINAL_TYPES else 0


def _thread_of(entry: QueuedPublish) -> tuple[str, str]:
    return entry.user_id, entry.thread_id


def _size_of(entry: QueuedPublish) -> int:
    return entry.size


# coredis is imported on first use, not with agentcast: it takes most of a second to import
# and single-process users never need it.


@functools.cache
def redis_down() -> tuple[type[BaseException], ...]:
    """What a lost or refused Redis connection raises (coredis lets anyio's closed-stream
    errors escape when a connection drops under a pending pub/sub command)."""
    import coredis.exceptions  # noqa: PLC0415 - deferred: slow to import

    return (
        coredis.exceptions.ConnectionError, TimeoutError, OSError,
        anyio.ClosedResourceError, anyio.BrokenResourceError,
    )


class _AbandonedConnects(logging.Filter):
    """Drops coredis's "Connection attempt failed unexpectedly!" when the attempt was cut by
    one of our deadlines (a cancellation or TimeoutError in its chain): against a frozen Redis
    that is expected, the broker logs the outage in one line of its own, and coredis would log
    a multi-screen traceback for every attempt."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.msg != "Connection attempt failed unexpectedly!" or not record.exc_info:
            return True
        exc: BaseException | None = record.exc_info[1]
        seen = 0
        while exc is not None and seen < 16:
            if isinstance(exc, TimeoutError) or type(exc).__name__ in {
                "Cancelled", "CancelledError"
            }:
                return False
            exc, seen = exc.__cause__ or exc.__context__, seen + 1
        return True


@functools.cache
def _quiet_abandoned_connects() -> None:
    logging.getLogger("coredis").addFilter(_AbandonedConnects())


def redis_client(url: str, timeout: float = CONNECT_TIMEOUT) -> coredis.Redis[str]:
    """A coredis client for ``url`` (``redis://HOST:PORT/DB``) decoding replies to str.

    ``timeout`` bounds connecting and waiting for a pooled connection (coredis waits without
    limit by default); callers still put their own deadline around each call.
    """
    import coredis  # noqa: PLC0415 - deferred: slow to import

    _quiet_abandoned_connects()
    return coredis.Redis.from_url(
        url, decode_responses=True, connect_timeout=timeout, pool_timeout=timeout
    )


def _no_script(exc: BaseException) -> bool:
    """Whether Redis answered that it does not know the script (its cache was flushed)."""
    import coredis.exceptions  # noqa: PLC0415 - deferred: slow to import

    return isinstance(exc, coredis.exceptions.NoScriptError) or "NOSCRIPT" in str(exc)


def first_leaf(exc: BaseException) -> BaseException:
    """The first non-group exception inside ``exc`` (coredis nests them in task groups)."""
    while isinstance(exc, BaseExceptionGroup):
        exc = exc.exceptions[0]
    return exc


def describe(exc: BaseException, timeout: float | None = None) -> str:
    """One line saying what went wrong with a Redis call (a bare TimeoutError says nothing)."""
    # TooSlowError: trio's fail_after (the broker's); TimeoutError: anyio's (shared code).
    if (isinstance(exc, TimeoutError) and not str(exc)) or type(exc).__name__ == "TooSlowError":
        within = "" if timeout is None else f" within {timeout:g} s"
        return f"Redis did not answer{within}"
    return str(exc) or type(exc).__name__


@contextmanager
def redis_errors(what: str, timeout: float | None = None) -> Iterator[None]:
    """Turn a lost Redis connection (possibly inside exception groups) into BrokerUnavailable.

    With ``timeout``, the block also has that deadline (anyio's, so it works under trio and
    asyncio alike) and missing it is BrokerUnavailable too.
    """
    # No cancel scope without a timeout: the publisher enters coredis's client (a task group)
    # inside this block and leaves it elsewhere, which a scope around it would corrupt.
    deadline = contextlib.nullcontext() if timeout is None else anyio.fail_after(timeout)
    try:
        with deadline:
            yield
    except* redis_down() as group:
        error = describe(first_leaf(group), timeout)
        raise BrokerUnavailable(f"{what} failed: {error}") from None


@attrs.define(eq=False)
class StreamOps:
    """The backplane's operations over one connected coredis client.

    Publishes go through ``pipeline`` (owned by the caller, so it outlives one connection),
    which its owner drains by running :meth:`flush_publishes`: each batch taken from it is one
    pipeline (one round trip), with the events of one thread in one script call. Every call
    fails with :class:`BrokerUnavailable` after ``timeout`` seconds.
    """

    client: coredis.Redis[str]
    config: Config
    #: Seconds each call may take (``REDIS_TIMEOUT`` by default).
    timeout: float = REDIS_TIMEOUT
    #: The queue publishes wait in (owned by the caller, so it outlives one connection).
    pipeline: PublishPipeline = attrs.Factory(PublishPipeline)
    #: Where the flusher's pipelines go (default: ``client``); a client of their own keeps
    #: ``client``'s pool from opening a connection for each call made while one is in flight.
    pipeline_client: coredis.Redis[str] | None = None
    _publish: Any = None
    _recover: Any = None
    _presence: Any = None

    def __attrs_post_init__(self) -> None:
        self.pipeline.timeout = self.timeout
        self._publish = self.client.register_script(PUBLISH_SCRIPT)
        self._recover = self.client.register_script(RECOVER_SCRIPT)
        self._presence = self.client.register_script(PRESENCE_SCRIPT)

    @property
    def publish_latency(self) -> DeliveryLatency:
        """Seconds from a publish being made to Redis storing it."""
        return self.pipeline.latency

    @property
    def pipeline_depth(self) -> int:
        """Publishes queued for the flusher or in its pipeline now."""
        return self.pipeline.depth

    async def load_scripts(self) -> None:
        """Load every script into Redis's cache, so the first call of each is an EVALSHA that
        succeeds (coredis would otherwise log its NOSCRIPT retry at INFO).

        Raises:
            BrokerUnavailable: Redis did not answer within ``timeout``.
        """
        with redis_errors("loading scripts", self.timeout):
            for script in (PUBLISH_SCRIPT, RECOVER_SCRIPT, PRESENCE_SCRIPT):
                await self.client.script_load(script)

    @property
    def _meta_ttl(self) -> int:
        return int(self.config.history_ttl) + META_GRACE

    @property
    def _ttl(self) -> int:
        return max(1, int(self.config.history_ttl))

    def _entry(
        self, user_id: str, thread_id: str, event: AgentEvent, done: anyio.Event | None
    ) -> QueuedPublish:
        prefix, suffix = split_envelope(event, thread_id, time.time())
        return QueuedPublish(
            user_id, thread_id, prefix, suffix, event.run_id, _run_kind(event), done
        )

    async def publish(self, user_id: str, thread_id: str, event: AgentEvent) -> int:
        """Queue the event behind every publish made before it and wait for its seq (assigned
        in Redis); the whole wait is at most ``timeout``.

        Raises:
            BrokerUnavailable: Redis is unreachable, did not answer within ``timeout``, or the
                queue stayed full; or an earlier queued event of the thread was not stored
                (that one's error, this event not published).
            RunTooLarge: the event's run would retain more than ``Config.max_run_bytes``
                (counted in stored frame bytes; nothing was published), or an earlier queued
                event of the thread was refused so (this event not published).
        """
        done = anyio.Event()
        entry = self._entry(user_id, thread_id, event, done)
        deadline = anyio.current_time() + self.timeout
        await self.pipeline.put(entry)
        with anyio.move_on_after(deadline - anyio.current_time()):
            await done.wait()
        if not done.is_set():
            if self.pipeline.withdraw(entry):
                raise BrokerUnavailable(
                    f"publish failed: Redis did not answer within {self.timeout:g} s; the event "
                    "was not sent"
                )
            raise BrokerUnavailable(
                f"publish failed: Redis did not answer within {self.timeout:g} s; the event was "
                "sent and may still be stored (resume with since_seq to find out)"
            )
        if entry.error is not None:
            raise entry.error
        assert entry.seq is not None
        return entry.seq

    async def enqueue(self, user_id: str, thread_id: str, event: AgentEvent) -> None:
        """Queue the event behind every publish made before it and return: it is stored (its
        seq assigned in Redis) in that order. Waits only for room in the queue, at most
        ``timeout``. A failure of the event later is raised by the thread's next publish or
        by :meth:`flush`.

        Raises:
            BrokerUnavailable: not connected, the queue stayed full for ``timeout``, or an
                earlier queued event of the thread was not stored (this one was not queued).
            RunTooLarge: an earlier queued event of the thread was refused by
                ``Config.max_run_bytes`` (this one was not queued).
        """
        await self.pipeline.put(self._entry(user_id, thread_id, event, None))

    async def flush(self, user_id: str | None = None) -> None:
        """Wait until every event queued before this call is stored or has failed; raise the
        oldest unreported failure of ``user_id``'s threads (any thread's for None).

        Raises:
            BrokerUnavailable: Redis stored nothing for twice ``timeout`` (a batch's deadline
                and as much again), or that failure.
            RunTooLarge: that failure.
        """
        await self.pipeline.wait_flushed(user_id)

    async def flush_publishes(
        self, *, task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED
    ) -> None:
        """Send queued publishes as pipelines, in queue order, until cancelled; reports
        started once publishes are admitted.

        Batches go one after another, so each thread's seqs stay in publish order; publishes
        made while a pipeline is in flight form the next batch, so batches grow with the
        load. After a batch Redis did not answer, everything queued behind it fails at once.
        On exit, whatever was still queued or in flight fails with BrokerUnavailable.
        """
        pipeline = self.pipeline
        pipeline.open()
        try:
            task_status.started()
            # The script is in Redis's cache already (load_scripts, before the owner is ready);
            # if it goes missing, _send loads it again.
            while True:
                batch = await pipeline.take()
                error: BrokerUnavailable | None = None
                try:
                    error = await self._send(batch)
                finally:
                    pipeline.finish(batch, error)
                if error is not None:
                    pipeline.fail_queued(BrokerUnavailable(
                        f"publish failed: not sent, queued behind a batch that failed ({error})"
                    ))
        finally:
            pipeline.close(BrokerUnavailable("publish failed: the Redis connection was lost"))

    async def _send(self, batch: list[QueuedPublish]) -> BrokerUnavailable | None:
        """One pipeline of script calls, one per thread of the batch; returns the error of a
        failed batch (each entry gets its seq or its own error otherwise)."""
        calls = group_calls(batch, key=_thread_of, size=_size_of)
        for attempt in range(2):
            try:
                # A frozen Redis must not hold the batch (and the publishes behind it).
                with anyio.fail_after(self.timeout):
                    if attempt:
                        # Redis lost its script cache (SCRIPT FLUSH): load it, resend once.
                        await self.client.script_load(PUBLISH_SCRIPT)
                    await self._pipeline(calls)
                return None
            except Exception as exc:  # noqa: BLE001 - each publish gets it as its error
                leaf = first_leaf(exc)
                if attempt == 0 and _no_script(leaf):
                    continue
                return BrokerUnavailable(
                    f"publish failed: {describe(leaf, self.timeout)}; it was sent and may "
                    "still be stored (resume with since_seq to find out)"
                )
        return None  # not reached: the second attempt returns or fails

    def _call(self, call: list[QueuedPublish]) -> tuple[list[str], list[Any]]:
        first, config = call[0], self.config
        user_id, thread_id = first.user_id, first.thread_id
        keys = [
            meta_key(user_id, thread_id), stream_key(user_id, thread_id), threads_key(user_id),
            runs_key(user_id, thread_id), kept_key(user_id, thread_id),
            runinfo_key(user_id, thread_id),
        ]
        args: list[Any] = [
            config.history_size, self._ttl, new_epoch(), user_channel(user_id), thread_id,
            self._meta_ttl, config.max_run_bytes, config.history_bytes,
        ]
        for entry in call:
            args += (entry.prefix, entry.suffix, entry.run_id or "", entry.kind)
        return keys, args

    async def _pipeline(self, calls: list[list[QueuedPublish]]) -> None:
        sha = self._publish.sha
        async with (self.pipeline_client or self.client).pipeline(transaction=False) as pipe:
            replies = []
            for call in calls:
                keys, args = self._call(call)
                replies.append(pipe.evalsha(sha, keys=keys, args=args))
        cap = self.config.max_run_bytes
        for call, reply in zip(calls, replies, strict=True):
            seqs = await reply
            if not isinstance(seqs, list):
                raise TypeError(f"the publish script answered {seqs!r}, not a list of seqs")
            for entry, seq in zip(call, seqs, strict=True):
                if int(seq) == REFUSED_TOO_LARGE:  # that publish's own answer
                    entry.error = run_too_large(entry.run_id or "?", cap)
                else:
                    entry.seq = int(seq)

    async def publish_user(self, user_id: str, event: AgentEvent) -> None:
        """Publish a live-only event on the user's channel."""
        frame = encode_envelope(event, thread_id=None, seq=None, ts=time.time())
        with redis_errors("publish", self.timeout):
            await self.client.publish(user_channel(user_id), user_message(frame))

    async def publish_all(self, event: AgentEvent) -> None:
        """Publish a live-only event to every node."""
        frame = encode_envelope(event, thread_id=None, seq=None, ts=time.time())
        with redis_errors("publish", self.timeout):
            await self.client.publish(ALL_CHANNEL, frame)

    async def publish_disconnect(self, user_id: str, code: int, reason: str) -> None:
        """Tell every node holding the user to close its connections."""
        with redis_errors("publish", self.timeout):
            await self.client.publish(user_channel(user_id), disconnect_message(code, reason))

    async def set_revocation(self, user_id: str, cutoff: float) -> None:
        """Record that the user's tokens issued at or before ``cutoff`` are refused, for
        ``REVOCATION_TTL`` seconds; a later cut-off replaces an earlier one."""
        with redis_errors("revocation", self.timeout):
            await self.client.set(revocation_key(user_id), repr(cutoff), ex=REVOCATION_TTL)

    async def revocation(self, user_id: str) -> float | None:
        """The user's revocation cut-off, Unix seconds, or None."""
        with redis_errors("revocation lookup", self.timeout):
            value = await self.client.get(revocation_key(user_id))
        return None if value is None else float(value)

    async def recover(
        self, user_id: str, thread_id: str, since_seq: int | None, epoch: str | None,
        *, compact: bool = True,
    ) -> Recovery:
        """What was missed after ``since_seq``: complete, or ``recovered`` False and nothing.
        ``compact`` False keeps one frame per delta (the subscribe's ``compact: false``).

        Raises:
            BrokerUnavailable: the call failed because Redis is unreachable.
            TooManyThreads: the stream is new and the user already has
                ``Config.max_threads_per_user`` streams in Redis (nothing was created).
        """
        since = -1 if since_seq is None else since_seq
        limit = self.config.max_threads_per_user
        args = [
            new_epoch(), since, REPLAY_MAX_EVENTS, self._meta_ttl, thread_id, limit, self._ttl,
        ]
        keys = [
            meta_key(user_id, thread_id), stream_key(user_id, thread_id), threads_key(user_id),
            runs_key(user_id, thread_id), runinfo_key(user_id, thread_id),
        ]
        with redis_errors("recovery", self.timeout):
            reply = await self._recover(keys=keys, args=args)
        if reply == -1:
            raise TooManyThreads(
                f"user {user_id!r} already has {limit} threads in Redis "
                "(Config.max_threads_per_user); they expire after history_ttl plus a day "
                "without use"
            )
        current, latest, frames = str(reply[0]), int(reply[1]), [str(f) for f in reply[2]]
        flat = [str(item) for item in reply[3]][: 2 * MAX_TRACKED_RUNS]
        active = tuple(
            ActiveRun(flat[i], int(float(flat[i + 1]))) for i in range(0, len(flat), 2)
        )
        if since_seq is None or (epoch is not None and epoch != current) or (
            epoch is None and since_seq > 0
        ):
            # No epoch: the seq may be another stream's (before a FLUSHALL, say): never trusted.
            return Recovery(False, current, latest, (), active)
        # Entry ids are the seqs and trimming only removes the oldest, so as many entries as
        # seqs missed means every one of them is there.
        complete = since_seq == latest or (
            since_seq < latest and len(frames) == latest - since_seq
        )
        if not complete:
            return Recovery(False, current, latest, (), active)
        # Redis keeps one entry per delta; the replay compacts them as the in-memory one does.
        replay = compact_frames(frames) if compact and self.config.compact_text else frames
        return Recovery(True, current, latest, replay, active)

    async def presence(self, user_id: str) -> Presence:
        """The user's connections over every node with a current heartbeat.

        Raises:
            BrokerUnavailable: Redis did not answer within ``timeout``.
        """
        _, places, nodes = await self.sync_presence(user_id, "", 0, None, 0)
        return Presence(places, nodes)

    async def sync_presence(
        self, user_id: str, node_id: str, places: int, limit: int | None, seq: int
    ) -> tuple[bool, int, int]:
        """Record that ``node_id`` holds ``places`` of the user's connections (including one
        being reserved) and check them against ``limit`` over every node, atomically (see
        ``PRESENCE_SCRIPT``); ``node_id`` "" only reads. ``seq`` orders the node's writes: give
        every count a higher one than the last, taken when the count is.

        Returns:
            (admitted, places over every node, nodes holding them), after the write.

        Raises:
            BrokerUnavailable: Redis did not answer within ``timeout``.
        """
        args = [node_id, places, -1 if limit is None else limit, PRESENCE_TTL, seq]
        with redis_errors("presence", self.timeout):
            reply = await self._presence(keys=[presence_key(user_id)], args=args)
        return bool(reply[0]), int(reply[1]), int(reply[2])

    async def heartbeat(self, node_id: str, places: dict[str, int], seq: int) -> None:
        """Rewrite this node's presence entries (``user -> places``, 0 deletes), renewing
        their expiry; ``seq`` as in :meth:`sync_presence`.

        Sent as concurrent plain calls, ``PRESENCE_BATCH`` at a time, not as a pipeline:
        coredis multiplexes plain calls over one pooled connection, while a pipeline holds a
        connection of its own and makes the pool open another for every call made meanwhile.

        Raises:
            BrokerUnavailable: Redis did not answer within ``timeout``.
        """
        entries = list(places.items())
        with redis_errors("presence heartbeat", self.timeout):
            for start in range(0, len(entries), PRESENCE_BATCH):
                async with anyio.create_task_group() as writers:
                    for user_id, count in entries[start : start + PRESENCE_BATCH]:
                        writers.start_soon(self._write_presence, user_id, node_id, count, seq)

    async def _write_presence(self, user_id: str, node_id: str, places: int, seq: int) -> None:
        await self._presence(
            keys=[presence_key(user_id)], args=[node_id, places, -1, PRESENCE_TTL, seq]
        )

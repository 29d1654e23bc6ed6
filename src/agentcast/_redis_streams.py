"""The Redis calls shared by :class:`RedisBroker` (trio) and :class:`RedisPublisher` (any
anyio backend): publish with an atomically assigned seq, live-only publish, and recovery.

Rules of this module: no trio import (the publisher must run under asyncio too); every Redis
failure surfaces as :class:`BrokerUnavailable`, whatever nesting of exception groups coredis
and anyio wrap it in.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any, Final

import anyio
import attrs

from ._config import Config
from ._errors import AgentcastError, BrokerUnavailable, TooManyThreads
from ._events import TERMINAL_TYPES, AgentEvent, EventType, encode_envelope
from ._history import Recovery, new_epoch
from ._redis_keys import (
    ALL_CHANNEL,
    META_GRACE,
    PUBLISH_SCRIPT,
    RECOVER_SCRIPT,
    REVOCATION_TTL,
    disconnect_message,
    kept_key,
    meta_key,
    revocation_key,
    runinfo_key,
    runs_key,
    split_envelope,
    stream_key,
    threads_key,
    user_channel,
    user_message,
)
from ._run_history import MAX_TRACKED_RUNS, ActiveRun, compact_frames, run_too_large

if TYPE_CHECKING:
    import coredis

__all__ = ["StreamOps", "first_leaf", "redis_client", "redis_down", "redis_errors"]

#: Seconds one connection attempt to Redis may take.
CONNECT_TIMEOUT: Final = 2.0
#: Most publishes sent in one pipeline by :meth:`StreamOps.flush_publishes`.
PIPELINE_MAX: Final = 256
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


def _seq_of(reply: Any, run_id: str | None, cap: int) -> int:
    seq = int(reply)
    if seq == REFUSED_TOO_LARGE:
        raise run_too_large(run_id or "?", cap)
    return seq


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


def redis_client(url: str) -> coredis.Redis[str]:
    """A coredis client for ``url`` (``redis://HOST:PORT/DB``) decoding replies to str."""
    import coredis  # noqa: PLC0415 - deferred: slow to import

    return coredis.Redis.from_url(url, decode_responses=True, connect_timeout=CONNECT_TIMEOUT)


def _no_script(exc: BaseException) -> bool:
    """Whether Redis answered that it does not know the script (its cache was flushed)."""
    import coredis.exceptions  # noqa: PLC0415 - deferred: slow to import

    return isinstance(exc, coredis.exceptions.NoScriptError) or "NOSCRIPT" in str(exc)


def first_leaf(exc: BaseException) -> BaseException:
    """The first non-group exception inside ``exc`` (coredis nests them in task groups)."""
    while isinstance(exc, BaseExceptionGroup):
        exc = exc.exceptions[0]
    return exc


@contextmanager
def redis_errors(what: str) -> Iterator[None]:
    """Turn a lost Redis connection (possibly inside exception groups) into BrokerUnavailable."""
    try:
        yield
    except* redis_down() as group:
        raise BrokerUnavailable(f"{what} failed: {first_leaf(group)}") from None


@attrs.define(eq=False)
class _Pending:
    """One publish waiting for the flusher: its script call, then its seq or its error."""

    keys: list[str]
    args: list[Any]
    #: The event's run id, for a ``RunTooLarge`` message.
    run_id: str | None = None
    done: anyio.Event = attrs.Factory(anyio.Event)
    seq: int | None = None
    error: AgentcastError | None = None


@attrs.define(eq=False)
class StreamOps:
    """The backplane's operations over one connected coredis client.

    While its owner runs :meth:`flush_publishes`, publishes are queued and sent as pipelines
    (one round trip and far less client CPU for many); otherwise each is its own call.
    """

    client: coredis.Redis[str]
    config: Config
    _publish: Any = None
    _recover: Any = None
    _queue: list[_Pending] = attrs.Factory(list)
    #: Set to wake the flusher; None while no flusher runs (publishes go one by one).
    _wakeup: anyio.Event | None = None

    def __attrs_post_init__(self) -> None:
        self._publish = self.client.register_script(PUBLISH_SCRIPT)
        self._recover = self.client.register_script(RECOVER_SCRIPT)

    @property
    def _meta_ttl(self) -> int:
        return int(self.config.history_ttl) + META_GRACE

    @property
    def _ttl(self) -> int:
        return max(1, int(self.config.history_ttl))

    async def publish(self, user_id: str, thread_id: str, event: AgentEvent) -> int:
        """Assign the next seq, append to the thread's stream and publish, in one script call.

        Raises:
            BrokerUnavailable: the call failed because Redis is unreachable.
            RunTooLarge: the event's run would retain more than ``Config.max_run_bytes``
                (counted in stored frame bytes; nothing was published).
        """
        prefix, suffix = split_envelope(event, thread_id, time.time())
        config = self.config
        args: list[Any] = [
            prefix, suffix, config.history_size, self._ttl,
            new_epoch(), user_channel(user_id), thread_id, self._meta_ttl,
            event.run_id or "", _run_kind(event), config.max_run_bytes, config.history_bytes,
        ]
        keys = [
            meta_key(user_id, thread_id), stream_key(user_id, thread_id), threads_key(user_id),
            runs_key(user_id, thread_id), kept_key(user_id, thread_id),
            runinfo_key(user_id, thread_id),
        ]
        if self._wakeup is None:
            with redis_errors("publish"):
                reply = await self._publish(keys=keys, args=args)
            return _seq_of(reply, event.run_id, config.max_run_bytes)
        pending = _Pending(keys, args, event.run_id)
        self._queue.append(pending)
        self._wakeup.set()
        await pending.done.wait()
        if pending.error is not None:
            raise pending.error
        assert pending.seq is not None
        return pending.seq

    async def flush_publishes(self) -> None:
        """Send queued publishes as pipelines, in queue order, until cancelled.

        Each thread's publishes are queued in the order they were made and batches go one
        after another, so seqs stay in publish order. Publishes made while a pipeline is in
        flight form the next batch, so batches grow with the load. On exit, whatever was
        still queued or in flight fails with :class:`BrokerUnavailable`.
        """
        self._wakeup = anyio.Event()
        try:
            with redis_errors("loading the publish script"):
                await self.client.script_load(PUBLISH_SCRIPT)
            while True:
                if not self._queue:
                    self._wakeup = anyio.Event()
                    await self._wakeup.wait()
                    continue
                batch = self._queue[:PIPELINE_MAX]
                del self._queue[:PIPELINE_MAX]
                await self._send(batch)
        finally:
            self._wakeup = None
            lost = BrokerUnavailable("publish failed: the Redis connection was lost")
            for pending in self._queue:
                pending.error = lost
                pending.done.set()
            self._queue.clear()

    async def _send(self, batch: list[_Pending]) -> None:
        """One pipeline of script calls; every entry ends with its seq or an error, whatever
        happens (a failed batch must not take the broker down with it)."""
        try:
            for attempt in range(2):
                try:
                    if attempt:
                        # Redis lost its script cache (SCRIPT FLUSH): load it, resend once.
                        await self.client.script_load(PUBLISH_SCRIPT)
                    await self._pipeline(batch)
                    return
                except Exception as exc:  # noqa: BLE001 - each caller gets it as its error
                    leaf = first_leaf(exc)
                    if attempt == 0 and _no_script(leaf):
                        continue
                    error = BrokerUnavailable(f"publish failed: {leaf}")
                    for pending in batch:
                        pending.error = error
                    return
        finally:
            for pending in batch:
                if pending.seq is None and pending.error is None:
                    pending.error = BrokerUnavailable(
                        "publish failed: the Redis connection was lost"
                    )
                pending.done.set()

    async def _pipeline(self, batch: list[_Pending]) -> None:
        sha = self._publish.sha
        async with self.client.pipeline(transaction=False) as pipe:
            replies = [pipe.evalsha(sha, keys=p.keys, args=p.args) for p in batch]
        cap = self.config.max_run_bytes
        for pending, reply in zip(batch, replies, strict=True):
            try:
                pending.seq = _seq_of(await reply, pending.run_id, cap)
            except AgentcastError as exc:  # RunTooLarge: that publish's own answer
                pending.error = exc

    async def publish_user(self, user_id: str, event: AgentEvent) -> None:
        """Publish a live-only event on the user's channel."""
        frame = encode_envelope(event, thread_id=None, seq=None, ts=time.time())
        with redis_errors("publish"):
            await self.client.publish(user_channel(user_id), user_message(frame))

    async def publish_all(self, event: AgentEvent) -> None:
        """Publish a live-only event to every node."""
        frame = encode_envelope(event, thread_id=None, seq=None, ts=time.time())
        with redis_errors("publish"):
            await self.client.publish(ALL_CHANNEL, frame)

    async def publish_disconnect(self, user_id: str, code: int, reason: str) -> None:
        """Tell every node holding the user to close its connections."""
        with redis_errors("publish"):
            await self.client.publish(user_channel(user_id), disconnect_message(code, reason))

    async def set_revocation(self, user_id: str, cutoff: float) -> None:
        """Record that the user's tokens issued at or before ``cutoff`` are refused, for
        ``REVOCATION_TTL`` seconds; a later cut-off replaces an earlier one."""
        with redis_errors("revocation"):
            await self.client.set(revocation_key(user_id), repr(cutoff), ex=REVOCATION_TTL)

    async def revocation(self, user_id: str) -> float | None:
        """The user's revocation cut-off, Unix seconds, or None."""
        with redis_errors("revocation lookup"):
            value = await self.client.get(revocation_key(user_id))
        return None if value is None else float(value)

    async def recover(
        self, user_id: str, thread_id: str, since_seq: int | None, epoch: str | None
    ) -> Recovery:
        """What was missed after ``since_seq``: complete, or ``recovered`` False and nothing.

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
        with redis_errors("recovery"):
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
        replay = compact_frames(frames) if self.config.compact_text else frames
        return Recovery(True, current, latest, replay, active)

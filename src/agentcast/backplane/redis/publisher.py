"""RedisPublisher: publish agent events onto the Redis backplane from any process.

For agent workers that are not WebSocket servers (a job-queue worker, another service). It
speaks the same key layout and script as :class:`agentcast.RedisBroker`, so every node
holding the user delivers the events, in order, once. Written against anyio, not trio: it
runs under ``trio.run`` and under ``asyncio.run`` alike.
"""

from __future__ import annotations

import contextlib
import logging
import types
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any, final

import anyio
import attrs

from ..._config import Config
from ..._events import AgentEvent
from ..._ids import check_id, new_id
from ..._lifecycle import RunEmitter
from ..._presence import Presence
from ..._redact import redact_url
from ..._run_shell import run_lifecycle
from .pipeline import PublishPipeline
from .streams import REDIS_TIMEOUT, StreamOps, redis_client, redis_errors

__all__ = ["PublisherRun", "RedisPublisher"]

log = logging.getLogger("agentcast")


@final
@attrs.define(eq=False, repr=False)
class PublisherRun(RunEmitter):
    """A run published through a :class:`RedisPublisher`; made by ``RedisPublisher.run``.

    It emits exactly what a trio ``Run`` emits (the methods come from one shared class). Set
    :attr:`result` to what ``agent_completed`` should carry.
    """

    run_id: str
    user_id: str
    thread_id: str
    agent_name: str
    _publisher: RedisPublisher
    #: What ``agent_completed`` carries in ``data.result``; must be JSON-serialisable.
    result: Any = None
    _ended: bool = False
    _scope: anyio.CancelScope = attrs.Factory(anyio.CancelScope)
    _cancel_reason: str | None = None
    _tools_started: dict[str, tuple[str, float]] = attrs.Factory(dict)

    def __repr__(self) -> str:
        state = "ended" if self._ended else "active"
        return f"<PublisherRun {self.run_id} thread={self.thread_id!r} {state}>"

    async def _publish(self, event: AgentEvent) -> int:
        return await self._publisher.send_to_thread(self.user_id, self.thread_id, event)

    def _now(self) -> float:
        return anyio.current_time()

    def cancel(self, reason: str = "cancelled") -> None:
        """Cancel the run's body; the scope then publishes ``agent_cancelled``."""
        if self._cancel_reason is None:
            self._cancel_reason = reason
        self._scope.cancel()


@final
@attrs.define(eq=False, repr=False)
class RedisPublisher:
    """Publishes onto the backplane; use as ``async with RedisPublisher(url) as pub:``.

    Args:
        url: ``redis://HOST:PORT/DB``, the same Redis the nodes use.
        config: history size and TTL; use the same values as the nodes.
        timeout: seconds any one call may take, connecting included; a frozen or unreachable
            Redis makes the call raise BrokerUnavailable then, never wait longer.

    Raises:
        BrokerUnavailable: (from any method) Redis is unreachable or did not answer within
            ``timeout``.
    """

    url: str
    config: Config = attrs.Factory(Config)
    timeout: float = attrs.field(default=REDIS_TIMEOUT, kw_only=True)
    _ops: StreamOps | None = None
    #: The client, then the flusher's task group, exited in reverse on close.
    _stack: contextlib.AsyncExitStack | None = None
    _flusher: anyio.CancelScope | None = None
    #: The publish queue; it outlives the connection, like the broker's.
    _pipeline: PublishPipeline = attrs.Factory(PublishPipeline)

    def __repr__(self) -> str:
        state = "open" if self._ops is not None else "closed"
        return f"<RedisPublisher {redact_url(self.url)!r} {state}>"

    async def __aenter__(self) -> RedisPublisher:
        stack = contextlib.AsyncExitStack()
        client = redis_client(self.url, self.timeout)
        with redis_errors("connecting to Redis"):
            await stack.enter_async_context(client)
        ops = StreamOps(client, self.config, timeout=self.timeout, pipeline=self._pipeline)
        try:
            with redis_errors("connecting to Redis", self.timeout):
                await client.ping()
            await ops.load_scripts()  # the first publish then logs no NOSCRIPT retry
            tasks = await stack.enter_async_context(anyio.create_task_group())
            await tasks.start(ops.flush_publishes)
        except BaseException:
            await stack.aclose()
            raise
        self._stack, self._ops, self._flusher = stack, ops, tasks.cancel_scope
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: types.TracebackType | None,
    ) -> None:
        """Flush what is queued (on a clean exit: a failure raises here), then close."""
        stack, flusher = self._stack, self._flusher
        self._stack = self._ops = self._flusher = None
        if stack is None or flusher is None:
            return
        try:
            if exc_type is None:
                await self._pipeline.wait_flushed(None)
        finally:
            lost = self._pipeline.depth
            flusher.cancel()
            # Not the body's exception: a task group would wrap it in an ExceptionGroup.
            await stack.aclose()
            if lost:
                log.warning(
                    "RedisPublisher closed with %d events still queued; they were not stored",
                    lost,
                )

    def _require(self) -> StreamOps:
        if self._ops is None:
            raise RuntimeError("use the publisher inside `async with RedisPublisher(url) as pub:`")
        return self._ops

    async def send_to_thread(self, user_id: str, thread_id: str, event: AgentEvent) -> int:
        """Publish ``event`` on the user's thread (seq assigned in Redis); return the seq once
        Redis has stored it.

        Raises:
            InvalidIdentifier: a user or thread id is invalid.
            RunTooLarge: this event, or one queued earlier on the thread, was refused by
                ``Config.max_run_bytes`` (this one not published).
        """
        check_id("user_id", user_id)
        check_id("thread_id", thread_id)
        return await self._require().publish(user_id, thread_id, event)

    async def queue_to_thread(self, user_id: str, thread_id: str, event: AgentEvent) -> None:
        """Publish ``event`` on the user's thread without waiting for its seq: returns once it
        is queued, in order with every other publish of the thread from this publisher (a
        later ``send_to_thread`` of the thread is stored after it). Events queued meanwhile
        go to Redis together: one round trip per batch, one script call per thread.

        The queue is bounded (``QUEUE_MAX_EVENTS`` events, ``QUEUE_MAX_BYTES`` bytes): when
        full this waits, at most ``timeout``, then raises ``BrokerUnavailable``. A queued
        event that then fails is raised (an error of its class naming the thread) by the
        thread's next ``queue_to_thread``/``send_to_thread``, which then publishes nothing,
        or by :meth:`flush`; leaving ``async with`` cleanly flushes too.

        Raises:
            InvalidIdentifier: a user or thread id is invalid.
            BrokerUnavailable: the queue stayed full, or an earlier queued event of the
                thread was not stored.
            RunTooLarge: an earlier queued event of the thread was refused by
                ``Config.max_run_bytes``.
        """
        check_id("user_id", user_id)
        check_id("thread_id", thread_id)
        await self._require().enqueue(user_id, thread_id, event)

    async def flush(self) -> None:
        """Wait until every event queued before this call is stored; raise the first failure
        of a queued event not yet raised (of any thread).

        Raises:
            BrokerUnavailable: a queued event was not stored, or Redis stored nothing for
                twice ``timeout``.
            RunTooLarge: a queued event was refused by ``Config.max_run_bytes``.
        """
        self._require()
        await self._pipeline.wait_flushed(None)

    async def send_to_user(self, user_id: str, event: AgentEvent) -> None:
        """Publish a live-only event (no seq, not replayed) to every connection of the user."""
        check_id("user_id", user_id)
        await self._require().publish_user(user_id, event)

    async def presence(self, user_id: str) -> Presence:
        """How many connections ``user_id`` holds over every node, and on how many nodes: an
        agent can check whether anyone is watching (see ``ConnectionManager.presence``)."""
        check_id("user_id", user_id)
        return await self._require().presence(user_id)

    async def broadcast(self, event: AgentEvent) -> None:
        """Publish a live-only event to every connection on every node."""
        await self._require().publish_all(event)

    @asynccontextmanager
    async def run(
        self,
        user_id: str,
        thread_id: str,
        *,
        run_id: str | None = None,
        agent_name: str = "agent",
        terminal_timeout: float | None = None,
    ) -> AsyncIterator[PublisherRun]:
        """A run scope: ``agent_started`` now, exactly one terminal event on exit.

        Normal exit publishes ``agent_completed`` with ``run.result``; an exception publishes
        ``agent_error`` (type and message) and propagates; cancellation publishes
        ``agent_cancelled`` and propagates (a run cancelled by ``run.cancel()`` ends quietly).
        The terminal event is published shielded, within ``terminal_timeout`` seconds
        (``Config.terminal_event_timeout`` by default).
        """
        check_id("user_id", user_id)
        check_id("thread_id", thread_id)
        run = PublisherRun(
            new_id("run") if run_id is None else check_id("run_id", run_id),
            user_id, thread_id, agent_name, self,
        )
        timeout = self.config.terminal_event_timeout if terminal_timeout is None else (
            terminal_timeout
        )
        async with run_lifecycle(
            run, terminal_timeout=timeout, message_limit=self.config.error_message_limit
        ):
            yield run

"""RedisPublisher: publish agent events onto the Redis backplane from any process.

For agent workers that are not WebSocket servers (a job-queue worker, another service). It
speaks the same key layout and script as :class:`agentcast.RedisBroker`, so every node
holding the user delivers the events, in order, once. Written against anyio, not trio: it
runs under ``trio.run`` and under ``asyncio.run`` alike.
"""

from __future__ import annotations

import types
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING, Any, final

import anyio
import attrs

from ._config import Config
from ._events import AgentEvent
from ._ids import check_id, new_id
from ._lifecycle import RunEmitter
from ._presence import Presence
from ._redact import redact_url
from ._redis_streams import REDIS_TIMEOUT, StreamOps, redis_client, redis_errors
from ._run_shell import run_lifecycle

if TYPE_CHECKING:
    import coredis

__all__ = ["PublisherRun", "RedisPublisher"]


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
    _client: coredis.Redis[str] | None = None
    _ops: StreamOps | None = None

    def __repr__(self) -> str:
        state = "open" if self._ops is not None else "closed"
        return f"<RedisPublisher {redact_url(self.url)!r} {state}>"

    async def __aenter__(self) -> RedisPublisher:
        client = redis_client(self.url, self.timeout)
        with redis_errors("connecting to Redis"):
            await client.__aenter__()
        ops = StreamOps(client, self.config, timeout=self.timeout)
        try:
            with redis_errors("connecting to Redis", self.timeout):
                await client.ping()
            await ops.load_scripts()  # the first publish then logs no NOSCRIPT retry
        except BaseException:
            await client.__aexit__(None, None, None)
            raise
        self._client, self._ops = client, ops
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: types.TracebackType | None,
    ) -> None:
        client, self._client, self._ops = self._client, None, None
        if client is not None:
            await client.__aexit__(exc_type, exc, tb)

    def _require(self) -> StreamOps:
        if self._ops is None:
            raise RuntimeError("use the publisher inside `async with RedisPublisher(url) as pub:`")
        return self._ops

    async def send_to_thread(self, user_id: str, thread_id: str, event: AgentEvent) -> int:
        """Publish ``event`` on the user's thread (seq assigned in Redis); return the seq.

        Raises:
            InvalidIdentifier: a user or thread id is invalid.
        """
        check_id("user_id", user_id)
        check_id("thread_id", thread_id)
        return await self._require().publish(user_id, thread_id, event)

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

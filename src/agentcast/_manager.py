"""ConnectionManager and the synchronous factory: the root of the task tree.

``open_manager`` owns the root nursery: the broker's task and one supervisor task per user
session live in it, and nothing else. ``get_websocket_manager`` is a plain function: it finds
the manager (explicitly or through a context variable set by ``open_manager``) and returns the
user's session, scheduling its supervisor with ``nursery.start_soon``, which is synchronous.
"""

from __future__ import annotations

import contextvars
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import final

import attrs
import trio

from ._config import Config
from ._context import UserContext
from ._errors import ManagerNotReady, ManagerNotRunning
from ._events import AgentEvent
from ._ids import check_id
from ._latency import DeliveryLatency
from ._presence import Presence
from ._protocol import CloseCode
from ._session import MessageHandler, UserSession
from ._stats import Counters, ManagerStats, count_tasks
from .backplane.memory import InMemoryBroker
from .backplane.protocol import Broker

__all__ = [
    "ConnectionManager",
    "get_websocket_manager",
    "get_websocket_manager_async",
    "open_manager",
]

log = logging.getLogger("agentcast")

_current_manager: contextvars.ContextVar[ConnectionManager] = contextvars.ContextVar(
    "agentcast_current_manager"
)

_HOW_TO_OPEN = (
    "open one with `async with agentcast.open_manager() as manager:` and call this inside "
    "the block (or pass manager=...)"
)


@final
@attrs.define(eq=False, repr=False)
class ConnectionManager:
    """Routes events to user sessions and owns their supervisors; made by ``open_manager``."""

    config: Config
    broker: Broker
    _root: trio.Nursery
    _message_handler: MessageHandler | None
    _sessions: dict[str, UserSession] = attrs.Factory(dict)
    _ready: trio.Event = attrs.Factory(trio.Event)
    _closing: bool = False
    #: Running totals of every session, open and closed: each session counts into them as it
    #: counts into its own ``counters``, so ``get_stats`` reads them instead of summing.
    _totals: Counters = attrs.Factory(Counters)
    _sessions_closed: int = 0
    _session_crashes: int = 0
    #: Publish-to-written latency of live events, over all connections.
    delivery_latency: DeliveryLatency = attrs.Factory(DeliveryLatency)

    def __repr__(self) -> str:
        state = "closing" if self._closing else "running"
        return f"<ConnectionManager {state} users={len(self._sessions)}>"

    @property
    def closing(self) -> bool:
        """True once shutdown has begun; no new sessions are created."""
        return self._closing

    def get_websocket_manager(self, user_context: UserContext) -> UserSession:
        """Return the user's session, creating it (and scheduling its nursery) on first use.

        Synchronous by construction: there is nothing to await, so nothing to mis-await.

        Raises:
            TypeError: ``user_context`` is not a :class:`UserContext`.
            ManagerNotRunning: the manager is shutting down.
        """
        if not isinstance(user_context, UserContext):
            raise TypeError(
                f"expected a UserContext, got {type(user_context).__name__}; build one with "
                "UserContext.from_request(user_id=...)"
            )
        if self._closing:
            raise ManagerNotRunning("the manager is shutting down; it accepts no new sessions")
        user_id = user_context.user_id
        session = self._sessions.get(user_id)
        if session is None or session.closed:
            session = UserSession(
                user_id, self, self.broker, self.config, self._message_handler,
                totals=self._totals,
            )
            self._sessions[user_id] = session
            self._root.start_soon(session.supervise, name=f"agentcast.session.{user_id}")
        else:
            session.touch()
        return session

    def user_ids(self) -> list[str]:
        """The users with a live session, sorted (a stable order to page through)."""
        return sorted(self._sessions)

    def session(self, user_id: str) -> UserSession | None:
        """The live session of ``user_id``, if any (does not create one)."""
        return self._sessions.get(user_id)

    async def broadcast(self, event: AgentEvent) -> None:
        """Send a live-only notice to every connection of every user (same channels, limits)."""
        await trio.lowlevel.checkpoint_if_cancelled()
        await self.broker.publish_all(event)

    async def disconnect_user(
        self, user_id: str, code: int = CloseCode.REVOKED, reason: str = "revoked"
    ) -> int:
        """Close every connection of ``user_id`` on this node and, through the broker, on
        every node (a Redis broker publishes a control message on the user's channel). Runs
        go on; the user's tokens are not touched (``agentcast revoke`` also refuses them).

        Returns:
            How many connections were open on this node.

        Raises:
            InvalidIdentifier: ``user_id`` is invalid.
            BrokerUnavailable: the other nodes could not be told (this node's are closed).
        """
        check_id("user_id", user_id)
        closed = self.close_user(user_id, code, reason)
        await self.broker.publish_disconnect(user_id, code, reason)
        return closed

    async def wait_ready(self) -> None:
        """Wait until the manager runs and its broker accepts publishes (a Redis broker:
        connected and answering); the caller bounds the wait."""
        await self._ready.wait()
        await self.broker.wait_ready()

    async def presence(self, user_id: str) -> Presence:
        """How many connections ``user_id`` holds (open or in their handshake) and on how many
        nodes: this node's with the in-memory broker, the whole cluster's with Redis (nodes
        whose heartbeat is current; a killed node's stop counting within ``PRESENCE_TTL``).

        Raises:
            InvalidIdentifier: ``user_id`` is invalid.
            BrokerUnavailable: Redis could not be asked.
        """
        check_id("user_id", user_id)
        return await self.broker.presence(user_id)

    async def reserve_cluster_connection(self, session: UserSession) -> None:
        """After ``session.reserve_connection()`` (synchronous, this node's count), claim the
        place over the cluster too: with Redis, this node's places and every other node's
        stay within ``Config.max_connections_per_user``, atomically; with one node it is a
        no-op. Nothing to release: a place is given back when this node's count drops.

        Raises:
            TooManyConnections: the user is at the limit over the cluster; release the slot.
            BrokerUnavailable: Redis could not be asked; release the slot.
        """
        limit = self.config.max_connections_per_user
        if limit is None:
            await trio.lowlevel.checkpoint()
            return
        await self.broker.reserve_connection(session.user_id, session.connection_places, limit)

    # ---- EventSink --------------------------------------------------------------------------

    def deliver_thread(self, user_id: str, thread_id: str, seq: int, frame: str) -> None:
        """Broker callback: an event for (user, thread)."""
        session = self._sessions.get(user_id)
        if session is not None:
            session.deliver_thread(thread_id, seq, frame)

    def deliver_user(self, user_id: str, frame: str) -> None:
        """Broker callback: a live-only event for one user."""
        session = self._sessions.get(user_id)
        if session is not None:
            session.deliver_all(frame)

    def deliver_all(self, frame: str) -> None:
        """Broker callback: a live-only event for everyone."""
        for session in tuple(self._sessions.values()):
            session.deliver_all(frame)

    def holds_user(self, user_id: str) -> bool:
        """Broker callback: whether ``user_id`` has a live session here."""
        return user_id in self._sessions

    def holds_thread(self, user_id: str, thread_id: str) -> bool:
        """Broker callback: whether a connection or run of ``user_id`` here uses the thread."""
        session = self._sessions.get(user_id)
        return session is not None and session.holds_thread(thread_id)

    def reset_connections(self, reason: str) -> None:
        """Broker callback: close every connection with 1012 (service restart) so each client
        resumes with ``since_seq``; sessions and runs go on."""
        for session in tuple(self._sessions.values()):
            for connection in session.connections():
                connection.close(CloseCode.SERVICE_RESTART, reason)

    def connection_places(self, user_id: str) -> int:
        """Broker callback: connections of ``user_id`` here, open or being opened."""
        session = self._sessions.get(user_id)
        return 0 if session is None else session.connection_places

    def close_user(self, user_id: str, code: int, reason: str) -> int:
        """Broker callback (and :meth:`disconnect_user`): close every connection of
        ``user_id`` on this node; returns how many were open."""
        session = self._sessions.get(user_id)
        if session is None:
            return 0
        connections = [c for c in session.connections() if c.close_code is None]
        for connection in connections:
            connection.close(code, reason)
        return len(connections)

    # ---- lifetime ---------------------------------------------------------------------------

    async def _watch_writes(self) -> None:
        """Cut writes stuck past ``write_timeout`` (a client that stopped reading), checking
        every eighth of it: one task for all connections instead of a cancel scope per write,
        so a stuck write ends between ``write_timeout`` and 1.125 times it. The same sweep
        closes connections whose token expired (4001), within an eighth of ``write_timeout``
        of the expiry: no task or cancel scope per idle connection. It also sends heartbeats,
        checking at least every quarter of ``heartbeat_interval``."""
        period = self.config.write_timeout / 8
        if self.config.heartbeat_interval is not None:
            period = min(period, self.config.heartbeat_interval / 4)
        while True:
            await trio.sleep(period)
            now = trio.current_time()
            for session in tuple(self._sessions.values()):
                session.check_writes(now)

    def _forget(self, session: UserSession) -> None:
        """Called by a session's supervisor when it has finished."""
        if self._sessions.get(session.user_id) is session:
            del self._sessions[session.user_id]
        self._sessions_closed += 1
        if session._crashed:
            self._session_crashes += 1

    async def _shutdown(self) -> None:
        """Cancel every run, close every connection with 1001 after draining, within
        ``Config.shutdown_timeout``; then cancel whatever is left."""
        self._closing = True
        try:
            with trio.CancelScope(shield=True) as scope:
                scope.deadline = trio.current_time() + self.config.shutdown_timeout
                async with trio.open_nursery() as stoppers:
                    for session in list(self._sessions.values()):
                        stoppers.start_soon(
                            session.shutdown, CloseCode.GOING_AWAY, "server shutting down"
                        )
        finally:
            self._root.cancel_scope.cancel()

    def get_stats(self, *, per_user: bool = True) -> ManagerStats:
        """A snapshot of every session, with totals that include closed sessions.

        The event and connection counters are running totals (read, not summed over
        sessions); ``connections`` and ``active_runs`` still add up the open sessions and
        ``live_tasks`` walks the task tree.

        Args:
            per_user: include a :class:`SessionStats` per live user; False leaves ``per_user``
                empty and skips building those snapshots (what the server's ``/stats`` uses,
                so polling it costs little with thousands of users online).
        """
        sessions = self._sessions.values()
        per_user_stats = (
            {user_id: s.get_stats() for user_id, s in self._sessions.items()} if per_user else {}
        )
        broker = self.broker.statistics()
        return ManagerStats(
            users=len(self._sessions),
            connections=sum(len(s.connections()) for s in sessions),
            active_runs=sum(len(s.active_runs()) for s in sessions),
            live_tasks=count_tasks(self._root),
            sessions_closed=self._sessions_closed,
            session_crashes=self._session_crashes,
            broker_streams=broker.streams,
            broker_retained_events=broker.retained_events,
            broker_retained_bytes=broker.retained_bytes,
            delivery_latency=self.delivery_latency.snapshot(),
            per_user=per_user_stats,
            **attrs.asdict(self._totals),
        )


@asynccontextmanager
async def open_manager(
    config: Config | None = None,
    *,
    broker: Broker | None = None,
    message_handler: MessageHandler | None = None,
) -> AsyncIterator[ConnectionManager]:
    """Run a connection manager for the duration of the block.

    On exit (normal, exception or cancellation) every run is cancelled (each sends
    ``agent_cancelled``), every connection is drained and closed with 1001, all within
    ``Config.shutdown_timeout``; then the root nursery is cancelled.

    Args:
        config: settings; defaults to ``Config()``.
        broker: where seqs and history live; defaults to an :class:`InMemoryBroker`.
        message_handler: called for client frame types agentcast does not handle itself.
    """
    config = Config() if config is None else config
    broker = InMemoryBroker(config) if broker is None else broker
    body_error: BaseException | None = None
    try:
        async with trio.open_nursery() as outer:
            # The broker and the sessions live in a nursery shielded from the caller's
            # cancellation, so a block left by cancellation still delivers agent_cancelled and
            # drains connections; _shutdown bounds that by shutdown_timeout, then cancels it.
            root: trio.Nursery = await outer.start(_shielded_nursery, name="agentcast.root")
            manager = ConnectionManager(config, broker, root, message_handler)
            try:
                await root.start(broker.serve, manager, name="agentcast.broker")
            except BaseException:
                root.cancel_scope.cancel()
                raise
            root.start_soon(manager._watch_writes, name="agentcast.write-watchdog")
            manager._ready.set()
            token = _current_manager.set(manager)
            try:
                yield manager
            except BaseException as exc:
                body_error = exc
                raise
            finally:
                _current_manager.reset(token)
                await manager._shutdown()
    except BaseExceptionGroup as group:
        # Give the caller back its own exception rather than a group of one.
        if body_error is not None and list(group.exceptions) == [body_error]:
            raise body_error from None
        raise


async def _shielded_nursery(*, task_status: trio.TaskStatus[trio.Nursery]) -> None:
    with trio.CancelScope(shield=True):
        async with trio.open_nursery() as nursery:
            task_status.started(nursery)
            await trio.sleep_forever()


def _resolve(manager: ConnectionManager | None) -> ConnectionManager:
    if manager is not None:
        return manager
    try:
        return _current_manager.get()
    except LookupError:
        raise ManagerNotRunning(f"no agentcast manager is running here; {_HOW_TO_OPEN}") from None


def get_websocket_manager(
    user_context: UserContext, *, manager: ConnectionManager | None = None
) -> UserSession:
    """Return the user's session at once (synchronous: do not ``await`` it).

    Args:
        user_context: who; the session is keyed by ``user_context.user_id``.
        manager: the manager to use; defaults to the one whose ``open_manager`` block the
            caller runs inside.

    Raises:
        ManagerNotRunning: no manager is running here, or it is shutting down.
        TypeError: ``user_context`` is not a :class:`UserContext`.
    """
    return _resolve(manager).get_websocket_manager(user_context)


async def get_websocket_manager_async(
    user_context: UserContext, *, manager: ConnectionManager | None = None
) -> UserSession:
    """Like :func:`get_websocket_manager`, but wait (up to ``Config.ready_timeout``) until the
    manager's broker is ready for real (a Redis broker: connected and answering) and the
    session's nursery is open.

    Raises:
        ManagerNotRunning: no manager is running here, or it is shutting down.
        ManagerNotReady: readiness took longer than ``Config.ready_timeout``; the message says
            why the broker is not ready (e.g. Redis unreachable).
    """
    resolved = _resolve(manager)
    timeout = resolved.config.ready_timeout
    with trio.move_on_after(timeout):
        await resolved.wait_ready()
        session = resolved.get_websocket_manager(user_context)
        await session._opened.wait()
        return session
    reason = resolved.broker.statistics().reason
    raise ManagerNotReady(
        f"the agentcast manager was not ready within {timeout} s"
        + (f": {reason}" if reason else "")
        + " (Config.ready_timeout)"
    )

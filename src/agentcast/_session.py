"""UserSession: one user's scope. Its nursery owns that user's connections and agent runs.

Rules of this module: a session only reaches its own connections (routing tables are per
session, keyed by thread id), so no call on one user's session can touch another user. A
session lives while it has connections or runs, lingers ``Config.session_linger`` seconds when
idle, then closes; a crash inside it closes this user's connections with 1011 and nothing else.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Collection, Sequence
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING, Any, final

import attrs
import trio

from ._config import Config
from ._connection import Connection
from ._credentials import Credentials
from ._errors import ClientError, SessionClosed, TooManyConnections, TooManyRuns
from ._events import AgentEvent
from ._history import Recovery
from ._ids import check_id, new_id
from ._latency import DeliveryLatency
from ._protocol import BATCH_SUBPROTOCOL, CloseCode, CustomFrame
from ._run import Run, run_scope
from ._stats import Counters, SessionStats, count_tasks
from ._transport import Transport
from .backplane.protocol import Broker

if TYPE_CHECKING:
    from ._manager import ConnectionManager

__all__ = ["AgentFunction", "ConnectionSlot", "MessageHandler", "UserSession"]

log = logging.getLogger("agentcast")

#: ``async def handler(session, connection, frame)`` for client frame types agentcast does not
#: handle itself (e.g. ``user_message``). Raise :class:`ClientError` to answer with an error
#: frame; any other exception is a bug and crashes this user's session (1011).
MessageHandler = Callable[["UserSession", Connection, dict[str, Any]], Awaitable[None]]
#: ``async def agent(run, *args)`` started by :meth:`UserSession.start_run`; its return value
#: becomes ``run.result`` unless the agent set one.
AgentFunction = Callable[..., Awaitable[Any]]


@final
@attrs.define(eq=False, repr=False)
class ConnectionSlot:
    """A place for one connection of a user, reserved by :meth:`UserSession.reserve_connection`
    before the handshake's awaits, so simultaneous handshakes cannot all pass the limit.

    ``add_connection(..., slot=slot)`` consumes it; :meth:`release` gives it back (idempotent,
    a no-op once consumed). Do not construct directly.
    """

    session: UserSession
    _done: bool = False

    def __repr__(self) -> str:
        state = "done" if self._done else "reserved"
        return f"<ConnectionSlot user={self.session.user_id!r} {state}>"

    @property
    def reserved(self) -> bool:
        """True until the slot is consumed by a connection or released."""
        return not self._done

    def release(self) -> None:
        """Give the place back (call it on every path where no connection was added)."""
        if not self._done:
            self._done = True
            self.session._slot_done()


@final
@attrs.define(eq=False, repr=False)
class UserSession:
    """The per-user scope returned by ``get_websocket_manager``; do not construct directly."""

    user_id: str
    _manager: ConnectionManager
    _broker: Broker
    config: Config
    _message_handler: MessageHandler | None
    counters: Counters = attrs.Factory(Counters)
    #: The manager's running totals: everything counted in ``counters`` is counted here too.
    totals: Counters = attrs.Factory(Counters)
    _nursery: trio.Nursery | None = None
    _opened: trio.Event = attrs.Factory(trio.Event)
    _finished: trio.Event = attrs.Factory(trio.Event)
    #: Set when the session stops taking new work (linger expired, shutdown or crash).
    _closing: bool = False
    _stopping: bool = False
    _crashed: bool = False
    _connections: dict[str, Connection] = attrs.Factory(dict)
    #: thread id -> connections subscribed to it (an ordered set).
    _routes: dict[str, dict[Connection, None]] = attrs.Factory(dict)
    _runs: dict[str, Run] = attrs.Factory(dict)
    #: Tasks asked for before the nursery opened; started as soon as it does.
    _pending: list[tuple[Callable[[], Awaitable[None]], str]] = attrs.Factory(list)
    _changed: trio.Event = attrs.Factory(trio.Event)
    _publishes_since_yield: int = 0
    #: Connection slots reserved and not yet consumed or released (handshakes in flight).
    _reserved: int = 0

    def __repr__(self) -> str:
        return (
            f"<UserSession {self.user_id!r} connections={len(self._connections)} "
            f"runs={len(self._runs)} closing={self._closing}>"
        )

    @property
    def delivery_latency(self) -> DeliveryLatency:
        """The manager-wide delivery latency histogram this session's writers report to."""
        return self._manager.delivery_latency

    @property
    def closed(self) -> bool:
        """True once the session stopped taking new connections and runs."""
        return self._closing

    # ---- connections ------------------------------------------------------------------------

    def reserve_connection(self) -> ConnectionSlot:
        """Reserve a place for one more connection, synchronously (call it before any await
        of a handshake); pass it to :meth:`add_connection`, or ``release()`` it on failure.

        Open connections and reserved slots together stay within
        ``Config.max_connections_per_user`` (None: no limit). A reservation keeps the session
        from lingering out.

        Raises:
            TooManyConnections: the user holds that many connections and reservations.
            SessionClosed: the session has closed; get a fresh one.
        """
        self._check_open()
        limit = self.config.max_connections_per_user
        if limit is not None and len(self._connections) + self._reserved >= limit:
            raise TooManyConnections(
                f"user {self.user_id!r} already holds {limit} connections "
                "(Config.max_connections_per_user); close one first"
            )
        self._reserved += 1
        self._notify()
        return ConnectionSlot(self)

    @property
    def connection_places(self) -> int:
        """Connections of this user here, open or reserved (what the limit counts)."""
        return len(self._connections) + self._reserved

    def _slot_done(self) -> None:
        self._reserved -= 1
        self._notify()

    async def add_connection(
        self,
        transport: Transport,
        *,
        threads: Sequence[str] = (),
        batch: bool | None = None,
        allowed_threads: Collection[str] | None = None,
        slot: ConnectionSlot | None = None,
        credentials: Credentials | None = None,
    ) -> Connection:
        """Attach a transport; its writer and reader run in this session's nursery.

        Returns at once. ``threads`` are subscribed immediately (live events only; the client
        can resume with a ``subscribe`` frame). ``batch=None`` turns batching on when the
        transport negotiated the ``agentcast.ndjson`` subprotocol. ``allowed_threads`` restricts
        which threads the client may subscribe to, message and cancel runs on (None: all of
        this user's); others get a ``forbidden_thread`` error frame. ``slot`` is a place
        reserved by :meth:`reserve_connection` (the connection takes it over; on failure it is
        released); without one a place is reserved here. With ``credentials`` (e.g. the
        server's verified token) the connection is closed with 4001 when they expire, unless
        the client renews them with a ``refresh`` frame; without, it never expires.

        Raises:
            SessionClosed: the session has closed; get a fresh one.
            InvalidIdentifier: a thread id is invalid.
            TooManyConnections: no slot was given and the user is at
                ``Config.max_connections_per_user`` (over the cluster, with Redis).
            BrokerUnavailable: no slot was given, a limit is set and Redis could not be asked.
            ValueError: ``slot`` belongs to another session or was already used.
        """
        if slot is not None and (slot.session is not self or not slot.reserved):
            raise ValueError(f"{slot!r} is not a reserved slot of this session")
        try:
            for thread_id in threads:
                check_id("thread_id", thread_id)
            allowed = None if allowed_threads is None else frozenset(allowed_threads)
            if slot is None:
                slot = self.reserve_connection()
                # With Redis the limit holds over the cluster: claim the place there too
                # (the server does this in its handshake, before passing the slot).
                await self._manager.reserve_cluster_connection(self)
            await self._opened.wait()
            self._check_open()
        except BaseException:
            if slot is not None:
                slot.release()
            raise
        assert self._nursery is not None
        if batch is None:
            batch = getattr(transport, "subprotocol", None) == BATCH_SUBPROTOCOL
        connection = Connection.create(
            self, transport, batch=batch, allowed_threads=allowed, credentials=credentials
        )
        # The reservation becomes the connection in one step: the count never dips or doubles.
        slot._done = True
        self._reserved -= 1
        self._connections[connection.connection_id] = connection
        self.counters.connections_opened += 1
        self.totals.connections_opened += 1
        self._notify()
        self._nursery.start_soon(
            connection.serve, name=f"agentcast.{self.user_id}.{connection.connection_id}"
        )
        # Subscribed before this returns (and, with the in-memory broker, before the new tasks
        # run), so no event published from here on is missed and the acks come first.
        for thread_id in threads:
            await connection.subscribe(thread_id)
        return connection

    async def serve_connection(
        self,
        transport: Transport,
        *,
        threads: Sequence[str] = (),
        batch: bool | None = None,
        allowed_threads: Collection[str] | None = None,
        slot: ConnectionSlot | None = None,
        credentials: Credentials | None = None,
    ) -> None:
        """Add a connection and wait until it closes: the body of a WebSocket handler.

        If the caller is cancelled, the connection is closed with 1001 first.
        """
        connection = await self.add_connection(
            transport, threads=threads, batch=batch, allowed_threads=allowed_threads, slot=slot,
            credentials=credentials,
        )
        await self.hold_connection(connection)

    async def hold_connection(self, connection: Connection) -> None:
        """Wait until ``connection`` closes; if the caller is cancelled, close it with 1001
        first (bounded by ``close_timeout``). ``serve_connection`` is add + hold."""
        try:
            await connection.wait_closed()
        finally:
            if not connection.closed:
                connection.close(CloseCode.GOING_AWAY, "handler cancelled")
                with trio.CancelScope(shield=True) as scope:
                    scope.deadline = trio.current_time() + 2 * self.config.close_timeout
                    await connection.wait_closed()

    async def remove_connection(
        self, connection_id: str, code: int = CloseCode.NORMAL, reason: str = ""
    ) -> bool:
        """Close a connection (sending what is queued first) and wait until it is gone.

        Returns:
            False if this session has no such connection.
        """
        connection = self._connections.get(connection_id)
        if connection is None:
            await trio.lowlevel.checkpoint()
            return False
        connection.close(code, reason, drain=True)
        await connection.wait_closed()
        return True

    def check_writes(self, now: float) -> None:
        """Close connections whose current write has outlasted ``write_timeout`` (4008), or
        whose credentials have expired (4001, after ``token_expiring``); send a heartbeat on
        those idle for ``heartbeat_interval``."""
        for connection in tuple(self._connections.values()):
            connection.check_write(now)
            connection.check_expiry(now)
            connection.check_heartbeat(now)

    def connections(self) -> list[Connection]:
        """This user's open connections."""
        return list(self._connections.values())

    # ---- events -----------------------------------------------------------------------------

    async def send_to_thread(self, thread_id: str, event: AgentEvent) -> int:
        """Publish ``event`` on this user's thread; returns its seq.

        Never waits for a client: each subscribed connection gets it through its bounded
        channel. Yields to the scheduler every few publishes so writers can batch. On Redis
        it waits for the seq (one round trip, shared with every publish made meanwhile);
        :meth:`queue_to_thread` does not.

        Raises:
            InvalidIdentifier: ``thread_id`` is invalid.
            BrokerUnavailable: Redis is down or did not answer within its timeout; or an
                earlier queued event of the thread was not stored (this one not published).
            RunTooLarge: this event, or an earlier queued one of the thread, was refused by
                ``Config.max_run_bytes``.
        """
        check_id("thread_id", thread_id)
        await self._pace()
        seq = await self._broker.publish(self.user_id, thread_id, event)
        self.counters.events_published += 1
        self.totals.events_published += 1
        return seq

    async def queue_to_thread(self, thread_id: str, event: AgentEvent) -> None:
        """Publish ``event`` on this user's thread without waiting for its seq: returns once
        it is queued for the broker, in order with every other publish of the thread from
        this process (a later ``send_to_thread`` of the thread is stored after it).

        In memory it is published at once (nothing is queued). On Redis the node's queue is
        bounded (``QUEUE_MAX_EVENTS`` events, ``QUEUE_MAX_BYTES`` bytes): when it is full this
        waits, at most the Redis timeout, then raises ``BrokerUnavailable``. A queued event
        that then fails (Redis down, ``RunTooLarge``) is raised, as an error of its class
        naming the thread, by the thread's next ``queue_to_thread``/``send_to_thread`` (which
        then publishes nothing) or by :meth:`flush`.

        Raises:
            InvalidIdentifier: ``thread_id`` is invalid.
            BrokerUnavailable: Redis is down or the queue stayed full; or an earlier queued
                event of the thread was not stored.
            RunTooLarge: this event (in memory), or an earlier queued one of the thread, was
                refused by ``Config.max_run_bytes``.
        """
        check_id("thread_id", thread_id)
        await self._pace()
        await self._broker.enqueue(self.user_id, thread_id, event)
        self.counters.events_published += 1

    async def flush(self) -> None:
        """Wait until every event queued (``queue_to_thread``) before this call is stored;
        raise the first failure of this user's queued events not yet raised.

        Raises:
            BrokerUnavailable: a queued event was not stored (Redis down), or Redis stored
                nothing for twice its timeout.
            RunTooLarge: a queued event was refused by ``Config.max_run_bytes``.
        """
        await self._broker.flush(self.user_id)

    async def send_to_user(self, event: AgentEvent) -> None:
        """Send a live-only event (no seq, not replayed) to every connection of this user."""
        await self._pace()
        await self._broker.publish_user(self.user_id, event)

    async def _pace(self) -> None:
        # A producer in a tight loop yields every few events, so writers wake up with
        # several events queued and send them as one batch; otherwise it only checks for
        # cancellation. Either way it never waits for a client.
        self._publishes_since_yield += 1
        if self._publishes_since_yield >= 32:
            self._publishes_since_yield = 0
            await trio.lowlevel.checkpoint()
        else:
            await trio.lowlevel.checkpoint_if_cancelled()

    def deliver_thread(self, thread_id: str, seq: int, frame: str) -> None:
        """Route an encoded thread event to this user's subscribed connections."""
        route = self._routes.get(thread_id)
        if route:
            for connection in tuple(route):
                connection.offer(thread_id, seq, frame)

    def deliver_all(self, frame: str) -> None:
        """Queue an encoded live-only event on every connection of this user."""
        for connection in tuple(self._connections.values()):
            connection.enqueue(frame)

    # ---- runs -------------------------------------------------------------------------------

    def _register_run(self, thread_id: str, run_id: str | None, agent_name: str) -> Run:
        self._check_open()
        check_id("thread_id", thread_id)
        run_id = new_id("run") if run_id is None else check_id("run_id", run_id)
        if run_id in self._runs:
            raise ValueError(f"run_id {run_id!r} is already active for user {self.user_id!r}")
        limit = self.config.max_active_runs_per_user
        if len(self._runs) >= limit:
            raise TooManyRuns(
                f"user {self.user_id!r} already has {limit} active runs "
                "(Config.max_active_runs_per_user); wait for one to end or cancel one"
            )
        run = Run(run_id, thread_id, agent_name, self.send_to_thread)
        self._runs[run_id] = run
        self.counters.runs_started += 1
        self.totals.runs_started += 1
        self._notify()
        return run

    def _unregister_run(self, run: Run) -> None:
        if self._runs.get(run.run_id) is run:
            del self._runs[run.run_id]
            self._notify()

    @asynccontextmanager
    async def _scope_of(self, run: Run) -> AsyncIterator[Run]:
        try:
            async with run_scope(
                run,
                terminal_timeout=self.config.terminal_event_timeout,
                message_limit=self.config.error_message_limit,
            ) as active:
                yield active
        finally:
            self._unregister_run(run)

    @asynccontextmanager
    async def run(
        self, thread_id: str, *, run_id: str | None = None, agent_name: str = "agent"
    ) -> AsyncIterator[Run]:
        """A run scope: ``agent_started`` now, exactly one terminal event on exit.

        Normal exit sends ``agent_completed`` with ``run.result``; an exception sends
        ``agent_error`` (type and message only) and propagates; cancellation sends
        ``agent_cancelled``. A run cancelled by :meth:`cancel_run` ends the block quietly.

        Raises:
            SessionClosed: the session has closed.
            InvalidIdentifier: invalid thread or run id, or the run id is already active.
            TooManyRuns: the user has ``Config.max_active_runs_per_user`` runs active.
        """
        run = self._register_run(thread_id, run_id, agent_name)
        async with self._scope_of(run) as active:
            yield active

    def start_run(
        self,
        thread_id: str,
        agent_fn: AgentFunction,
        *args: Any,
        run_id: str | None = None,
        agent_name: str | None = None,
    ) -> str:
        """Start ``await agent_fn(run, *args)`` in this user's nursery; return the run id.

        Synchronous like ``nursery.start_soon``. The agent's exception becomes
        ``agent_error`` and is logged; it does not crash the session.

        Raises:
            SessionClosed: the session has closed.
            InvalidIdentifier: invalid thread or run id, or the run id is already active.
            TooManyRuns: the user has ``Config.max_active_runs_per_user`` runs active (a client
                whose frame made the message handler call this gets ``too_many_runs``).
        """
        name = agent_name or str(getattr(agent_fn, "__name__", "agent"))
        run = self._register_run(thread_id, run_id, name)
        self._spawn(
            functools.partial(self._drive_agent, run, agent_fn, args),
            f"agentcast.{self.user_id}.{run.run_id}",
        )
        return run.run_id

    async def _drive_agent(self, run: Run, agent_fn: AgentFunction, args: tuple[Any, ...]) -> None:
        try:
            async with self._scope_of(run) as active:
                value = await agent_fn(active, *args)
                if active.result is None:
                    active.result = value
        except* Exception:
            log.warning(
                "agent run %s of user %r raised; sent agent_error",
                run.run_id, self.user_id, exc_info=True,
            )

    def cancel_run(
        self, run_id: str, reason: str = "cancelled", *, threads: frozenset[str] | None = None
    ) -> bool:
        """Cancel one of this user's active runs; it sends ``agent_cancelled``.

        ``threads`` limits it to runs on those threads (a connection restricted by its token).

        Returns:
            False if this user has no such active run (another user's run id included).
        """
        run = self._runs.get(run_id)
        if run is None or (threads is not None and run.thread_id not in threads):
            return False
        run.cancel(reason)
        return True

    def active_runs(self) -> list[Run]:
        """This user's runs that have not ended."""
        return list(self._runs.values())

    # ---- ConnectionOwner --------------------------------------------------------------------

    async def recover(
        self, thread_id: str, since_seq: int | None, epoch: str | None, *, compact: bool = True
    ) -> Recovery:
        """What this user missed on a thread (used by connections on subscribe); ``compact``
        False replays each ``agent_text`` delta as its own frame.

        Raises:
            BrokerUnavailable: the broker's backend is down; the connection closes with 1012.
        """
        return await self._broker.recover(
            self.user_id, thread_id, since_seq, epoch, compact=compact
        )

    def holds_thread(self, thread_id: str) -> bool:
        """Whether a connection of this user is subscribed to the thread or a run writes to
        it (the broker keeps such a stream's epoch and seq)."""
        return thread_id in self._routes or any(
            run.thread_id == thread_id for run in self._runs.values()
        )

    def index_subscribe(self, thread_id: str, connection: Connection) -> None:
        """Route the thread's events to ``connection``."""
        self._routes.setdefault(thread_id, {})[connection] = None

    def index_unsubscribe(self, thread_id: str, connection: Connection) -> None:
        """Stop routing the thread's events to ``connection``."""
        route = self._routes.get(thread_id)
        if route is not None:
            route.pop(connection, None)
            if not route:
                del self._routes[thread_id]

    def detach(self, connection: Connection) -> None:
        """Forget a connection that has closed."""
        if self._connections.pop(connection.connection_id, None) is not None:
            self._notify()

    async def handle_custom(self, connection: Connection, frame: CustomFrame) -> None:
        """Hand an application frame to the message handler."""
        if self._message_handler is None:
            raise ClientError("unknown_type", f"unknown frame type {frame.type!r}")
        await self._message_handler(self, connection, frame.payload)

    # ---- lifetime ---------------------------------------------------------------------------

    def _check_open(self) -> None:
        if self._closing:
            raise SessionClosed(
                f"the session of user {self.user_id!r} has closed; "
                "call get_websocket_manager(ctx) again for a fresh one"
            )

    def _spawn(self, fn: Callable[[], Awaitable[None]], name: str) -> None:
        if self._nursery is None:
            self._pending.append((fn, name))
        else:
            self._nursery.start_soon(fn, name=name)

    def _notify(self) -> None:
        self._changed.set()
        self._changed = trio.Event()

    def touch(self) -> None:
        """Restart the linger clock (the manager calls it whenever it hands out the session)."""
        self._notify()

    def _busy(self) -> bool:
        return bool(self._connections or self._runs or self._pending or self._reserved)

    async def _linger(self) -> None:
        """Return once the session has been idle for ``session_linger`` seconds."""
        while not self._stopping:
            changed = self._changed
            if self._busy():
                await changed.wait()
                continue
            with trio.move_on_after(self.config.session_linger):
                await changed.wait()
            if changed.is_set():
                continue
            if not self._busy():
                return

    async def supervise(self) -> None:
        """The session's task: own the nursery, linger when idle, contain crashes."""
        attached = False
        try:
            # Attached before any connection can subscribe, so a replay computed afterwards
            # has no gap before the live events (a Redis broker subscribes here).
            await self._broker.attach_user(self.user_id)
            attached = True
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                for fn, name in self._pending:
                    nursery.start_soon(fn, name=name)
                self._pending.clear()
                self._opened.set()
                await self._linger()
                self._closing = True  # no checkpoint since the idle check: nothing slipped in
                nursery.cancel_scope.cancel()
        except* Exception:
            self._crashed = True
            log.exception("session of user %r crashed; closing its connections with 1011",
                          self.user_id)
        finally:
            self._closing = True
            self._opened.set()  # release add_connection callers: they now get SessionClosed
            code = CloseCode.INTERNAL_ERROR if self._crashed else CloseCode.GOING_AWAY
            reason = "internal error" if self._crashed else "session closed"
            with trio.CancelScope(shield=True) as scope:
                scope.deadline = trio.current_time() + 2 * self.config.close_timeout
                async with trio.open_nursery() as closers:
                    for connection in list(self._connections.values()):
                        closers.start_soon(connection.finish, code, reason)
            self._nursery = None
            self._manager._forget(self)
            if attached:
                with trio.CancelScope(shield=True) as scope:
                    scope.deadline = trio.current_time() + self.config.close_timeout
                    await self._broker.detach_user(self.user_id)
            self._finished.set()

    async def shutdown(self, code: int, reason: str) -> None:
        """Cancel runs, close connections after draining them, and wait for the session's end."""
        # _stopping is set only once runs have ended and connections have drained: any
        # notification after it makes the supervisor cancel the nursery, writers included.
        for run in list(self._runs.values()):
            run.cancel(reason)
        for run in list(self._runs.values()):
            await run.wait_done()
        for connection in list(self._connections.values()):
            connection.close(code, reason, drain=True)
        for connection in list(self._connections.values()):
            await connection.wait_closed()
        self._stopping = True
        self._notify()
        await self._finished.wait()

    def get_stats(self) -> SessionStats:
        """A snapshot of this session: connections, runs, tasks and event counters."""
        counters = self.counters
        return SessionStats(
            user_id=self.user_id,
            connections=len(self._connections),
            reserved_connections=self._reserved,
            open_channels=sum(1 for c in self._connections.values() if c.close_code is None),
            subscriptions=sum(len(c.threads) for c in self._connections.values()),
            active_runs=len(self._runs),
            live_tasks=count_tasks(self._nursery),
            closed=self._closing,
            **attrs.asdict(counters),
        )

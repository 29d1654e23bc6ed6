"""One client connection: a bounded send channel, a writer task and a reader task.

Rules of this module: producers reach a connection only through :meth:`Connection.offer` and
:meth:`Connection.enqueue`, which never block (a full channel closes the connection as a slow
consumer). Every close goes through :meth:`Connection.close`, which records the first close code
and cancels or drains; :meth:`Connection.serve` then finishes the close exactly once.

Write-through: when the transport offers ``send_nowait`` (``_transport.WritesThrough``) and
:func:`~agentcast._writethrough.may_write_through` says yes (the writer parked on an empty
channel, nothing part-written, not closing, batching not about to apply), :meth:`offer` writes a
live event in the producer's step instead of waking the writer. If the socket takes only part of
it, the writer finishes the rest first (:data:`FINISH_SEND` is queued ahead of anything else).
"""

from __future__ import annotations

import itertools
import logging
import time
from collections.abc import Iterable
from typing import Final, Protocol, final

import attrs
import trio
from trio_websocket import ConnectionClosed

from ._batching import Outgoing, gather, messages
from ._config import Config
from ._credentials import NEVER, Credentials, ExpiryPlan, narrow_threads, plan_expiry
from ._errors import (
    BrokerUnavailable,
    ClientError,
    InvalidEvent,
    InvalidIdentifier,
    TooManyRuns,
    TooManyThreads,
)
from ._history import Recovery
from ._latency import DeliveryLatency
from ._protocol import (
    UNENCODABLE_REPLY,
    CancelRun,
    ClientFrame,
    CloseCode,
    CustomFrame,
    Ping,
    ProtocolError,
    Refresh,
    Subscribe,
    Unsubscribe,
    close_reason,
    error_frame,
    parse_client_frame,
    pong_frame,
    refreshed_frame,
    token_expiring_frame,
    unsubscribed_frame,
)
from ._ratelimit import Admission, InboundLimiter
from ._stats import Counters
from ._subscriptions import HeldOverflow, Subscriptions
from ._transport import Transport, WritesThrough, Written, abort_transport, close_transport
from ._writethrough import may_write_through

__all__ = ["Connection", "ConnectionOwner"]

log = logging.getLogger("agentcast")

_ids = itertools.count(1)

#: The data frame sent on a connection idle for ``Config.heartbeat_interval``; clients ignore it.
HEARTBEAT_FRAME: Final = '{"type":"heartbeat"}'

#: Queued after a write-through the socket took only part of: the writer finishes that frame
#: (``WritesThrough.finish_send``) before anything else. It is always the first item queued
#: after the write-through (the writer was idle, the channel empty), so ``gather`` never sees it.
FINISH_SEND: Final[tuple[str, ...]] = ()


class ConnectionOwner(Protocol):
    """What a connection needs from its session."""

    @property
    def user_id(self) -> str: ...

    @property
    def config(self) -> Config: ...

    @property
    def counters(self) -> Counters: ...

    @property
    def totals(self) -> Counters:
        """The manager's running totals; every count goes to ``counters`` and here."""

    @property
    def delivery_latency(self) -> DeliveryLatency:
        """The histogram the writer reports delivery latencies to."""

    async def recover(
        self, thread_id: str, since_seq: int | None, epoch: str | None, *, compact: bool = True
    ) -> Recovery:
        """Replay information for (this user, thread); ``compact`` False expands text spans."""

    def index_subscribe(self, thread_id: str, connection: Connection) -> None:
        """Route the thread's events to ``connection``."""

    def index_unsubscribe(self, thread_id: str, connection: Connection) -> None:
        """Stop routing the thread's events to ``connection``."""

    def cancel_run(
        self, run_id: str, reason: str = ..., *, threads: frozenset[str] | None = ...
    ) -> bool:
        """Cancel one of this user's runs (on one of ``threads``, if given); False if there is
        no such active run."""

    def detach(self, connection: Connection) -> None:
        """Forget a connection that has finished closing."""

    async def handle_custom(self, connection: Connection, frame: CustomFrame) -> None:
        """Dispatch an application frame type; raises ClientError for an error frame."""


@final
@attrs.define(eq=False, repr=False)
class Connection:
    """A live client connection of one user; created by ``UserSession.add_connection``."""

    #: Unique within the process, e.g. ``"c-17"``.
    connection_id: str
    transport: Transport
    #: Whether events are joined into newline-delimited batches.
    batch: bool
    _owner: ConnectionOwner
    _send: trio.MemorySendChannel[Outgoing]
    _receive: trio.MemoryReceiveChannel[Outgoing]
    _limiter: InboundLimiter
    #: The threads this client may subscribe to, message and cancel runs on (None: any of the
    #: user's threads), e.g. from the ``threads`` claim of its token.
    allowed_threads: frozenset[str] | None = None
    #: Per-thread delivery positions and the subscribe/replay merge (a pure state machine).
    _subscriptions: Subscriptions = attrs.field(kw_only=True)
    #: Wraps both tasks: cancelling it stops them; its deadline bounds a draining close.
    _scope: trio.CancelScope = attrs.Factory(trio.CancelScope)
    _close_code: int | None = None
    _close_reason: str = ""
    _peer_closed: bool = False
    #: trio time the write in progress started (None between writes). Cancelling a write may
    #: leave half a frame on the wire; the manager's watchdog cuts one older than
    #: ``write_timeout`` (see :meth:`check_write`), far cheaper than a cancel scope per write.
    _write_started: float | None = None
    #: trio time the last completed write began (or the connection was created, or a heartbeat
    #: was queued): :meth:`check_heartbeat` sends one when it is ``heartbeat_interval`` old.
    _last_sent: float = attrs.Factory(trio.current_time)
    #: Set by :meth:`abort`: the peer is dead, so no close handshake is attempted.
    _aborting: bool = False
    _finished: trio.Event = attrs.Factory(trio.Event)
    #: What the client authenticated with (None: never expires, ``refresh`` is refused).
    _credentials: Credentials | None = None
    #: When the watchdog warns (``token_expiring``) and closes (4001), in trio time.
    _expiry: ExpiryPlan = NEVER
    #: The transport again, if it can write synchronously (None: every event is queued).
    _through: WritesThrough | None = None
    #: True while the writer waits on an empty channel; cleared by every :meth:`enqueue`.
    _writer_idle: bool = False
    #: The event a write-through wrote part of, until the writer has finished it.
    _part_written: str | None = None

    @classmethod
    def create(
        cls,
        owner: ConnectionOwner,
        transport: Transport,
        *,
        batch: bool,
        allowed_threads: frozenset[str] | None = None,
        credentials: Credentials | None = None,
    ) -> Connection:
        """Build a connection with its bounded channel; the session then runs :meth:`serve`.

        With ``credentials`` it is closed with 4001 at their expiry (plus their grace) unless
        the client renews them with a ``refresh`` frame.
        """
        config = owner.config
        send, receive = trio.open_memory_channel[Outgoing](config.send_queue_size)
        limiter = InboundLimiter.create(
            config.inbound_rate, config.inbound_burst, config.rate_limit_strikes,
            trio.current_time(),
        )
        connection = cls(
            f"c-{next(_ids)}", transport, batch, owner, send, receive, limiter, allowed_threads,
            subscriptions=Subscriptions(max_held=config.send_queue_size),
        )
        if credentials is not None:
            connection._grant(credentials)
        if isinstance(transport, WritesThrough):
            connection._through = transport
        return connection

    def __repr__(self) -> str:
        return (
            f"<Connection {self.connection_id} user={self._owner.user_id!r} "
            f"threads={sorted(self._subscriptions.threads)} closed={self.closed}>"
        )

    @property
    def user_id(self) -> str:
        """The user this connection belongs to."""
        return self._owner.user_id

    @property
    def threads(self) -> frozenset[str]:
        """The threads this connection is subscribed to."""
        return self._subscriptions.threads

    @property
    def closed(self) -> bool:
        """True once the connection has finished closing."""
        return self._finished.is_set()

    @property
    def close_code(self) -> int | None:
        """The close code sent (or received from the peer); None while open."""
        return self._close_code

    async def wait_closed(self) -> None:
        """Wait until the connection has finished closing."""
        await self._finished.wait()

    # ---- producer side: never blocks ------------------------------------------------------

    def offer(self, thread_id: str, seq: int, frame: str) -> None:
        """Queue a thread event unless it is a duplicate; hold it while a replay is fetched."""
        try:
            live = self._subscriptions.offer(thread_id, seq, frame)
        except HeldOverflow:
            self._slow_consumer("too many events held during replay")
            return
        if live is None:
            return
        through = self._through
        if through is not None:
            now = trio.current_time()
            if may_write_through(
                closing=self._close_code is not None, writer_idle=self._writer_idle,
                writing=self._write_started is not None, batch=self.batch, now=now,
                last_sent=self._last_sent,
            ):
                written = through.send_nowait(live)
                if written is Written.ALL:
                    self._last_sent = now
                    owner = self._owner
                    counters, totals = owner.counters, owner.totals
                    counters.messages_sent += 1
                    counters.events_sent += 1
                    totals.messages_sent += 1
                    totals.events_sent += 1
                    self._owner.delivery_latency.observe_frame(live, 1)
                    return
                if written is Written.PART:
                    # A write in progress, as the writer's: the watchdog bounds it, a close
                    # meanwhile aborts (finish()), and the writer finishes it before anything.
                    self._last_sent = self._write_started = now
                    self._part_written = live
                    self.enqueue(FINISH_SEND)
                    return
        self.enqueue(live)

    def enqueue(self, item: Outgoing) -> None:
        """Queue a frame (or an ack-and-replay group); a full channel closes with 4008."""
        if self._close_code is not None:
            self._owner.counters.events_dropped += 1
            self._owner.totals.events_dropped += 1
            return
        self._writer_idle = False
        try:
            self._send.send_nowait(item)
        except trio.WouldBlock:
            self._owner.counters.events_dropped += 1
            self._owner.totals.events_dropped += 1
            self._slow_consumer("send queue full")

    def _slow_consumer(self, why: str) -> None:
        if self._close_code is None:
            self._owner.counters.slow_consumer_disconnects += 1
            self._owner.totals.slow_consumer_disconnects += 1
            log.info(
                "closing slow consumer %s of user %r: %s",
                self.connection_id, self._owner.user_id, why,
            )
            self.close(CloseCode.SLOW_CONSUMER, f"slow consumer: {why}")

    # ---- closing ----------------------------------------------------------------------------

    def close(self, code: int, reason: str = "", *, drain: bool = False) -> None:
        """Start closing; the first call decides the code. Returns at once.

        With ``drain`` the writer first sends what is queued, within ``Config.close_timeout``;
        otherwise queued events are dropped (the client resumes from history).
        """
        if self._close_code is not None:
            return
        self._close_code = code
        self._close_reason = close_reason(reason)
        if drain:
            self._send.close()
            self._scope.deadline = min(
                self._scope.deadline, trio.current_time() + self._owner.config.close_timeout
            )
        else:
            self._scope.cancel()

    def abort(self, code: int, reason: str = "") -> None:
        """Drop the connection without a close handshake, e.g. a peer that stopped answering
        pings (a close frame would only wait for a reply that never comes). Returns at once;
        ``code`` is recorded as the close code."""
        if self._close_code is None:
            self._close_code = code
            self._close_reason = close_reason(reason)
        self._aborting = True
        self._scope.cancel()

    def _peer_gone(self, exc: ConnectionClosed) -> None:
        self._peer_closed = True
        if self._close_code is None:
            self._close_code = exc.reason.code if exc.reason is not None else 1006
        self._scope.cancel()

    async def finish(self, code: int, reason: str) -> None:
        """Close the transport (politely, or by abort after a cut-off write) and detach.

        Idempotent; the session calls it for connections whose tasks were cancelled with it.
        """
        if self._finished.is_set():
            return
        if self._close_code is None:
            self._close_code = code
            self._close_reason = close_reason(reason)
        self._send.close()
        try:
            if self._peer_closed:
                pass
            elif self._write_started is not None or self._aborting:
                await abort_transport(self.transport, self._close_code, self._close_reason)
            else:
                await close_transport(
                    self.transport, self._close_code, self._close_reason,
                    self._owner.config.close_timeout,
                )
        finally:
            for thread_id in list(self._subscriptions):
                self._owner.index_unsubscribe(thread_id, self)
            self._owner.detach(self)
            self._finished.set()

    # ---- the tasks --------------------------------------------------------------------------

    async def subscribe(self, thread_id: str) -> None:
        """Subscribe to a server-chosen thread (live events only), queueing its ack."""
        await self._subscribe(Subscribe(thread_id))

    async def serve(self) -> None:
        """Run the writer (a child task) and the reader (this task) until the connection
        closes, then finish the close. Two tasks per connection, not three: idle connections
        are most of a server's memory."""
        with self._scope:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._write_loop, name=f"{self.connection_id}:writer")
                await self._read_loop()
        await self.finish(CloseCode.NORMAL, "")

    async def _write_loop(self) -> None:
        """Send what the channel brings, batched, until it ends or the connection must stop."""
        counters, totals = self._owner.counters, self._owner.totals
        config = self._owner.config
        limit = config.batch_max_events
        latency = self._owner.delivery_latency
        receive = self._receive
        empty = (trio.WouldBlock, trio.EndOfChannel)
        batch, max_bytes = self.batch, config.batch_max_bytes
        try:
            while True:
                try:
                    item = receive.receive_nowait()
                except trio.WouldBlock:
                    # Parked on an empty channel: offer() may write through meanwhile.
                    self._writer_idle = True
                    try:
                        item = await receive.receive()
                    except trio.EndOfChannel:
                        return
                    finally:
                        self._writer_idle = False
                except trio.EndOfChannel:
                    return
                else:
                    # As receive() would: let producers add to what this wake-up gathers.
                    await trio.lowlevel.cancel_shielded_checkpoint()
                if not item:  # FINISH_SEND
                    if not await self._finish_send():
                        return
                    continue
                frames, events, oldest_live, live = gather(
                    item, receive.receive_nowait, limit, empty
                )
                for message in messages(
                    frames, batch=batch, max_bytes=max_bytes, max_events=limit
                ):
                    if not await self._write(message):
                        return
                    counters.messages_sent += 1
                    totals.messages_sent += 1
                counters.events_sent += events
                totals.events_sent += events
                if oldest_live is not None:
                    latency.observe_frame(oldest_live, live)
        finally:
            # However the writer ends (drained, slow, peer gone), the reader must stop too.
            self._scope.cancel()

    async def _write(self, message: str) -> bool:
        """Write one message (:meth:`check_write` bounds it); False if the peer has gone."""
        # A close that came between two messages cuts nothing: stop before starting this one,
        # so finish() closes politely with the code instead of aborting (1006).
        await trio.lowlevel.checkpoint_if_cancelled()
        started = self._write_started = trio.current_time()
        try:
            await self.transport.send_message(message)
        except ConnectionClosed as exc:
            self._write_started = None
            self._peer_gone(exc)
            return False
        # Cancelled (cut by check_write or a close) leaves _write_started set: finish() aborts.
        self._write_started = None
        self._last_sent = started  # no second clock read on the hot path
        return True

    async def _finish_send(self) -> bool:
        """Write the rest of the frame a write-through wrote part of (the write began then:
        ``_write_started`` is already set, so :meth:`check_write` bounds it from there and a
        cut leaves it set for finish() to abort); False if the peer has gone."""
        through, frame = self._through, self._part_written
        assert through is not None, "FINISH_SEND on a transport without send_nowait"
        assert frame is not None, "FINISH_SEND without a part written"
        await trio.lowlevel.checkpoint_if_cancelled()
        try:
            await through.finish_send()
        except ConnectionClosed as exc:
            self._write_started = None
            self._peer_gone(exc)
            return False
        self._write_started = self._part_written = None
        owner = self._owner
        for counters in (owner.counters, owner.totals):
            counters.messages_sent += 1
            counters.events_sent += 1
        self._owner.delivery_latency.observe_frame(frame, 1)
        return True

    def check_write(self, now: float) -> None:
        """Close as a slow consumer (4008, by abort) if the write in progress started
        ``write_timeout`` or more before ``now``; the manager's watchdog calls this."""
        started = self._write_started
        if started is not None and now - started >= self._owner.config.write_timeout:
            self._slow_consumer("write timed out")

    def check_heartbeat(self, now: float) -> None:
        """Queue a ``heartbeat`` frame if nothing has been sent for ``heartbeat_interval``
        (and nothing is being written); the manager's watchdog calls this, so an idle
        connection needs no task or cancel scope of its own for it."""
        interval = self._owner.config.heartbeat_interval
        if (
            interval is None or now - self._last_sent < interval
            or self._write_started is not None or self._close_code is not None
        ):
            return
        self._last_sent = now  # one heartbeat per interval, even while the writer is busy
        self.enqueue((HEARTBEAT_FRAME,))

    # ---- credentials ------------------------------------------------------------------------

    @property
    def expires_at(self) -> float | None:
        """When the connection's credentials expire, Unix seconds (None: never)."""
        return None if self._credentials is None else self._credentials.expires_at

    def _grant(self, credentials: Credentials) -> None:
        self._credentials = credentials
        self._expiry = plan_expiry(
            credentials.expires_at, credentials.grace,
            wall_now=time.time(), clock_now=trio.current_time(),
        )

    def check_expiry(self, now: float) -> None:
        """Close with 4001 once the credentials have expired (plus their grace), and send
        ``token_expiring`` once per token before that; the manager's watchdog calls this with
        trio's clock, so no connection needs a task or a cancel scope of its own for it."""
        expiry = self._expiry
        if now < expiry.warn_at and now < expiry.close_at:
            return
        credentials = self._credentials
        if credentials is None or self._close_code is not None:
            return
        if now >= expiry.close_at:
            self.close(CloseCode.TOKEN_EXPIRED, "token expired")
            return
        self._expiry = attrs.evolve(expiry, warn_at=float("inf"))
        self.enqueue((token_expiring_frame(credentials.expires_at),))

    async def _read_loop(self) -> None:
        config = self._owner.config
        while True:
            try:
                message = await self.transport.get_message()
            except ConnectionClosed as exc:
                self._peer_gone(exc)
                return
            admission = self._limiter.admit(trio.current_time())
            if admission is not Admission.ACCEPT:
                if admission is Admission.CLOSE:
                    self._owner.counters.rate_limit_disconnects += 1
                    self._owner.totals.rate_limit_disconnects += 1
                    # Drain: the refusals already queued are sent, and a busy writer is not
                    # cut mid-write (which would turn 4029 into an abort, 1006).
                    self.close(CloseCode.RATE_LIMITED, "rate limit exceeded", drain=True)
                    return
                self._refuse(ProtocolError("rate_limited", "too many frames; slow down"))
                continue
            try:
                frame = parse_client_frame(message, max_bytes=config.max_message_bytes)
            except ProtocolError as exc:
                self._refuse(exc)
                if exc.close_code is not None:
                    return
                continue
            await self._dispatch(frame)

    def _refuse(self, exc: ProtocolError) -> None:
        self._owner.counters.protocol_errors += 1
        self._owner.totals.protocol_errors += 1
        if exc.close_code is not None:
            self.close(exc.close_code, exc.message)
        else:
            self.enqueue((error_frame(exc.code, exc.message),))

    def _forbidden(self, thread_id: object) -> bool:
        """True (and an error frame queued) if this client may not use ``thread_id``."""
        allowed = self.allowed_threads
        if allowed is None or not isinstance(thread_id, str) or thread_id in allowed:
            return False
        self._refuse(ProtocolError(
            "forbidden_thread", f"this connection may not use thread {thread_id!r}"
        ))
        return True

    async def _dispatch(self, frame: ClientFrame) -> None:
        match frame:
            case Subscribe(thread_id=thread_id) if self._forbidden(thread_id):
                pass
            case CustomFrame(payload=payload) if self._forbidden(payload.get("thread_id")):
                pass
            case Subscribe():
                await self._subscribe(frame)
            case Unsubscribe(thread_id=thread_id):
                if self._subscriptions.remove(thread_id):
                    self._owner.index_unsubscribe(thread_id, self)
                self.enqueue((unsubscribed_frame(thread_id),))
            case CancelRun(run_id=run_id):
                if not self._owner.cancel_run(
                    run_id, "cancelled by client", threads=self.allowed_threads
                ):
                    self._refuse(
                        ProtocolError("unknown_run", f"no active run {run_id!r} of yours")
                    )
            case Ping(id=ping_id):
                try:
                    pong = pong_frame(ping_id)
                except TypeError:  # orjson.JSONEncodeError: an id it parsed but cannot encode
                    self._refuse(ProtocolError("bad_frame", UNENCODABLE_REPLY))
                else:
                    self.enqueue((pong,))
            case Refresh(token=token):
                await self._refresh(token)
            case CustomFrame():
                try:
                    await self._owner.handle_custom(self, frame)
                except ClientError as exc:
                    self._refuse(ProtocolError(exc.code, exc.message))
                except (InvalidIdentifier, InvalidEvent) as exc:
                    # The handler passed the client's bad id or data on: bad input, not a bug.
                    self._refuse(ProtocolError("invalid_field", str(exc)))
                except TooManyRuns as exc:
                    # The handler started a run past Config.max_active_runs_per_user.
                    self._refuse(ProtocolError("too_many_runs", str(exc)))

    async def _refresh(self, token: str) -> None:
        """Renew the credentials: same user, equal or narrower threads; the old expiry stands
        on any refusal (``bad_token``)."""
        current = self._credentials
        if current is None:
            self._refuse(ProtocolError(
                "bad_token", "this connection was not opened with a token, so it cannot refresh"
            ))
            return
        try:
            renewed = await current.refresh(token)
            if renewed.user_id != current.user_id:
                raise ClientError("bad_token", "the new token was issued to a different user")
            try:
                allowed = narrow_threads(self.allowed_threads, renewed.threads)
            except ValueError as exc:
                raise ClientError("bad_token", str(exc)) from None
        except ClientError as exc:
            self._refuse(ProtocolError("bad_token", exc.message))
            return
        if self._close_code is not None:
            return  # closed (e.g. expired) while the token was checked
        self._grant(renewed)
        self.allowed_threads = allowed
        if allowed is not None:
            for thread_id in [t for t in self._subscriptions if t not in allowed]:
                self._subscriptions.remove(thread_id)
                self._owner.index_unsubscribe(thread_id, self)
                self.enqueue((unsubscribed_frame(thread_id),))
        self.enqueue((refreshed_frame(renewed.expires_at),))

    async def _subscribe(self, request: Subscribe) -> None:
        """Ack, replay what was missed, then go live, with no gap and no duplicate.

        The thread is routed here before its replay is fetched; :class:`Subscriptions` holds
        its live events meanwhile and gives every subscribe its own ack, in the order they
        began, however their fetches finish (the server's own subscribe and a client's resume
        race on a token's threads).
        """
        thread_id = request.thread_id
        subscriptions = self._subscriptions
        limit = self._owner.config.max_subscriptions
        if thread_id not in subscriptions and len(subscriptions) >= limit:
            self._refuse(ProtocolError(
                "too_many_subscriptions", f"at most {limit} threads per connection"
            ))
            return
        ticket, new = subscriptions.begin(thread_id)
        if new:
            self._owner.index_subscribe(thread_id, self)
        try:
            recovery = await self._owner.recover(
                thread_id, request.since_seq, request.epoch, compact=request.compact
            )
        except BrokerUnavailable as exc:
            # Scale-out mode with Redis down: nothing to replay from; the client retries.
            self.close(CloseCode.SERVICE_RESTART, str(exc))
            return
        except TooManyThreads as exc:
            # The user's streams are all in use: nothing was created. No ack for this one;
            # a thread never acked here is unrouted again.
            release, forget = subscriptions.abandon(thread_id, ticket)
            if forget:
                self._owner.index_unsubscribe(thread_id, self)
            self._refuse(ProtocolError("too_many_threads", str(exc)))
            self._queue(release)
            return
        self._queue(subscriptions.complete(thread_id, ticket, recovery))

    def _queue(self, release: Iterable[Outgoing]) -> None:
        for item in release:
            self.enqueue(item)

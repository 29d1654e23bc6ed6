"""The trio shell of the Python client: one connection task, reconnecting by close code.

The decisions (what a close code, an event or an ack means) are :mod:`._policy`; this module
does the I/O. Task tree, all inside ``connect()``'s nursery::

    agentcast.client                   connect()'s nursery
     └── agentcast.client.run          connects, reconnects with backoff, until stopped
          ├── ...writer                writes queued frames (each within write_timeout)
          └── ...keepalive             pings; no pong within pong_timeout drops the socket

Each subscription has a bounded channel: a caller that stops iterating stops the reader, so
the server's queue fills and it closes the connection (4008); the client then resumes from the
last event it delivered. Nothing is lost and memory stays bounded.
"""

from __future__ import annotations

import logging
import math
import random
import ssl
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any, Final
from urllib.parse import urlsplit

import attrs
import orjson
import trio
from trio_websocket import (
    ConnectionClosed,
    ConnectionRejected,
    HandshakeError,
    WebSocketConnection,
    wrap_client_stream,
)

from .._errors import AgentcastError
from ._policy import (
    BACKOFF,
    Action,
    Backoff,
    EventDecision,
    ack_decision,
    backoff_delay,
    close_action,
    event_decision,
    handshake_action,
)

__all__ = ["Client", "ClientClosed", "Event", "Resync", "Subscription", "connect"]

log = logging.getLogger("agentcast.client")

#: Longest handshake (TCP connect included), seconds.
CONNECT_TIMEOUT: Final = 10.0
#: Longest single write, seconds; past it the socket is dropped and the client reconnects.
WRITE_TIMEOUT: Final = 5.0
#: Longest close handshake, seconds.
CLOSE_TIMEOUT: Final = 2.0
#: Seconds between WebSocket pings, and how long a pong may take.
PING_INTERVAL: Final = 20.0
PONG_TIMEOUT: Final = 10.0
#: Items (events, resyncs) buffered per subscription before the reader waits for the caller.
SUBSCRIPTION_BUFFER: Final = 1024
#: Frames ``send()`` may queue (also while reconnecting) before it waits.
OUTBOX_SIZE: Final = 64
#: Largest message accepted from the server (a batch, or one large event), bytes.
MAX_MESSAGE_BYTES: Final = 4 * 1024 * 1024
#: The code the client reports for a connection lost without a close frame.
ABNORMAL_CLOSURE: Final = 1006
#: The close code the client itself uses for ``drop()`` and a dead peer.
CLIENT_DROP: Final = 4000
#: How many close codes ``Client.close_codes`` keeps.
CLOSE_CODES_KEPT: Final = 64
#: The subprotocols (see docs/protocol.md, "Subprotocols").
BATCH_SUBPROTOCOL: Final = "agentcast.ndjson"
PLAIN_SUBPROTOCOL: Final = "agentcast.v1"
#: Terminal event types of a run.
TERMINAL: Final = frozenset({"agent_completed", "agent_error", "agent_cancelled"})

TokenSource = Callable[[], Awaitable[str]]


class ClientClosed(AgentcastError):
    """The client stopped for good: the server closed with a code that must not be retried
    (1000, 1003, 1007, 1009, 4003, 4001 without ``get_token``), or refused the handshake."""

    def __init__(self, code: int, reason: str) -> None:
        super().__init__(f"the connection closed with {code} ({reason or 'no reason'}); "
                         "see docs/protocol.md, 'Close codes', for what to fix")
        self.code = code
        self.reason = reason


@attrs.frozen
class Event:
    """One event of a thread, as the server sent it (docs/protocol.md, "Events")."""

    type: str
    thread_id: str
    run_id: str | None
    seq: int
    ts: float
    data: dict[str, Any]


@attrs.frozen
class Resync:
    """Events after ``last_seq`` were missed (``recovered: false``, e.g. a new epoch after a
    server restart): reload the thread from the application; events continue after ``seq``."""

    thread_id: str
    seq: int
    epoch: str
    last_seq: int | None


@attrs.define(eq=False)
class Subscription:
    """A thread's events, in seq order, each once; iterate with ``async for``.

    Yields :class:`Event` and :class:`Resync` items. Ends when the client closes or the
    subscription is unsubscribed; raises :class:`ClientClosed` when the client stopped for good.
    """

    thread_id: str
    _client: Client
    _send: trio.MemorySendChannel[Event | Resync] = attrs.field(repr=False)
    _receive: trio.MemoryReceiveChannel[Event | Resync] = attrs.field(repr=False)
    #: Seq of the last event delivered; None before the first ack.
    seq: int | None = None
    epoch: str | None = None
    #: Runs in progress: run id -> seq of its first event.
    active_runs: dict[str, int] = attrs.Factory(dict)
    _requested: int | None = None
    _rebuilding: bool = False
    #: The connection (its number) the last subscribe went out on.
    _sent_on: int = 0
    _awaiting_ack: bool = True

    def __aiter__(self) -> Subscription:
        return self

    async def __anext__(self) -> Event | Resync:
        # A plain iterator, not an async generator: nothing to finalise when a caller stops.
        try:
            return await self._receive.receive()
        except (trio.EndOfChannel, trio.ClosedResourceError):
            if self._client.closed_by is not None:
                raise self._client.closed_by from None
            raise StopAsyncIteration from None

    def unsubscribe(self) -> None:
        """Stop this thread's events (the iteration ends)."""
        self._client._unsubscribe(self)

    def _frame(self) -> dict[str, Any]:
        frame: dict[str, Any] = {"type": "subscribe", "thread_id": self.thread_id}
        if self.seq is not None and self.epoch is not None:
            frame["since_seq"] = self.seq
            frame["epoch"] = self.epoch
            self._requested = self.seq
        else:
            self._requested = None
        self._awaiting_ack = True
        return frame

    async def _ack(self, ack: dict[str, Any]) -> bool:
        """Apply an ack; True if the thread must be subscribed again (a rebuild)."""
        decision = ack_decision(self._requested, ack, rebuilding=self._rebuilding)
        self._rebuilding = decision.rebuild_from is not None
        last = self.seq
        self.seq, self.epoch, self._awaiting_ack = decision.seq, str(ack["epoch"]), False
        self.active_runs = {
            run["run_id"]: run["first_seq"] for run in ack.get("active_runs") or []
            if isinstance(run, dict) and isinstance(run.get("run_id"), str)
        }
        if decision.kind == "resync":
            await self._send.send(Resync(self.thread_id, int(ack["seq"]), self.epoch, last))
        return self._rebuilding

    async def _event(self, frame: dict[str, Any]) -> bool:
        """Deliver an event; True if a gap means the thread must be subscribed again."""
        if self._awaiting_ack or self.seq is None:
            return False
        raw = frame.get("data")
        data: dict[str, Any] = raw if isinstance(raw, dict) else {}
        decision = event_decision(self.seq, frame["seq"], data)
        if decision is EventDecision.DUPLICATE:
            self._client.duplicates += 1
            return False
        if decision is EventDecision.GAP:
            return True
        self.seq = frame["seq"]
        run_id = frame.get("run_id")
        if frame["type"] == "agent_started" and isinstance(run_id, str):
            self.active_runs[run_id] = frame["seq"]
        elif frame["type"] in TERMINAL:
            self.active_runs.pop(str(run_id), None)
        await self._send.send(Event(
            frame["type"], self.thread_id, run_id, frame["seq"], frame.get("ts", 0.0), data
        ))
        return False


@attrs.define(eq=False)
class Client:
    """A connection to an agentcast server that reconnects and resumes; from :func:`connect`."""

    url: str
    token: str | None = attrs.field(repr=False)
    batch: bool
    get_token: TokenSource | None
    backoff: Backoff
    connect_timeout: float
    write_timeout: float
    ping_interval: float
    pong_timeout: float
    _nursery: trio.Nursery
    _random: Callable[[], float] = random.random
    #: Open sockets so far (1 after the first connect), reconnect attempts, duplicates dropped.
    connections: int = 0
    reconnects: int = 0
    duplicates: int = 0
    #: The last close codes (HTTP status of refused handshakes), oldest first.
    close_codes: deque[int] = attrs.Factory(lambda: deque(maxlen=CLOSE_CODES_KEPT))
    #: Why the client stopped for good, if it did.
    closed_by: ClientClosed | None = None
    _subs: dict[str, Subscription] = attrs.Factory(dict)
    _ws: WebSocketConnection | None = None
    _dropping: bool = False
    _closed: bool = False
    #: Frames for the writer. Unbounded as a channel so the synchronous ``subscribe`` and
    #: ``unsubscribe`` can always queue theirs (one per call); ``send`` is bounded by
    #: ``_outbox_slots`` (OUTBOX_SIZE frames).
    _outbox: tuple[trio.MemorySendChannel[dict[str, Any]],
                   trio.MemoryReceiveChannel[dict[str, Any]]] = attrs.Factory(
        lambda: trio.open_memory_channel[dict[str, Any]](math.inf))
    _outbox_slots: trio.Semaphore = attrs.Factory(lambda: trio.Semaphore(OUTBOX_SIZE))

    # ---- public -----------------------------------------------------------------------------

    def subscribe(self, thread_id: str) -> Subscription:
        """Receive a thread's events from now on (iterate the result).

        Raises:
            ValueError: already subscribed to ``thread_id``.
            ClientClosed: the client has stopped.
        """
        self._check_open()
        if thread_id in self._subs:
            raise ValueError(f"already subscribed to {thread_id!r}; iterate that subscription")
        send, receive = trio.open_memory_channel[Event | Resync](SUBSCRIPTION_BUFFER)
        sub = Subscription(thread_id, self, send, receive)
        self._subs[thread_id] = sub
        self._outbox[0].send_nowait({"type": "_subscribe", "thread_id": thread_id})
        return sub

    async def send(self, frame: dict[str, Any]) -> None:
        """Queue ``frame`` for the server (sent on the next connection if disconnected); waits
        while ``OUTBOX_SIZE`` frames are queued. At most once: a frame being written as the
        connection drops is lost (subscriptions are not: they are resent on reconnect)."""
        self._check_open()
        await self._outbox_slots.acquire()
        self._outbox[0].send_nowait({"type": "_send", "frame": frame})

    async def cancel_run(self, run_id: str) -> None:
        """Ask the server to cancel a run; it ends with ``agent_cancelled``."""
        await self.send({"type": "cancel_run", "run_id": run_id})

    def drop(self) -> None:
        """Drop the socket as a network failure would; the client reconnects and resumes."""
        if self._ws is not None:
            self._dropping = True
            self._nursery.start_soon(self._close_ws, self._ws, CLIENT_DROP, "dropped by client")

    async def aclose(self) -> None:
        """Close for good; iterations end."""
        await trio.lowlevel.checkpoint()
        self._closed = True
        for sub in list(self._subs.values()):
            sub._send.close()
        self._nursery.cancel_scope.cancel()

    # ---- internals --------------------------------------------------------------------------

    def _check_open(self) -> None:
        if self.closed_by is not None:
            raise self.closed_by
        if self._closed:
            raise ClientClosed(1000, "the client was closed")

    def _unsubscribe(self, sub: Subscription) -> None:
        if self._subs.get(sub.thread_id) is sub:
            del self._subs[sub.thread_id]
            sub._send.close()
            self._outbox[0].send_nowait({"type": "unsubscribe", "thread_id": sub.thread_id})

    def _stop(self, code: int, reason: str) -> None:
        self.closed_by = ClientClosed(code, reason)
        for sub in self._subs.values():
            sub._send.close()

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Connect, serve, and reconnect by close code until stopped."""
        attempt = 0
        started: list[bool] = []

        def opened() -> None:
            if not started:
                started.append(True)
                task_status.started()

        while True:
            code, reason, refused, opened_for = await self._attempt(opened)
            self.close_codes.append(code if refused is None else refused)
            if refused is not None:
                action = handshake_action(refused, can_refresh=self.get_token is not None)
                code = refused
            elif self._dropping:
                self._dropping, action = False, Action.RESUME
            else:
                action = close_action(code, can_refresh=self.get_token is not None)
            if action is Action.STOP or not started:
                self._stop(code, reason)
                if not started:
                    raise self.closed_by or ClientClosed(code, reason)
                return
            if opened_for >= self.backoff.stable_after:
                attempt = 0
            delay = backoff_delay(attempt, action, self._random(), self.backoff)
            attempt += 1
            self.reconnects += 1
            log.info("agentcast client: closed with %d; reconnecting in %.2f s", code, delay)
            if action is Action.REFRESH and await self._refresh_token():
                delay = 0.0 if attempt == 1 else delay
            await trio.sleep(delay)  # the backoff itself

    async def _attempt(self, opened: Callable[[], None]) -> tuple[int, str, int | None, float]:
        """One connection from handshake to close: (close code, reason, HTTP status of a
        refused handshake or None, seconds it was open)."""
        code, reason, refused, opened_for = ABNORMAL_CLOSURE, "connection failed", None, 0.0
        stream: trio.SocketStream | trio.SSLStream[trio.SocketStream] | None = None
        try:
            # trio-websocket raises a refusal from its reader task: it comes out of the nursery.
            async with trio.open_nursery() as connection:
                try:
                    with trio.fail_after(self.connect_timeout):
                        stream = await self._open_stream()
                        host, resource = self._target()
                        ws = await wrap_client_stream(
                            connection, stream, host, resource,
                            subprotocols=self._subprotocols(), max_message_size=MAX_MESSAGE_BYTES,
                        )
                    opened()
                    since = trio.current_time()
                    code, reason = await self._serve(ws, connection)
                    opened_for = trio.current_time() - since
                finally:
                    # Ours, not the library's: a refused handshake would leave it open.
                    if stream is not None:
                        await trio.aclose_forcefully(stream)
                    connection.cancel_scope.cancel()
        except* ConnectionRejected as group:
            first = group.exceptions[0]
            assert isinstance(first, ConnectionRejected)
            refused, reason = first.status_code, f"handshake refused with HTTP {first.status_code}"
        except* (OSError, HandshakeError, trio.TooSlowError) as group:
            reason = f"connection failed: {group.exceptions[0]!r}"
        return code, reason, refused, opened_for

    async def _refresh_token(self) -> bool:
        """A new token from ``get_token`` within ``connect_timeout``; False if none came (the
        old token stays: the server then refuses or closes, and the policy decides again)."""
        if self.get_token is None:
            return False
        with trio.move_on_after(self.connect_timeout):
            self.token = await self.get_token()
            return True
        log.warning("agentcast client: get_token took over %.1f s", self.connect_timeout)
        return False

    def _target(self) -> tuple[str, str]:
        """The Host header and the resource (path and query) of the WebSocket endpoint."""
        parts = urlsplit(self.url)
        path = parts.path if parts.path not in ("", "/") else "/ws"
        return parts.netloc, f"{path}?{parts.query}" if parts.query else path

    async def _open_stream(self) -> trio.SocketStream | trio.SSLStream[trio.SocketStream]:
        parts = urlsplit(self.url)
        secure = parts.scheme in ("wss", "https")
        if parts.scheme not in ("ws", "wss", "http", "https") or not parts.hostname:
            raise ValueError(f"expected a ws://, wss://, http:// or https:// URL, got {self.url!r}")
        port = parts.port or (443 if secure else 80)
        stream = await trio.open_tcp_stream(parts.hostname, port)
        if not secure:
            return stream
        tls = trio.SSLStream(stream, ssl.create_default_context(), server_hostname=parts.hostname,
                             https_compatible=True)
        try:
            await tls.do_handshake()
        except BaseException:
            await trio.aclose_forcefully(stream)
            raise
        return tls

    def _subprotocols(self) -> list[str]:
        protocols = [BATCH_SUBPROTOCOL if self.batch else PLAIN_SUBPROTOCOL]
        if self.token:
            protocols.append(f"bearer.{self.token}")
        return protocols

    async def _serve(self, ws: WebSocketConnection, nursery: trio.Nursery) -> tuple[int, str]:
        """Resubscribe, then read until the socket closes; returns (code, reason)."""
        self._ws = ws
        self.connections += 1
        lost = trio.Event()
        try:
            for sub in list(self._subs.values()):
                sub._rebuilding, sub._sent_on = False, self.connections
                await self._write(ws, sub._frame())
            nursery.start_soon(self._writer, ws, lost, name="agentcast.client.writer")
            nursery.start_soon(self._keepalive, ws, lost, name="agentcast.client.keepalive")
            with trio.CancelScope() as reading:
                nursery.start_soon(self._cancel_on, lost, reading)
                while True:
                    message = await ws.get_message()
                    for line in str(message).split("\n"):
                        if line:
                            await self._frame(ws, orjson.loads(line))
            return ABNORMAL_CLOSURE, "dropped: a write timed out or no pong came"
        except ConnectionClosed as exc:
            closed = exc.reason
            if closed is None or closed.code is None:
                return ABNORMAL_CLOSURE, "closed without a code"
            return closed.code, closed.reason or ""
        except trio.TooSlowError:
            return ABNORMAL_CLOSURE, "a write timed out"
        finally:
            self._ws = None
            with trio.move_on_after(CLOSE_TIMEOUT) as cleanup:
                cleanup.shield = True
                await ws.aclose()

    async def _cancel_on(self, event: trio.Event, scope: trio.CancelScope) -> None:
        await event.wait()
        scope.cancel()

    async def _write(self, ws: WebSocketConnection, frame: dict[str, Any]) -> None:
        with trio.fail_after(self.write_timeout):
            await ws.send_message(orjson.dumps(frame).decode())

    async def _writer(self, ws: WebSocketConnection, lost: trio.Event) -> None:
        try:
            async for queued in self._outbox[1]:
                frame = queued
                if queued["type"] == "_send":
                    self._outbox_slots.release()
                    frame = queued["frame"]
                elif queued["type"] == "_subscribe":
                    sub = self._subs.get(queued["thread_id"])
                    if sub is None or sub._sent_on == self.connections:
                        continue  # gone, or subscribed by this connection's start already
                    sub._sent_on = self.connections
                    frame = sub._frame()
                await self._write(ws, frame)
        except (ConnectionClosed, trio.TooSlowError):
            lost.set()

    async def _keepalive(self, ws: WebSocketConnection, lost: trio.Event) -> None:
        try:
            while True:
                await trio.sleep(self.ping_interval)
                with trio.fail_after(self.pong_timeout):
                    await ws.ping()
        except (ConnectionClosed, trio.TooSlowError):
            lost.set()

    async def _close_ws(self, ws: WebSocketConnection, code: int, reason: str) -> None:
        with trio.move_on_after(CLOSE_TIMEOUT):
            await ws.aclose(code, reason)

    async def _resubscribe(self, ws: WebSocketConnection, sub: Subscription) -> None:
        await self._write(ws, sub._frame())

    async def _frame(self, ws: WebSocketConnection, frame: Any) -> None:
        if not isinstance(frame, dict):
            return
        kind = frame.get("type")
        if kind == "subscribed":
            sub = self._subs.get(str(frame.get("thread_id")))
            if sub is not None and await sub._ack(frame):
                await self._resubscribe(ws, sub)
        elif kind == "token_expiring":
            if await self._refresh_token() and self.token is not None:
                await self._write(ws, {"type": "refresh", "token": self.token})
        elif kind == "error":
            log.warning("agentcast client: error frame %s: %s",
                        frame.get("code"), frame.get("message"))
        elif kind in ("pong", "heartbeat", "unsubscribed", "refreshed"):
            pass
        elif isinstance(frame.get("thread_id"), str) and isinstance(frame.get("seq"), int):
            sub = self._subs.get(frame["thread_id"])
            if sub is not None and await sub._event(frame):
                await self._resubscribe(ws, sub)


@asynccontextmanager
async def connect(
    url: str,
    *,
    token: str | None,
    batch: bool = True,
    get_token: TokenSource | None = None,
    backoff: Backoff = BACKOFF,
    connect_timeout: float = CONNECT_TIMEOUT,
    write_timeout: float = WRITE_TIMEOUT,
    ping_interval: float = PING_INTERVAL,
    pong_timeout: float = PONG_TIMEOUT,
) -> AsyncIterator[Client]:
    """Connect to an agentcast server (``ws://host:port/ws``, or ``http://host:port``).

    Args:
        token: sent as the subprotocol ``bearer.<token>``.
        batch: offer ``agentcast.ndjson`` (batched messages) instead of ``agentcast.v1``.
        get_token: an async callable for a new token: on ``token_expiring`` (then sent as
            ``refresh``), after a 4001 close or an HTTP 401; without it those stop the client.
            Each call may take ``connect_timeout``; an exception it raises ends ``connect``.

    Returns once the first connection is open; reconnects (with jittered exponential backoff)
    and resumes every subscription until the block ends.

    Raises:
        ClientClosed: the first connection failed or was refused.
    """
    try:
        async with trio.open_nursery() as nursery:
            client = Client(
                url, token, batch, get_token, backoff, connect_timeout, write_timeout,
                ping_interval, pong_timeout, nursery,
            )
            await nursery.start(client.run, name="agentcast.client.run")
            try:
                yield client
            finally:
                await client.aclose()
    except BaseExceptionGroup as group:
        # One failure (the caller's own, or ClientClosed) is raised as itself, as
        # trio-websocket's open_websocket does; several stay a group.
        if len(group.exceptions) == 1:
            raise group.exceptions[0] from group
        raise

"""``threaded()``: agentcast for asyncio ASGI servers (uvicorn), in its own trio thread.

The manager runs under ``trio.run`` in a thread started by the lifespan. Each WebSocket is
served by two halves joined by a :class:`_Link`: the asyncio half (the ASGI request task) reads
``receive`` and writes ``send``; the trio half is an ordinary agentcast connection over a
:class:`_BridgeTransport`. Frames hop between the loops with the loops' thread-safe calls only
(``loop.call_soon_threadsafe``, ``TrioToken.run_sync_soon``), never a blocking thread.

Both directions are bounded by a window of :data:`BRIDGE_WINDOW` messages: the trio writer
waits (cancellably, so agentcast's write deadline applies) for the asyncio side to have sent,
and the asyncio reader waits for agentcast to have read.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import logging
import threading
from collections.abc import Awaitable, Callable, Collection, Sequence
from types import TracebackType
from typing import Any, Final, TypeVar, final, overload

import attrs
import sniffio
import trio
from trio_websocket import CloseReason, ConnectionClosed

from .._config import Config
from .._context import UserContext
from .._credentials import Credentials
from .._errors import ManagerNotRunning, SessionClosed, TooManyConnections
from .._manager import ConnectionManager, open_manager
from .._session import MessageHandler
from ..backplane.protocol import Broker
from ..protocols import batch_for, wrap_transport
from ._endpoint import (
    AsyncioNotSupported,
    Authenticate,
    Scope,
    authenticate_or_refuse,
    refuse,
)
from ._policy import STATE_KEY, choose_subprotocol, disconnect_reason
from ._transport import ASGIReceive, ASGISend

__all__ = ["ThreadedManager", "threaded"]

log = logging.getLogger("agentcast.asgi")

T = TypeVar("T")

#: Messages in flight per direction between the asyncio and the trio half of one connection.
BRIDGE_WINDOW: Final = 16
#: Seconds the trio thread may take to open the manager (and its broker) at start-up.
START_TIMEOUT: Final = 30.0
#: Close code the trio half sees when the asyncio half ended without a disconnect event.
ABNORMAL_CLOSURE: Final = 1006
#: Close code when the asyncio request task was cancelled (server shutdown).
GOING_AWAY: Final = 1001


@attrs.frozen
class _Close:
    code: int
    reason: str | None


#: The trio half ended without a close frame (abort): the asyncio half just returns.
_ABORT: Final = "abort"


@final
@attrs.define(eq=False)
class _Link:
    """The two halves of one bridged connection and the queues between them."""

    loop: asyncio.AbstractEventLoop
    token: trio.lowlevel.TrioToken
    #: trio -> asyncio: messages, then a _Close or _ABORT.
    outbox: asyncio.Queue[str | bytes | _Close] = attrs.Factory(asyncio.Queue)
    #: asyncio reader's window: released by the trio half after each get_message.
    read_window: asyncio.Semaphore = attrs.Factory(lambda: asyncio.Semaphore(BRIDGE_WINDOW))
    #: Set when the trio half aborted (a write cut by the deadline): cancel the asyncio write.
    aborted: asyncio.Event = attrs.Factory(asyncio.Event)
    #: The trio half's verdict on admission: None (accepted) or (status, reason).
    admitted: asyncio.Future[tuple[int, str] | None] = attrs.field(init=False)
    transport: _BridgeTransport = attrs.field(init=False)

    def __attrs_post_init__(self) -> None:
        self.admitted = self.loop.create_future()

    # -- called from the trio thread ---------------------------------------------------------

    def to_asyncio(self, fn: Callable[..., object], *args: Any) -> bool:
        """Run ``fn(*args)`` on the asyncio loop; False if the loop has closed."""
        try:
            self.loop.call_soon_threadsafe(fn, *args)
        except RuntimeError:
            return False
        return True

    def admit(self, verdict: tuple[int, str] | None) -> None:
        def settle() -> None:
            if not self.admitted.done():
                self.admitted.set_result(verdict)

        self.to_asyncio(settle)

    # -- called from the asyncio loop --------------------------------------------------------

    def to_trio(self, fn: Callable[..., object], *args: Any) -> bool:
        """Run ``fn(*args)`` in the trio thread; False if trio has stopped."""
        try:
            self.token.run_sync_soon(fn, *args)
        except trio.RunFinishedError:
            return False
        return True


@final
@attrs.define(eq=False)
class _BridgeTransport:
    """The trio half: agentcast's Transport surface over a :class:`_Link`."""

    link: _Link
    subprotocol: str | None
    closed: CloseReason | None = None
    _write_window: trio.Semaphore = attrs.Factory(lambda: trio.Semaphore(BRIDGE_WINDOW))
    _inbox: tuple[trio.MemorySendChannel[str | bytes | _Close],
                  trio.MemoryReceiveChannel[str | bytes | _Close]] = attrs.Factory(
        lambda: trio.open_memory_channel[str | bytes | _Close](BRIDGE_WINDOW + 1)
    )

    def sent(self) -> None:
        """The asyncio half has written one message (runs in the trio thread)."""
        self._write_window.release()

    def deliver(self, item: str | bytes | _Close) -> None:
        """A message or the disconnect from the asyncio half (runs in the trio thread)."""
        try:
            self._inbox[0].send_nowait(item)
        except (trio.WouldBlock, trio.ClosedResourceError, trio.BrokenResourceError):
            if isinstance(item, _Close) and self.closed is None:
                self.closed = CloseReason(item.code, item.reason)

    async def send_message(self, message: str | bytes) -> None:
        if self.closed is not None:
            raise ConnectionClosed(self.closed)
        await self._write_window.acquire()
        if self.closed is not None:
            raise ConnectionClosed(self.closed)
        if not self.link.to_asyncio(self.link.outbox.put_nowait, message):
            self.closed = CloseReason(ABNORMAL_CLOSURE, "the asyncio loop has stopped")
            raise ConnectionClosed(self.closed)

    async def get_message(self) -> str | bytes:
        if self.closed is not None:
            raise ConnectionClosed(self.closed)
        item = await self._inbox[1].receive()
        if isinstance(item, _Close):
            if self.closed is None:
                self.closed = CloseReason(item.code, item.reason)
            raise ConnectionClosed(self.closed)
        self.link.to_asyncio(self.link.read_window.release)
        return item

    async def aclose(self, code: int = 1000, reason: str | None = None) -> None:
        if self.closed is not None:
            return
        self.closed = CloseReason(code, reason)
        try:
            await trio.lowlevel.checkpoint_if_cancelled()
        except trio.Cancelled:
            self.link.to_asyncio(self.link.aborted.set)
            raise
        self.link.to_asyncio(self.link.outbox.put_nowait, _Close(code, reason))


@final
class ThreadedManager:
    """The threaded bridge, made by :func:`threaded`: a lifespan for asyncio ASGI apps that runs
    the manager in its own trio thread, and the handle asyncio code uses to reach it."""

    def __init__(
        self, config: Config | None, broker: Broker | None, message_handler: MessageHandler | None
    ) -> None:
        self._config = Config() if config is None else config
        self._broker = broker
        self._message_handler = message_handler
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._token: trio.lowlevel.TrioToken | None = None
        self._manager: ConnectionManager | None = None
        self._nursery: trio.Nursery | None = None
        self._stop: trio.Event | None = None
        self._ready: asyncio.Future[None] | None = None

    def __repr__(self) -> str:
        return f"<agentcast.asgi.ThreadedManager {'running' if self._manager else 'stopped'}>"

    @property
    def manager(self) -> ConnectionManager:
        """The manager; touch it only from the trio thread (through :meth:`call`)."""
        if self._manager is None:
            raise ManagerNotRunning("the agentcast thread is not running; use it as lifespan=")
        return self._manager

    def __call__(self, app: object) -> ThreadedManager:
        """Starlette's and FastAPI's ``lifespan(app)`` protocol."""
        return self

    async def __aenter__(self) -> dict[str, Any]:
        if sniffio.current_async_library() != "asyncio":
            raise AsyncioNotSupported(
                "agentcast.asgi.threaded() is for asyncio servers; under a trio server use "
                "agentcast.asgi.lifespan()"
            )
        if self._thread is not None:
            raise RuntimeError("this agentcast bridge is already running; make one per app")
        self._loop = asyncio.get_running_loop()
        self._ready = self._loop.create_future()
        self._thread = threading.Thread(
            target=self._thread_main, name="agentcast-trio", daemon=True
        )
        self._thread.start()
        try:
            async with asyncio.timeout(START_TIMEOUT):
                await self._ready
        except BaseException:
            await self._stop_thread()
            raise
        return {STATE_KEY: self}

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self._stop_thread()

    async def _stop_thread(self) -> None:
        thread, self._thread = self._thread, None
        if thread is None:
            return
        token, stop = self._token, self._stop
        if token is not None and stop is not None:
            with contextlib.suppress(trio.RunFinishedError):  # trio has stopped already
                token.run_sync_soon(stop.set)
        # Bounded: the manager's own shutdown is bounded by shutdown_timeout.
        await asyncio.to_thread(thread.join, self._config.shutdown_timeout + START_TIMEOUT)

    def _thread_main(self) -> None:
        try:
            trio.run(self._trio_main)
        except BaseException as exc:  # reported to the lifespan, which raises it
            log.exception("the agentcast trio thread failed")
            self._settle_ready(exc)
        self._settle_ready(ManagerNotRunning("the agentcast trio thread has stopped"))

    def _settle_ready(self, exc: BaseException | None) -> None:
        ready, loop = self._ready, self._loop
        if ready is None or loop is None:
            return

        def settle() -> None:
            if not ready.done():
                if exc is None:
                    ready.set_result(None)
                else:
                    ready.set_exception(exc)

        with contextlib.suppress(RuntimeError):  # the loop has closed: nobody waits any more
            loop.call_soon_threadsafe(settle)

    async def _trio_main(self) -> None:
        async with open_manager(
            self._config, broker=self._broker, message_handler=self._message_handler
        ) as manager:
            try:
                async with trio.open_nursery() as nursery:
                    self._stop = trio.Event()
                    self._manager, self._nursery = manager, nursery
                    self._token = trio.lowlevel.current_trio_token()
                    self._settle_ready(None)
                    await self._stop.wait()
                    # Connections first (1001, bounded by close_timeout), then the manager's
                    # shutdown cancels runs: their terminal events go to history.
                    nursery.cancel_scope.cancel()
            finally:
                self._manager = self._nursery = None

    def _running(self) -> tuple[asyncio.AbstractEventLoop, trio.lowlevel.TrioToken, trio.Nursery]:
        if self._loop is None or self._token is None or self._nursery is None:
            raise ManagerNotRunning("the agentcast thread is not running; use it as lifespan=")
        return self._loop, self._token, self._nursery

    @overload
    async def call(self, fn: Callable[..., Awaitable[T]], *args: Any) -> T: ...

    @overload
    async def call(self, fn: Callable[..., T], *args: Any) -> T: ...

    async def call(self, fn: Callable[..., Any], *args: Any) -> Any:
        """Run ``fn(manager, *args)`` (sync or async) in the trio thread; return its result.

        This is how asyncio code reaches the manager: e.g. ``await bridge.call(start, ctx)``
        with ``def start(manager, ctx): return manager.get_websocket_manager(ctx).start_run(...)``.
        Cancelling the caller does not cancel ``fn``.
        """
        loop, token, nursery = self._running()
        future: asyncio.Future[Any] = loop.create_future()

        def settle(ok: bool, value: Any) -> None:
            if not future.done():
                if ok:
                    future.set_result(value)
                else:
                    future.set_exception(value)

        async def run() -> None:
            try:
                value = fn(self.manager, *args)
                if inspect.isawaitable(value):
                    value = await value
            except Exception as exc:  # noqa: BLE001 - handed to the asyncio caller, which raises it
                loop.call_soon_threadsafe(settle, False, exc)
            else:
                loop.call_soon_threadsafe(settle, True, value)

        try:
            token.run_sync_soon(nursery.start_soon, run)
        except trio.RunFinishedError:
            raise ManagerNotRunning("the agentcast thread has stopped") from None
        return await future

    # ---- one WebSocket ----------------------------------------------------------------------

    async def serve_asgi(
        self, scope: Scope, receive: ASGIReceive, send: ASGISend, *,
        authenticate: Authenticate | None, user_context: UserContext | None,
        connected: bool, threads: Sequence[str], allowed_threads: Collection[str] | None,
        credentials: Credentials | None, handshake_timeout: float,
    ) -> None:
        """Serve one WebSocket: the asyncio half here, the agentcast connection in trio."""
        loop, token, nursery = self._running()
        link = _Link(loop, token)
        subprotocol = choose_subprotocol(scope.get("subprotocols") or ())
        link.transport = _BridgeTransport(link, subprotocol)
        # However this task ends (refused, timed out, cancelled by the server's shutdown, or
        # done), the trio half learns of it; after a close it ignores this.
        ending = _Close(GOING_AWAY, "server shutting down")
        try:
            try:
                async with asyncio.timeout(handshake_timeout):
                    if not await self._admit(
                        link, nursery, scope, receive, send, authenticate=authenticate,
                        user_context=user_context, connected=connected, threads=threads,
                        allowed_threads=allowed_threads, credentials=credentials,
                    ):
                        return
            except TimeoutError:
                ending = _Close(ABNORMAL_CLOSURE, "handshake timeout")
                return
            async with asyncio.TaskGroup() as tasks:
                reader = tasks.create_task(self._read(link, receive), name="agentcast.read")
                writer = tasks.create_task(self._write(link, send), name="agentcast.write")
                aborted = tasks.create_task(link.aborted.wait(), name="agentcast.aborted")
                # An abort (a write cut by write_timeout) cancels the write in progress too.
                await asyncio.wait({writer, aborted}, return_when=asyncio.FIRST_COMPLETED)
                for task in (reader, writer, aborted):
                    task.cancel()
        finally:
            link.to_trio(link.transport.deliver, ending)

    async def _admit(
        self, link: _Link, nursery: trio.Nursery, scope: Scope, receive: ASGIReceive,
        send: ASGISend, *, authenticate: Authenticate | None, user_context: UserContext | None,
        connected: bool, threads: Sequence[str], allowed_threads: Collection[str] | None,
        credentials: Credentials | None,
    ) -> bool:
        """The handshake: connect, authenticate, the trio half's slot, accept. True if accepted."""
        if not connected:
            event = await receive()
            if event.get("type") != "websocket.connect":
                return False
        if authenticate is not None:
            user_context = await authenticate_or_refuse(authenticate, scope, send)
        if user_context is None:
            return False
        if not link.to_trio(
            nursery.start_soon, self._serve_trio, link, user_context,
            tuple(threads), allowed_threads, credentials,
        ):
            await refuse(scope, send, 503, "the agentcast thread has stopped")
            return False
        verdict = await link.admitted
        if verdict is not None:
            await refuse(scope, send, *verdict)
            return False
        await send({"type": "websocket.accept", "subprotocol": link.transport.subprotocol})
        return True

    async def _read(self, link: _Link, receive: ASGIReceive) -> None:
        transport = link.transport
        while True:
            event = await receive()
            kind = event.get("type")
            if kind == "websocket.receive":
                await link.read_window.acquire()
                text = event.get("text")
                data = text if text is not None else bytes(event.get("bytes") or b"")
                link.to_trio(transport.deliver, data)
            elif kind == "websocket.disconnect":
                link.to_trio(transport.deliver, _Close(*disconnect_reason(event)))
                return

    async def _write(self, link: _Link, send: ASGISend) -> None:
        transport = link.transport
        while True:
            item = await link.outbox.get()
            try:
                if isinstance(item, _Close):
                    close: dict[str, Any] = {"type": "websocket.close", "code": item.code}
                    if item.reason:
                        close["reason"] = item.reason
                    await send(close)
                    return
                if item == _ABORT:
                    return
                key = "text" if isinstance(item, str) else "bytes"
                await send({"type": "websocket.send", key: item})
            except Exception as exc:  # noqa: BLE001 - the server's send failed: the peer is gone
                log.debug("ASGI send failed: %r", exc)
                link.to_trio(transport.deliver, _Close(ABNORMAL_CLOSURE, "send failed"))
                return
            link.to_trio(transport.sent)

    async def _serve_trio(
        self, link: _Link, user_context: UserContext, threads: tuple[str, ...],
        allowed_threads: Collection[str] | None, credentials: Credentials | None,
    ) -> None:
        """The trio half: admit (slot), then serve the connection until it closes."""
        manager = self.manager
        try:
            session = manager.get_websocket_manager(user_context)
            slot = session.reserve_connection()
        except TooManyConnections as exc:
            link.admit((429, str(exc)))
            return
        except (ManagerNotRunning, SessionClosed) as exc:
            link.admit((503, str(exc)))
            return
        try:
            link.admit(None)
            # agentcast.agui / agentcast.vercel-ai: translated at the edge, as standalone.
            subprotocol = link.transport.subprotocol
            connection = await session.add_connection(
                wrap_transport(link.transport, subprotocol), threads=threads,
                allowed_threads=allowed_threads, slot=slot, credentials=credentials,
                batch=batch_for(subprotocol),
            )
            await session.hold_connection(connection)
        finally:
            slot.release()
            # However the trio half ended, let the asyncio half return.
            link.to_asyncio(link.outbox.put_nowait, _ABORT)


def threaded(
    config: Config | None = None,
    *,
    broker: Broker | None = None,
    message_handler: MessageHandler | None = None,
) -> ThreadedManager:
    """The opt-in bridge for asyncio ASGI servers (uvicorn, hypercorn's asyncio worker).

    Use it where you would use :func:`agentcast.asgi.lifespan`: ``FastAPI(lifespan=bridge)``.
    ``endpoint()`` and ``serve_websocket()`` then hand each WebSocket to it; asyncio code
    reaches the manager with ``await bridge.call(fn, *args)``. With several workers, give each
    a :class:`agentcast.RedisBroker` so events reach a client on any worker.
    """
    return ThreadedManager(config, broker, message_handler)

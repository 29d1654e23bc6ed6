"""The standalone server's own WebSocket connection: wsproto's frames, written through.

``agentcast serve`` speaks WebSocket itself instead of through trio-websocket (issue 12): an
idle trio-websocket connection costs a reader task of its own, a one-message channel, a send
lock and its retained h11 handshake, and every send three scheduler steps. A
:class:`ServerWebSocket` is one object over the client's socket, with no task of its own:

* **reading** happens in the task that calls :meth:`~ServerWebSocket.get_message` (the
  connection's reader): bytes come through the frame guard (``_inbound.InboundGuard``: frame
  rules, fragments 1008, control-frame floods 4029, byte and frame rates by reading later) and
  go to the pure ``_wsstate.ServerProtocol`` (wsproto), which says what to deliver, what to
  answer (pongs, the close reply, 1002/1007/1009) and when it is over;
* **sending** is write-through: a frame (the pure ``agentcast._wsframe`` encoder) is
  written to the non-blocking socket in the step that asked, with no yield: the writer's
  :meth:`~ServerWebSocket.send_message`, or the producer's step through
  :meth:`~ServerWebSocket.send_nowait` (``_transport.WritesThrough``: the connection writes a
  live event there when its writer is idle and nothing is queued). Only a
  socket that would block makes the caller wait: the rest goes into a backlog that one task
  at a time writes as the socket drains, and every frame after it queues behind it, so frames
  never interleave. The connection's write watchdog (``Connection.check_write``) bounds that
  wait for the writer; the reader's replies are bounded by ``write_timeout`` here;
* **closing**: :meth:`~ServerWebSocket.aclose` sends the close frame and reads (through the
  guard) until the client's reply, the caller bounding it (``close_transport``); entered
  already cancelled (``abort_transport``) it writes nothing. Every way a connection ends closes
  the socket, so nothing else has to hold it: the server's handler task ends after the
  handshake;
* **keepalive**: ``_keepalive.Keepalive`` writes pings with :meth:`~ServerWebSocket.send_ping`
  and is told of pongs by the reader (``watch.pong``).

It satisfies :class:`agentcast._transport.Transport` and raises
``trio_websocket.ConnectionClosed`` like every transport (the embedding path and the clients
stay on trio-websocket).
"""

from __future__ import annotations

import collections
import socket
from typing import final

import trio
from trio_websocket import CloseReason, ConnectionClosed

from .._transport import Written
from .._wsframe import data_frame
from ._inbound import READ_CHUNK, InboundGuard
from ._keepalive import Keepalive, Watch
from ._wsstate import Closed, ServerProtocol, accept_response

__all__ = ["ServerWebSocket", "take_over"]


def take_over(stream: trio.abc.Stream) -> socket.socket:
    """``stream``'s socket as a plain non-blocking socket of our own, leaving ``stream`` holding
    nothing.

    trio's ``serve_listeners`` closes the stream it handed a handler when the handler returns;
    a WebSocket outlives its handler task, so it moves the descriptor to a socket object of its
    own (closing the listener's stream then closes nothing). A stdlib socket, not a trio
    ``SocketStream``: the WebSocket reads, writes and waits on it itself, so an idle connection
    holds neither the stream's objects nor their suspended frames (~1.5 KB).

    Raises:
        TypeError: ``stream`` is not a plain TCP stream (the server listens on TCP only).
    """
    if not isinstance(stream, trio.SocketStream):
        raise TypeError(
            f"the server's WebSocket needs a trio.SocketStream, got {type(stream).__name__}"
        )
    old = stream.socket
    own = socket.socket(old.family, old.type, old.proto, fileno=old.detach())
    own.setblocking(False)
    return own


def _reason(closed: Closed) -> CloseReason:
    return CloseReason(closed.code, closed.reason)


@final
class ServerWebSocket:
    """One accepted client WebSocket of the standalone server (see the module)."""

    __slots__ = (
        "_backlog", "_flushing", "_guard", "_inbox", "_protocol", "_sock", "_unread",
        "_write_timeout", "subprotocol", "waited_writes", "watch", "written_through",
    )

    def __init__(
        self, sock: socket.socket, guard: InboundGuard, *, subprotocol: str | None,
        max_message_bytes: int, write_timeout: float, unread: bytes = b"",
    ) -> None:
        #: The negotiated subprotocol (decides batching and translation).
        self.subprotocol = subprotocol
        #: The keepalive's entry (set by ``Keepalive.watch``), dropped when the socket closes.
        self.watch: Watch | None = None
        #: Data messages written in the step that asked (for tests and diagnostics).
        self.written_through = 0
        #: Frames that waited for the socket to drain.
        self.waited_writes = 0
        #: The client's non-blocking socket (see :func:`take_over`).
        self._sock = sock
        self._guard = guard
        self._protocol = ServerProtocol(max_message_bytes)
        self._write_timeout = write_timeout
        #: Client bytes read with the request head, handled before the socket is read.
        self._unread = unread
        #: Messages of the last read not yet taken (None: none, the usual case).
        self._inbox: collections.deque[str | bytes] | None = None
        #: Bytes accepted for sending that the socket has not taken yet, in order.
        self._backlog: bytearray | None = None
        #: Set when the task writing the backlog stops (None: nobody is writing it).
        self._flushing: trio.Event | None = None

    @classmethod
    async def accept(
        cls, sock: socket.socket, guard: InboundGuard, key: str, *,
        subprotocol: str | None, max_message_bytes: int, write_timeout: float,
        unread: bytes = b"",
    ) -> ServerWebSocket:
        """Answer the handshake with ``101`` and return the open connection; the caller
        bounds the time (a cut answer leaves the socket to the caller to close).

        Raises:
            ConnectionClosed: the client left during the handshake.
        """
        ws = cls(
            sock, guard, subprotocol=subprotocol, max_message_bytes=max_message_bytes,
            write_timeout=write_timeout, unread=unread,
        )
        if not ws._write(accept_response(key, subprotocol)):
            await ws._drain()
        return ws

    @property
    def guard(self) -> InboundGuard:
        """The frame guard every read goes through (its ``on_violation`` closes the
        connection)."""
        return self._guard

    @property
    def closed(self) -> bool:
        """True once the socket is closed."""
        return self._sock.fileno() < 0

    def statistics(self) -> tuple[int, int]:
        """(messages written through, frames that waited for the socket), for diagnostics."""
        return self.written_through, self.waited_writes

    # ---- reading ----------------------------------------------------------------------------

    async def get_message(self) -> str | bytes:
        """The next message; answers pings and the close handshake on the way.

        Raises:
            ConnectionClosed: the connection is closed or closing (with the close code).
        """
        protocol = self._protocol
        while True:
            inbox = self._inbox
            if inbox:
                message = inbox.popleft()
                if not inbox:
                    self._inbox = None  # an empty deque still holds a 64-slot block
                return message
            if protocol.closed is not None:
                raise ConnectionClosed(_reason(protocol.closed))
            if self._unread:
                data, self._unread = self._unread, b""
            else:
                data = await self._read()
            if not data:
                self._lost()
                continue
            received = protocol.receive(data)
            if received.pongs and self.watch is not None:
                for payload in received.pongs:
                    self.watch.pong(payload)
            if received.messages:
                if inbox is None:
                    inbox = self._inbox = collections.deque()
                inbox.extend(received.messages)
            if received.reply:
                await self._reply(received.reply)
            if received.closed is not None:
                self._close_socket()

    async def _reply(self, data: bytes) -> None:
        """Write a pong or close frame, waiting at most ``write_timeout`` behind a full socket
        (then the connection is dropped: part of a frame may have gone)."""
        if self._write(data):
            return
        with trio.move_on_after(self._write_timeout):
            await self._drain()
            return
        self._lost()

    # ---- sending ----------------------------------------------------------------------------

    async def send_message(self, message: str | bytes) -> None:
        """Send one message, in this step when the socket can take it (see the module).

        Completes without a checkpoint when it writes through, like a ``send_nowait``: the
        caller (the connection's writer) yields when it waits for its next message.

        Raises:
            ConnectionClosed: the connection is closed or closing, or the peer is gone.
        """
        closed = self._protocol.closed
        if closed is not None:
            raise ConnectionClosed(_reason(closed))
        if self._write(data_frame(message)):
            self.written_through += 1
            return
        self.waited_writes += 1
        await self._drain()

    def send_nowait(self, message: str | bytes) -> Written:
        """Write ``message`` in this step if nothing is waiting to be written and the socket
        takes at least part of it (``_transport.WritesThrough``).

        ``Written.PART`` leaves the rest first in the backlog: :meth:`finish_send` writes it,
        and every frame after it (a pong, a ping, a close) waits behind it. Never raises:
        closing, closed or broken answers ``Written.NONE`` (``send_message`` reports it).
        """
        if self._protocol.closed is not None or self._backlog:
            return Written.NONE
        data = data_frame(message)
        try:
            sent = self._sock.send(data)
        except OSError:  # would block (BlockingIOError), or broken: the queued path decides
            return Written.NONE
        if sent == len(data):
            self.written_through += 1
            return Written.ALL
        self.waited_writes += 1
        self._backlog = bytearray(memoryview(data)[sent:])
        return Written.PART

    async def finish_send(self) -> None:
        """Write the rest of what :meth:`send_nowait` wrote part of (at once if nothing is
        left). Raises ConnectionClosed if the socket closed first."""
        await self._drain()

    def send_ping(self, payload: bytes) -> bool:
        """Write a ping frame now (for the keepalive); True if it waits for a flush nobody
        runs. Raises ConnectionClosed once closing."""
        frame = self._protocol.ping(payload)
        if frame is None:
            raise ConnectionClosed(_reason(self._protocol.closed or Closed(1000)))
        return not self._write(frame) and self._flushing is None

    async def flush(self) -> None:
        """Wait until everything accepted for sending has been written."""
        await self._drain()

    def _write(self, data: bytes) -> bool:
        """Write ``data`` now unless bytes wait before it; True if the socket took it all.

        Otherwise what is left waits in the backlog, in order, and the caller must
        :meth:`_drain` (or know that a task is draining it).

        Raises:
            ConnectionClosed: the socket is closed or broken (it is closed then).
        """
        backlog = self._backlog
        if backlog:
            backlog += data
            return False
        try:
            sent = self._sock.send(data)
        except BlockingIOError:
            sent = 0
        except OSError:
            # Reset, broken, or closed (fileno -1): never written to a reused descriptor.
            raise ConnectionClosed(_reason(self._lost())) from None
        if sent == len(data):
            return True
        self._backlog = bytearray(memoryview(data)[sent:])
        return False

    async def _drain(self) -> None:
        """Wait until the backlog is written: one task writes it as the socket drains, the
        others wait for it (a cancelled writer leaves the rest to the next).

        Raises:
            ConnectionClosed: the socket closed before everything was written.
        """
        while self._backlog:
            flushing = self._flushing
            if flushing is not None:
                await flushing.wait()
                continue
            self._flushing = done = trio.Event()
            try:
                await self._write_backlog()
            finally:
                self._flushing = None
                done.set()
        if self.closed:
            raise ConnectionClosed(_reason(self._lost()))

    async def _write_backlog(self) -> None:
        sock = self._sock
        while self._backlog:
            try:
                await trio.lowlevel.wait_writable(sock)
            except trio.ClosedResourceError:
                return  # closed meanwhile: _drain raises
            backlog = self._backlog
            if backlog is None:
                return
            try:
                sent = sock.send(backlog)
            except BlockingIOError:
                continue
            except OSError:
                raise ConnectionClosed(_reason(self._lost())) from None
            del backlog[:sent]

    # ---- closing ----------------------------------------------------------------------------

    async def aclose(self, code: int = 1000, reason: str | None = None) -> None:
        """The close handshake: send the close frame, read until the client's reply or the
        caller's deadline, close the socket. Entered cancelled (an abort after a cut write) it
        writes nothing; the socket is closed however it ends."""
        try:
            await trio.lowlevel.checkpoint_if_cancelled()
            frame = self._protocol.close(code, reason)
            if frame:
                if not self._write(frame):
                    await self._drain()
                await self._wait_close_reply()
        except ConnectionClosed:
            pass  # the peer went away first: nothing to wait for
        finally:
            self._close_socket()

    async def _wait_close_reply(self) -> None:
        """Read until the client's close frame or the end of its stream (messages and pings
        that come first are dropped)."""
        while True:
            data = await self._read()
            if not data or self._protocol.receive(data).closed is not None:
                return

    async def _read(self) -> bytes:
        """The next client bytes the guard passes on; b"" once the stream ended or broke.

        One read per call, after the guard's wait (rates; for ever after a broken rule). A
        read that found data without waiting yields once, so a flooding client cannot keep
        its reader from letting others run.
        """
        guard, sock = self._guard, self._sock
        waited = False
        while True:
            size = await guard.wait_to_read(READ_CHUNK)
            try:
                data = sock.recv(size)
            except BlockingIOError:
                try:
                    await trio.lowlevel.wait_readable(sock)
                except trio.ClosedResourceError:
                    return b""
                waited = True
                continue
            except OSError:
                return b""  # reset, or closed
            if not data:
                return b""
            passed = guard.scan(data)
            if not passed:
                continue  # part of a frame header, or a broken rule: the wait above decides
            if not waited:
                await trio.lowlevel.checkpoint()
            return passed

    def _lost(self) -> Closed:
        """The connection ended without a (complete) close handshake: close the socket."""
        closed = self._protocol.lost()
        self._close_socket()
        return closed

    def _close_socket(self) -> None:
        """Close the socket (idempotent): waiting readers and writers wake with an error, the
        backlog is dropped, the keepalive forgets the connection."""
        self._protocol.lost()
        self._backlog = None
        watch, self.watch = self.watch, None
        if watch is not None:
            Keepalive.unwatch(watch)
        sock = self._sock
        if sock.fileno() >= 0:
            trio.lowlevel.notify_closing(sock)  # a task waiting on it wakes with an error
            sock.close()

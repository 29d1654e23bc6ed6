"""The standalone server's Transport: a trio-websocket connection whose sends write through.

trio-websocket's ``send_message`` costs three scheduler steps per message even when the socket
could take the bytes at once: the writer wakes, the connection's ``StrictFIFOLock`` yields on a
free lock, and trio's ``socket.send`` yields again; and wsproto's frame encoder is most of the
CPU left. :class:`WriteThrough` keeps every other part of trio-websocket (handshake, reader
task, pings, close handshake) and sends a data message like this instead:

* :meth:`WriteThrough.send_nowait` (the optional method of
  :class:`~agentcast._transport.WritesThrough`): when nobody holds the send lock, nothing of an
  earlier frame is still to be written, the connection is open and the socket is a plain TCP
  socket, encode the frame (:func:`agentcast._wsframe.data_frame`) and ``os.write`` it to the
  non-blocking socket, in the caller's step: no yield, no task. A connection calls it from the
  producer's step (its writer idle, nothing queued), or through :meth:`WriteThrough.send_message`
  from its writer.
* the socket takes only part of it: the rest waits in the stream's tail (:class:`_TailFirst`,
  which trio-websocket writes through) until :meth:`WriteThrough.finish_send` writes it under the
  send lock, and any frame of trio-websocket's own (a ping, a pong, a close) that takes the lock
  first writes the tail before itself. A cancellation part-way leaves half a frame, which the
  caller handles as for any cut write: ``Connection`` aborts it;
* anything else (the lock held by a ping, a pong or a close; a socket that would block; an
  error; a connection closing): ``send_nowait`` writes nothing and ``send_message`` uses
  trio-websocket's own ``send_message``, unchanged.

Ordering holds: all other writers (pings, pongs, close frames) go through the send lock and the
tail-first stream, and a write-through happens only while the lock is free and no tail is left,
so no frame ever interleaves with another.

This relies on trio-websocket's private attributes (:data:`PRIVATE_ATTRIBUTES`) and replaces
one (``_stream``, with the tail-first stream around it); pyproject pins the version they were
checked on, ``tests/test_server_wsconn.py`` checks they exist, and :meth:`WriteThrough.wrap`
falls back to the plain connection when one is missing.
"""

from __future__ import annotations

import logging
import os
from typing import Final, final

import trio
from trio_websocket import CloseReason, ConnectionClosed, WebSocketConnection
from wsproto.connection import ConnectionState

from .._transport import Transport, Written
from .._wsframe import data_frame

__all__ = ["PRIVATE_ATTRIBUTES", "WriteThrough"]

log = logging.getLogger("agentcast.server")

#: What the write-through path reads from a ``trio_websocket.WebSocketConnection`` (0.12.x):
#: the close reason (set once closed), the send lock every writer takes, the wsproto state, the
#: stream it writes to (replaced by a :class:`_TailFirst` around it), and the abort it runs when
#: that stream breaks.
PRIVATE_ATTRIBUTES: Final = (
    "_close_reason", "_stream_lock", "_wsproto", "_stream", "_abort_web_socket",
)


@final
class _TailFirst(trio.abc.Stream):
    """trio-websocket's stream, writing the rest of a write-through frame before anything else.

    Installed as the connection's ``_stream``: every frame trio-websocket sends itself (under
    the send lock) goes through :meth:`send_all`, so a ping, a pong or a close frame that takes
    the lock before the connection's writer finishes a partial write cannot split that frame.
    """

    __slots__ = ("inner", "tail")

    def __init__(self, inner: trio.abc.Stream) -> None:
        self.inner = inner
        #: What is left of a frame the socket took part of; None when nothing is.
        self.tail: memoryview | None = None

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        tail, self.tail = self.tail, None
        if tail is not None:
            await self.inner.send_all(tail)
        await self.inner.send_all(data)

    async def wait_send_all_might_not_block(self) -> None:
        await self.inner.wait_send_all_might_not_block()

    async def receive_some(self, max_bytes: int | None = None) -> bytes | bytearray:
        return await self.inner.receive_some(max_bytes)

    async def aclose(self) -> None:
        await self.inner.aclose()


@final
class WriteThrough:
    """A ``trio_websocket.WebSocketConnection`` with write-through ``send_message``.

    Satisfies :class:`~agentcast._transport.WritesThrough` (``send_nowait``, ``finish_send``)
    and so :class:`~agentcast._transport.Transport` (``send_message``, ``get_message``,
    ``aclose(code, reason)``, ``subprotocol``), so adapters that wrap a transport wrap this.
    """

    __slots__ = (
        "_lock", "_socket", "_stream", "_wsproto", "partial_writes", "written_through", "ws",
    )

    def __init__(self, ws: WebSocketConnection, socket: trio.socket.SocketType) -> None:
        #: The wrapped connection; keepalive pings and closes use it directly.
        self.ws = ws
        #: Messages written in the step that asked (for tests and diagnostics).
        self.written_through = 0
        #: Messages the socket took only part of at once, finished under the send lock.
        self.partial_writes = 0
        self._socket = socket
        self._lock: trio.StrictFIFOLock = ws._stream_lock
        self._wsproto = ws._wsproto
        self._stream = _TailFirst(ws._stream)
        ws._stream = self._stream

    @classmethod
    def wrap(cls, ws: WebSocketConnection, stream: trio.abc.Stream) -> Transport:
        """``ws`` with write-through sends over ``stream``'s socket, or ``ws`` itself when
        ``stream`` is not a plain TCP stream (TLS) or trio-websocket lacks an attribute."""
        if not isinstance(stream, trio.SocketStream):
            return ws
        missing = [name for name in PRIVATE_ATTRIBUTES if not hasattr(ws, name)]
        if missing:
            log.warning(
                "trio-websocket lacks %s: sending without write-through (install the version "
                "pyproject pins)", ", ".join(missing),
            )
            return ws
        return cls(ws, stream.socket)

    @property
    def subprotocol(self) -> str | None:
        """The negotiated subprotocol (decides batching)."""
        return self.ws.subprotocol

    async def get_message(self) -> str | bytes:
        """The next message; raises ``ConnectionClosed`` once closed."""
        return await self.ws.get_message()

    async def aclose(self, code: int = 1000, reason: str | None = None) -> None:
        """trio-websocket's close handshake (it closes the stream even if cancelled)."""
        await self.ws.aclose(code, reason)

    def send_nowait(self, message: str | bytes) -> Written:
        """Write ``message`` in this step if nothing else is being written and the socket takes
        at least part of it (see the module and :class:`~agentcast._transport.Written`)."""
        if (
            self.ws._close_reason is not None or self._lock.locked()
            or self._wsproto.state is not ConnectionState.OPEN or self._stream.tail is not None
        ):
            return Written.NONE
        fd = self._socket.fileno()
        if fd < 0:
            return Written.NONE
        data = data_frame(message)
        try:
            sent = os.write(fd, data)
        except OSError:
            # Would block (BlockingIOError), or reset or broken: nothing was written, so the
            # library's own send waits for room or meets the same error and closes the
            # connection its way (ConnectionClosed, 1006).
            return Written.NONE
        if sent == len(data):
            self.written_through += 1
            return Written.ALL
        if sent == 0:
            return Written.NONE
        self.partial_writes += 1
        self._stream.tail = memoryview(data)[sent:]
        return Written.PART

    async def finish_send(self) -> None:
        """Write the rest of a frame :meth:`send_nowait` wrote part of, under the send lock, as
        trio-websocket sends (and aborts on a broken stream); at once if a frame of
        trio-websocket's own already wrote it.

        Raises:
            ConnectionClosed: the peer is gone.
        """
        ws = self.ws
        stream = self._stream
        async with self._lock:
            tail, stream.tail = stream.tail, None
            if tail is None:
                return
            try:
                await stream.inner.send_all(tail)
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                await ws._abort_web_socket()
                raise ConnectionClosed(
                    ws._close_reason or CloseReason(1006, "connection lost")
                ) from None

    async def send_message(self, message: str | bytes) -> None:
        """Send one message, in this step when the socket can take it (see the module).

        Completes without a checkpoint when it writes through, like a ``send_nowait``: the
        caller (the connection's writer) yields when it waits for its next message.

        Raises:
            ConnectionClosed: the connection is closed or closing, or the peer is gone.
        """
        reason: CloseReason | None = self.ws._close_reason
        if reason is not None:
            raise ConnectionClosed(reason)
        written = self.send_nowait(message)
        if written is Written.ALL:
            return
        if written is Written.PART:
            await self.finish_send()
            return
        # trio-websocket's send takes the lock; the tail-first stream writes any tail first.
        await self.ws.send_message(message)

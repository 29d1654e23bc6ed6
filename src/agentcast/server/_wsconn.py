"""The standalone server's Transport: a trio-websocket connection whose sends write through.

trio-websocket's ``send_message`` costs three scheduler steps per message even when the socket
could take the bytes at once: the writer wakes, the connection's ``StrictFIFOLock`` yields on a
free lock, and trio's ``socket.send`` yields again; and wsproto's frame encoder is most of the
CPU left. :class:`WriteThrough` keeps every other part of trio-websocket (handshake, reader
task, pings, close handshake) and sends a data message like this instead:

* nobody holds the send lock, the connection is open and the socket is a plain TCP socket:
  encode the frame (:func:`agentcast._wsframe.data_frame`) and ``os.write`` it to the
  non-blocking socket, in the step that dequeued it. No yield, no task.
* the socket takes only part of it: the rest goes out under the send lock with trio's
  ``send_all`` (a cancellation part-way leaves half a frame, which the caller handles as for
  any cut write: ``Connection`` aborts it);
* anything else (the lock held by a ping, a pong or a close; a socket that would block; an
  error; a connection closing): trio-websocket's own ``send_message``, unchanged.

Ordering holds: all other writers (pings, pongs, close frames) go through the send lock, and a
write-through happens only while it is free, so no frame ever interleaves with another.

This relies on trio-websocket's private attributes (:data:`PRIVATE_ATTRIBUTES`); pyproject pins
the version they were checked on, ``tests/test_server_wsconn.py`` checks they exist, and
:meth:`WriteThrough.wrap` falls back to the plain connection when one is missing.
"""

from __future__ import annotations

import logging
import os
from typing import Final, final

import trio
from trio_websocket import CloseReason, ConnectionClosed, WebSocketConnection
from wsproto.connection import ConnectionState

from .._transport import Transport
from .._wsframe import data_frame

__all__ = ["PRIVATE_ATTRIBUTES", "WriteThrough"]

log = logging.getLogger("agentcast.server")

#: What the write-through path reads from a ``trio_websocket.WebSocketConnection`` (0.12.x):
#: the close reason (set once closed), the send lock every writer takes, the wsproto state, the
#: stream it writes to, and the abort it runs when that stream breaks.
PRIVATE_ATTRIBUTES: Final = (
    "_close_reason", "_stream_lock", "_wsproto", "_stream", "_abort_web_socket",
)


@final
class WriteThrough:
    """A ``trio_websocket.WebSocketConnection`` with write-through ``send_message``.

    Satisfies :class:`~agentcast._transport.Transport` (``send_message``, ``get_message``,
    ``aclose(code, reason)``, ``subprotocol``), so adapters that wrap a transport wrap this.
    """

    __slots__ = ("_lock", "_socket", "_wsproto", "partial_writes", "written_through", "ws")

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

    async def send_message(self, message: str | bytes) -> None:
        """Send one message, in this step when the socket can take it (see the module).

        Completes without a checkpoint when it writes through, like a ``send_nowait``: the
        caller (the connection's writer) yields when it waits for its next message.

        Raises:
            ConnectionClosed: the connection is closed or closing, or the peer is gone.
        """
        ws = self.ws
        reason: CloseReason | None = ws._close_reason
        if reason is not None:
            raise ConnectionClosed(reason)
        fd = self._socket.fileno()
        if self._lock.locked() or self._wsproto.state is not ConnectionState.OPEN or fd < 0:
            await ws.send_message(message)
            return
        data = data_frame(message)
        try:
            sent = os.write(fd, data)
        except BlockingIOError:
            sent = 0
        except OSError:
            # Reset or broken: nothing was written, so the library's own send meets the same
            # error and closes the connection its way (ConnectionClosed, 1006).
            sent = 0
        if sent == len(data):
            self.written_through += 1
            return
        if sent == 0:
            await ws.send_message(message)
            return
        self.partial_writes += 1
        await self._send_rest(memoryview(data)[sent:])

    async def _send_rest(self, rest: memoryview) -> None:
        """Finish a frame the socket took part of, under the send lock, as trio-websocket
        sends (and aborts on a broken stream)."""
        ws = self.ws
        async with self._lock:
            try:
                await ws._stream.send_all(rest)
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                await ws._abort_web_socket()
                raise ConnectionClosed(
                    ws._close_reason or CloseReason(1006, "connection lost")
                ) from None


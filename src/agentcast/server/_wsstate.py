"""The standalone server's side of one WebSocket, sans-I/O: the 101 answer and what to do with
what the client sends (issue 12).

Rules of this module: pure, no I/O, no trio; every decision is tested synchronously in
tests/test_server_wsconn.py. ``_wsconn.ServerWebSocket`` is the trio shell that reads, writes
and closes the socket as this module says.

* The handshake: the front parsed the request head once with h11 and ``decide_upgrade``
  accepted it, so the answer is built from that head (:func:`accept_response`). wsproto's
  ``H11Handshake.initiate_upgrade_connection`` would take the parsed head too, but it
  serializes it and parses it again with a second h11 connection, and keeps both for the
  connection's life (~2.3 KB each); its frame protocol is used directly instead.
* Frames: :class:`ServerProtocol` wraps wsproto's ``Connection`` (frame parsing, unmasking,
  UTF-8, close codes) and adds the rules trio-websocket's reader applied on top: messages
  joined from their fragments up to ``max_message_bytes`` (one more closes with 1009), a pong
  for every ping while open, the close reply, and a close frame for what wsproto refuses
  (1002 for broken frames, 1007 for invalid UTF-8; trio-websocket dropped the TCP connection
  without one).
"""

from __future__ import annotations

from typing import Final

import attrs
from wsproto.connection import Connection, ConnectionState, ConnectionType
from wsproto.events import BytesMessage, CloseConnection, Ping, Pong, TextMessage
from wsproto.utilities import generate_accept_token

from .._protocol import CloseCode

__all__ = ["Closed", "Received", "ServerProtocol", "accept_response"]

#: The close code of a connection that ended without a close frame (RFC 6455 7.1.5).
ABNORMAL: Final = 1006


@attrs.frozen
class Closed:
    """How a connection ended: the close code and reason (sent, received or implied)."""

    code: int
    reason: str | None = None


@attrs.frozen
class Received:
    """What one read of client bytes asks of the shell, in this order."""

    #: Complete messages, to hand to ``get_message`` callers in order.
    messages: tuple[str | bytes, ...] = ()
    #: Bytes to write (pongs, a close reply or a close frame), after any write in progress.
    reply: bytes = b""
    #: Payloads of the pongs that arrived (the keepalive matches its pings with them).
    pongs: tuple[bytes, ...] = ()
    #: Set when the connection is over: write ``reply``, then close the socket.
    closed: Closed | None = None


def accept_response(key: str, subprotocol: str | None) -> bytes:
    """The ``101 Switching Protocols`` answer to a head ``decide_upgrade`` accepted.

    Args:
        key: the request's ``Sec-WebSocket-Key`` (one base64 nonce, checked by the front).
        subprotocol: the subprotocol selected from those the client offered, or None.
    No extension is ever accepted (no ``permessage-deflate``: it would cost ~47 KB per idle
    connection), so frames are the plain ones ``agentcast._wsframe`` encodes.
    """
    lines = [
        "HTTP/1.1 101 Switching Protocols",
        "Upgrade: websocket",
        "Connection: Upgrade",
        f"Sec-WebSocket-Accept: {generate_accept_token(key.encode('ascii')).decode('ascii')}",
    ]
    if subprotocol is not None:
        lines.append(f"Sec-WebSocket-Protocol: {subprotocol}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("ascii")


class ServerProtocol:
    """One connection's frame state after the handshake (see the module's rules)."""

    __slots__ = ("_parts", "_size", "_ws", "closed", "max_message_bytes")

    def __init__(self, max_message_bytes: int) -> None:
        #: Longest message accepted, as ``len()`` of its text or bytes (trio-websocket's rule).
        self.max_message_bytes = max_message_bytes
        #: Set once a close frame was sent or received, or the connection failed.
        self.closed: Closed | None = None
        self._ws = Connection(ConnectionType.SERVER)
        #: Fragments of the message in progress (None: none; most messages are one frame).
        self._parts: list[str | bytes] | None = None
        self._size = 0

    @property
    def state(self) -> ConnectionState:
        return self._ws.state

    def receive(self, data: bytes) -> Received:
        """Take the next bytes the client sent; say what to deliver, write and close.

        Once closing (a close frame sent), data messages and pings are dropped: only the
        peer's close reply matters then.
        """
        ws = self._ws
        if ws.state is ConnectionState.CLOSED:
            return Received()
        ws.receive_data(data)
        messages: list[str | bytes] = []
        pongs: list[bytes] = []
        reply = b""
        closed = None
        for event in ws.events():
            if isinstance(event, (TextMessage, BytesMessage)):
                if self.closed is not None:
                    continue
                size = self._size + len(event.data)
                if size > self.max_message_bytes:
                    closed = self._fail(
                        CloseCode.MESSAGE_TOO_BIG,
                        f"message longer than {self.max_message_bytes}",
                    )
                    reply += ws.send(CloseConnection(closed.code, closed.reason))
                    break
                part = event.data if isinstance(event.data, str) else bytes(event.data)
                if event.message_finished:
                    messages.append(self._join(part))
                else:
                    self._size = size
                    if self._parts is None:
                        self._parts = []
                    self._parts.append(part)
            elif isinstance(event, Ping):
                if ws.state is ConnectionState.OPEN:
                    reply += ws.send(event.response())
            elif isinstance(event, Pong):
                pongs.append(bytes(event.payload))
            elif isinstance(event, CloseConnection):
                closed, answer = self._on_close(event)
                reply += answer
                break
        if not (messages or pongs or reply or closed):
            return Received()
        return Received(tuple(messages), reply, tuple(pongs), closed)

    def _join(self, last: str | bytes) -> str | bytes:
        """The message ``last`` completes (most messages are one frame: ``last`` itself)."""
        parts, self._parts, self._size = self._parts, None, 0
        if parts is None:
            return last
        if isinstance(last, str):
            return "".join(part for part in (*parts, last) if isinstance(part, str))
        return b"".join(part for part in (*parts, last) if isinstance(part, bytes))

    def _fail(self, code: int, reason: str) -> Closed:
        self._parts, self._size = None, 0
        self.closed = Closed(code, reason)
        return self.closed

    def _on_close(self, event: CloseConnection) -> tuple[Closed, bytes]:
        """The connection's end on a close event, and what to write for it."""
        ws = self._ws
        if ws.state is ConnectionState.REMOTE_CLOSING:
            # The client closes: answer with its code, then the server drops TCP (RFC 6455
            # 7.1.1: the server closes the TCP connection first).
            self.closed = Closed(event.code, event.reason or None)
            return self.closed, ws.send(event.response())
        if ws.state is ConnectionState.CLOSED:
            # The reply to our own close frame.
            return self.closed or Closed(event.code, event.reason or None), b""
        # wsproto refused a frame (ParseFailed: 1002, 1007 for bad UTF-8) and reports it as
        # a close event without changing its state: send the close frame it implies.
        closed = self.closed or self._fail(event.code, event.reason or "")
        if ws.state is ConnectionState.OPEN:
            return closed, ws.send(CloseConnection(closed.code, closed.reason))
        return closed, b""

    def close(self, code: int, reason: str | None) -> bytes:
        """The close frame to send for a close we start (b"" unless open)."""
        if self._ws.state is not ConnectionState.OPEN:
            return b""
        self.closed = self.closed or Closed(code, reason)
        return self._ws.send(CloseConnection(code, reason))

    def ping(self, payload: bytes) -> bytes | None:
        """A ping frame with ``payload``; None once closing (no ping then)."""
        if self._ws.state is not ConnectionState.OPEN or self.closed is not None:
            return None
        return self._ws.send(Ping(payload))

    def lost(self) -> Closed:
        """The TCP connection ended without a close handshake (1006)."""
        self.closed = self.closed or Closed(ABNORMAL, "connection lost")
        return self.closed

"""The Transport surface: exactly the part of trio-websocket's connection agentcast uses.

A ``trio_websocket.WebSocketConnection`` satisfies it unchanged; so does
``agentcast.testing.MemoryTransport``. Transports raise ``trio_websocket.ConnectionClosed`` once
closed. A transport that can write a message synchronously also satisfies
:class:`WritesThrough`; a connection then writes a live event in the producer's own step when
nothing is queued before it (``_connection.py``).
"""

from __future__ import annotations

import enum
from typing import Protocol, runtime_checkable

import trio

__all__ = ["Transport", "Written", "WritesThrough", "abort_transport", "close_transport"]


@runtime_checkable
class Transport(Protocol):
    """A message-oriented, closable connection to one client.

    Optional: a transport may also offer ``send_nowait(message) -> Written`` and ``async
    finish_send()`` (see :class:`WritesThrough`). Only a transport that really writes to its
    socket synchronously may define them; an adapter that wraps another transport (a protocol
    translator, ASGI) does not forward them, so it keeps the queued path.
    """

    async def send_message(self, message: str | bytes) -> None:
        """Send one WebSocket message; raises ``ConnectionClosed`` when the peer is gone."""

    async def get_message(self) -> str | bytes:
        """Receive one WebSocket message; raises ``ConnectionClosed`` when closed."""

    async def aclose(self, code: int = 1000, reason: str | None = None) -> None:
        """Close with a close frame; closes the underlying stream even if cancelled."""


class Written(enum.Enum):
    """How much of a message :meth:`WritesThrough.send_nowait` wrote."""

    #: The whole message is on the wire (in the socket's buffer); nothing more to do.
    ALL = "all"
    #: A prefix is; the transport holds the rest. The caller must ``await finish_send()``
    #: before its next send; the transport writes nothing of its own before that rest.
    PART = "part"
    #: Nothing was written (the socket would block, another write holds the stream, the
    #: connection is closing or gone): send the message with ``send_message`` as usual, which
    #: also reports a closed connection.
    NONE = "none"


@runtime_checkable
class WritesThrough(Transport, Protocol):
    """A :class:`Transport` that can write a message in the caller's step, with no checkpoint.

    The contract, for the one caller that sends data messages (a connection):

    - ``send_nowait`` never blocks, never yields and never raises for a closed, closing or
      broken connection (it answers :attr:`Written.NONE`; the ordinary ``send_message`` then
      raises ``ConnectionClosed``). It writes only when no other write (the caller's, a ping,
      a pong, a close frame) is in progress, so frames never interleave.
    - The caller calls it only when none of its own messages is waiting to be sent before this
      one and none of its sends is in progress: ordering is the caller's side of the contract.
    - After :attr:`Written.PART` the caller calls ``finish_send`` before any other send; until
      the rest is written ``send_nowait`` answers :attr:`Written.NONE`, and the transport's own
      frames (pings, pongs, close) go out after that rest.
    """

    def send_nowait(self, message: str | bytes) -> Written:
        """Write ``message`` now if the transport can; see :class:`Written`."""

    async def finish_send(self) -> None:
        """Write the rest of the message ``send_nowait`` wrote :attr:`Written.PART` of (at
        once if nothing is left of it).

        A cancellation part-way leaves half a frame on the wire: abort the connection then,
        never close it politely.

        Raises:
            ConnectionClosed: the peer is gone.
        """


async def close_transport(transport: Transport, code: int, reason: str, within: float) -> None:
    """Close politely within ``within`` seconds, shielded from the caller's cancellation.

    A client that stops reading can make a polite close hang; past the deadline the close is
    cancelled, which makes trio-websocket drop the TCP stream.
    """
    with trio.CancelScope(shield=True, deadline=trio.current_time() + within):
        await transport.aclose(code, reason)


async def abort_transport(transport: Transport, code: int, reason: str) -> None:
    """Drop the connection without writing anything more to it.

    Used after a write was cancelled part-way: the stream may hold half a frame, so a close
    frame would be garbage to the client. ``aclose`` entered already cancelled sends nothing
    and closes the stream (trio-websocket closes its stream in a ``finally``; our memory
    transport does the same).
    """
    with trio.CancelScope(shield=True) as scope:
        scope.cancel()
        await transport.aclose(code, reason)

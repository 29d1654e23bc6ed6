"""The Transport surface: exactly the part of trio-websocket's connection agentcast uses.

A ``trio_websocket.WebSocketConnection`` satisfies it unchanged; so does
``agentcast.testing.MemoryTransport``. Transports raise ``trio_websocket.ConnectionClosed`` once
closed.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import trio

__all__ = ["Transport", "abort_transport", "close_transport"]


@runtime_checkable
class Transport(Protocol):
    """A message-oriented, closable connection to one client."""

    async def send_message(self, message: str | bytes) -> None:
        """Send one WebSocket message; raises ``ConnectionClosed`` when the peer is gone."""

    async def get_message(self) -> str | bytes:
        """Receive one WebSocket message; raises ``ConnectionClosed`` when closed."""

    async def aclose(self, code: int = 1000, reason: str | None = None) -> None:
        """Close with a close frame; closes the underlying stream even if cancelled."""


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

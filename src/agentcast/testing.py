"""Test helpers for applications built on agentcast: an in-memory transport pair.

``MemoryTransport`` mimics a trio-websocket connection closely enough to stand in for one:
messages are delivered in order, a side that stops reading eventually blocks the other side's
``send_message`` (like a full socket buffer), close frames arrive after pending messages, and
an ``aclose`` that is cancelled drops the connection at once (the peer sees code 1006).
"""

from __future__ import annotations

from typing import Final, final

import attrs
import trio
from trio_websocket import CloseReason, ConnectionClosed

__all__ = ["MemoryTransport"]

#: Messages in flight per direction before ``send_message`` blocks (a socket buffer's worth).
DEFAULT_CAPACITY: Final = 64
#: Close code a side sees when the connection was dropped without a close frame.
ABNORMAL_CLOSURE: Final = 1006


@attrs.frozen
class _CloseFrame:
    code: int
    reason: str | None


@final
@attrs.define(eq=False)
class MemoryTransport:
    """One side of an in-memory WebSocket-like connection; create pairs with :meth:`pair`."""

    _outbox: trio.MemorySendChannel[str | bytes | _CloseFrame]
    _inbox: trio.MemoryReceiveChannel[str | bytes | _CloseFrame]
    #: The negotiated subprotocol, as trio-websocket exposes it.
    subprotocol: str | None = None
    #: Set once this side is closed (locally or by the peer).
    closed: CloseReason | None = None
    #: Messages this side has sent (for assertions in tests).
    sent_count: int = 0

    @classmethod
    def pair(
        cls, *, capacity: int = DEFAULT_CAPACITY, subprotocol: str | None = None
    ) -> tuple[MemoryTransport, MemoryTransport]:
        """Return ``(server_side, client_side)`` of a fresh connection.

        Args:
            capacity: messages in flight per direction before the sender blocks.
            subprotocol: what ``subprotocol`` reports on both sides, e.g. ``"agentcast.ndjson"``.
        """
        to_client_send, to_client_receive = trio.open_memory_channel[str | bytes | _CloseFrame](
            capacity
        )
        to_server_send, to_server_receive = trio.open_memory_channel[str | bytes | _CloseFrame](
            capacity
        )
        server = cls(to_client_send, to_server_receive, subprotocol)
        client = cls(to_server_send, to_client_receive, subprotocol)
        return server, client

    async def send_message(self, message: str | bytes) -> None:
        """Send one message; blocks while the peer's inbox is full."""
        if self.closed is not None:
            raise ConnectionClosed(self.closed)
        try:
            await self._outbox.send(message)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            # Not marked closed here: like trio-websocket, what the peer sent before it went
            # away (its close frame included) can still be read with get_message.
            raise ConnectionClosed(
                CloseReason(ABNORMAL_CLOSURE, "peer dropped the connection")
            ) from None
        self.sent_count += 1

    async def get_message(self) -> str | bytes:
        """Receive the next message; raises ``ConnectionClosed`` once a close frame arrives."""
        if self.closed is not None:
            raise ConnectionClosed(self.closed)
        try:
            item = await self._inbox.receive()
        except (trio.EndOfChannel, trio.ClosedResourceError):
            self._mark_closed(ABNORMAL_CLOSURE, "connection dropped")
            raise ConnectionClosed(self.closed) from None
        if isinstance(item, _CloseFrame):
            self._mark_closed(item.code, item.reason)
            self._drop()
            raise ConnectionClosed(self.closed)
        return item

    async def aclose(self, code: int = 1000, reason: str | None = None) -> None:
        """Send a close frame after pending messages; if cancelled, drop the connection."""
        if self.closed is not None:
            return
        self._mark_closed(code, reason)
        try:
            await self._outbox.send(_CloseFrame(code, reason))
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass  # the peer is gone already: nothing to tell it
        finally:
            self._drop()

    def _mark_closed(self, code: int, reason: str | None) -> None:
        if self.closed is None:
            self.closed = CloseReason(code, reason)

    def _drop(self) -> None:
        # Closing our send side lets the peer drain what was sent, then see the end; closing
        # our receive side makes the peer's blocked sends fail at once.
        self._outbox.close()
        self._inbox.close()

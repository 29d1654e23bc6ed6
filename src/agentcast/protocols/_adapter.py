"""A Transport that speaks another protocol to the client and agentcast's to the connection.

The connection keeps its own protocol (batched NDJSON frames, native control frames); this
wrapper translates each outgoing message and each incoming one with a per-connection
translator. It adds no task, lock or buffer of its own beyond the frames one client message
turned into: writes stay under the connection's write deadline (they happen inside its
``send_message`` call), reads under its rate limiter (each native frame is one read).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable

import attrs

from .._transport import Transport

__all__ = ["TranslatingTransport"]


@attrs.define(eq=False)
class TranslatingTransport:
    """Wraps ``inner``: ``downstream`` maps one native message to the messages to send,
    ``upstream`` one client message to native frames."""

    inner: Transport
    #: The subprotocol the client selected (what the handshake answered).
    subprotocol: str
    downstream: Callable[[str | bytes], list[str]]
    upstream: Callable[[str | bytes], list[str | bytes]]
    _pending: deque[str | bytes] = attrs.Factory(deque)

    async def send_message(self, message: str | bytes) -> None:
        """Translate one native message (a frame or an NDJSON batch) and send the result."""
        for out in self.downstream(message):
            await self.inner.send_message(out)

    async def get_message(self) -> str | bytes:
        """The next native frame: from the last client message, or from the next one."""
        while not self._pending:
            self._pending.extend(self.upstream(await self.inner.get_message()))
        return self._pending.popleft()

    async def aclose(self, code: int = 1000, reason: str | None = None) -> None:
        """Close the real transport."""
        await self.inner.aclose(code, reason)

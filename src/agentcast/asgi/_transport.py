"""``ASGITransport``: agentcast's Transport surface over one ASGI WebSocket's ``receive``/``send``.

Rules of this module: nothing here calls the ASGI ``send`` except the pump task, one message at
a time and in order. ``send_message`` hands its message to the pump and waits for it
cancellably, so agentcast's write deadline (the manager's watchdog) cuts the *wait* even though
hypercorn shields its socket write from cancellation; the connection is then aborted and every
agentcast task and counter of it is freed. The pump itself cannot be cut: it stays in the
server's write until the server closes the socket (see README, "Inside your web app").

Hypercorn ignores sends after the peer has gone, so a close is learnt only from the
``websocket.disconnect`` event read by ``get_message`` (agentcast's reader always waits there).
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any, Final, final

import attrs
import trio
from trio_websocket import CloseReason, ConnectionClosed

from ._policy import disconnect_reason

__all__ = ["ASGIReceive", "ASGISend", "ASGITransport"]

log = logging.getLogger("agentcast.asgi")

ASGIReceive = Callable[[], Awaitable[MutableMapping[str, Any]]]
ASGISend = Callable[[MutableMapping[str, Any]], Awaitable[None]]

#: Close code reported when the server's ``send`` failed or the transport was aborted.
ABNORMAL_CLOSURE: Final = 1006


@final
@attrs.define(eq=False)
class ASGITransport:
    """One accepted ASGI WebSocket as an agentcast Transport.

    Run :meth:`pump` in a nursery for as long as the transport is used (``serve_websocket`` does
    this); it ends when the transport is closed.
    """

    _receive: ASGIReceive
    _send: ASGISend
    #: The negotiated subprotocol, as trio-websocket exposes it (selects batching).
    subprotocol: str | None = None
    #: Set once closed, by either side.
    closed: CloseReason | None = None
    _to_pump: trio.MemorySendChannel[tuple[MutableMapping[str, Any], trio.Event]] = attrs.field(
        init=False
    )
    _pump_inbox: trio.MemoryReceiveChannel[tuple[MutableMapping[str, Any], trio.Event]] = (
        attrs.field(init=False)
    )
    _send_failed: bool = False

    def __attrs_post_init__(self) -> None:
        self._to_pump, self._pump_inbox = trio.open_memory_channel[
            tuple[MutableMapping[str, Any], trio.Event]
        ](0)

    def __repr__(self) -> str:
        state = "open" if self.closed is None else f"closed {self.closed.code}"
        return f"<ASGITransport {state} subprotocol={self.subprotocol!r}>"

    async def pump(self) -> None:
        """Write what ``send_message``/``aclose`` hand over, in order, until closed."""
        async with self._pump_inbox:
            async for event, done in self._pump_inbox:
                try:
                    if not self._send_failed:
                        await self._send(event)
                except Exception as exc:  # noqa: BLE001 - the server's send failed: the peer is gone
                    # Converted at the boundary, like httpcore's map_exceptions: servers raise
                    # OSError, RuntimeError or their own types for a dead socket.
                    log.debug("ASGI send failed: %r", exc)
                    self._send_failed = True
                    self._mark_closed(ABNORMAL_CLOSURE, "the server could not send")
                finally:
                    done.set()

    async def _hand_over(self, event: MutableMapping[str, Any]) -> None:
        done = trio.Event()
        try:
            await self._to_pump.send((event, done))
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            raise ConnectionClosed(self.closed or CloseReason(ABNORMAL_CLOSURE, None)) from None
        await done.wait()

    async def send_message(self, message: str | bytes) -> None:
        """Send one message; raises ``ConnectionClosed`` once either side has closed."""
        if self.closed is not None:
            raise ConnectionClosed(self.closed)
        key = "text" if isinstance(message, str) else "bytes"
        await self._hand_over({"type": "websocket.send", key: message})
        if self._send_failed:
            raise ConnectionClosed(self.closed or CloseReason(ABNORMAL_CLOSURE, None))

    async def get_message(self) -> str | bytes:
        """Receive one message; raises ``ConnectionClosed`` on ``websocket.disconnect``."""
        while True:
            if self.closed is not None:
                raise ConnectionClosed(self.closed)
            event = await self._receive()
            kind = event.get("type")
            if kind == "websocket.receive":
                text = event.get("text")
                if text is not None:
                    return str(text)
                data = event.get("bytes")
                return bytes(data) if data is not None else ""
            if kind == "websocket.disconnect":
                code, reason = disconnect_reason(event)
                self._mark_closed(code, reason)
                self._to_pump.close()

    async def aclose(self, code: int = 1000, reason: str | None = None) -> None:
        """Send a close frame after what is queued; entered cancelled, send nothing (an abort:
        the app then returns and the server drops the connection)."""
        if self.closed is not None:
            self._to_pump.close()
            return
        self._mark_closed(code, reason)
        try:
            await trio.lowlevel.checkpoint_if_cancelled()
            event: dict[str, Any] = {"type": "websocket.close", "code": code}
            if reason:
                event["reason"] = reason
            await self._hand_over(event)
        except ConnectionClosed:
            pass  # the pump has stopped: there is nobody left to tell
        finally:
            self._to_pump.close()

    def stop(self) -> None:
        """End :meth:`pump` once its current write (if any) returns; sends nothing more."""
        self._to_pump.close()

    def _mark_closed(self, code: int, reason: str | None) -> None:
        if self.closed is None:
            self.closed = CloseReason(code, reason)

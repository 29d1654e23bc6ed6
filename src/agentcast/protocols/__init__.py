"""Agent-UI protocols spoken at the edge: AG-UI and the Vercel AI SDK's WebSocket transport.

Each protocol is a pure translator (:mod:`.agui`, :mod:`.vercel_ai`) and the same thin
:class:`TranslatingTransport` around the real connection; the core only ever sees agentcast's
own protocol. :func:`wrap_transport` picks one by the subprotocol the client selected.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Final

from .._protocol import BATCH_SUBPROTOCOL, PLAIN_SUBPROTOCOL
from .._transport import Transport
from ._adapter import TranslatingTransport
from .agui import AGUI_SUBPROTOCOL, AguiTranslator, input_to_native
from .vercel_ai import VERCEL_SUBPROTOCOL, VercelTranslator

__all__ = [
    "AGUI_SUBPROTOCOL",
    "SUBPROTOCOLS",
    "VERCEL_SUBPROTOCOL",
    "TranslatingTransport",
    "batch_for",
    "select_subprotocol",
    "wrap_transport",
]

#: The subprotocols served through a translator, in the server's order of preference.
SUBPROTOCOLS: Final = (AGUI_SUBPROTOCOL, VERCEL_SUBPROTOCOL)


#: Every subprotocol a server selects, in its order of preference: agentcast's own (batched
#: NDJSON first), then the translated ones.
SELECTABLE: Final = (BATCH_SUBPROTOCOL, PLAIN_SUBPROTOCOL, *SUBPROTOCOLS)


def select_subprotocol(offered: Iterable[str]) -> str | None:
    """The subprotocol a server (standalone or ASGI) selects from the client's offer: the first
    of :data:`SELECTABLE` offered, never any other entry (``bearer.<token>`` carries a token
    and must not be echoed in the response)."""
    entries = {value.strip() for value in offered}
    return next((ours for ours in SELECTABLE if ours in entries), None)


def batch_for(subprotocol: str | None) -> bool | None:
    """The connection's ``batch`` option for ``subprotocol``: a translated connection is
    batched inside (its translator frames what the client receives); None lets agentcast's
    own subprotocols decide."""
    return True if subprotocol in SUBPROTOCOLS else None


def wrap_transport(transport: Transport, subprotocol: str | None) -> Transport:
    """``transport`` as is for agentcast's own subprotocols, else wrapped in the translator
    of ``subprotocol`` (a new translator per connection: they hold per-connection state)."""
    if subprotocol == AGUI_SUBPROTOCOL:
        agui = AguiTranslator()

        def agui_down(message: str | bytes) -> list[str]:
            text = agui.encode(message)
            return [text] if text else []

        return TranslatingTransport(transport, AGUI_SUBPROTOCOL, agui_down, input_to_native)
    if subprotocol == VERCEL_SUBPROTOCOL:
        vercel = VercelTranslator()
        return TranslatingTransport(
            transport, VERCEL_SUBPROTOCOL, vercel.downstream, vercel.upstream
        )
    return transport

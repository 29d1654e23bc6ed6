"""Pure decisions of the ASGI adapter: no I/O, no trio, no asyncio.

Everything here maps plain values to plain values (ASGI event dicts, status codes, messages), so
it is tested synchronously: which subprotocol to select, how a refusal is written on a server
that offers the WebSocket Denial Response extension and on one that does not, what a
``websocket.disconnect`` means as a close code, and what to tell a user who runs the trio-native
endpoint on an asyncio server.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any, Final

import orjson

from ..protocols import select_subprotocol

__all__ = [
    "DENIAL_EXTENSION",
    "STATE_KEY",
    "choose_subprotocol",
    "disconnect_reason",
    "needs_trio_message",
    "refusal_events",
]

#: The ASGI extension that lets an app answer a WebSocket handshake with an HTTP response.
DENIAL_EXTENSION: Final = "websocket.http.response"
#: Key of the manager (or the threaded bridge) in the ASGI lifespan state.
STATE_KEY: Final = "agentcast"
#: What ASGI servers answer a close before accept with (the ASGI spec's rule).
CLOSE_BEFORE_ACCEPT_STATUS: Final = 403
#: Close code of a disconnect event that carries none (the ASGI spec's default).
DEFAULT_DISCONNECT_CODE: Final = 1005
#: Close code agentcast's own refusal sends before accept (a policy violation).
POLICY_VIOLATION: Final = 1008


def choose_subprotocol(offered: Iterable[str]) -> str | None:
    """The subprotocol to select from the client's offer: the standalone server's rule
    (:func:`agentcast.protocols.select_subprotocol`, one copy), AG-UI and the Vercel AI SDK's
    transport included; never the ``bearer.<token>`` entry."""
    return select_subprotocol(offered)


def refusal_events(
    status: int, reason: str, extensions: Mapping[str, Any] | None
) -> list[dict[str, Any]]:
    """The ASGI events that refuse a handshake with ``status`` before it is accepted.

    With the Denial Response extension (hypercorn, uvicorn) a real HTTP response with a JSON
    body ``{"error": reason}``; without it a close before accept, which every ASGI server turns
    into ``403 Forbidden`` whatever ``status`` was.
    """
    if extensions is not None and DENIAL_EXTENSION in extensions:
        body = orjson.dumps({"error": reason})
        headers = [
            (b"content-type", b"application/json"),
            (b"content-length", str(len(body)).encode()),
        ]
        if status == 401:
            headers.append((b"www-authenticate", b"Bearer"))
        return [
            {"type": "websocket.http.response.start", "status": status, "headers": headers},
            {"type": "websocket.http.response.body", "body": body, "more_body": False},
        ]
    return [{"type": "websocket.close", "code": POLICY_VIOLATION, "reason": reason[:120]}]


def disconnect_reason(event: Mapping[str, Any]) -> tuple[int, str | None]:
    """(code, reason) of a ``websocket.disconnect`` event; 1005 when the server gave none."""
    code = event.get("code")
    reason = event.get("reason")
    return (
        code if isinstance(code, int) else DEFAULT_DISCONNECT_CODE,
        reason if isinstance(reason, str) and reason else None,
    )


def needs_trio_message(library: str, what: str) -> str:
    """The error message for running the trio-native ``what`` under ``library`` (e.g. asyncio)."""
    return (
        f"{what} needs a trio ASGI server, but this code runs under {library}. Either run the app "
        "with `hypercorn --worker-class trio module:app` (pip install 'agentcast[asgi]'), or, "
        "under uvicorn or another asyncio server, use `agentcast.asgi.threaded()` as the "
        "lifespan (it runs agentcast in its own trio thread), or run `agentcast serve` beside "
        "the app and publish with `agentcast.RedisPublisher`."
    )

"""The server: one handler per TCP connection, HTTP endpoints and the authenticated upgrade.

Every TCP connection gets a bounded head read (``handshake_timeout``, ``max_header_bytes``), then
either a plain HTTP answer or, for ``GET /ws`` with a valid token and origin, a trio-websocket
connection served by the user's session. Refusals happen before the upgrade, with an HTTP
status, so nothing is registered for a refused client. No exception leaves a handler: one
client's failure never reaches the listener.
"""

from __future__ import annotations

import logging
from typing import Any, Final

import attrs
import orjson
import trio
from trio_websocket import wrap_server_stream

from .._context import UserContext
from .._manager import ConnectionManager
from .._protocol import BATCH_SUBPROTOCOL
from ._auth import AuthError, Claims, verify_token
from ._front import HeadError, PrefixedStream, RequestHead, read_request_head, send_response
from ._inbound import InboundGuard
from ._keepalive import Keepalive
from ._metrics import CONTENT_TYPE, Metrics
from ._settings import ServerSettings

__all__ = ["Server"]

log = logging.getLogger("agentcast.server")

#: Subprotocol prefix that carries the token (``bearer.<token>``), as browsers cannot set headers.
BEARER_PREFIX: Final = "bearer."
#: The WebSocket version we speak (RFC 6455).
WEBSOCKET_VERSION: Final = "13"


def _json(data: Any) -> bytes:
    return orjson.dumps(data, option=orjson.OPT_NON_STR_KEYS)


@attrs.define(eq=False)
class Server:
    """Handles TCP connections for one :class:`ConnectionManager`."""

    settings: ServerSettings
    manager: ConnectionManager
    secret: str
    #: The origin the server itself is reached at (its own page), e.g. http://127.0.0.1:8765.
    own_origins: frozenset[str] = frozenset()
    draining: bool = False
    #: Handshakes refused, by reason (origin, auth_missing, auth_expired, limit, ...).
    rejections: dict[str, int] = attrs.Factory(dict)
    demo_page: bytes | None = None
    metrics: Metrics | None = None
    #: Pings every open WebSocket; :func:`serve` runs it in its handler nursery.
    keepalive: Keepalive = attrs.field(init=False)

    def __attrs_post_init__(self) -> None:
        self.keepalive = Keepalive(self.settings.ping_interval, self.settings.ping_timeout)

    async def handle(self, stream: trio.abc.Stream) -> None:
        """Serve one TCP connection from its first byte to its close."""
        try:
            head: RequestHead | None = None
            with trio.move_on_after(self.settings.handshake_timeout):
                try:
                    head = await read_request_head(
                        stream, max_bytes=self.settings.max_header_bytes
                    )
                except HeadError as exc:
                    if exc.status:
                        await send_response(stream, exc.status, _json({"error": str(exc)}))
                    return
            if head is None:
                return  # no complete request head in time (slowloris): just close
            if head.is_websocket_upgrade:
                accepted = await self._authorize(stream, head)
                # trio-websocket parses the head again: the stream replays its bytes once,
                # over a guard that scans the frames that follow (limits below messages).
                replay = PrefixedStream(*InboundGuard.under(stream, head.raw, self.settings.core))
                # Not kept for the connection's lifetime: per idle connection, the parsed
                # headers weigh as much as agentcast's own state.
                del head
                if accepted is not None:
                    await self._serve_websocket(replay, *accepted)
            else:
                await self._http(stream, head)
        except* Exception:
            # One client's failure must never reach the listener and stop the server.
            log.exception("a connection handler failed")
        finally:
            await trio.aclose_forcefully(stream)

    # ---- plain HTTP -------------------------------------------------------------------------

    async def _http(self, stream: trio.abc.Stream, head: RequestHead) -> None:
        if head.method not in ("GET", "HEAD"):
            await send_response(stream, 405, _json({"error": "only GET is supported"}))
            return
        path = head.path
        if path == "/health":
            broker = self.manager.broker.statistics()
            ready = not self.draining and broker.ready
            body = {"status": "ok" if ready else ("draining" if self.draining else "not_ready"),
                    "ready": ready, "draining": self.draining}
            if broker.reason:
                body["reason"] = broker.reason
            await send_response(stream, 200 if ready else 503, _json(body))
        elif path == "/stats":
            stats = attrs.asdict(self.manager.get_stats())
            stats["handshake_rejections"] = dict(self.rejections)
            await send_response(stream, 200, _json(stats))
        elif path == "/metrics" and self.metrics is not None:
            await send_response(stream, 200, self.metrics.render(), content_type=CONTENT_TYPE)
        elif path == "/config":
            await send_response(stream, 200, _json(self.settings.redacted()))
        elif path == "/ws":
            await send_response(
                stream, 426, _json({"error": "this endpoint needs a WebSocket upgrade"}),
                extra_headers=[("Upgrade", "websocket")],
            )
        elif path == "/" and self.demo_page is not None:
            await send_response(
                stream, 200, self.demo_page, content_type="text/html; charset=utf-8"
            )
        else:
            await send_response(stream, 404, _json({"error": f"no such endpoint {path!r}"}))

    # ---- WebSocket upgrade ------------------------------------------------------------------

    async def _refuse(
        self, stream: trio.abc.Stream, status: int, reason: str, message: str,
        extra_headers: list[tuple[str, str]] | None = None,
    ) -> None:
        self.rejections[reason] = self.rejections.get(reason, 0) + 1
        log.info("refused a WebSocket handshake: %s", reason)  # never the token
        await send_response(stream, status, _json({"error": message}),
                            extra_headers=extra_headers or [])

    def _origin_allowed(self, origin: str | None) -> bool:
        if origin is None:
            return True  # not a browser; browsers always send Origin on WebSocket requests
        allowed = self.settings.allowed_origins or tuple(self.own_origins)
        return origin in allowed

    def _token(self, head: RequestHead) -> str | None:
        """The token from ``Sec-WebSocket-Protocol: bearer.<token>``, else from ``?token=``."""
        for value in (head.header("sec-websocket-protocol") or "").split(","):
            entry = value.strip()
            if entry.lower().startswith(BEARER_PREFIX):
                return entry[len(BEARER_PREFIX):]
        tokens = head.query.get("token")
        return tokens[0] if tokens else None

    async def _authorize(
        self, stream: trio.abc.Stream, head: RequestHead
    ) -> tuple[Claims, str | None] | None:
        """Check an upgrade request: refuse it (and return None), or return the token's
        claims and the subprotocol to select."""
        if head.path != "/ws":
            await self._refuse(stream, 404, "path", f"no WebSocket endpoint at {head.path!r}")
            return None
        if head.method != "GET":
            await self._refuse(stream, 405, "method", "a WebSocket upgrade must be a GET")
            return None
        if head.header("sec-websocket-version") != WEBSOCKET_VERSION:
            await self._refuse(
                stream, 426, "version", "only WebSocket version 13 is supported",
                [("Sec-WebSocket-Version", WEBSOCKET_VERSION)],
            )
            return None
        if not head.header("sec-websocket-key"):
            await self._refuse(stream, 400, "bad_handshake", "missing Sec-WebSocket-Key")
            return None
        if self.draining:
            await self._refuse(stream, 503, "draining", "the server is shutting down")
            return None
        if not self._origin_allowed(head.header("origin")):
            await self._refuse(stream, 403, "origin", "this Origin is not allowed")
            return None
        claimed = head.query.get("user", [None])[0]
        try:
            claims = verify_token(self._token(head), self.secret, claimed_user=claimed)
        except AuthError as exc:
            await self._refuse(stream, 401, f"auth_{exc.reason}", str(exc))
            return None
        session = self.manager.get_websocket_manager(UserContext(user_id=claims.user_id))
        if len(session.connections()) >= self.settings.max_connections_per_user:
            await self._refuse(
                stream, 429, "connection_limit",
                f"at most {self.settings.max_connections_per_user} connections per user",
            )
            return None
        offered = [
            value.strip() for value in (head.header("sec-websocket-protocol") or "").split(",")
            if value.strip()
        ]
        # Browsers fail a handshake that offered subprotocols when none is selected, so a
        # client offering only its bearer token gets that entry back.
        subprotocol = BATCH_SUBPROTOCOL if BATCH_SUBPROTOCOL in offered else next(
            (value for value in offered if value.lower().startswith(BEARER_PREFIX)), None
        )
        return claims, subprotocol

    async def _serve_websocket(
        self, stream: PrefixedStream, claims: Claims, subprotocol: str | None
    ) -> None:
        session = self.manager.get_websocket_manager(UserContext(user_id=claims.user_id))
        async with trio.open_nursery() as nursery:
            request = await wrap_server_stream(
                nursery, stream, max_message_size=self.settings.core.max_message_bytes
            )
            ws = await request.accept(subprotocol=subprotocol)
            del request
            # A token naming threads subscribes to them and confines the client to them.
            connection = await session.add_connection(
                ws, threads=claims.threads, allowed_threads=claims.threads or None
            )
            if isinstance(stream.inner, InboundGuard):
                # Fragment floods, control-frame floods and RFC 6455 violations close it.
                stream.inner.on_violation(connection.close)
            watch = self.keepalive.watch(ws, connection)
            try:
                await session.hold_connection(connection)
            finally:
                self.keepalive.unwatch(watch)
            nursery.cancel_scope.cancel()

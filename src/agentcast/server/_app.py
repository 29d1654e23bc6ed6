"""The server: one handler per TCP connection, HTTP endpoints and the authenticated upgrade.

Every TCP connection gets a bounded head read (``handshake_timeout``, ``max_header_bytes``), then
either a plain HTTP answer or, for ``GET /ws`` with a valid token and origin, the server's own
WebSocket connection (``_wsconn``) served by the user's session. Refusals happen before the
upgrade, with an HTTP status, so nothing is registered for a refused client. No exception
leaves a handler: one client's failure never reaches the listener.

What counts as an upgrade is ``_http_rules.decide_upgrade`` (a subset of what wsproto's handshake
accepts); the head is parsed once, by the front, and the ``101`` is built from it. Once a
WebSocket is open the handler task ends: the connection's own tasks (in the user's session)
hold it. Every answer is written within ``http_write_timeout``; ``/stats``, ``/config`` and
``/metrics`` need the admin token.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from typing import Any, Final

import attrs
import orjson
import trio
from trio_websocket import ConnectionClosed

from .._connection import Connection
from .._context import UserContext
from .._errors import BrokerUnavailable, InvalidIdentifier, TooManyConnections
from .._ids import check_id
from .._manager import ConnectionManager
from .._protocol import CloseCode
from .._redact import MASK, redact_text
from .._session import ConnectionSlot
from ..protocols import batch_for, select_subprotocol, wrap_transport
from ._admin import admin_refusal
from ._auth import AuthError, Claims
from ._client_js import CACHE_CONTROL, client_script, not_modified
from ._client_js import CONTENT_TYPE as SCRIPT_TYPE
from ._front import HeadError, RequestHead, read_request_head, send_response
from ._http_rules import ALLOW, LogLimiter, Refusal, Upgrade, decide_upgrade, stats_page
from ._inbound import InboundGuard
from ._keepalive import Keepalive
from ._metrics import CONTENT_TYPE, Metrics
from ._settings import ServerSettings
from ._sse import AGUI_CANCEL_PATH, AGUI_PATH, serve_agui
from ._static import FAVICON_CACHE_CONTROL, FAVICON_PATHS, FAVICON_TYPE, favicon
from ._tokens import MemoryRevocations, Revocations, TokenVerifier
from ._wsconn import ServerWebSocket, take_over

__all__ = ["Server"]

log = logging.getLogger("agentcast.server")

#: Subprotocol prefix that carries the token (``bearer.<token>``), as browsers cannot set headers.
BEARER_PREFIX: Final = "bearer."
#: The WebSocket version we speak (RFC 6455).
WEBSOCKET_VERSION: Final = "13"
#: The endpoints that need ``Authorization: Bearer <admin token>`` (see ``_admin``).
ADMIN_PATHS: Final = frozenset({"/stats", "/config", "/metrics"})
#: Log lines about refused request heads (garbage, bad targets, odd upgrades) per
#: :data:`REFUSAL_LOG_PERIOD`; the rest are counted and the count logged with the next line.
REFUSAL_LOG_LIMIT: Final = 10
#: Seconds of the refusal log window.
REFUSAL_LOG_PERIOD: Final = 60.0
#: Longest client-derived text in one refusal log line.
REFUSAL_LOG_CHARS: Final = 100


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
    #: Revocation cut-offs: in memory on one node, in Redis when scaled out.
    revocations: Revocations = attrs.Factory(MemoryRevocations)
    #: Pings every open WebSocket; :func:`serve` runs it in its handler nursery.
    keepalive: Keepalive = attrs.field(init=False)
    #: Checks tokens at the handshake and on ``refresh`` (signature, claims, cut-off).
    tokens: TokenVerifier = attrs.field(init=False)
    #: Rate limit of the log lines about refused request heads.
    refusal_log: LogLimiter = attrs.Factory(
        lambda: LogLimiter(REFUSAL_LOG_LIMIT, REFUSAL_LOG_PERIOD)
    )

    def __attrs_post_init__(self) -> None:
        self.keepalive = Keepalive(self.settings.ping_interval, self.settings.ping_timeout)
        self.tokens = TokenVerifier(
            self.secret, self.revocations, leeway=self.settings.token_leeway,
            issuer=self.settings.token_issuer, audience=self.settings.token_audience,
        )

    async def handle(self, stream: trio.abc.Stream) -> None:
        """Serve one TCP connection from its first byte to its close, or to its upgrade (the
        WebSocket then owns the socket and this task ends)."""
        handed_over = False
        try:
            head: RequestHead | None = None
            with trio.move_on_after(self.settings.handshake_timeout):
                try:
                    head = await read_request_head(
                        stream, max_bytes=self.settings.max_header_bytes
                    )
                except HeadError as exc:
                    if exc.status:
                        self._log_refusal(exc.status, str(exc))
                        await self._respond(stream, exc.status, {"error": str(exc)})
                    return
            if head is None:
                return  # no complete request head in time (slowloris): just close
            decision = decide_upgrade(head.method, head.http_version, head.headers)
            if isinstance(decision, Refusal):
                # A WebSocket attempt wsproto would refuse: answered here, so no handshake
                # waiter is left behind in trio-websocket.
                reason = {405: "method", 426: "version"}.get(decision.status, "bad_handshake")
                self.rejections[reason] = self.rejections.get(reason, 0) + 1
                self._log_refusal(decision.status, decision.message)
                await self._respond(
                    stream, decision.status, {"error": decision.message},
                    extra_headers=decision.headers,
                )
            elif isinstance(decision, Upgrade):
                accepted = await self._authorize(stream, head)
                opened = None if accepted is None else await self._open_websocket(
                    stream, head, *accepted
                )
                if opened is not None and accepted is not None:
                    handed_over = True  # the connection closes the socket from here on
                    ws, connection = opened
                    # Fragment floods, control-frame floods and RFC 6455 violations close it.
                    ws.guard.on_violation(connection.close)
                    self.keepalive.watch(ws, connection)
                    await self._recheck_revocation(connection, accepted[0])
            else:
                await self._http(stream, head)
        except* Exception:
            # One client's failure must never reach the listener and stop the server.
            log.exception("a connection handler failed")
        finally:
            if not handed_over:
                await trio.aclose_forcefully(stream)

    def _log_refusal(self, status: int, message: str) -> None:
        """One short line per refused request head, at most REFUSAL_LOG_LIMIT a minute."""
        admitted, held_back = self.refusal_log.admit(trio.current_time())
        if held_back:
            log.info("%d more refused requests were not logged", held_back)
        if admitted:
            log.info("refused a request with %d: %.*s", status, REFUSAL_LOG_CHARS, message)

    async def _respond(
        self, stream: trio.abc.Stream, status: int, body: Any, *,
        head: RequestHead | None = None, content_type: str = "application/json",
        extra_headers: Sequence[tuple[str, str]] = (),
    ) -> None:
        """Answer with ``body`` (bytes as they are, anything else as JSON) within
        ``http_write_timeout``; a ``HEAD`` request gets the headers only."""
        await send_response(
            stream, status, body if isinstance(body, bytes) else _json(body),
            content_type=content_type, extra_headers=extra_headers,
            head_only=head is not None and head.method == "HEAD",
            write_timeout=self.settings.http_write_timeout,
        )

    # ---- plain HTTP -------------------------------------------------------------------------

    async def _http(self, stream: trio.abc.Stream, head: RequestHead) -> None:
        if head.path == "/admin/revoke":
            await self._admin_revoke(stream, head)
            return
        if head.path in (AGUI_PATH, AGUI_CANCEL_PATH):
            # AG-UI's HttpAgent: POST a RunAgentInput, read the run as SSE (issue 15).
            await serve_agui(
                stream, head, settings=self.settings, manager=self.manager,
                tokens=self.tokens, respond=self._respond, origin_allowed=self._origin_allowed,
                draining=self.draining,
            )
            return
        if head.method not in ("GET", "HEAD"):
            await self._respond(
                stream, 405, {"error": f"only {ALLOW} are supported"}, head=head,
                extra_headers=[("Allow", ALLOW)],
            )
            return
        path = head.path
        if path == "/health":
            await self._health(stream, head)
        elif path in ADMIN_PATHS:
            await self._admin(stream, head, path)
        elif path == "/ws":
            await self._respond(
                stream, 426, {"error": "this endpoint needs a WebSocket upgrade"}, head=head,
                extra_headers=[("Upgrade", "websocket")],
            )
        elif path == "/client.js":
            # The browser client, for pages without a build step: import from "/client.js".
            script = client_script()
            cache = [("ETag", script.etag), ("Cache-Control", CACHE_CONTROL),
                     ("X-Content-Type-Options", "nosniff")]
            if not_modified(head.header("if-none-match"), script.etag):
                await send_response(  # headers only; Content-Length that of the 200
                    stream, 304, script.body, content_type=SCRIPT_TYPE, extra_headers=cache,
                    head_only=True, write_timeout=self.settings.http_write_timeout,
                )
            else:
                await self._respond(stream, 200, script.body, head=head,
                                    content_type=SCRIPT_TYPE, extra_headers=cache)
        elif path in FAVICON_PATHS:
            # Every browser asks for /favicon.ico: answer it rather than log a 404.
            icon, etag = favicon()
            await self._respond(stream, 200, icon, head=head, content_type=FAVICON_TYPE,
                                extra_headers=[("ETag", etag),
                                               ("Cache-Control", FAVICON_CACHE_CONTROL)])
        elif path == "/" and self.demo_page is not None:
            await self._respond(
                stream, 200, self.demo_page, head=head, content_type="text/html; charset=utf-8"
            )
        else:
            await self._respond(stream, 404, {"error": f"no such endpoint {path!r}"}, head=head)

    async def _health(self, stream: trio.abc.Stream, head: RequestHead) -> None:
        """Public: ``status``, ``ready``, ``draining`` and, when not ready, a ``reason``."""
        broker = self.manager.broker.statistics()
        ready = not self.draining and broker.ready
        body: dict[str, Any] = {
            "status": "ok" if ready else ("draining" if self.draining else "not_ready"),
            "ready": ready, "draining": self.draining,
        }
        if broker.reason:
            body["reason"] = self._scrub(broker.reason)
        await self._respond(stream, 200 if ready else 503, body, head=head)

    def _scrub(self, text: str) -> str:
        """``text`` without any credential this server knows (a broker's reason is written by
        whatever broker an embedder passed, so it is not trusted to have done it)."""
        text = redact_text(text, self.settings.redis_url)
        for credential in (self.secret, self.settings.admin_token):
            if credential:
                text = text.replace(credential, MASK)
        return text

    async def _admin_refused(self, stream: trio.abc.Stream, head: RequestHead) -> bool:
        """True (and the refusal answered) unless the request carries the admin token."""
        refusal = admin_refusal(head.header("authorization"), self.settings.admin_token)
        if refusal is None:
            return False
        status, message = refusal
        challenge = [("WWW-Authenticate", "Bearer")] if status == 401 else []
        await self._respond(stream, status, {"error": message}, head=head, extra_headers=challenge)
        return True

    async def _admin(self, stream: trio.abc.Stream, head: RequestHead, path: str) -> None:
        """``/stats``, ``/config`` and ``/metrics``, for the admin token's bearer only."""
        if await self._admin_refused(stream, head):
            return
        if path == "/stats":
            status, stats = self._stats(head)
            await self._respond(stream, status, stats, head=head)
        elif path == "/metrics" and self.metrics is not None:
            await self._respond(
                stream, 200, self.metrics.render(), head=head, content_type=CONTENT_TYPE
            )
        elif path == "/config":
            await self._respond(stream, 200, self.settings.redacted(), head=head)
        else:
            await self._respond(stream, 404, {"error": f"no such endpoint {path!r}"}, head=head)

    def _stats(self, head: RequestHead) -> tuple[int, dict[str, Any]]:
        """Totals (no user ids: their cost does not grow with the users online), and with
        ``?users=1`` one page of per-user snapshots (``offset``, ``limit`` at most 100)."""
        stats = attrs.asdict(self.manager.get_stats(per_user=False))
        del stats["per_user"]
        stats["handshake_rejections"] = dict(self.rejections)
        if head.query.get("users", ["0"])[-1] not in ("1", "true"):
            return 200, stats
        page = stats_page(head.query)
        if isinstance(page, str):
            return 400, {"error": page}
        offset, limit = page
        user_ids = self.manager.user_ids()
        per_user = {}
        for user_id in user_ids[offset:offset + limit]:
            session = self.manager.session(user_id)
            if session is not None:
                per_user[user_id] = attrs.asdict(session.get_stats())
        end = min(offset + limit, len(user_ids))
        stats["per_user"] = per_user
        stats["page"] = {
            "offset": offset, "limit": limit, "total": len(user_ids),
            "next_offset": end if end < len(user_ids) else None,
        }
        return 200, stats

    async def _admin_revoke(self, stream: trio.abc.Stream, head: RequestHead) -> None:
        """``POST /admin/revoke?user=U`` (admin token): refuse U's tokens issued until now, on
        every node, and close U's connections everywhere with 4003."""
        if head.method != "POST":
            await self._respond(
                stream, 405, {"error": "use POST /admin/revoke?user=U"}, head=head,
                extra_headers=[("Allow", "POST")],
            )
            return
        if await self._admin_refused(stream, head):
            return
        try:
            user_id = check_id("user", head.query.get("user", [None])[0])
        except InvalidIdentifier as exc:
            await self._respond(stream, 400, {"error": f"{exc}; pass ?user=U"})
            return
        cutoff = time.time()
        try:
            await self.revocations.revoke(user_id, cutoff)
            closed = await self.manager.disconnect_user(user_id, CloseCode.REVOKED, "revoked")
        except BrokerUnavailable as exc:
            await self._respond(stream, 503, {"error": f"revocation failed: {exc}"})
            return
        log.info("revoked the tokens of a user; closed %d connections here", closed)
        await self._respond(
            stream, 200, {"user": user_id, "revoked_before": cutoff, "closed_here": closed}
        )

    # ---- WebSocket upgrade ------------------------------------------------------------------

    async def _refuse(
        self, stream: trio.abc.Stream, status: int, reason: str, message: str,
        extra_headers: list[tuple[str, str]] | None = None,
    ) -> None:
        self.rejections[reason] = self.rejections.get(reason, 0) + 1
        log.info("refused a WebSocket handshake: %s", reason)  # never the token
        await self._respond(stream, status, {"error": message}, extra_headers=extra_headers or [])

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
    ) -> tuple[Claims, str | None, ConnectionSlot] | None:
        """Check an upgrade request: refuse it (and return None), or return the token's
        claims, the subprotocol to select and the connection slot reserved for it (the
        caller must consume or release it)."""
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
            claims = await self.tokens.admit(self._token(head), claimed_user=claimed)
        except AuthError as exc:
            status = 503 if exc.reason == "unavailable" else 401
            await self._refuse(stream, status, f"auth_{exc.reason}", str(exc))
            return None
        session = self.manager.get_websocket_manager(UserContext(user_id=claims.user_id))
        try:
            # Reserved before any await, so simultaneous handshakes cannot all pass the limit.
            slot = session.reserve_connection()
        except TooManyConnections as exc:
            await self._refuse(stream, 429, "connection_limit", str(exc))
            return None
        try:
            # With Redis the limit holds over the cluster: claim the place there as well.
            await self.manager.reserve_cluster_connection(session)
        except TooManyConnections as exc:
            slot.release()
            await self._refuse(stream, 429, "connection_limit", str(exc))
            return None
        except BrokerUnavailable as exc:
            slot.release()
            await self._refuse(stream, 503, "backplane_unavailable", str(exc))
            return None
        offered = [
            value.strip() for value in (head.header("sec-websocket-protocol") or "").split(",")
            if value.strip()
        ]
        # Only one of ours is ever selected, never the bearer entry (that would echo the
        # token in the response). A browser that offers only bearer.<token> then fails the
        # handshake, so it must offer agentcast.v1 or agentcast.ndjson too.
        subprotocol = select_subprotocol(offered)
        return claims, subprotocol, slot

    async def _open_websocket(
        self, stream: trio.abc.Stream, head: RequestHead, claims: Claims,
        subprotocol: str | None, slot: ConnectionSlot,
    ) -> tuple[ServerWebSocket, Connection] | None:
        """Answer the upgrade and hand the WebSocket to the user's session (whose connection
        closes the socket from then on); None if the handshake did not finish."""
        core = self.settings.core
        # The WebSocket outlives this handler task (which trio's serve_listeners ends by
        # closing its stream): from here on the socket is ``own``'s, closed below on failure.
        own = take_over(stream)
        opened = None
        try:
            # The frames that follow go through a guard (limits below messages); any the
            # client sent with its head are scanned too and handled first.
            guard, early = InboundGuard.create(head.raw, core)
            key = head.header("sec-websocket-key") or ""  # decide_upgrade checked there is one
            # The slot is held across these awaits: bound them, and give it back on any
            # failure (a handshake that dies half-way).
            ws = None
            with trio.move_on_after(self.settings.handshake_timeout):
                try:
                    ws = await ServerWebSocket.accept(
                        own, guard, key, subprotocol=subprotocol,
                        max_message_bytes=core.max_message_bytes,
                        write_timeout=core.write_timeout, unread=early,
                    )
                except ConnectionClosed:
                    return None  # the client left before its 101
            if ws is None:
                return None  # its 101 could not be written in time
            # A token naming threads subscribes to them and confines the client to them.
            # agentcast.agui / agentcast.vercel-ai: translated at the edge (batched
            # inside, the translator frames what the client receives).
            connection = await slot.session.add_connection(
                wrap_transport(ws, subprotocol), threads=claims.threads,
                allowed_threads=claims.threads or None, slot=slot,
                credentials=self.tokens.grant(claims),
                batch=batch_for(subprotocol),
            )
            opened = ws, connection
        finally:
            slot.release()
            if opened is None and own.fileno() >= 0:
                # Nothing else holds the socket yet: close it (waking any waiter first).
                trio.lowlevel.notify_closing(own)
                own.close()
        return opened

    async def _recheck_revocation(self, connection: Connection, claims: Claims) -> None:
        """Close a just-registered connection whose user was revoked during its handshake (the
        revocation closed the user's connections before this one was counted among them)."""
        try:
            revoked = await self.tokens.revoked(claims)
        except AuthError:
            connection.close(CloseCode.SERVICE_RESTART, "revocation list unavailable; retry")
            return
        if revoked:
            connection.close(CloseCode.REVOKED, "revoked")

"""The trio-native ASGI surface: ``lifespan``, ``endpoint``, ``serve_websocket`` and ``Refuse``.

Under a trio ASGI server (``hypercorn --worker-class trio``) the manager runs in the lifespan
task and every WebSocket is served in its own request task through an :class:`ASGITransport`:
the same sessions, protocol, batching, limits and stats as the standalone server. Under an
asyncio server the same names hand the connection to the threaded bridge when the app uses
``agentcast.asgi.threaded()``, and otherwise fail with a message that says what to do.

The lifespan's context variables are not visible in request tasks, so the manager travels
explicitly: in the ASGI lifespan state under ``"agentcast"``, or as ``manager=``.
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import Awaitable, Callable, Collection, MutableMapping, Sequence
from types import TracebackType
from typing import Any, Final, Protocol, final

import sniffio
import trio

from .._config import Config
from .._context import UserContext
from .._credentials import Credentials
from .._errors import (
    AgentcastError,
    InvalidUserContext,
    ManagerNotRunning,
    SessionClosed,
    TooManyConnections,
)
from .._manager import ConnectionManager, open_manager
from .._session import MessageHandler
from ..backplane.protocol import Broker
from ..protocols import batch_for, wrap_transport
from ._policy import STATE_KEY, choose_subprotocol, needs_trio_message, refusal_events
from ._transport import ASGIReceive, ASGISend, ASGITransport

__all__ = [
    "AsyncioNotSupported",
    "Authenticate",
    "Endpoint",
    "Lifespan",
    "Refuse",
    "endpoint",
    "lifespan",
    "serve_websocket",
]

log = logging.getLogger("agentcast.asgi")

#: An ASGI connection scope, as every ASGI server passes it (annotate `authenticate` with it).
Scope = MutableMapping[str, Any]
#: ``authenticate(scope) -> UserContext``, sync or async; raise :class:`Refuse` to refuse.
Authenticate = Callable[[Scope], UserContext | Awaitable[UserContext]]

#: Seconds from the request to the accept: ``websocket.connect``, ``authenticate`` and the
#: accept itself (the connection slot is held meanwhile).
HANDSHAKE_TIMEOUT: Final = 10.0


class AsyncioNotSupported(AgentcastError, RuntimeError):
    """Trio-native agentcast code was started under asyncio (uvicorn, hypercorn's asyncio
    worker); the message says which server or bridge to use instead."""


@final
class Refuse(AgentcastError):
    """Raise from ``authenticate`` to refuse a handshake with an HTTP ``status``.

    Servers that offer the WebSocket Denial Response extension (hypercorn, uvicorn) answer with
    that status and ``{"error": reason}``; others can only close before accept, which is 403.
    """

    def __init__(self, status: int, reason: str) -> None:
        if not 400 <= status <= 599:
            raise ValueError(f"Refuse needs a 4xx or 5xx status, got {status!r}")
        super().__init__(f"{status} {reason}")
        self.status = status
        self.reason = reason


class BridgedManager(Protocol):
    """What the endpoint needs from the threaded bridge (``agentcast.asgi.threaded``)."""

    async def serve_asgi(
        self, scope: Scope, receive: ASGIReceive, send: ASGISend, *,
        authenticate: Authenticate | None, user_context: UserContext | None,
        connected: bool, threads: Sequence[str], allowed_threads: Collection[str] | None,
        credentials: Credentials | None, handshake_timeout: float,
    ) -> None:
        """Serve one ASGI WebSocket on the asyncio side, its connection in the trio thread."""


@final
class Lifespan:
    """Runs ``open_manager`` for the app's life; made by :func:`lifespan`.

    Use it as ``lifespan=`` (Starlette and FastAPI call it with the app), or enter it inside
    your own lifespan with ``async with`` (it yields the state to merge into yours). The
    manager is then in the lifespan state under ``"agentcast"`` and in :attr:`manager`.
    """

    def __init__(
        self, config: Config | None, broker: Broker | None, message_handler: MessageHandler | None
    ) -> None:
        self._config = config
        self._broker = broker
        self._message_handler = message_handler
        self._manager: ConnectionManager | None = None
        self._context: Any = None

    def __repr__(self) -> str:
        return f"<agentcast.asgi.Lifespan {'running' if self._manager else 'stopped'}>"

    @property
    def manager(self) -> ConnectionManager:
        """The running manager.

        Raises:
            ManagerNotRunning: the lifespan is not running (the app has not started, or the
                server does not run lifespans: hypercorn and uvicorn do by default).
        """
        if self._manager is None:
            raise ManagerNotRunning(
                "the agentcast lifespan is not running; pass it to the app as lifespan= (or "
                "enter it in your own lifespan) and serve the app with lifespan events on"
            )
        return self._manager

    def __call__(self, app: object) -> Lifespan:
        """Starlette's and FastAPI's ``lifespan(app)`` protocol: the context manager itself."""
        return self

    async def __aenter__(self) -> dict[str, Any]:
        library = sniffio.current_async_library()
        if library != "trio":
            raise AsyncioNotSupported(needs_trio_message(library, "agentcast.asgi.lifespan()"))
        if self._context is not None:
            raise RuntimeError("this agentcast lifespan is already running; make one per app")
        context = open_manager(
            self._config, broker=self._broker, message_handler=self._message_handler
        )
        self._manager = await context.__aenter__()
        self._context = context
        return {STATE_KEY: self._manager}

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None,
        tb: TracebackType | None,
    ) -> bool | None:
        context, self._context = self._context, None
        try:
            return bool(await context.__aexit__(exc_type, exc, tb))
        finally:
            self._manager = None


def lifespan(
    config: Config | None = None,
    *,
    broker: Broker | None = None,
    message_handler: MessageHandler | None = None,
) -> Lifespan:
    """A lifespan that runs ``open_manager(config, broker=..., message_handler=...)`` for the
    app's life and puts the manager in the lifespan state (key ``"agentcast"``).

    Example::

        app = FastAPI(lifespan=agentcast.asgi.lifespan())
        app.mount("/ws", agentcast.asgi.endpoint(authenticate=my_auth))
    """
    return Lifespan(config, broker, message_handler)


ManagerSource = ConnectionManager | Lifespan | BridgedManager | None


def _resolve(source: ManagerSource, scope: Scope) -> ConnectionManager | BridgedManager:
    if isinstance(source, Lifespan):
        return source.manager
    if source is not None:
        return source
    state = scope.get("state")
    found = state.get(STATE_KEY) if isinstance(state, MutableMapping) else None
    if found is None:
        raise ManagerNotRunning(
            "no agentcast manager in the ASGI lifespan state; give the app "
            "lifespan=agentcast.asgi.lifespan() (or threaded() under asyncio), or pass "
            "manager= to endpoint()/serve_websocket()"
        )
    return found  # type: ignore[no-any-return]


async def _authenticate(authenticate: Authenticate, scope: Scope) -> UserContext:
    result = authenticate(scope)
    if inspect.isawaitable(result):
        result = await result
    if not isinstance(result, UserContext):
        raise TypeError(
            f"authenticate() returned {type(result).__name__}; return an agentcast.UserContext "
            "or raise agentcast.asgi.Refuse(status, reason)"
        )
    return result


async def authenticate_or_refuse(
    authenticate: Authenticate, scope: Scope, send: ASGISend
) -> UserContext | None:
    """Run ``authenticate``; on :class:`Refuse` (or a broken authenticate) send the refusal and
    return None. Library-agnostic: it only awaits the callables it is given."""
    try:
        return await _authenticate(authenticate, scope)
    except Refuse as refusal:
        await refuse(scope, send, refusal.status, refusal.reason)
    except InvalidUserContext as exc:
        await refuse(scope, send, 400, str(exc))
    except Exception:
        log.exception("authenticate() raised; refused the handshake with 500")
        await refuse(scope, send, 500, "authentication failed")
    return None


async def refuse(scope: Scope, send: ASGISend, status: int, reason: str) -> None:
    """Refuse a handshake that has not been accepted (see :func:`refusal_events`)."""
    log.info("refused a WebSocket handshake with %d", status)
    for event in refusal_events(status, reason, scope.get("extensions")):
        await send(event)


async def _serve_trio(
    manager: ConnectionManager, scope: Scope, receive: ASGIReceive, send: ASGISend,
    user_context: UserContext, *, threads: Sequence[str],
    allowed_threads: Collection[str] | None, credentials: Credentials | None,
    deadline: float,
) -> None:
    """Reserve a slot, accept, and serve the connection until it closes."""
    try:
        session = manager.get_websocket_manager(user_context)
        # Reserved before any await, so simultaneous handshakes cannot all pass the limit.
        slot = session.reserve_connection()
    except TooManyConnections as exc:
        await refuse(scope, send, 429, str(exc))
        return
    except (ManagerNotRunning, SessionClosed) as exc:
        await refuse(scope, send, 503, str(exc))
        return
    try:
        subprotocol = choose_subprotocol(scope.get("subprotocols") or ())
        transport = ASGITransport(receive, send, subprotocol)
        accepted = False
        with trio.move_on_at(deadline):
            await send({"type": "websocket.accept", "subprotocol": subprotocol})
            accepted = True
        if not accepted:
            return
        async with trio.open_nursery() as nursery:
            nursery.start_soon(transport.pump, name="agentcast.asgi.pump")
            try:
                # agentcast.agui / agentcast.vercel-ai: translated at the edge, as standalone.
                connection = await session.add_connection(
                    wrap_transport(transport, subprotocol), threads=threads,
                    allowed_threads=allowed_threads, slot=slot, credentials=credentials,
                    batch=batch_for(subprotocol),
                )
                await session.hold_connection(connection)
            finally:
                transport.stop()
    finally:
        slot.release()


@final
class Endpoint:
    """A pure ASGI app serving agentcast WebSockets; made by :func:`endpoint`."""

    def __init__(
        self, authenticate: Authenticate, manager: ManagerSource, threads: Sequence[str],
        handshake_timeout: float,
    ) -> None:
        self._authenticate = authenticate
        self._manager = manager
        self._threads = tuple(threads)
        self._handshake_timeout = handshake_timeout

    def __repr__(self) -> str:
        return f"<agentcast.asgi.Endpoint authenticate={self._authenticate!r}>"

    async def __call__(self, scope: Scope, receive: ASGIReceive, send: ASGISend) -> None:
        kind = scope.get("type")
        if kind == "http":
            await _upgrade_required(send)
            return
        if kind != "websocket":
            return  # lifespan: the app's lifespan (agentcast.asgi.lifespan) runs the manager
        source = _resolve(self._manager, scope)
        library = sniffio.current_async_library()
        if library != "trio":
            if isinstance(source, ConnectionManager):
                raise AsyncioNotSupported(needs_trio_message(library, "agentcast.asgi.endpoint"))
            await source.serve_asgi(
                scope, receive, send, authenticate=self._authenticate, user_context=None,
                connected=False, threads=self._threads, allowed_threads=None, credentials=None,
                handshake_timeout=self._handshake_timeout,
            )
            return
        if not isinstance(source, ConnectionManager):
            raise AsyncioNotSupported(
                "agentcast.asgi.threaded() is for asyncio servers; under a trio server use "
                "agentcast.asgi.lifespan()"
            )
        deadline = trio.current_time() + self._handshake_timeout
        user_context: UserContext | None = None
        with trio.move_on_at(deadline):
            event = await receive()
            if event.get("type") != "websocket.connect":
                return  # the client left before the handshake
            user_context = await authenticate_or_refuse(self._authenticate, scope, send)
        if user_context is None:
            return
        await _serve_trio(
            source, scope, receive, send, user_context, threads=self._threads,
            allowed_threads=None, credentials=None, deadline=deadline,
        )


async def _upgrade_required(send: ASGISend) -> None:
    body = b'{"error":"this endpoint needs a WebSocket upgrade"}'
    await send({
        "type": "http.response.start", "status": 426,
        "headers": [(b"content-type", b"application/json"), (b"upgrade", b"websocket"),
                    (b"content-length", str(len(body)).encode())],
    })
    await send({"type": "http.response.body", "body": body})


def endpoint(
    *,
    authenticate: Authenticate,
    manager: ManagerSource = None,
    threads: Sequence[str] = (),
    handshake_timeout: float = HANDSHAKE_TIMEOUT,
) -> Endpoint:
    """A pure ASGI app for ``app.mount("/ws", ...)`` or a ``WebSocketRoute``.

    Args:
        authenticate: ``authenticate(scope) -> UserContext``, sync or async; raise
            :class:`Refuse` to refuse (401, 403, 429, ...).
        manager: where the manager comes from: a :class:`Lifespan`, a running
            ``ConnectionManager``, the threaded bridge, or None for the ASGI lifespan state.
        threads: threads every connection is subscribed to when it opens (live events).
        handshake_timeout: seconds for ``websocket.connect``, ``authenticate`` and the accept.
    """
    return Endpoint(authenticate, manager, threads, handshake_timeout)


class _WebSocketLike(Protocol):
    @property
    def scope(self) -> Scope: ...

    async def receive(self) -> MutableMapping[str, Any]: ...

    async def send(self, message: MutableMapping[str, Any]) -> None: ...


async def serve_websocket(
    websocket: _WebSocketLike,
    user_context: UserContext,
    *,
    manager: ManagerSource = None,
    threads: Sequence[str] = (),
    allowed_threads: Collection[str] | None = None,
    credentials: Credentials | None = None,
    handshake_timeout: float = HANDSHAKE_TIMEOUT,
) -> None:
    """Serve a Starlette/FastAPI ``WebSocket`` that the route has authenticated itself (e.g.
    with ``Depends()``), until it closes. Do not accept it first: this selects the subprotocol
    and accepts, or refuses (429 at the connection limit, 503 while shutting down).
    """
    scope = websocket.scope
    source = _resolve(manager, scope)
    connecting = getattr(getattr(websocket, "client_state", None), "name", None) == "CONNECTING"
    library = sniffio.current_async_library()
    if library != "trio":
        if isinstance(source, ConnectionManager):
            raise AsyncioNotSupported(needs_trio_message(library, "agentcast.asgi.serve_websocket"))
        await source.serve_asgi(
            scope, websocket.receive, websocket.send, authenticate=None,
            user_context=user_context, connected=not connecting, threads=threads,
            allowed_threads=allowed_threads, credentials=credentials,
            handshake_timeout=handshake_timeout,
        )
        return
    if not isinstance(source, ConnectionManager):
        raise AsyncioNotSupported(
            "agentcast.asgi.threaded() is for asyncio servers; under a trio server use "
            "agentcast.asgi.lifespan()"
        )
    deadline = trio.current_time() + handshake_timeout
    if connecting:
        event: MutableMapping[str, Any] = {}
        with trio.move_on_at(deadline):
            event = await websocket.receive()
        if event.get("type") != "websocket.connect":
            return
    await _serve_trio(
        source, scope, websocket.receive, websocket.send, user_context, threads=threads,
        allowed_threads=allowed_threads, credentials=credentials, deadline=deadline,
    )

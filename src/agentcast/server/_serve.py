"""Run the server: listeners, the manager, and a graceful stop.

Stopping (``stop`` set, e.g. by SIGTERM) closes the listeners first, reports draining in
``/health``, then leaves the manager's block, which cancels runs and closes every connection
with 1001 within ``Config.shutdown_timeout``; whatever is still running after that is cancelled.
"""

from __future__ import annotations

import functools
import secrets
import socket
from importlib import resources
from typing import Any, Final

import attrs
import trio

from .._errors import ClientError
from .._manager import ConnectionManager, open_manager
from .._session import MessageHandler, UserSession
from ..backplane.memory import InMemoryBroker
from ..backplane.protocol import Broker
from ..backplane.redis.broker import RedisBroker
from ..demo import simulated_agent
from ._admin import check_admin_token
from ._app import Server
from ._auth import check_secret, issue_token
from ._metrics import Metrics
from ._settings import ServerSettings
from ._tokens import MemoryRevocations, RedisRevocations, Revocations

__all__ = ["DEMO_USER", "RunningServer", "serve"]

#: The user the demo page connects as.
DEMO_USER: Final = "demo-user"
#: Lifetime of the demo page's token, in seconds.
DEMO_TOKEN_TTL: Final = 7 * 24 * 3600


@attrs.frozen
class RunningServer:
    """What ``await nursery.start(serve, settings)`` hands back."""

    server: Server
    host: str
    port: int
    #: The secret in use (generated in demo mode when none was given).
    secret: str = attrs.field(repr=False)
    #: The admin token in use (generated in demo mode when none was given); None: admin
    #: endpoints are off.
    admin_token: str | None = attrs.field(default=None, repr=False)

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    @property
    def manager(self) -> ConnectionManager:
        """The server's :class:`~agentcast.ConnectionManager`: publish from the embedding
        program with ``running.manager.get_websocket_manager(ctx)`` (a user's session), as
        from any manager; see examples/serve_and_publish.py."""
        return self.server.manager


def demo_message_handler(speed: float) -> MessageHandler:
    """Start the simulated agent for every ``{"type": "user_message", "thread_id", "text"}``."""

    async def handle(session: UserSession, connection: Any, frame: dict[str, Any]) -> None:
        await trio.lowlevel.checkpoint()
        thread_id, text = frame.get("thread_id"), frame.get("text")
        if frame["type"] != "user_message":
            raise ClientError("unknown_type", f"unknown frame type {frame['type']!r}")
        if not isinstance(thread_id, str) or not isinstance(text, str) or not text.strip():
            raise ClientError("invalid_field", "user_message needs thread_id and a non-empty text")
        agent = functools.partial(simulated_agent, speed=speed)
        session.start_run(thread_id, agent, text[:2000], agent_name="demo-agent")

    return handle


async def serve(
    settings: ServerSettings,
    *,
    stop: trio.Event | None = None,
    message_handler: MessageHandler | None = None,
    task_status: trio.TaskStatus[RunningServer] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve until ``stop`` is set (forever if None), then drain and return.

    ``message_handler`` handles client frame types agentcast does not know (see
    :class:`~agentcast.MessageHandler`); in demo mode it defaults to starting the simulated agent
    for ``user_message`` frames.

    Raises:
        ValueError: no secret outside demo mode, or a secret that is too short.
    """
    if settings.secret is None and not settings.demo:
        raise ValueError(
            "refusing to start without a token secret: pass --secret (or AGENTCAST_SECRET), "
            "or --demo for a local demo"
        )
    secret = check_secret(settings.secret or secrets.token_urlsafe(32))
    admin_token = check_admin_token(settings.admin_token)
    if admin_token is None and settings.demo:
        admin_token = secrets.token_urlsafe(32)
    settings = attrs.evolve(settings, admin_token=admin_token)
    if settings.core.max_connections_per_user is None:
        # The per-user limit lives in the core (reserved atomically by the session).
        settings = attrs.evolve(settings, core=attrs.evolve(
            settings.core, max_connections_per_user=settings.max_connections_per_user
        ))
    stop = trio.Event() if stop is None else stop
    handler = message_handler
    if handler is None and settings.demo:
        handler = demo_message_handler(settings.demo_speed)
    async with trio.open_nursery() as handlers:
        metrics = Metrics()
        inner: Broker = (
            InMemoryBroker(settings.core) if settings.redis_url is None
            else RedisBroker(
                settings.redis_url, settings.core, timeout=settings.redis_timeout,
                outage_grace=settings.redis_grace,
            )
        )
        broker = metrics.wrap(inner)
        async with open_manager(
            settings.core, broker=broker, message_handler=handler
        ) as manager:
            listeners = await _listeners(settings)
            port = listeners[0].socket.getsockname()[1]
            origins = frozenset({f"http://{settings.host}:{port}", f"http://localhost:{port}"})
            revocations: Revocations = (
                RedisRevocations(inner) if isinstance(inner, RedisBroker)
                else MemoryRevocations()
            )
            server = Server(settings, manager, secret, own_origins=origins, metrics=metrics,
                            revocations=revocations)
            metrics.watch(manager, server.rejections)
            handlers.start_soon(server.keepalive.run, name="agentcast.server.keepalive")
            if settings.demo:
                server.demo_page = _demo_page(issue_token(secret, DEMO_USER, ttl=DEMO_TOKEN_TTL))
            with trio.CancelScope() as accepting:
                async with trio.open_nursery() as listening:
                    await listening.start(
                        functools.partial(
                            trio.serve_listeners, server.handle, listeners,
                            handler_nursery=handlers,
                        )
                    )
                    task_status.started(
                        RunningServer(server, settings.host, port, secret, admin_token)
                    )
                    await stop.wait()
                    server.draining = True
                    accepting.cancel()  # stop accepting; open connections go on
        # The manager has closed every connection with 1001; cut what is left (half-read heads).
        handlers.cancel_scope.cancel()


async def _listeners(settings: ServerSettings) -> list[trio.SocketListener]:
    """TCP listeners for the settings; with ``reuse_port`` one SO_REUSEPORT socket, so the
    kernel spreads new connections over every worker bound to the same port."""
    if not settings.reuse_port:
        return await trio.open_tcp_listeners(settings.port, host=settings.host)
    family = socket.AF_INET6 if ":" in settings.host else socket.AF_INET
    sock = trio.socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        await sock.bind((settings.host, settings.port))
        sock.listen(socket.SOMAXCONN)
    except BaseException:
        sock.close()
        raise
    return [trio.SocketListener(sock)]


def _demo_page(token: str) -> bytes:
    """The demo page with a token for the demo user baked in (demo mode only)."""
    page = resources.files("agentcast.server").joinpath("demo.html").read_bytes()
    return page.replace(b"__AGENTCAST_DEMO_TOKEN__", token.encode())

"""Server settings: every knob of ``agentcast serve``, named, documented and validated once."""

from __future__ import annotations

from typing import Any, Final

import attrs

from .._config import Config, positive
from .._redact import redact_url
from ..backplane.redis.broker import OUTAGE_GRACE
from ..backplane.redis.streams import REDIS_TIMEOUT
from ._auth import LEEWAY

__all__ = ["ServerSettings"]

#: Address the server binds when none is given (loopback: exposing it is a decision).
DEFAULT_HOST: Final = "127.0.0.1"
#: Port the server binds when none is given.
DEFAULT_PORT: Final = 8765
#: Highest TCP port number; a larger one would silently wrap when bound.
MAX_PORT: Final = 65535
#: Connections one user may hold at once; one more is refused with HTTP 429.
MAX_CONNECTIONS_PER_USER: Final = 10
#: Largest request head (request line and headers), in bytes; larger gets 431.
MAX_HEADER_BYTES: Final = 8 * 1024
#: Seconds a TCP connection has to send a complete request head.
HANDSHAKE_TIMEOUT: Final = 10.0
#: Seconds one HTTP response (a page, ``/metrics``, a refusal) may take to be written; a client
#: that stops reading is cut off then, so it holds no task, socket or buffer.
HTTP_WRITE_TIMEOUT: Final = 5.0
#: Seconds between server keepalive pings on an open WebSocket.
PING_INTERVAL: Final = 20.0
#: Seconds a pong may take before the connection is dropped as dead.
PING_TIMEOUT: Final = 20.0


def _check_port(port: int) -> None:
    if not 0 <= port <= MAX_PORT:
        raise ValueError(f"the port must be between 0 and {MAX_PORT}, got {port}")


@attrs.frozen(kw_only=True)
class ServerSettings:
    """What ``agentcast serve`` runs with; the CLI builds it from flags and AGENTCAST_* vars."""

    host: str = DEFAULT_HOST
    #: 0 picks a free port; the bound address is printed on the first line of output.
    port: int = attrs.field(default=DEFAULT_PORT, validator=lambda _, __, port: _check_port(port))
    #: HS256 secret for tokens (at least 32 bytes); required unless ``demo``.
    secret: str | None = attrs.field(default=None, repr=False)
    #: Exact ``Origin`` values allowed to open a WebSocket; requests without Origin (non-browser
    #: clients) are allowed; with an empty list only the server's own origin is.
    allowed_origins: tuple[str, ...] = ()
    #: Serve the demo page and the simulated agent (generates a secret when none is given).
    demo: bool = False
    #: Speed factor of the demo agent's delays (2.0 is twice as fast).
    demo_speed: float = attrs.field(default=1.0, validator=positive)
    max_connections_per_user: int = attrs.field(
        default=MAX_CONNECTIONS_PER_USER, validator=positive
    )
    max_header_bytes: int = attrs.field(default=MAX_HEADER_BYTES, validator=positive)
    handshake_timeout: float = attrs.field(default=HANDSHAKE_TIMEOUT, validator=positive)
    http_write_timeout: float = attrs.field(default=HTTP_WRITE_TIMEOUT, validator=positive)
    ping_interval: float = attrs.field(default=PING_INTERVAL, validator=positive)
    ping_timeout: float = attrs.field(default=PING_TIMEOUT, validator=positive)
    #: Bearer token (at least 32 bytes) that ``/stats``, ``/config``, ``/metrics`` and the admin
    #: actions require; None turns those endpoints off (403). ``demo`` generates one.
    admin_token: str | None = attrs.field(default=None, repr=False)
    #: Seconds of clock difference tolerated on a token's ``exp`` and ``iat``: a connection is
    #: closed with 4001 this long after its token's ``exp``.
    token_leeway: float = attrs.field(default=LEEWAY, validator=attrs.validators.ge(0))
    #: When set, tokens must carry this ``iss`` (``--token-issuer``).
    token_issuer: str | None = None
    #: When set, tokens must carry this ``aud`` (``--token-audience``); when None an ``aud``
    #: claim is not checked.
    token_audience: str | None = None
    #: ``redis://HOST:PORT/DB`` of the Redis backplane; None runs a single in-memory node.
    redis_url: str | None = attrs.field(
        default=None, repr=lambda url: repr(None if url is None else redact_url(url))
    )
    #: Seconds any one Redis call may take (``--redis-timeout``); a frozen Redis makes the node
    #: not-ready within it and producers get BrokerUnavailable then.
    redis_timeout: float = attrs.field(default=REDIS_TIMEOUT, validator=positive)
    #: Seconds a frozen Redis may stay silent before every connection is closed with 1012
    #: (``--redis-grace``); shorter stalls are invisible to clients.
    redis_grace: float = attrs.field(default=OUTAGE_GRACE, validator=attrs.validators.ge(0))
    #: Bind with SO_REUSEPORT so several worker processes share the port (``--workers``).
    reuse_port: bool = False
    #: The core settings (queues, timeouts, history, inbound limits).
    core: Config = attrs.Factory(Config)

    def redacted(self) -> dict[str, Any]:
        """These settings as JSON-ready data, with the secret and admin token replaced by
        ``"***"`` and the Redis URL's password masked (``redis://:***@host``)."""
        data = attrs.asdict(self)
        data["secret"] = None if self.secret is None else "***"
        data["admin_token"] = None if self.admin_token is None else "***"
        data["redis_url"] = None if self.redis_url is None else redact_url(self.redis_url)
        return data

"""The ``agentcast`` command: ``serve``, ``token`` and ``revoke``. Every option also reads
AGENTCAST_*.

Rules of this module: a mistake in the command line or the environment (a bad number, a port
outside 0-65535, an unknown log level, a port in use, an unknown host) is one line on stderr
and exit status 2, never a traceback; ``agentcast listening on URL`` is the first line on
stdout (logs go to stderr).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Sequence
from typing import Final, NoReturn, TypeVar

import attrs
import trio

from .._config import Config
from .._errors import BrokerUnavailable
from .._ids import check_id
from .._protocol import CloseCode
from ..backplane.redis.broker import OUTAGE_GRACE
from ..backplane.redis.streams import REDIS_TIMEOUT, StreamOps, redis_client
from ._admin import check_admin_token
from ._auth import DEFAULT_TTL, check_secret, issue_token
from ._gc import DEFAULT_GC_THRESHOLD, tune_gc
from ._serve import DEMO_USER, RunningServer, serve
from ._settings import (
    DEFAULT_HOST,
    DEFAULT_PORT,
    MAX_CONNECTIONS_PER_USER,
    MAX_PORT,
    ServerSettings,
)
from ._workers import run_workers

__all__ = ["main"]

#: Seconds ``agentcast revoke`` waits for the server's (or Redis's) answer.
REVOKE_TIMEOUT: Final = 10.0

T = TypeVar("T", int, float)


def _env(name: str, default: str | None = None) -> str | None:
    return os.environ.get(f"AGENTCAST_{name}", default)


def _env_flag(name: str) -> bool:
    return (_env(name) or "").strip().lower() in {"1", "true", "yes", "on"}


#: Log levels ``--log-level`` accepts.
LOG_LEVELS: Final = ("CRITICAL", "ERROR", "WARNING", "INFO", "DEBUG")
#: Shortest ``--heartbeat``, seconds: a data frame per connection more often than this is load,
#: not keepalive.
MIN_HEARTBEAT: Final = 1.0


class _Parser(argparse.ArgumentParser):
    """An argument parser whose errors are one line on stderr and exit status 2."""

    def error(self, message: str) -> NoReturn:
        # "argument --port: --port (or AGENTCAST_PORT) must be ...": name the flag once.
        flag, sep, rest = message.partition(": ")
        if sep and flag.startswith("argument ") and rest.startswith(flag[len("argument "):]):
            message = rest
        self.exit(2, f"{self.prog}: {message} (see {self.prog} --help)\n")


def _number(
    convert: Callable[[str], T], flag: str, env: str | None, *, minimum: T | None = None,
    maximum: T | None = None,
) -> Callable[[str], T]:
    """An argparse ``type`` for ``flag`` (also read from ``AGENTCAST_<env>`` unless None), with
    bounds.

    argparse passes a string default (the environment variable) through it too, so a bad
    environment value is reported like a bad flag, naming both.
    """

    def parse(text: str) -> T:
        bounds = (
            f" between {minimum} and {maximum}" if minimum is not None and maximum is not None
            else f" of at least {minimum}" if minimum is not None else ""
        )
        kind = "an integer" if convert is int else "a number"
        source = f"{flag} (or AGENTCAST_{env})" if env else flag
        wanted = f"{source} must be {kind}"
        try:
            value = convert(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{wanted}{bounds}, got {text!r}") from None
        if (minimum is not None and value < minimum) or (
            maximum is not None and value > maximum
        ):
            raise argparse.ArgumentTypeError(f"{wanted}{bounds}, got {text!r}")
        return value

    parse.__name__ = flag  # what argparse names in its own messages
    return parse


def _log_level(text: str) -> str:
    level = text.strip().upper()
    if level not in LOG_LEVELS:
        raise argparse.ArgumentTypeError(
            f"--log-level (or AGENTCAST_LOG_LEVEL) must be one of {', '.join(LOG_LEVELS)}, "
            f"got {text!r}"
        )
    return level


def _parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="agentcast",
        description="agentcast: stream AI-agent events to browsers over WebSocket. Every serve "
                    "option also reads an AGENTCAST_* environment variable.",
    )
    commands = parser.add_subparsers(dest="command", required=True)

    run = commands.add_parser("serve", help="run the WebSocket + HTTP server")
    run.add_argument("--host", default=_env("HOST", DEFAULT_HOST),
                     help="address to bind (AGENTCAST_HOST; default: %(default)s)")
    run.add_argument("--port", type=_number(int, "--port", "PORT", minimum=0, maximum=MAX_PORT),
                     default=_env("PORT", str(DEFAULT_PORT)),
                     help="TCP port, 0 picks a free one; the bound address is the first line "
                          "on stdout (AGENTCAST_PORT; default: %(default)s)")
    run.add_argument("--secret", default=_env("SECRET"),
                     help="HS256 token secret, at least 32 bytes (AGENTCAST_SECRET; default: "
                          "none, required unless --demo)")
    run.add_argument("--admin-token", default=_env("ADMIN_TOKEN"),
                     help="bearer token, at least 32 bytes, that /stats, /config and /metrics "
                          "require (AGENTCAST_ADMIN_TOKEN; default: none, those endpoints "
                          "answer 403; --demo generates one)")
    run.add_argument("--allowed-origin", action="append", dest="allowed_origins",
                     default=[o for o in (_env("ALLOWED_ORIGINS") or "").split(",") if o],
                     help="exact Origin allowed to connect; repeat for several "
                          "(AGENTCAST_ALLOWED_ORIGINS, comma-separated; default: only the "
                          "server's own origin)")
    run.add_argument("--demo", action="store_true", default=_env_flag("DEMO"),
                     help="demo page at /, simulated agent, generated secret and demo token "
                          "(AGENTCAST_DEMO; default: %(default)s)")
    run.add_argument("--demo-speed",
                     type=_number(float, "--demo-speed", "DEMO_SPEED", minimum=0.001),
                     default=_env("DEMO_SPEED", "1"),
                     help="speed factor of the demo agent (AGENTCAST_DEMO_SPEED; default: "
                          "%(default)s)")
    run.add_argument("--max-connections-per-user",
                     type=_number(int, "--max-connections-per-user", "MAX_CONNECTIONS_PER_USER",
                                  minimum=1),
                     default=_env("MAX_CONNECTIONS_PER_USER", str(MAX_CONNECTIONS_PER_USER)),
                     help="open WebSockets one user may hold; one more gets 429 "
                          "(AGENTCAST_MAX_CONNECTIONS_PER_USER; default: %(default)s)")
    run.add_argument("--max-message-bytes",
                     type=_number(int, "--max-message-bytes", "MAX_MESSAGE_BYTES", minimum=1),
                     default=_env("MAX_MESSAGE_BYTES", str(Config().max_message_bytes)),
                     help="largest client message; larger closes with 1009 "
                          "(AGENTCAST_MAX_MESSAGE_BYTES; default: %(default)s)")
    run.add_argument("--redis-url", default=_env("REDIS_URL"),
                     help="redis://HOST:PORT/DB: join the Redis backplane (AGENTCAST_REDIS_URL; "
                          "default: none, one in-memory node)")
    run.add_argument("--redis-timeout",
                     type=_number(float, "--redis-timeout", "REDIS_TIMEOUT", minimum=0.01),
                     default=_env("REDIS_TIMEOUT", str(REDIS_TIMEOUT)),
                     help="seconds any one Redis call may take; a frozen Redis makes /health "
                          "not-ready within it (AGENTCAST_REDIS_TIMEOUT; default: %(default)s)")
    run.add_argument("--redis-grace",
                     type=_number(float, "--redis-grace", "REDIS_GRACE", minimum=0.0),
                     default=_env("REDIS_GRACE", str(OUTAGE_GRACE)),
                     help="seconds a frozen Redis may stay silent before connections are "
                          "closed with 1012 (AGENTCAST_REDIS_GRACE; default: %(default)s)")
    run.add_argument("--workers", type=_number(int, "--workers", "WORKERS", minimum=1),
                     default=_env("WORKERS", "1"),
                     help="server processes sharing the port; more than 1 needs --redis-url "
                          "(AGENTCAST_WORKERS; default: %(default)s)")
    run.add_argument("--gc-threshold",
                     type=_number(int, "--gc-threshold", "GC_THRESHOLD", minimum=0),
                     default=_env("GC_THRESHOLD", str(DEFAULT_GC_THRESHOLD)),
                     help="young-generation GC threshold for this server process; 0 keeps "
                          "Python's default (AGENTCAST_GC_THRESHOLD; default: %(default)s)")
    run.add_argument("--log-level", type=_log_level, default=_env("LOG_LEVEL", "INFO"),
                     help=f"one of {', '.join(LOG_LEVELS)}; logs go to stderr "
                          "(AGENTCAST_LOG_LEVEL; default: %(default)s)")
    run.add_argument("--token-issuer", default=_env("TOKEN_ISSUER"),
                     help="tokens must carry this iss claim (AGENTCAST_TOKEN_ISSUER; "
                          "default: not checked)")
    run.add_argument("--token-audience", default=_env("TOKEN_AUDIENCE"),
                     help="tokens must carry this aud claim (AGENTCAST_TOKEN_AUDIENCE); "
                          "without it an aud claim is not checked (default: none)")
    run.add_argument("--heartbeat", metavar="SECONDS",
                     type=_number(float, "--heartbeat", "HEARTBEAT", minimum=MIN_HEARTBEAT),
                     default=_env("HEARTBEAT"),
                     help="send a {\"type\":\"heartbeat\"} data frame on a connection idle "
                          "this long, for proxies that ignore pings (AGENTCAST_HEARTBEAT; "
                          "default: off)")

    token = commands.add_parser("token", help="print a signed token that serve accepts")
    token.add_argument("--user", required=True, help="the user id the token names (required)")
    token.add_argument("--thread", action="append", dest="threads", default=[],
                       help="confine the token to this thread id; repeat for several "
                            "(default: every thread of the user)")
    token.add_argument("--ttl", type=_number(float, "--ttl", None, minimum=1.0),
                       default=str(float(DEFAULT_TTL)),
                       help="lifetime in seconds (default: %(default)s)")
    token.add_argument("--secret", default=_env("SECRET"),
                       help="the server's HS256 secret (AGENTCAST_SECRET; default: none, "
                            "required)")
    token.add_argument("--issuer", default=_env("TOKEN_ISSUER"),
                       help="the iss claim (AGENTCAST_TOKEN_ISSUER; default: none)")
    token.add_argument("--audience", default=_env("TOKEN_AUDIENCE"),
                       help="the aud claim (AGENTCAST_TOKEN_AUDIENCE; default: none)")

    revoke = commands.add_parser(
        "revoke", help="close a user's connections everywhere (4003) and refuse its tokens "
                       "issued until now",
    )
    revoke.add_argument("--user", required=True)
    revoke.add_argument("--url", default=_env("URL"),
                        help="a running server, e.g. http://127.0.0.1:8765 (AGENTCAST_URL); "
                             "needs --admin-token")
    revoke.add_argument("--admin-token", default=_env("ADMIN_TOKEN"),
                        help="the server's admin token (AGENTCAST_ADMIN_TOKEN)")
    revoke.add_argument("--redis-url", default=_env("REDIS_URL"),
                        help="revoke over the Redis backplane instead (AGENTCAST_REDIS_URL)")
    return parser


def _revoke_over_http(url: str, admin_token: str, user_id: str) -> str:
    """POST /admin/revoke on a running server; returns its JSON answer.

    Raises:
        ValueError: the server refused (with its message) or could not be reached.
    """
    target = f"{url.rstrip('/')}/admin/revoke?{urllib.parse.urlencode({'user': user_id})}"
    if urllib.parse.urlsplit(target).scheme not in ("http", "https"):
        raise ValueError(f"--url must be http:// or https://, got {url!r}")
    request = urllib.request.Request(
        target, method="POST", headers={"Authorization": f"Bearer {admin_token}"}
    )
    try:
        with urllib.request.urlopen(request, timeout=REVOKE_TIMEOUT) as answer:
            return str(answer.read().decode())
    except urllib.error.HTTPError as exc:
        try:
            message = json.loads(exc.read()).get("error", "")
        except ValueError:
            message = ""
        raise ValueError(f"the server answered {exc.code}: {message}") from None
    except (urllib.error.URLError, OSError) as exc:
        raise ValueError(f"could not reach {url}: {exc}") from None


async def _revoke_over_redis(redis_url: str, user_id: str) -> None:
    """Store the cut-off in Redis and tell every node to close the user's connections."""
    with trio.fail_after(REVOKE_TIMEOUT):
        client = redis_client(redis_url)
        async with client:
            ops = StreamOps(client, Config())
            await ops.set_revocation(user_id, time.time())
            await ops.publish_disconnect(user_id, CloseCode.REVOKED, "revoked")


def _revoke(args: argparse.Namespace) -> int:
    try:
        user_id = check_id("--user", args.user)
        if args.url and args.redis_url:
            raise ValueError("give --url or --redis-url, not both")
        if args.url:
            if not args.admin_token:
                raise ValueError("--url needs --admin-token (or AGENTCAST_ADMIN_TOKEN)")
            print(_revoke_over_http(args.url, args.admin_token, user_id))
        elif args.redis_url:
            trio.run(_revoke_over_redis, args.redis_url, user_id)
            print(json.dumps({"user": user_id, "revoked": True}))
        else:
            raise ValueError("give --url of a running server (with --admin-token) or --redis-url")
    except (ValueError, BrokerUnavailable, trio.TooSlowError) as exc:
        print(f"agentcast revoke: {exc or 'timed out'}", file=sys.stderr)
        return 2
    return 0


class _CannotListen(Exception):
    """The listening socket could not be opened (port in use, unknown host, no permission)."""


async def _run(settings: ServerSettings) -> None:
    stop = trio.Event()
    # Signals are caught from before the listening line: a supervisor may send SIGTERM as soon
    # as it has read it, and that must drain, not kill.
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        async with trio.open_nursery() as nursery:
            try:
                running: RunningServer = await nursery.start(
                    lambda task_status: serve(settings, stop=stop, task_status=task_status)
                )
            except* OSError as group:
                # Before serve() reports started, an OSError can only come from binding.
                error = _first_leaf(group)
                detail = error.strerror if isinstance(error, OSError) and error.strerror else error
                raise _CannotListen(
                    f"cannot listen on {settings.host}:{settings.port}: {detail}"
                ) from None
            print(f"agentcast listening on {running.url}", flush=True)
            if settings.demo:
                print(f"demo page: {running.url}/  (connects as {DEMO_USER!r})", flush=True)
                token = issue_token(running.secret, DEMO_USER)
                print(f"demo token: {token}", flush=True)
            if settings.demo and running.admin_token is not None:
                print(f"admin token: {running.admin_token}", flush=True)
            async for signum in signals:
                print(f"agentcast: {signal.Signals(signum).name}, draining", flush=True)
                stop.set()
                break


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``agentcast`` command; returns the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        args = _parser().parse_args(argv)
    except SystemExit as exited:  # --help (0) or a bad argument (2, its line already printed)
        return exited.code if isinstance(exited.code, int) else 2
    if args.command == "revoke":
        return _revoke(args)
    if args.command == "token":
        if not args.secret:
            print("agentcast token: --secret (or AGENTCAST_SECRET) is required", file=sys.stderr)
            return 2
        try:
            print(issue_token(
                args.secret, args.user, threads=args.threads, ttl=args.ttl,
                issuer=args.issuer, audience=args.audience,
            ))
        except ValueError as exc:
            print(f"agentcast token: {exc}", file=sys.stderr)
            return 2
        return 0
    logging.basicConfig(level=args.log_level, format="%(levelname)s %(name)s: %(message)s")
    try:
        settings = ServerSettings(
            host=args.host, port=args.port, secret=args.secret,
            admin_token=check_admin_token(args.admin_token or None),
            allowed_origins=tuple(args.allowed_origins), demo=args.demo,
            demo_speed=args.demo_speed, max_connections_per_user=args.max_connections_per_user,
            core=attrs.evolve(
                Config(), max_message_bytes=args.max_message_bytes,
                heartbeat_interval=args.heartbeat,
            ),
            redis_url=args.redis_url or None, reuse_port=_env_flag("REUSE_PORT"),
            redis_timeout=args.redis_timeout, redis_grace=args.redis_grace,
            token_issuer=args.token_issuer or None, token_audience=args.token_audience or None,
        )
        if args.workers > 1 and settings.redis_url is None:
            raise ValueError(
                "--workers needs --redis-url (or AGENTCAST_REDIS_URL): worker processes share "
                "users only through the Redis backplane"
            )
        if args.workers > 1 and settings.secret is None:
            raise ValueError("--workers needs --secret: every worker must accept the same tokens")
        if settings.secret is None and not settings.demo:
            raise ValueError(
                "refusing to start without a token secret: pass --secret (or AGENTCAST_SECRET), "
                "or --demo for a local demo"
            )
        if settings.secret is not None:
            check_secret(settings.secret)
    except ValueError as exc:
        print(f"agentcast serve: {exc}", file=sys.stderr)
        return 2
    if args.workers > 1:
        return run_workers(argv, args.workers, settings.host, settings.port)
    tune_gc(args.gc_threshold)
    failure: BaseException | None = None
    try:
        trio.run(_run, settings)
    except* _CannotListen as group:
        failure = _first_leaf(group)
    if failure is not None:
        print(f"agentcast serve: {failure}", file=sys.stderr)
        return 2
    return 0


def _first_leaf(error: BaseException) -> BaseException:
    """The first exception inside (possibly nested) exception groups."""
    while isinstance(error, BaseExceptionGroup):
        error = error.exceptions[0]
    return error


if __name__ == "__main__":
    sys.exit(main())

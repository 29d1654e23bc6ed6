"""The ``agentcast`` command: ``serve``, ``token`` and ``revoke``. Every option also reads
AGENTCAST_*."""

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
from collections.abc import Sequence
from typing import Final

import attrs
import trio

from .._config import Config
from .._errors import BrokerUnavailable
from .._ids import check_id
from .._protocol import CloseCode
from .._redis_streams import StreamOps, redis_client
from ._admin import check_admin_token
from ._auth import DEFAULT_TTL, check_secret, issue_token
from ._gc import DEFAULT_GC_THRESHOLD, tune_gc
from ._serve import DEMO_USER, RunningServer, serve
from ._settings import DEFAULT_HOST, DEFAULT_PORT, MAX_CONNECTIONS_PER_USER, ServerSettings
from ._workers import run_workers

__all__ = ["main"]

#: Seconds ``agentcast revoke`` waits for the server's (or Redis's) answer.
REVOKE_TIMEOUT: Final = 10.0


def _env(name: str, default: str | None = None) -> str | None:
    return os.environ.get(f"AGENTCAST_{name}", default)


def _env_flag(name: str) -> bool:
    return (_env(name) or "").strip().lower() in {"1", "true", "yes", "on"}


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="agentcast", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)

    run = commands.add_parser("serve", help="run the WebSocket + HTTP server")
    run.add_argument("--host", default=_env("HOST", DEFAULT_HOST))
    run.add_argument("--port", type=int, default=int(_env("PORT", str(DEFAULT_PORT)) or 0),
                     help="0 picks a free port (printed on the first line)")
    run.add_argument("--secret", default=_env("SECRET"),
                     help="HS256 token secret, at least 32 bytes (AGENTCAST_SECRET)")
    run.add_argument("--admin-token", default=_env("ADMIN_TOKEN"),
                     help="bearer token, at least 32 bytes, that /stats, /config and /metrics "
                          "require (AGENTCAST_ADMIN_TOKEN); --demo generates one")
    run.add_argument("--allowed-origin", action="append", dest="allowed_origins",
                     default=[o for o in (_env("ALLOWED_ORIGINS") or "").split(",") if o],
                     help="exact Origin allowed to connect; repeat for several")
    run.add_argument("--demo", action="store_true", default=_env_flag("DEMO"),
                     help="demo page at /, simulated agent, generated secret and demo token")
    run.add_argument("--demo-speed", type=float, default=float(_env("DEMO_SPEED", "1") or 1))
    run.add_argument("--max-connections-per-user", type=int,
                     default=int(_env("MAX_CONNECTIONS_PER_USER", "") or MAX_CONNECTIONS_PER_USER))
    run.add_argument("--max-message-bytes", type=int,
                     default=int(_env("MAX_MESSAGE_BYTES", "") or Config().max_message_bytes))
    run.add_argument("--redis-url", default=_env("REDIS_URL"),
                     help="redis://HOST:PORT/DB: join the Redis backplane (AGENTCAST_REDIS_URL)")
    run.add_argument("--workers", type=int, default=int(_env("WORKERS", "1") or 1),
                     help="server processes sharing the port; needs --redis-url "
                          "(AGENTCAST_WORKERS)")
    run.add_argument("--gc-threshold", type=int,
                     default=int(_env("GC_THRESHOLD", "") or DEFAULT_GC_THRESHOLD),
                     help="young-generation GC threshold for this server process; 0 keeps "
                          "Python's default (AGENTCAST_GC_THRESHOLD)")
    run.add_argument("--log-level", default=_env("LOG_LEVEL", "INFO"))
    run.add_argument("--token-issuer", default=_env("TOKEN_ISSUER"),
                     help="tokens must carry this iss claim (AGENTCAST_TOKEN_ISSUER)")
    run.add_argument("--token-audience", default=_env("TOKEN_AUDIENCE"),
                     help="tokens must carry this aud claim (AGENTCAST_TOKEN_AUDIENCE); "
                          "without it an aud claim is not checked")

    token = commands.add_parser("token", help="print a signed token that serve accepts")
    token.add_argument("--user", required=True)
    token.add_argument("--thread", action="append", dest="threads", default=[])
    token.add_argument("--ttl", type=float, default=float(DEFAULT_TTL))
    token.add_argument("--secret", default=_env("SECRET"))
    token.add_argument("--issuer", default=_env("TOKEN_ISSUER"), help="the iss claim")
    token.add_argument("--audience", default=_env("TOKEN_AUDIENCE"), help="the aud claim")

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


async def _run(settings: ServerSettings) -> None:
    stop = trio.Event()
    async with trio.open_nursery() as nursery:
        running: RunningServer = await nursery.start(
            lambda task_status: serve(settings, stop=stop, task_status=task_status)
        )
        print(f"agentcast listening on {running.url}", flush=True)
        if settings.demo:
            print(f"demo page: {running.url}/  (connects as {DEMO_USER!r})", flush=True)
            token = issue_token(running.secret, DEMO_USER)
            print(f"demo token: {token}", flush=True)
        if settings.demo and running.admin_token is not None:
            print(f"admin token: {running.admin_token}", flush=True)
        with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
            async for signum in signals:
                print(f"agentcast: {signal.Signals(signum).name}, draining", flush=True)
                stop.set()
                break


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``agentcast`` command; returns the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    args = _parser().parse_args(argv)
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
    logging.basicConfig(level=args.log_level.upper(), format="%(levelname)s %(name)s: %(message)s")
    try:
        settings = ServerSettings(
            host=args.host, port=args.port, secret=args.secret,
            admin_token=check_admin_token(args.admin_token or None),
            allowed_origins=tuple(args.allowed_origins), demo=args.demo,
            demo_speed=args.demo_speed, max_connections_per_user=args.max_connections_per_user,
            core=attrs.evolve(Config(), max_message_bytes=args.max_message_bytes),
            redis_url=args.redis_url or None, reuse_port=_env_flag("REUSE_PORT"),
            token_issuer=args.token_issuer or None, token_audience=args.token_audience or None,
        )
        if args.workers < 1:
            raise ValueError(f"--workers must be at least 1, got {args.workers}")
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
        if args.gc_threshold < 0:
            raise ValueError(f"--gc-threshold must be 0 or positive, got {args.gc_threshold}")
    except ValueError as exc:
        print(f"agentcast serve: {exc}", file=sys.stderr)
        return 2
    if args.workers > 1:
        return run_workers(argv, args.workers, settings.host, settings.port)
    tune_gc(args.gc_threshold)
    trio.run(_run, settings)
    return 0


if __name__ == "__main__":
    sys.exit(main())

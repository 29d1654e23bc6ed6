"""agentcast-asgi peer: the FastAPI example's shape (``agentcast.asgi.lifespan`` plus the ASGI
``endpoint``) served by hypercorn's trio worker, to measure the ASGI path next to the standalone
server (the ``agentcast`` peer).

Same config (``Config()``), same ``bench_burst`` handler and same clients as the ``agentcast``
peer: ``agentcast.ndjson`` batching and a ``bearer.<token>`` entry checked with the standalone
server's token verifier, so the difference measured is the ASGI path (hypercorn, Starlette's
router, the adapter's pump) and nothing else. hypercorn is run in-process
(``hypercorn.trio.serve``, what ``hypercorn -k trio`` runs) so the bound port can be announced.
"""

from __future__ import annotations

import functools
import logging
from typing import Any

import trio
from fastapi import FastAPI
from hypercorn.config import Config as HypercornConfig
from hypercorn.trio import serve

import agentcast
import agentcast.asgi
from agentcast.server import tune_gc
from agentcast.server._tokens import MemoryRevocations, TokenVerifier
from benchmarks.peers import BENCH_SECRET
from benchmarks.peers._common import announce, parse_lifetime
from benchmarks.peers.agentcast_peer import handler

verifier = TokenVerifier(BENCH_SECRET, MemoryRevocations())


async def authenticate(scope: dict[str, Any]) -> agentcast.UserContext:
    """The token of the ``bearer.<token>`` subprotocol entry, as the standalone server reads."""
    token = next((entry[len("bearer."):] for entry in scope.get("subprotocols") or ()
                  if entry.startswith("bearer.")), None)
    try:
        claims = await verifier.admit(token)
    except Exception as exc:  # noqa: BLE001 - any verification failure is a 401
        raise agentcast.asgi.Refuse(401, str(exc)) from None
    return agentcast.UserContext.from_request(user_id=claims.user_id)


app = FastAPI(lifespan=agentcast.asgi.lifespan(agentcast.Config(), message_handler=handler))
app.router.add_websocket_route("/ws", agentcast.asgi.endpoint(authenticate=authenticate))


async def main() -> None:
    config = HypercornConfig()
    config.bind = ["127.0.0.1:0"]
    config.accesslog = None
    config.errorlog = logging.getLogger("hypercorn.bench")
    config.errorlog.setLevel(logging.WARNING)
    config.backlog = 4096
    async with trio.open_nursery() as nursery:
        binds = await nursery.start(functools.partial(serve, app, config))
        announce(int(binds[0].rsplit(":", 1)[1]))


if __name__ == "__main__":
    parse_lifetime()
    tune_gc()
    trio.run(main)

"""agentcast inside a Quart-Trio app: the ASGI endpoint in front of Quart's routes, the manager
run by a while_serving hook, and a POST route that starts an agent run.

Run it:  hypercorn --worker-class trio --bind 127.0.0.1:8000 examples.quart_trio_app:app
Then:    curl -X POST 'http://127.0.0.1:8000/runs?user=alice&token=demo' -d '{"thread_id":"t1"}'
         and read ws://127.0.0.1:8000/ws?user=alice&token=demo

Quart keeps no lifespan state, so the endpoint gets the manager explicitly (``manager=``).
Authentication here is a demo (one shared token, APP_TOKEN); use your real auth instead.
"""

from __future__ import annotations

import hmac
import os
from collections.abc import AsyncIterator
from typing import Any
from urllib.parse import parse_qs

import trio
from quart import request
from quart_trio import QuartTrio

import agentcast
import agentcast.asgi

APP_TOKEN = os.environ.get("APP_TOKEN", "demo")


def user_from(params: dict[str, str]) -> agentcast.UserContext | None:
    """The demo's auth: ?user=U&token=APP_TOKEN. None when the token is missing or wrong."""
    if not hmac.compare_digest(params.get("token", "").encode(), APP_TOKEN.encode()):
        return None
    try:
        return agentcast.UserContext.from_request(user_id=params.get("user", ""))
    except agentcast.InvalidUserContext:
        return None


def authenticate(scope: dict[str, Any]) -> agentcast.UserContext:
    query = parse_qs(scope["query_string"].decode("latin-1"), max_num_fields=16)
    user = user_from({key: values[0] for key, values in query.items()})
    if user is None:
        raise agentcast.asgi.Refuse(401, "pass ?user=U&token=APP_TOKEN")
    return user


async def ticker(run: agentcast.Run, steps: int, delay: float) -> dict[str, int]:
    """A stand-in agent: ``steps`` pieces of text, ``delay`` seconds apart."""
    for step in range(steps):
        await run.text(f"{step} ")
        await trio.sleep(delay)
    return {"steps": steps}


manager_lifespan = agentcast.asgi.lifespan(agentcast.Config(max_connections_per_user=8))
websockets = agentcast.asgi.endpoint(authenticate=authenticate, manager=manager_lifespan)
app = QuartTrio(__name__)


@app.while_serving
async def run_agentcast() -> AsyncIterator[None]:
    async with manager_lifespan:
        yield


@app.post("/runs")
async def post_run() -> tuple[dict[str, Any], int]:
    user = user_from(dict(request.args))
    if user is None:
        return {"error": "pass ?user=U&token=APP_TOKEN"}, 401
    body = await request.get_json(force=True, silent=True)
    try:
        steps = min(max(int(body.get("steps", 20)), 0), 10_000)
        delay = min(max(float(body.get("delay", 0.05)), 0.0), 1.0)
        session = agentcast.get_websocket_manager(user, manager=manager_lifespan.manager)
        run_id = session.start_run(body["thread_id"], ticker, steps, delay)
    except (ValueError, TypeError, KeyError, AttributeError, agentcast.AgentcastError) as exc:
        return {"error": f"send {{thread_id, steps, delay}}: {exc}"}, 400
    return {"run_id": run_id, "pid": os.getpid()}, 200


quart_asgi = app.asgi_app


async def asgi_app(scope: dict[str, Any], receive: Any, send: Any) -> None:
    """``/ws`` goes to agentcast (a pure ASGI app), everything else to Quart."""
    if scope["type"] == "websocket" and scope["path"] == "/ws":
        await websockets(scope, receive, send)
    else:
        await quart_asgi(scope, receive, send)


app.asgi_app = asgi_app  # type: ignore[method-assign]

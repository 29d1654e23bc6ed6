"""agentcast inside a Starlette app: a WebSocketRoute to the ASGI endpoint, and a POST route that
starts an agent run.

Run it:  hypercorn --worker-class trio --bind 127.0.0.1:8000 examples.starlette_app:app
Then:    curl -X POST 'http://127.0.0.1:8000/runs?user=alice&token=demo' -d '{"thread_id":"t1"}'
         and read ws://127.0.0.1:8000/ws?user=alice&token=demo

Authentication here is a demo (one shared token, APP_TOKEN); use your real auth instead.
"""

from __future__ import annotations

import hmac
import json
import os
from typing import Any

import trio
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route, WebSocketRoute

import agentcast
import agentcast.asgi

APP_TOKEN = os.environ.get("APP_TOKEN", "demo")
#: Largest POST body the demo reads.
MAX_BODY = 16 * 1024


def user_from(params: Any) -> agentcast.UserContext | None:
    """The demo's auth: ?user=U&token=APP_TOKEN. None when the token is missing or wrong."""
    if not hmac.compare_digest(params.get("token", "").encode(), APP_TOKEN.encode()):
        return None
    try:
        return agentcast.UserContext.from_request(user_id=params.get("user", ""))
    except agentcast.InvalidUserContext:
        return None


def authenticate(scope: dict[str, Any]) -> agentcast.UserContext:
    user = user_from(Request({"type": "http", "query_string": scope["query_string"]}).query_params)
    if user is None:
        raise agentcast.asgi.Refuse(401, "pass ?user=U&token=APP_TOKEN")
    return user


async def ticker(run: agentcast.Run, steps: int, delay: float) -> dict[str, int]:
    """A stand-in agent: ``steps`` pieces of text, ``delay`` seconds apart."""
    for step in range(steps):
        await run.text(f"{step} ")
        await trio.sleep(delay)
    return {"steps": steps}


async def post_run(request: Request) -> JSONResponse:
    user = user_from(request.query_params)
    if user is None:
        return JSONResponse({"error": "pass ?user=U&token=APP_TOKEN"}, 401)
    raw = await request.body()
    try:
        body = json.loads(raw) if len(raw) <= MAX_BODY else None
        steps = min(max(int(body.get("steps", 20)), 0), 10_000)
        delay = min(max(float(body.get("delay", 0.05)), 0.0), 1.0)
        session = agentcast.get_websocket_manager(user, manager=request.state.agentcast)
        run_id = session.start_run(body["thread_id"], ticker, steps, delay)
    except (ValueError, TypeError, KeyError, AttributeError, agentcast.AgentcastError) as exc:
        return JSONResponse({"error": f"send {{thread_id, steps, delay}}: {exc}"}, 400)
    return JSONResponse({"run_id": run_id, "pid": os.getpid()})


app = Starlette(
    routes=[
        WebSocketRoute("/ws", agentcast.asgi.endpoint(authenticate=authenticate)),
        Route("/runs", post_run, methods=["POST"]),
    ],
    lifespan=agentcast.asgi.lifespan(agentcast.Config(max_connections_per_user=8)),
)

"""agentcast inside a FastAPI app: a mounted endpoint, a Depends()-authenticated route, and an
agent started from a POST route.

Run it (trio ASGI server, native):
    hypercorn --worker-class trio --bind 127.0.0.1:8000 examples.fastapi_app:app
Run it under uvicorn (asyncio) with the threaded bridge, optionally scaled out over Redis:
    AGENTCAST_BRIDGE=thread uvicorn examples.fastapi_app:app --port 8000
    AGENTCAST_BRIDGE=thread AGENTCAST_REDIS_URL=redis://127.0.0.1:6379/0 \
        uvicorn examples.fastapi_app:app --port 8000 --workers 2
Then:
    curl -X POST 'http://127.0.0.1:8000/runs?user=alice&token=demo' \
        -H 'content-type: application/json' -d '{"thread_id": "t1", "steps": 20}'
    and read ws://127.0.0.1:8000/ws/?user=alice&token=demo (send {"type":"subscribe",...}).

Authentication here is a demo (one shared token, APP_TOKEN); use your real auth instead.
"""

from __future__ import annotations

import hmac
import os
from typing import Annotated, Any

import trio
from fastapi import Depends, FastAPI, HTTPException, Request, WebSocket, WebSocketException
from pydantic import BaseModel, Field

import agentcast
import agentcast.asgi

APP_TOKEN = os.environ.get("APP_TOKEN", "demo")
REDIS_URL = os.environ.get("AGENTCAST_REDIS_URL")
THREADED = os.environ.get("AGENTCAST_BRIDGE") == "thread"


def user_from(query: dict[str, str]) -> agentcast.UserContext | None:
    """The demo's auth: ?user=U&token=APP_TOKEN. None when the token is missing or wrong."""
    token = query.get("token", "")
    if not hmac.compare_digest(token.encode(), APP_TOKEN.encode()):
        return None
    try:
        return agentcast.UserContext.from_request(user_id=query.get("user", ""))
    except agentcast.InvalidUserContext:
        return None


def authenticate(scope: dict[str, Any]) -> agentcast.UserContext:
    """For the mounted endpoint: a refusal becomes a real HTTP 401."""
    query = dict(Request({"type": "http", "query_string": scope["query_string"]}).query_params)
    user = user_from(query)
    if user is None:
        raise agentcast.asgi.Refuse(401, "pass ?user=U&token=APP_TOKEN")
    return user


def ws_user(websocket: WebSocket) -> agentcast.UserContext:
    """For the Depends() route: FastAPI closes before accept, which is a 403."""
    user = user_from(dict(websocket.query_params))
    if user is None:
        raise WebSocketException(code=1008, reason="pass ?user=U&token=APP_TOKEN")
    return user


def http_user(request: Request) -> agentcast.UserContext:
    user = user_from(dict(request.query_params))
    if user is None:
        raise HTTPException(401, "pass ?user=U&token=APP_TOKEN")
    return user


async def ticker(run: agentcast.Run, text: str, steps: int, delay: float) -> dict[str, int]:
    """A stand-in agent: ``steps`` pieces of text, ``delay`` seconds apart."""
    await run.thinking(f"answering {text[:60]!r}")
    for step in range(steps):
        await run.text(f"{step} ")
        await trio.sleep(delay)
    return {"steps": steps}


async def on_message(session: agentcast.UserSession, connection: agentcast.Connection,
                     frame: dict[str, Any]) -> None:
    """Client frames agentcast leaves to the app: {"type":"user_message","thread_id","text"}."""
    if frame["type"] != "user_message" or not isinstance(frame.get("text"), str):
        raise agentcast.ClientError("bad_message", "send {type: user_message, thread_id, text}")
    session.start_run(frame.get("thread_id"), ticker, frame["text"], 5, 0.2)


config = agentcast.Config(max_connections_per_user=8)
broker = agentcast.RedisBroker(REDIS_URL, config) if REDIS_URL else None
manager_lifespan = (
    agentcast.asgi.threaded(config, broker=broker, message_handler=on_message) if THREADED
    else agentcast.asgi.lifespan(config, broker=broker, message_handler=on_message)
)
app = FastAPI(lifespan=manager_lifespan)
app.mount("/ws", agentcast.asgi.endpoint(authenticate=authenticate))


@app.websocket("/ws-depends")
async def ws_depends(websocket: WebSocket,
                     user: Annotated[agentcast.UserContext, Depends(ws_user)]) -> None:
    await agentcast.asgi.serve_websocket(websocket, user)


class RunRequest(BaseModel):
    thread_id: str = Field(min_length=1, max_length=128)
    text: str = Field(default="hello", max_length=10_000)
    steps: int = Field(default=20, ge=0, le=10_000)
    delay: float = Field(default=0.05, ge=0, le=1.0)


def start(manager: agentcast.ConnectionManager, user: agentcast.UserContext,
          body: RunRequest) -> str:
    session = manager.get_websocket_manager(user)
    return session.start_run(body.thread_id, ticker, body.text, body.steps, body.delay)


@app.post("/runs")
async def post_run(body: RunRequest, request: Request,
                   user: Annotated[agentcast.UserContext, Depends(http_user)]) -> dict[str, Any]:
    """Start an agent run for the caller; its events stream to the caller's connections."""
    source = request.state.agentcast  # the lifespan state: the manager, or the thread bridge
    try:
        if isinstance(source, agentcast.asgi.ThreadedManager):
            run_id = await source.call(start, user, body)
        else:
            run_id = start(source, user, body)
    except (agentcast.TooManyRuns, agentcast.InvalidIdentifier) as exc:
        raise HTTPException(429 if isinstance(exc, agentcast.TooManyRuns) else 400,
                            str(exc)) from None
    return {"run_id": run_id, "thread_id": body.thread_id, "pid": os.getpid()}

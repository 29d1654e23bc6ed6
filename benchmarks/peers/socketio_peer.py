"""python-socketio peer: ``AsyncServer`` as an ASGI app on uvicorn, one room per user.

Every connection joins the room named after its user (``auth={"user": U}``); events go out with
``emit("event", ..., room=user)`` once per event. All of a user's tabs subscribe to the same
thread in every scenario, so a room per user delivers exactly what subscriptions ask for; the
``subscribe`` handler only acknowledges.

Tuning left on the table: uvloop/httptools, a room per (user, thread), the msgpack serializer.
"""

from __future__ import annotations

import asyncio
import socket
import time
from typing import Any

import socketio
import uvicorn

from benchmarks.peers._common import announce, parse_lifetime
from benchmarks.protocol import (
    Pacer,
    event_data,
    event_type_of,
    pad_for,
    parse_burst,
)

sio = socketio.AsyncServer(async_mode="asgi", cors_allowed_origins="*")
app = socketio.ASGIApp(sio)


@sio.event
async def connect(sid: str, environ: dict[str, Any], auth: dict[str, Any] | None) -> None:
    user = str((auth or {}).get("user", "anonymous"))
    await sio.save_session(sid, {"user": user})
    await sio.enter_room(sid, user)


@sio.event
async def subscribe(sid: str, frame: dict[str, Any]) -> None:
    await sio.emit("subscribed", {"type": "subscribed", "thread_id": frame["thread_id"]}, to=sid)


@sio.event
async def bench_burst(sid: str, frame: dict[str, Any]) -> None:
    user = (await sio.get_session(sid))["user"]
    thread_id, _count, size, _rate = parse_burst(frame)
    pad, kind, pacer = pad_for(size), event_type_of(frame), Pacer.of(frame)
    while True:
        for n in pacer.due_now():
            ts = time.time()
            await sio.emit(
                "event",
                {"type": kind, "thread_id": thread_id, "run_id": None, "seq": n, "ts": ts,
                 "data": event_data(pad, n, user, ts)},
                room=user,
            )
        if (wait := pacer.pause()) is None:
            break
        await asyncio.sleep(wait)


async def main() -> None:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    announce(sock.getsockname()[1])
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", access_log=False))
    await server.serve(sockets=[sock])


if __name__ == "__main__":
    parse_lifetime()
    asyncio.run(main())

"""websockets peer: asyncio ``websockets`` server with the FastAPI-docs ``ConnectionManager``.

A dict of user -> connections, each with its set of subscribed threads; one ``await ws.send``
per event per connection, the event JSON encoded once per event. Permessage-deflate is off
because the load generator does not offer it (to every peer alike).

Tuning left on the table: sending to a user's connections concurrently, batching events,
a larger listen backlog, uvloop.
"""

from __future__ import annotations

import asyncio
import json
import time
from urllib.parse import parse_qs, urlsplit

from websockets.asyncio.server import ServerConnection, serve
from websockets.exceptions import ConnectionClosed

from benchmarks.peers._common import announce, parse_lifetime
from benchmarks.protocol import (
    Pacer,
    encode_event,
    event_type_of,
    pad_for,
    parse_burst,
)


class ConnectionManager:
    """Connections per user and the threads each one subscribed to."""

    def __init__(self) -> None:
        self.users: dict[str, dict[ServerConnection, set[str]]] = {}

    def connect(self, user: str, ws: ServerConnection) -> None:
        self.users.setdefault(user, {})[ws] = set()

    def disconnect(self, user: str, ws: ServerConnection) -> None:
        conns = self.users.get(user, {})
        conns.pop(ws, None)
        if not conns:
            self.users.pop(user, None)

    async def send_to_thread(self, user: str, thread_id: str, message: str) -> None:
        for ws, threads in list(self.users.get(user, {}).items()):
            if thread_id in threads:
                try:
                    await ws.send(message)
                except ConnectionClosed:
                    self.disconnect(user, ws)


manager = ConnectionManager()


async def emit(user: str, frame: dict[str, object]) -> None:
    thread_id, _count, size, _rate = parse_burst(frame)
    pad, kind, pacer = pad_for(size), event_type_of(frame), Pacer.of(frame)
    while True:
        for n in pacer.due_now():
            await manager.send_to_thread(
                user, thread_id, encode_event(thread_id, pad, n, user, time.time(), event_type=kind)
            )
        if (wait := pacer.pause()) is None:
            break
        await asyncio.sleep(wait)


async def handle(ws: ServerConnection) -> None:
    user = parse_qs(urlsplit(ws.request.path).query).get("user", ["anonymous"])[0]
    manager.connect(user, ws)
    try:
        async for raw in ws:
            frame = json.loads(raw)
            if frame["type"] == "subscribe":
                manager.users[user][ws].add(frame["thread_id"])
                await ws.send(json.dumps({"type": "subscribed", "thread_id": frame["thread_id"]}))
            elif frame["type"] == "bench_burst":
                await emit(user, frame)
    except ConnectionClosed:
        pass
    finally:
        manager.disconnect(user, ws)


async def main() -> None:
    async with serve(handle, "127.0.0.1", 0, compression=None) as server:
        announce(next(iter(server.sockets)).getsockname()[1])
        await asyncio.Future()


if __name__ == "__main__":
    parse_lifetime()
    asyncio.run(main())

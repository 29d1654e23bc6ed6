"""trio-websocket peer: a naive trio manager, one ``send_message`` per event per connection.

What a trio team writes without agentcast: a dict of user -> connections and subscriptions,
the emitter awaiting each client in turn.

Tuning left on the table: joining events into one message (see DESIGN: 16 events per message
cut CPU 6-8x), per-connection writer tasks with bounded queues.
"""

from __future__ import annotations

import json
import time
from urllib.parse import parse_qs, urlsplit

import trio
from trio_websocket import ConnectionClosed, WebSocketConnection, WebSocketRequest, serve_websocket

from benchmarks.peers._common import announce, parse_lifetime
from benchmarks.protocol import (
    Pacer,
    encode_event,
    event_type_of,
    pad_for,
    parse_burst,
)

users: dict[str, dict[WebSocketConnection, set[str]]] = {}


async def send_to_thread(user: str, thread_id: str, message: str) -> None:
    for ws, threads in list(users.get(user, {}).items()):
        if thread_id in threads:
            try:
                await ws.send_message(message)
            except ConnectionClosed:
                users.get(user, {}).pop(ws, None)


async def emit(user: str, frame: dict[str, object]) -> None:
    thread_id, _count, size, _rate = parse_burst(frame)
    pad, kind, pacer = pad_for(size), event_type_of(frame), Pacer.of(frame)
    while True:
        for n in pacer.due_now():
            message = encode_event(thread_id, pad, n, user, time.time(), event_type=kind)
            await send_to_thread(user, thread_id, message)
        if (wait := pacer.pause()) is None:
            break
        await trio.sleep(wait)


async def handle(request: WebSocketRequest) -> None:
    user = parse_qs(urlsplit(request.path).query).get("user", ["anonymous"])[0]
    ws = await request.accept()
    users.setdefault(user, {})[ws] = set()
    try:
        while True:
            frame = json.loads(await ws.get_message())
            if frame["type"] == "subscribe":
                users[user][ws].add(frame["thread_id"])
                await ws.send_message(
                    json.dumps({"type": "subscribed", "thread_id": frame["thread_id"]})
                )
            elif frame["type"] == "bench_burst":
                await emit(user, frame)
    except ConnectionClosed:
        pass
    finally:
        conns = users.get(user, {})
        conns.pop(ws, None)
        if not conns:
            users.pop(user, None)


async def main() -> None:
    async with trio.open_nursery() as nursery:
        server = await nursery.start(serve_websocket, handle, "127.0.0.1", 0, None)
        announce(server.port)


if __name__ == "__main__":
    parse_lifetime()
    trio.run(main)

"""The Redis hop inside one node: publish to delivery through a real redis-server, no sockets.

Splits the scale-out scenario's "added p50" into its parts. ``--users`` users each hold one
connection (``MemoryTransport``) subscribed to their thread; one producer publishes
``--events`` events round-robin over the users, one every ``--interval`` seconds, either with
``send_to_thread`` (waits for the seq) or ``queue_to_thread`` (pipelined). Reported: publish
to seq (what the producer waits) and publish to arrival at the connection's client side (the
hop: flusher, script, PUBLISH, pub/sub read, delivery, writer), p50/p90/p99 in ms, with the
same load on the in-memory broker as the baseline. Wall-clock figures: run on a quiet machine.

Run:  python -m benchmarks.redis_hop [--events 3000] [--interval 0.001] [--users 50]
It stops by itself; its redis-server is on a free port and terminated at the end.
"""

from __future__ import annotations

import argparse
import json
import time
from typing import Any

import orjson
import trio

import agentcast
from agentcast import AgentEvent, EventType, RedisBroker, UserContext
from agentcast.testing import MemoryTransport
from benchmarks.reload import redis_server

#: Seconds after the last publish that late arrivals are still counted.
DRAIN = 1.0


def percentiles(values: list[float]) -> dict[str, float]:
    """p50/p90/p99 of ``values`` (seconds) in ms."""
    ordered = sorted(values)
    return {
        f"p{round(q * 100)}": round(ordered[min(len(ordered) - 1, int(len(ordered) * q))] * 1e3, 3)
        for q in (0.5, 0.9, 0.99)
    }


async def one_setup(
    redis_url: str | None, mode: str, events: int, interval: float, users: int
) -> dict[str, Any]:
    config = agentcast.Config(session_linger=0.2)
    broker = RedisBroker(redis_url, config) if redis_url else None
    sent: dict[int, float] = {}
    arrived: dict[int, float] = {}
    to_seq: list[float] = []
    all_arrived = trio.Event()

    async def read(client: MemoryTransport) -> None:
        while True:
            message = await client.get_message()
            now = time.perf_counter()
            for line in str(message).split("\n"):
                frame = orjson.loads(line)
                if frame.get("type") == "agent_text":
                    arrived[int(frame["data"]["text"])] = now
                    if len(arrived) == events:
                        all_arrived.set()

    async with agentcast.open_manager(config, broker=broker) as manager:
        await manager.wait_ready()
        sessions = [
            manager.get_websocket_manager(UserContext(user_id=f"u{i}")) for i in range(users)
        ]
        async with trio.open_nursery() as readers:
            for session in sessions:
                server_side, client_side = MemoryTransport.pair(capacity=1024)
                await session.add_connection(server_side, threads=("t",))
                readers.start_soon(read, client_side)
            for n in range(events):
                session = sessions[n % users]
                event = AgentEvent(EventType.AGENT_TEXT, {"text": str(n)})
                sent[n] = started = time.perf_counter()
                if mode == "send":
                    await session.send_to_thread("t", event)
                else:
                    await session.queue_to_thread("t", event)
                to_seq.append(time.perf_counter() - started)
                await trio.sleep(interval)
            for session in sessions:
                await session.flush()
            with trio.move_on_after(DRAIN):
                await all_arrived.wait()
            readers.cancel_scope.cancel()
    hops = [arrived[n] - sent[n] for n in sent if n in arrived]
    return {
        "broker": "redis" if redis_url else "memory", "mode": mode, "events": events,
        "delivered": len(hops), "publish_to_seq_ms": percentiles(to_seq),
        "publish_to_arrival_ms": percentiles(hops),
    }


async def main(args: argparse.Namespace) -> None:
    rows = [await one_setup(None, "send", args.events, args.interval, args.users)]
    async with redis_server() as url:
        for mode in ("send", "queue"):
            rows.append(await one_setup(url, mode, args.events, args.interval, args.users))
    for row in rows:
        print(json.dumps(row))


def cli() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--events", type=int, default=3000)
    parser.add_argument("--interval", type=float, default=0.001)
    parser.add_argument("--users", type=int, default=50)
    trio.run(main, parser.parse_args())


if __name__ == "__main__":
    cli()

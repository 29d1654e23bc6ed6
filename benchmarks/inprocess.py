"""In-process hot-path benchmark: CPU per delivered event through the core, no sockets.

One user, C in-memory connections subscribed to one thread, E events published as fast as the
producer can; the clients drain concurrently. Reports CPU microseconds per delivered event
(process CPU time, which includes the in-memory clients, so it is an upper bound on the server
side) with batching on and off. Run:  python -m benchmarks.inprocess [--connections 100 1000]
"""

from __future__ import annotations

import argparse
import time

import trio
import trio.testing

import agentcast
from agentcast import AgentEvent, EventType, UserContext
from agentcast.testing import MemoryTransport

PAYLOAD = "x" * 120  # with the envelope, about 200 bytes per event


async def drain(client: MemoryTransport, expected: int, done: trio.MemorySendChannel[int]) -> None:
    received = 0
    while received < expected:
        message = await client.get_message()
        assert isinstance(message, str)
        received += message.count('{"type":"agent_thinking"')
    await done.send(received)


async def one_run(connections: int, events: int, batch: bool) -> dict[str, float]:
    config = agentcast.Config(send_queue_size=max(1024, events + 8))
    async with agentcast.open_manager(config) as manager:
        session = manager.get_websocket_manager(UserContext(user_id="bench"))
        done_send, done_receive = trio.open_memory_channel[int](connections)
        async with trio.open_nursery() as nursery:
            for _ in range(connections):
                server, client = MemoryTransport.pair(capacity=events + 8)
                await session.add_connection(server, threads=["t"], batch=batch)
                nursery.start_soon(drain, client, events, done_send)
            await trio.testing.wait_all_tasks_blocked()
            event = AgentEvent(EventType.AGENT_THINKING, {"text": PAYLOAD}, "run-1")
            cpu, wall = time.process_time(), time.perf_counter()
            for _ in range(events):
                await session.send_to_thread("t", event)
            delivered = 0
            for _ in range(connections):
                delivered += await done_receive.receive()
            cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
        stats = manager.get_stats()
    return {
        "connections": connections,
        "events": events,
        "batch": batch,
        "delivered": delivered,
        "cpu_us_per_event": cpu / delivered * 1e6,
        "events_per_s": delivered / wall,
        "events_per_message": stats.events_sent / max(1, stats.messages_sent),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--connections", type=int, nargs="+", default=[100, 1000])
    parser.add_argument("--deliveries", type=int, default=200_000,
                        help="events x connections per measurement")
    args = parser.parse_args()
    print(f"{'conns':>6} {'batch':>5} {'µs/event':>9} {'events/s':>10} {'ev/msg':>7}")
    for connections in args.connections:
        for batch in (False, True):
            events = max(10, args.deliveries // connections)
            row = trio.run(one_run, connections, events, batch)
            print(f"{connections:>6} {batch!s:>5} {row['cpu_us_per_event']:>9.2f} "
                  f"{row['events_per_s']:>10.0f} {row['events_per_message']:>7.1f}")


if __name__ == "__main__":
    main()

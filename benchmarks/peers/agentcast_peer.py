"""agentcast peer: the bundled server (``agentcast.server.serve``) with a bench message handler.

Config is agentcast's default (``Config()``): the benchmark keeps every burst at or below
``send_queue_size`` events per connection, so no knob needs changing. Clients use the documented
``agentcast.ndjson`` subprotocol (batching) and ``bearer.<token>`` auth.

Tuning left on the table: a larger ``batch_max_events``. ``--redis-url``, ``--port`` and
``--reuse-port`` make it a node of the ``scale-out`` scenario (several processes on one port
behind the Redis backplane).
"""

from __future__ import annotations

import argparse
import functools
import time
from typing import Any

import trio

from agentcast import AgentEvent, Config, EventType, UserSession
from agentcast.server import ServerSettings, serve, tune_gc
from benchmarks.peers import BENCH_SECRET
from benchmarks.peers._common import announce, parse_lifetime
from benchmarks.protocol import (
    Pacer,
    event_data,
    event_type_of,
    pad_for,
    parse_burst,
)


async def handler(session: UserSession, connection: Any, frame: dict[str, Any]) -> None:
    """Emit a ``bench_burst`` on this user's thread through ``queue_to_thread`` (the same call
    in memory, where it publishes at once, and on Redis, where it does not wait for the seq),
    then ``flush`` so a failed publish fails the burst instead of passing unseen."""
    thread_id, _count, size, _rate = parse_burst(frame)
    pad, user, kind = pad_for(size), session.user_id, EventType(event_type_of(frame))
    pacer = Pacer.of(frame)
    while True:
        for n in pacer.due_now():
            ts = time.time()
            await session.queue_to_thread(
                thread_id, AgentEvent(kind, event_data(pad, n, user, ts))
            )
        if (wait := pacer.pause()) is None:
            break
        await trio.sleep(wait)
    await session.flush()


def node_options() -> argparse.Namespace:
    """The scale-out scenario's options: a Redis backplane, a shared port (SO_REUSEPORT)."""
    parser = argparse.ArgumentParser()
    parser.add_argument("--redis-url")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--reuse-port", action="store_true")
    options, _ = parser.parse_known_args()
    return options


async def main(options: argparse.Namespace) -> None:
    settings = ServerSettings(
        port=options.port, secret=BENCH_SECRET, core=Config(), redis_url=options.redis_url,
        reuse_port=options.reuse_port,
    )
    async with trio.open_nursery() as nursery:
        running = await nursery.start(functools.partial(serve, settings, message_handler=handler))
        announce(running.port)


if __name__ == "__main__":
    parse_lifetime()
    tune_gc()  # what the agentcast serve command does before it starts
    trio.run(main, node_options())

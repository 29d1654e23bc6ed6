"""The ``reload`` scenario: many pages reload in the middle of one long streamed answer.

One run streams ``--deltas`` ``agent_text`` deltas of ``--delta`` (4 bytes); halfway it
pauses and ``--clients`` pages reload at once: each connects, subscribes (the ack names the
active run and the epoch), unsubscribes, and resumes from ``first_seq - 1``, then rebuilds the
answer with the client rule (``data.from_seq`` continues the last seq applied). Reported per
reload: time to rebuild (p50/max over the concurrent reloads, wall clock), bytes and frames
sent; per run: retained bytes (the broker's accounting and, in memory, what tracemalloc saw
the history grow by) against the target of 2x the text plus a fixed overhead. Each is run with
``Config.compact_text`` on and off, on the in-memory broker and (``--redis``) on a throwaway
redis-server on 127.0.0.1, where Redis's own ``MEMORY USAGE`` of the stream is reported.

Run:  python -m benchmarks.reload [--redis] [--deltas 10000] [--clients 100]
In-process (MemoryTransport, no sockets): it measures the core's rebuild, not the network.
The run stops by itself; Redis, when used, is on a free port and terminated at the end.
"""

from __future__ import annotations

import argparse
import collections
import json
import shutil
import socket
import statistics
import subprocess
import tempfile
import time
import tracemalloc
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any, Final

import trio

import agentcast
from agentcast import Config, ConnectionManager, RedisBroker, UserContext
from agentcast._run_history import apply_replay
from agentcast.testing import MemoryTransport

#: Seconds the whole measurement may take before it is abandoned.
DEADLINE: Final = 300.0
#: Seconds redis-server may take to start.
REDIS_START: Final = 10.0
#: Seconds any one Redis call may take here (``RedisBroker(timeout=...)``).
REDIS_DEADLINE: Final = 30.0


async def reload_once(manager: ConnectionManager, expected: str) -> dict[str, float]:
    """One page reload: connect, learn the active run, resume it, rebuild its text."""
    session = manager.get_websocket_manager(UserContext(user_id="bench"))
    server, client = MemoryTransport.pair(capacity=100_000)
    began = time.perf_counter()
    await session.add_connection(server, batch=True)
    sent = {"bytes": 0, "frames": 0}
    pending: collections.deque[dict[str, Any]] = collections.deque()

    async def receive() -> dict[str, Any]:
        while not pending:
            message = await client.get_message()
            assert isinstance(message, str)
            sent["bytes"] += len(message.encode())
            for line in message.split("\n"):
                sent["frames"] += 1
                pending.append(json.loads(line))
        return pending.popleft()

    await client.send_message(json.dumps({"type": "subscribe", "thread_id": "t"}))
    ack = await receive()
    [run] = ack["active_runs"]
    await client.send_message(json.dumps({"type": "unsubscribe", "thread_id": "t"}))
    assert (await receive())["type"] == "unsubscribed"
    await client.send_message(json.dumps({
        "type": "subscribe", "thread_id": "t", "since_seq": run["first_seq"] - 1,
        "epoch": ack["epoch"],
    }))
    ack = await receive()
    assert ack["recovered"], ack
    replay: list[dict[str, Any]] = []
    while not replay or replay[-1]["seq"] < ack["seq"]:
        replay.append(await receive())
    texts, _ = apply_replay(replay, last_seq=run["first_seq"] - 1)
    rebuilt = time.perf_counter() - began
    assert texts[run["run_id"]] == expected
    await client.aclose()
    return {"seconds": rebuilt, "bytes": sent["bytes"], "frames": sent["frames"]}


async def measure(
    config: Config, deltas: int, delta: str, clients: int, redis_url: str | None
) -> dict[str, Any]:
    # A generous Redis deadline: 100 simultaneous replays of thousands of entries keep this
    # one process busy for seconds, which the default 2 s liveness deadline takes for a
    # frozen Redis (RESULTS.md, "reload").
    broker = RedisBroker(redis_url, config, timeout=REDIS_DEADLINE) if redis_url else None
    async with agentcast.open_manager(config, broker=broker) as manager:
        session = manager.get_websocket_manager(UserContext(user_id="bench"))
        halfway, proceed = trio.Event(), trio.Event()
        half = deltas // 2
        traced: dict[str, int] = {}

        async def agent() -> None:
            async with session.run("t", run_id="answer") as run:
                tracemalloc.start()
                base = tracemalloc.get_traced_memory()[0]
                for _ in range(half):
                    await run.text(delta)
                traced["history"] = tracemalloc.get_traced_memory()[0] - base
                tracemalloc.stop()
                halfway.set()
                await proceed.wait()
                for _ in range(deltas - half):
                    await run.text(delta)

        with trio.fail_after(DEADLINE):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(agent, name="bench.agent")
                await halfway.wait()
                retained = manager.get_stats().broker_retained_bytes
                rows: list[dict[str, float]] = []
                began, cpu = time.perf_counter(), time.process_time()
                async with trio.open_nursery() as reloads:
                    for _ in range(clients):

                        async def one() -> None:
                            rows.append(await reload_once(manager, delta * half))

                        reloads.start_soon(one, name="bench.reload")
                wall, cpu = time.perf_counter() - began, time.process_time() - cpu
                proceed.set()
    text_bytes = len((delta * half).encode())
    seconds = sorted(row["seconds"] for row in rows)
    result: dict[str, Any] = {
        "broker": "redis" if redis_url else "memory",
        "compact_text": config.compact_text,
        "deltas_at_reload": half,
        "text_bytes": text_bytes,
        "clients": clients,
        "all_reloads_s": round(wall, 3),
        # This process's CPU for all reloads (server core and the in-memory pages together;
        # steadier than wall time on a shared machine; Redis's own CPU is not in it).
        "all_reloads_cpu_s": round(cpu, 3),
        "rebuild_p50_ms": round(statistics.median(seconds) * 1000, 1),
        "rebuild_max_ms": round(seconds[-1] * 1000, 1),
        "bytes_per_reload": round(statistics.mean(row["bytes"] for row in rows)),
        "frames_per_reload": round(statistics.mean(row["frames"] for row in rows), 1),
    }
    if redis_url:
        result["redis_stream_bytes"] = await redis_memory(redis_url)
    else:
        result["retained_bytes_accounted"] = retained
        result["retained_bytes_traced"] = traced["history"]
        result["traced_over_text"] = round(traced["history"] / text_bytes, 2)
    return result


async def redis_memory(url: str) -> int:
    import coredis  # noqa: PLC0415 - only for --redis

    async with coredis.Redis.from_url(url, decode_responses=True) as client:
        return int(await client.memory_usage("agentcast:{bench}:t:t:events") or 0)


async def flush(url: str) -> None:
    import coredis  # noqa: PLC0415 - only for --redis

    async with coredis.Redis.from_url(url, decode_responses=True) as client:
        await client.flushall()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@asynccontextmanager
async def redis_server() -> AsyncIterator[str]:
    """A throwaway redis-server on 127.0.0.1 without persistence."""
    binary = shutil.which("redis-server")
    if binary is None:
        raise SystemExit("redis-server is not installed (apt-get install redis-server)")
    port = free_port()
    with tempfile.TemporaryDirectory() as directory:
        process = subprocess.Popen(  # noqa: ASYNC220 - started once, terminated below
            [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "",
             "--appendonly", "no", "--dir", directory], stdout=subprocess.DEVNULL)
        try:
            url = f"redis://127.0.0.1:{port}/0"
            with trio.fail_after(REDIS_START):
                while True:
                    try:
                        await flush(url)
                        break
                    except OSError:
                        await trio.sleep(0.05)
            yield url
        finally:
            process.terminate()
            process.wait(REDIS_START)


async def main_async(args: argparse.Namespace) -> list[dict[str, Any]]:
    rows = []
    for compact in (True, False):
        config = Config(compact_text=compact, send_queue_size=100_000, session_linger=0.1)
        rows.append(await measure(config, args.deltas, args.delta, args.clients, None))
    if args.redis:
        async with redis_server() as url:
            for compact in (True, False):
                await flush(url)
                config = Config(compact_text=compact, send_queue_size=100_000)
                rows.append(await measure(config, args.deltas, args.delta, args.clients, url))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--deltas", type=int, default=10_000)
    parser.add_argument("--delta", default="abcd")
    parser.add_argument("--clients", type=int, default=100)
    parser.add_argument("--redis", action="store_true", help="also on a local redis-server")
    args = parser.parse_args()
    for row in trio.run(main_async, args):
        print(json.dumps(row))


if __name__ == "__main__":
    main()

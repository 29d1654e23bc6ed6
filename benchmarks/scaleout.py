"""The ``scale-out`` scenario (issue 5): agentcast on a Redis backplane with 1 and 2 worker
processes, against the single in-memory process, under the same loads.

For each setup it runs a ``burst`` (delivered events/s and server CPU per delivered event,
summed over every worker process) and a paced, staggered ``latency`` load well below
saturation (p50/p99 from emit to arrival: the Redis hop is the difference from the in-memory
row). With two
workers sharing the port through SO_REUSEPORT, the kernel spreads connections by their
address hash, so one user's tabs land on both workers: every event crosses nodes through
Redis pub/sub, and each user's driving tab sends its burst to whichever worker holds it, so
both workers publish. The row records how the connections were split.

The runner starts its own ``redis-server`` on a free port (never 6379, no persistence) and
stops it with the workers; without the binary the scenario reports why instead of a row.
"""

from __future__ import annotations

import asyncio
import shutil
import socket
import tempfile
from collections.abc import AsyncIterator, Callable
from contextlib import AsyncExitStack, asynccontextmanager, suppress
from typing import Any, Final

import attrs
import psutil

from benchmarks.procs import Peer, running_peer
from benchmarks.protocol import stagger
from benchmarks.scenarios import EVENT_SIZE, Progress, Sizes, run_load, users_of

#: Seconds redis-server may take to accept connections.
REDIS_START: Final = 10.0


@attrs.define
class Workers:
    """Several agentcast worker processes on one port, measured as one server."""

    peers: list[Peer]
    name: str = "agentcast"

    @property
    def port(self) -> int:
        return self.peers[0].port

    def cpu(self) -> float:
        return sum(peer.cpu() for peer in self.peers)

    def rss(self) -> int:
        return sum(peer.rss() for peer in self.peers)

    def peak_rss(self) -> int:
        return sum(peer.peak_rss() for peer in self.peers)

    def reset_peak(self) -> None:
        for peer in self.peers:
            peer.reset_peak()

    def holds_client_port(self, port: int) -> bool:
        return any(peer.holds_client_port(port) for peer in self.peers)

    def split(self) -> list[int]:
        """Established client connections held by each worker, in start order."""
        return [
            sum(1 for c in peer.ps.net_connections(kind="tcp4")
                if c.status == psutil.CONN_ESTABLISHED and c.laddr and c.laddr.port == self.port
                and c.raddr)
            for peer in self.peers
        ]


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@asynccontextmanager
async def running_redis() -> AsyncIterator[tuple[str, psutil.Process]]:
    """A throwaway redis-server on a free port; yields its URL and its process (for its CPU)."""
    binary = shutil.which("redis-server")
    if binary is None:
        raise RuntimeError("redis-server is not installed (apt-get install redis-server)")
    port = _free_port()
    with tempfile.TemporaryDirectory(prefix="agentcast-bench-redis-") as directory:
        proc = await asyncio.create_subprocess_exec(
            binary, "--port", str(port), "--bind", "127.0.0.1", "--dir", directory,
            "--save", "", "--appendonly", "no", stdout=asyncio.subprocess.DEVNULL,
        )
        try:
            await _wait_for_redis(port)
            yield f"redis://127.0.0.1:{port}/0", psutil.Process(proc.pid)
        finally:
            with suppress(ProcessLookupError):
                proc.terminate()
            await proc.wait()


async def _wait_for_redis(port: int) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + REDIS_START
    while True:
        try:
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
        except OSError:
            if loop.time() > deadline:
                raise RuntimeError(f"redis-server did not start on port {port}") from None
            await asyncio.sleep(0.05)
            continue
        writer.write(b"PING\r\n")
        reply = await reader.readline()
        writer.close()
        if reply.startswith(b"+PONG"):
            return


@asynccontextmanager
async def running_workers(count: int, redis_url: str) -> AsyncIterator[Workers]:
    """``count`` agentcast peers on the Redis backplane, sharing one port."""
    async with AsyncExitStack() as stack:
        options = ["--redis-url", redis_url, "--reuse-port"]
        first = await stack.enter_async_context(running_peer("agentcast", 900, options))
        peers = [first]
        for _ in range(count - 1):
            peers.append(await stack.enter_async_context(
                running_peer("agentcast", 900, [*options, "--port", str(first.port)])
            ))
        yield Workers(peers)


async def _measure(
    server: Any, sizes: Sizes, progress: Progress, label: str, *, tag: str,
    on_ready: Callable[[], Any] | None = None, redis: psutil.Process | None = None,
) -> dict[str, Any]:
    users, tabs, events = sizes.scale_burst
    redis_cpu0 = _cpu_of(redis)
    progress(f"scale-out: {label}, burst {users}x{tabs} connections x {events} events")
    burst = await run_load(
        server, users_of(f"sb-{tag}", users), tabs, processes=sizes.loadgen_processes,
        drive={"count": events, "size": EVENT_SIZE, "rate": 0}, on_ready=on_ready,
    )
    # redis-server's CPU over the whole burst load (connecting, subscribing and publishing).
    redis_cpu = _cpu_of(redis) - redis_cpu0
    progress(f"scale-out: {label}, latency at {sizes.scale_rate} deliveries/s")
    rate = sizes.scale_rate / (users * tabs)
    # Staggered as in `steady`: each user starts at its own phase of the period, so the paced
    # load is a smooth stream and its latency is the hop, not the drain of one tick of every
    # user at once (the lockstep shape the first rows of RESULTS.md were measured with).
    paced_users = users_of(f"sl-{tag}", users)
    paced = await run_load(
        server, paced_users, tabs, processes=sizes.loadgen_processes,
        drive={"count": max(1, int(rate * sizes.scale_seconds)), "size": EVENT_SIZE,
               "rate": rate, "phases": stagger(paced_users, rate)},
        deadline=sizes.scale_seconds + 4, quiet=1.5,
    )
    delivered = burst["tally"]["delivered"]
    tally = {key: burst["tally"][key] + paced["tally"][key]
             for key in ("losses", "duplicates", "order_violations", "cross_user")}
    return {
        "setup": label,
        "connections": users * tabs,
        "events_per_s": round(delivered / max(burst["wall"], 1e-9)),
        "server_cpu_us_per_event": round(burst["server_cpu"] / delivered * 1e6, 2)
        if delivered else None,
        "redis_cpu_us_per_event": round(redis_cpu / delivered * 1e6, 2)
        if redis is not None and delivered else None,
        "burst_p99": burst["latency_ms"]["p99"],
        "paced_per_s": sizes.scale_rate,
        # Deliveries asked for at one instant in the paced load: one user's tabs.
        "burst_deliveries": tabs,
        "p50": paced["latency_ms"]["p50"],
        "p99": paced["latency_ms"]["p99"],
        "closed_by_server": burst["closed_by_server"] + paced["closed_by_server"],
        **tally,
    }


def _cpu_of(process: psutil.Process | None) -> float:
    if process is None:
        return 0.0
    times = process.cpu_times()
    return float(times.user + times.system)


async def scale_out(peer: Peer, sizes: Sizes, progress: Progress) -> list[dict[str, Any]]:
    """Rows for in-memory (``peer``, already running), Redis with 1 worker, with 2 workers."""
    rows = [await _measure(peer, sizes, progress, "in-memory, 1 process", tag="mem")]
    async with running_redis() as (redis_url, redis):
        for count in (1, 2):
            async with running_workers(count, redis_url) as workers:
                split: list[int] = []
                row = await _measure(
                    workers, sizes, progress, f"redis, {count} worker{'s' * (count > 1)}",
                    tag=f"redis{count}", redis=redis,
                    on_ready=lambda workers=workers, split=split: split.extend(workers.split()),
                )
                rows.append({**row, "connections_per_worker": split})
    base = rows[0]
    for row in rows:
        if base["p50"] is not None and row["p50"] is not None:
            row["added_p50"] = round(row["p50"] - base["p50"], 3)
        if base["p99"] is not None and row["p99"] is not None:
            row["added_p99"] = round(row["p99"] - base["p99"], 3)
    return rows

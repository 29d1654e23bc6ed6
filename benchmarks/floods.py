"""The ``floods`` scenario (issue 9): other users' p99 delivery latency with and without
clients flooding below the message level, agentcast only.

A separate flooder process (:mod:`benchmarks.flooder`) keeps ``connections`` hostile clients
per flood kind going against the same server process (each its own user, so the per-user
connection limit does not stop them): one-byte fragments of a 64 KiB message, pings as fast as
the socket takes them (both closed by the server and reconnecting at once), and tiny frames
within the message rate and the fragment cap (64 fragments per message, 19 messages/s; read
at the frame rate, never closed). Meanwhile the paced
``slow-consumer`` load measures the other users' p99. Rounds alternate undisturbed and
flooded runs; the ratio compares medians (single runs on 2 cores vary by several x).

The flooders run on the same 2 cores: part of any latency increase is their own CPU, which the
row reports next to the server's, so a miss can be told apart from the server's cost.
"""

from __future__ import annotations

import asyncio
import json
import statistics
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any, Final

import attrs
import psutil

from agentcast.server import issue_token
from benchmarks.peers import BENCH_SECRET
from benchmarks.procs import ROOT, Peer, _stop
from benchmarks.scenarios import EVENT_SIZE, QUICK, Progress, Sizes, run_load, users_of

#: Seconds the flooder may take to open its connections, and to report after ``stop``.
FLOODER_TIMEOUT: Final = 60.0


@attrs.frozen
class FloodSizes:
    """Sizes of the floods scenario in one run mode."""

    #: Flood kinds of each flooded run; a run with several kinds floods with all at once.
    runs: tuple[tuple[str, ...], ...]
    #: Flooding connections per kind.
    connections: int
    #: (users, tabs, events/s per user, seconds) of the measured load, as in slow-consumer.
    load: tuple[int, int, int, float]
    rounds: int


FLOOD_QUICK: Final = FloodSizes(
    runs=(("fragments", "pings", "tiny-frames"),), connections=1, load=(4, 2, 100, 1.5),
    rounds=1,
)
FLOOD_FULL: Final = FloodSizes(
    runs=(("fragments",), ("pings",), ("tiny-frames",)), connections=4, load=(10, 4, 50, 6.0),
    rounds=5,
)


@attrs.define
class Flooder:
    proc: asyncio.subprocess.Process
    cpu0: float = 0.0

    async def receive(self, key: str) -> Any:
        assert self.proc.stdout is not None
        while True:
            line = await asyncio.wait_for(self.proc.stdout.readline(), FLOODER_TIMEOUT)
            if not line:
                raise RuntimeError(f"flooder exited before sending {key!r}")
            message = json.loads(line)
            if key in message:
                return message[key]

    def cpu(self) -> float:
        times = psutil.Process(self.proc.pid).cpu_times()
        return float(times.user + times.system)

    async def stop(self) -> dict[str, Any]:
        cpu = self.cpu() - self.cpu0
        assert self.proc.stdin is not None
        self.proc.stdin.write(b"stop\n")
        await self.proc.stdin.drain()
        report: dict[str, Any] = await self.receive("flood")
        report["flooder_cpu_s"] = round(cpu, 2)
        return report


@asynccontextmanager
async def running_flooder(
    peer: Peer, kinds: tuple[str, ...], per_kind: int, tag: str, lifetime: int
) -> AsyncIterator[Flooder]:
    """Start the flooder with ``per_kind`` connections of each kind; stop it on exit."""
    users = [f"{tag}-{kind}-{n}" for kind in kinds for n in range(per_kind)]
    spec = {
        "port": peer.port, "tokens": [issue_token(BENCH_SECRET, user) for user in users],
        "kinds": [kind for kind in kinds for _ in range(per_kind)], "lifetime": lifetime,
    }
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "benchmarks.flooder",
        stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE, cwd=ROOT,
    )
    try:
        assert proc.stdin is not None
        proc.stdin.write((json.dumps(spec) + "\n").encode())
        await proc.stdin.drain()
        flooder = Flooder(proc)
        await flooder.receive("flooding")
        flooder.cpu0 = flooder.cpu()
        yield flooder
    finally:
        await _stop(proc)


async def floods(peer: Peer, sizes: Sizes, progress: Progress) -> list[dict[str, Any]]:
    """One row per flood run: others' p99 undisturbed vs flooded, what the flooders got."""
    flood = FLOOD_QUICK if sizes == QUICK else FLOOD_FULL
    users, tabs, rate, seconds = flood.load
    drive = {"count": int(rate * seconds), "size": EVENT_SIZE, "rate": rate}
    calm: list[float] = []
    calm_cpu: list[float] = []
    flooded: dict[tuple[str, ...], list[dict[str, Any]]] = {kinds: [] for kinds in flood.runs}
    lifetime = int(seconds + 120)
    for round_index in range(flood.rounds):
        progress(f"floods: undisturbed, round {round_index + 1}/{flood.rounds}")
        load = await run_load(
            peer, users_of(f"fcalm{round_index}", users), tabs, processes=1, drive=drive,
            deadline=seconds + 3, quiet=1.5,
        )
        if load["latency_ms"]["p99"] is not None:
            calm.append(load["latency_ms"]["p99"])
        calm_cpu.append(load["server_cpu"] / max(load["wall"], 1e-9))
        for kinds in flood.runs:
            name = "+".join(kinds)
            progress(f"floods: {name}, round {round_index + 1}/{flood.rounds}")
            tag = f"flood{round_index}"
            async with running_flooder(peer, kinds, flood.connections, tag, lifetime) as gen:
                load = await run_load(
                    peer, users_of(f"f{name}{round_index}", users), tabs, processes=1,
                    drive=drive, deadline=seconds + 3, quiet=1.5,
                )
                report = await gen.stop()
            flooded[kinds].append({"load": load, "flood": report})
    calm_p99 = statistics.median(calm) if calm else None
    rows = []
    for kinds, runs in flooded.items():
        p99s = [r["load"]["latency_ms"]["p99"] for r in runs
                if r["load"]["latency_ms"]["p99"] is not None]
        p99 = statistics.median(p99s) if p99s else None
        codes: dict[str, int] = {}
        for run in runs:
            for code, count in run["flood"]["close_codes"].items():
                codes[code] = codes.get(code, 0) + count
        tallies = [run["load"]["tally"] for run in runs]
        rows.append({
            "flood": "+".join(kinds), "flooders": flood.connections * len(kinds),
            "offered_per_s": rate * users * tabs, "rounds": flood.rounds,
            "p99_undisturbed_rounds": calm, "p99_flooded_rounds": p99s,
            "p99_undisturbed": calm_p99, "p99_flooded": p99,
            "p99_ratio": round(p99 / calm_p99, 2) if p99 and calm_p99 else None,
            "server_cpu_share_undisturbed": round(statistics.median(calm_cpu), 2),
            "server_cpu_share": round(statistics.median(
                r["load"]["server_cpu"] / max(r["load"]["wall"], 1e-9) for r in runs), 2),
            "flooder_cpu_share": round(statistics.median(
                r["flood"]["flooder_cpu_s"] / max(r["load"]["wall"], 1e-9) for r in runs), 2),
            "flood_connections_opened": sum(r["flood"]["opened"] for r in runs),
            # Handshakes refused (429: the user's earlier connections were still closing).
            "flood_refused": sum(r["flood"]["refused"] for r in runs),
            "flood_close_codes": codes,
            "flood_mb_sent": round(sum(r["flood"]["bytes_sent"] for r in runs) / 2**20, 1),
            "losses": sum(t["losses"] for t in tallies),
            "duplicates": sum(t["duplicates"] for t in tallies),
            "order_violations": sum(t["order_violations"] for t in tallies),
            "cross_user": sum(t["cross_user"] for t in tallies),
        })
    return rows

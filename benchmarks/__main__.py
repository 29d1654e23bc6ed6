"""``python -m benchmarks [scenario ...] [--quick] [--out DIR] [--peers ...]``: the runner.

Starts each peer in turn as its own process, runs the chosen scenarios against it with separate
load-generator processes, then writes results.json, results.md and PNG plots to ``--out`` and
prints the verdict lines. Exits 1 when a peer lost, duplicated, reordered or misrouted events
where that must not happen (see ``report.integrity_failures``); timing is never asserted.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import os
import platform
import sys
from importlib.metadata import version
from pathlib import Path
from typing import Any

import attrs
import psutil
from rich.console import Console

from benchmarks import report
from benchmarks.floods import floods
from benchmarks.peers import PEERS
from benchmarks.peers.centrifuge_peer import build as build_centrifuge
from benchmarks.peers.node_ws_peer import command as node_ws_command
from benchmarks.procs import Affinity, affinity_as, plan_affinity, running_peer, set_affinity
from benchmarks.scaleout import scale_out
from benchmarks.scenarios import FULL, QUICK, SCENARIOS

#: Order scenarios run in against one server process: idle first, so its RSS is a clean base.
ORDER = ["idle", "connect", "isolation", "burst", "steady", "steady-lockstep", "slow-consumer",
         "tokens", "floods", "scale-out"]
#: Scenarios about agentcast alone (its own deployment options or limits), skipped for the
#: other peers.
AGENTCAST_ONLY = {"scale-out": scale_out, "floods": floods}
#: Scenarios that run several server processes (and redis-server): never pinned, since pinning
#: would put every worker on the server's cores (one core of two here).
NOT_PINNED = {"scale-out"}


def parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__)
    parser.add_argument("scenarios", nargs="*", metavar="scenario",
                        help=f"any of {', '.join(ORDER)} (default: all)")
    parser.add_argument("--quick", action="store_true", help="small sizes (CI smoke run)")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/out"))
    parser.add_argument("--peers", nargs="*", choices=list(PEERS), default=list(PEERS))
    parser.add_argument("--no-pin", dest="pin", action="store_false",
                        help="let the kernel place the server and the load generators (default: "
                             "pinned to different cores where the machine has 2 or more)")
    args = parser.parse_args(argv)
    unknown = sorted(set(args.scenarios) - set(ORDER))
    if unknown:
        parser.error(f"unknown scenario(s) {', '.join(unknown)}; choose from {', '.join(ORDER)}")
    return args


def meta(args: argparse.Namespace, argv: list[str]) -> dict[str, Any]:
    packages = ["agentcast", "trio", "trio-websocket", "websockets", "python-socketio",
                "python-engineio", "uvicorn", "orjson"]
    return {
        "command": "python -m benchmarks " + " ".join(argv),
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "machine": f"{platform.machine()}, {psutil.cpu_count()} cores, "
                   f"{round(psutil.virtual_memory().total / 2**30, 1)} GB, "
                   f"Python {platform.python_version()}, {platform.system()} {platform.release()}",
        "versions": {name: version(name) for name in packages},
        "mode": "quick" if args.quick else "full",
        "sizes": attrs.asdict(QUICK if args.quick else FULL),
        "affinity": {**plan_affinity(sorted(os.sched_getaffinity(0)), args.pin).describe(),
                     "not_pinned": sorted(NOT_PINNED)},
    }


async def run(args: argparse.Namespace, argv: list[str], console: Console) -> dict[str, Any]:
    sizes = QUICK if args.quick else FULL
    chosen = [name for name in ORDER if name in (args.scenarios or ORDER)]
    results: dict[str, Any] = {"meta": meta(args, argv), "peers": {}}
    pinning = plan_affinity(sorted(os.sched_getaffinity(0)), args.pin)
    set_affinity(pinning)
    if "node-ws" in args.peers:
        # Before any peer runs: a full run must not end half-way, its results unwritten,
        # because the last peer's packages were never installed.
        node_ws_command(1)
    if "centrifuge" in args.peers:
        console.log("building the centrifuge peer (Go, offline)")
        await asyncio.to_thread(build_centrifuge)
    with console.status("starting") as status:
        for peer_name in args.peers:
            rows: dict[str, Any] = {}
            results["peers"][peer_name] = rows
            async with running_peer(peer_name, lifetime=1800) as peer:
                for name in chosen:
                    if name in AGENTCAST_ONLY and peer_name != "agentcast":
                        continue
                    scenario = AGENTCAST_ONLY.get(name) or SCENARIOS[name]

                    def progress(text: str, peer_name: str = peer_name) -> None:
                        status.update(f"[bold]{peer_name}[/]: {text}")

                    with affinity_as(Affinity() if name in NOT_PINNED else pinning):
                        rows[name] = await scenario(peer, sizes, progress)
                    console.log(f"{peer_name} {name}: {_short(rows[name])}")
    return results


def _short(row: Any) -> str:
    keys = ("events_per_s", "server_cpu_us_per_event", "p99", "kb_per_connection",
            "handshakes_per_s", "p99_ratio", "cross_user", "losses")
    rows = row if isinstance(row, list) else [row]
    return " | ".join(", ".join(f"{k}={r[k]}" for k in keys if k in r) for r in rows)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = parse(argv)
    console = Console(stderr=True)
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    results = asyncio.run(run(args, argv, console))
    for path in report.write_all(results, args.out):
        console.log(f"wrote {path}")
    for line in report.verdicts(results):
        console.print(line)
    failures = report.integrity_failures(results)
    for line in failures:
        console.print(f"[red]integrity failure[/] {line}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())

"""The scenarios of issues 4 and 12; each runs against one live peer and returns one row (a dict).

Sizes come from :class:`Sizes` (``QUICK`` for the CI smoke run, ``FULL`` for the committed
results). Every scenario uses thread names shared by all users (``t1``), so every scenario also
counts cross-user deliveries; ``isolation`` does it with many users at once.

``steady`` staggers each user's phase over the pacing period, so the offered rate is a smooth
stream; ``steady-lockstep`` keeps every user on the same frame (what ``steady`` measured before
issue 12: a burst of every connection at once, reported as ``burst_deliveries``). ``tokens`` is
the agent-chat load: one connection per user, each receiving its own jittered stream of small
``agent_text`` events at 20-50/s (:func:`benchmarks.protocol.token_schedule`).
"""

from __future__ import annotations

import asyncio
import json
import statistics
from collections.abc import Callable
from typing import Any, Final

import attrs

from agentcast.server import issue_token
from benchmarks.peers import BENCH_SECRET
from benchmarks.procs import Peer, running_loadgens
from benchmarks.protocol import TOKEN_EVENT_TYPE, stagger, token_schedule, token_seed
from benchmarks.stats import Histogram, Tally, percentiles_ms

#: Event size on the wire (bytes), as in the issue's planning figures.
EVENT_SIZE: Final = 200
THREAD: Final = "t1"
#: Size on the wire of a ``tokens`` event (an ``agent_text`` delta of a few words).
TOKEN_EVENT_SIZE: Final = 180
#: Seed of the ``tokens`` streams: every peer is offered the same ones.
TOKEN_SEED: Final = 12


@attrs.frozen
class Sizes:
    """Every size and duration of one run mode."""

    idle_connections: int
    connect_connections: int
    isolation_users: int
    isolation_events: int
    #: (users, tabs, events per user) per burst size.
    bursts: tuple[tuple[int, int, int], ...]
    steady_users: int
    steady_tabs: int
    #: Offered deliveries per second (events per second x subscribed connections).
    steady_levels: tuple[int, ...]
    steady_seconds: float
    #: (users, tabs, events/s per user, seconds) of the slow-consumer load.
    slow: tuple[int, int, int, float]
    #: Alternating undisturbed / with-slow runs; the ratio compares their median p99s.
    slow_rounds: int
    loadgen_processes: int
    #: Seconds idle connections are held before RSS is read.
    idle_hold: float
    #: scale-out: (users, tabs, events per user) of its burst.
    scale_burst: tuple[int, int, int]
    #: scale-out: offered deliveries/s of its paced latency load, and its seconds.
    scale_rate: int
    scale_seconds: float
    #: tokens: connections (one user each) per level, and each level's seconds of streaming.
    tokens_connections: tuple[int, ...] = (50,)
    tokens_seconds: float = 1.0


QUICK: Final = Sizes(
    idle_connections=200, connect_connections=100, isolation_users=20, isolation_events=50,
    bursts=((5, 4, 200),), steady_users=10, steady_tabs=2, steady_levels=(400, 2000),
    steady_seconds=1.0, slow=(4, 2, 300, 2.0), slow_rounds=1, loadgen_processes=1,
    idle_hold=0.5, scale_burst=(4, 2, 50), scale_rate=200, scale_seconds=1.5,
    tokens_connections=(50,), tokens_seconds=1.0,
)
FULL: Final = Sizes(
    idle_connections=3000, connect_connections=1000, isolation_users=200, isolation_events=100,
    bursts=((10, 10, 500), (100, 10, 100)), steady_users=20, steady_tabs=5,
    steady_levels=(500, 1000, 2500, 5000, 10000, 20000, 40000, 80000), steady_seconds=5.0,
    slow=(10, 4, 50, 8.0), slow_rounds=3, loadgen_processes=2, idle_hold=2.0,
    scale_burst=(50, 4, 200), scale_rate=4000, scale_seconds=5.0,
    tokens_connections=(300, 1000, 3000), tokens_seconds=5.0,
)

Progress = Callable[[str], None]


def users_of(tag: str, count: int) -> list[str]:
    return [f"{tag}-u{index}" for index in range(count)]


async def run_load(
    peer: Peer, users: list[str], tabs: int, *, processes: int, drive: dict[str, Any] | None,
    thread: str | None = THREAD, slow_user: str | None = None, deadline: float = 60.0,
    quiet: float = 3.0, concurrency: int = 200, hold: float = 0.0,
    on_ready: Callable[[], Any] | None = None,
) -> dict[str, Any]:
    """Open the connections in ``processes`` load generators, drive them, merge their reports."""
    groups = [users[index::processes] for index in range(processes)]
    groups = [group for group in groups if group]
    specs = [
        {"peer": peer.name, "port": peer.port, "users": group,
         "tokens": {u: issue_token(BENCH_SECRET, u) for u in group}
         if peer.name.startswith("agentcast") else {},
         "tabs": tabs, "thread": thread, "drive": drive, "concurrency": concurrency,
         "slow_user": slow_user if index == 0 else None, "deadline": deadline, "quiet": quiet,
         "lifetime": int(deadline + 300)}
        for index, group in enumerate(groups)
    ]
    rss_before = peer.rss()
    async with running_loadgens(specs) as gens:
        ready = await asyncio.gather(*(g.receive("ready", 180) for g in gens))
        if hold:
            await asyncio.sleep(hold)
        if on_ready is not None:
            on_ready()  # every connection is open: e.g. see how they spread over workers
        rss_connected = peer.rss()
        peer.reset_peak()
        cpu0 = peer.cpu()
        started = asyncio.get_running_loop().time()
        await asyncio.gather(*(g.send("go") for g in gens))
        if drive is None:
            await asyncio.gather(*(g.send("close") for g in gens))
        slow_port = next((r["slow_port"] for r in ready if r.get("slow_port")), None)
        collecting = asyncio.gather(*(g.receive("result", deadline + 60) for g in gens))
        slow_closed_after = None
        while slow_port is not None and not collecting.done():
            # The stalled client reads nothing, so it cannot see its own close: watch the
            # server's side of its TCP connection instead.
            if not peer.holds_client_port(slow_port):
                slow_closed_after = asyncio.get_running_loop().time() - started
                break
            await asyncio.wait([collecting], timeout=0.2)
        results = await collecting
        wall_end = max((r["wall"] for r in results), default=0.0)
        if slow_closed_after is not None and slow_closed_after > wall_end:
            slow_closed_after = None  # gone only when the load generator hung up at the end
        server_cpu = peer.cpu() - cpu0
        peak = peer.peak_rss()
        if drive is not None:
            await asyncio.gather(*(g.send("close") for g in gens))
        await asyncio.gather(*(g.receive("closed", 60) for g in gens))
        teardown_cpu = peer.cpu() - cpu0 - server_cpu
    tally, histogram = Tally(), Histogram()
    for result in results:
        if "tally" in result:
            tally.merge(Tally(**result["tally"]))
            histogram.merge(Histogram.from_json(result["histogram"]))
    wall = max((r["wall"] for r in results), default=0.0)
    opened = sum(r["opened"] for r in ready)
    return {
        "opened": opened, "connect_failures": sum(r["failures"] for r in ready),
        "connect_wall": max(r["wall"] for r in ready),
        "handshake_p99_ms": max((r["handshake_p99"] or 0) * 1000 for r in ready),
        "rss_before": rss_before, "rss_connected": rss_connected, "peak_rss": peak,
        "wall": wall, "server_cpu": server_cpu, "teardown_cpu": teardown_cpu,
        "loadgen_cpu": sum(r["cpu"] for r in results),
        "tally": attrs.asdict(tally), "latency_ms": percentiles_ms(histogram),
        "histogram": histogram.to_json(),
        "slow": next((r["slow"] for r in results if r.get("slow")), None),
        "slow_closed_after": slow_closed_after,
        "closed_by_server": sum(r.get("closed_by_server", 0) for r in results),
    }


def _throughput(load: dict[str, Any], processes: int) -> dict[str, Any]:
    delivered = load["tally"]["delivered"]
    wall = max(load["wall"], 1e-9)
    return {
        "delivered": delivered, "events_per_s": round(delivered / wall),
        "server_cpu_us_per_event": round(load["server_cpu"] / delivered * 1e6, 2)
        if delivered else None,
        "server_cpu_share": round(load["server_cpu"] / wall, 2),
        # Closing the connections afterwards, apart: it is not delivery work.
        "teardown_cpu_s": round(load["teardown_cpu"], 3),
        "loadgen_cpu_share": round(load["loadgen_cpu"] / wall / processes, 2),
        # Cores the load generators used together: near the cores they have (1 when pinned on
        # 2 cores), the clients, not the server, set the arrival stamps.
        "loadgen_cores_used": round(load["loadgen_cpu"] / wall, 2),
        **load["latency_ms"], **load["tally"],
    }


async def idle(peer: Peer, sizes: Sizes, progress: Progress) -> dict[str, Any]:
    count = sizes.idle_connections
    progress(f"idle: {count} connections")
    load = await run_load(
        peer, users_of("idle", count // 10), 10, processes=sizes.loadgen_processes, drive=None,
        hold=sizes.idle_hold, concurrency=100,
    )
    opened = load["opened"]
    per_conn = (load["rss_connected"] - load["rss_before"]) / opened if opened else None
    return {
        "connections": opened, "connect_failures": load["connect_failures"],
        "rss_before_mb": round(load["rss_before"] / 2**20, 1),
        "rss_connected_mb": round(load["rss_connected"] / 2**20, 1),
        "kb_per_connection": round(per_conn / 1024, 1) if per_conn is not None else None,
    }


async def connect(peer: Peer, sizes: Sizes, progress: Progress) -> dict[str, Any]:
    count = sizes.connect_connections
    progress(f"connect: {count} handshakes in parallel")
    load = await run_load(
        peer, users_of("conn", count // 10), 10, processes=sizes.loadgen_processes, drive=None,
        thread=None, concurrency=count,
    )
    return {
        "connections": load["opened"], "failures": load["connect_failures"],
        "seconds": round(load["connect_wall"], 3),
        "handshakes_per_s": round(load["opened"] / max(load["connect_wall"], 1e-9)),
        "handshake_p99_ms": round(load["handshake_p99_ms"], 1),
    }


async def isolation(peer: Peer, sizes: Sizes, progress: Progress) -> dict[str, Any]:
    users = sizes.isolation_users
    progress(f"isolation: {users} users on thread {THREAD!r}")
    drive = {"count": sizes.isolation_events, "size": EVENT_SIZE, "rate": 0}
    load = await run_load(
        peer, users_of("iso", users), 1, processes=sizes.loadgen_processes, drive=drive,
    )
    return {"users": users, **_throughput(load, sizes.loadgen_processes)}


async def burst(peer: Peer, sizes: Sizes, progress: Progress) -> list[dict[str, Any]]:
    rows = []
    for users, tabs, events in sizes.bursts:
        progress(f"burst: {users}x{tabs} connections, {events} events per user")
        drive = {"count": events, "size": EVENT_SIZE, "rate": 0}
        load = await run_load(
            peer, users_of(f"burst{users * tabs}", users), tabs,
            processes=sizes.loadgen_processes, drive=drive,
        )
        rows.append({"connections": users * tabs, "events_per_user": events,
                     **_throughput(load, sizes.loadgen_processes)})
    return rows


def sustained(row: dict[str, Any]) -> bool:
    """Sustained: at least 90% of the offered rate delivered, nothing lost, p99 under 0.5 s."""
    p99 = row.get("p99")
    return (
        row["events_per_s"] >= 0.9 * row["offered_per_s"] and row["losses"] == 0
        and p99 is not None and p99 < 500
    )


async def steady(peer: Peer, sizes: Sizes, progress: Progress) -> list[dict[str, Any]]:
    """Paced load at rising offered rates, each user's emission at its own phase."""
    return await _steady(peer, sizes, progress, staggered=True)


async def steady_lockstep(
    peer: Peer, sizes: Sizes, progress: Progress
) -> list[dict[str, Any]]:
    """``steady`` with every user's pacing on the same frame: bursts of every connection."""
    return await _steady(peer, sizes, progress, staggered=False)


async def _steady(
    peer: Peer, sizes: Sizes, progress: Progress, *, staggered: bool
) -> list[dict[str, Any]]:
    rows = []
    users, tabs = sizes.steady_users, sizes.steady_tabs
    name = "steady" if staggered else "steady-lockstep"
    for level in sizes.steady_levels:
        progress(f"{name}: {level} deliveries/s offered")
        rate = level / (users * tabs)
        count = max(1, int(rate * sizes.steady_seconds))
        tag = f"{'steady' if staggered else 'lock'}{level}"
        drive: dict[str, Any] = {"count": count, "size": EVENT_SIZE, "rate": rate}
        if staggered:
            drive["phases"] = stagger(users_of(tag, users), rate)
        load = await run_load(
            peer, users_of(tag, users), tabs, processes=sizes.loadgen_processes,
            drive=drive, deadline=sizes.steady_seconds + 4, quiet=1.5,
        )
        row = {"offered_per_s": level, **_throughput(load, sizes.loadgen_processes)}
        # Deliveries the server is asked to make at one instant: a user's tabs when
        # staggered, every connection in lockstep.
        row["burst_deliveries"] = tabs if staggered else users * tabs
        row["sustained"] = sustained(row)
        rows.append(row)
        if not row["sustained"]:
            break
    return rows


async def tokens(peer: Peer, sizes: Sizes, progress: Progress) -> list[dict[str, Any]]:
    """The agent-chat load: many users, each a jittered token stream of small events.

    Every level runs (the issue asks for 1 000 and 3 000 connections even where a peer does not
    sustain them); ``sustained`` marks the levels that held.
    """
    rows = []
    seconds = sizes.tokens_seconds
    for connections in sizes.tokens_connections:
        progress(f"tokens: {connections} users streaming tokens")
        users = users_of(f"tok{connections}", connections)
        offered = sum(len(token_schedule(token_seed(u, TOKEN_SEED), seconds)) for u in users)
        drive = {"count": 0, "size": TOKEN_EVENT_SIZE, "rate": 0, "event": TOKEN_EVENT_TYPE,
                 "token_seconds": seconds, "seed": TOKEN_SEED}
        load = await run_load(
            peer, users, 1, processes=sizes.loadgen_processes, drive=drive,
            deadline=seconds + 6, quiet=2.0, concurrency=100,
        )
        row = {"connections": connections, "offered_per_s": round(offered / seconds),
               **_throughput(load, sizes.loadgen_processes)}
        row["sustained"] = sustained(row)
        rows.append(row)
    return rows


async def slow_consumer(peer: Peer, sizes: Sizes, progress: Progress) -> dict[str, Any]:
    """The others' p99 with and without a stalled client, in alternating rounds.

    One run of each is at the mercy of a scheduler hiccup on a 2-core machine (single runs of
    the same peer varied 4x), so the rounds alternate and the ratio compares medians.
    """
    users, tabs, rate, seconds = sizes.slow
    drive = {"count": int(rate * seconds), "size": EVENT_SIZE, "rate": rate}
    p99s: dict[str, list[float]] = {"undisturbed": [], "with_slow": []}
    disturbed: dict[str, Any] = {}
    losses = duplicates = order_violations = cross_user = 0
    peak_rss = peak_growth = 0
    slow_closed_after: list[float] = []
    for round_index in range(sizes.slow_rounds):
        for label, slow in (("undisturbed", None), ("with_slow", f"slow{round_index}-u0")):
            progress(f"slow-consumer: {label}, round {round_index + 1}/{sizes.slow_rounds}")
            load = await run_load(
                peer, users_of(f"slow{round_index}" if slow else f"calm{round_index}", users),
                tabs, processes=sizes.loadgen_processes, drive=drive, slow_user=slow,
                deadline=seconds + 3, quiet=1.5,
            )
            if load["latency_ms"]["p99"] is not None:
                p99s[label].append(load["latency_ms"]["p99"])
            if slow is None:
                continue
            disturbed = load
            losses += load["tally"]["losses"]
            duplicates += load["tally"]["duplicates"]
            order_violations += load["tally"]["order_violations"]
            cross_user += load["tally"]["cross_user"]
            peak_rss = max(peak_rss, load["peak_rss"])
            peak_growth = max(peak_growth, load["peak_rss"] - load["rss_before"])
            if load["slow_closed_after"] is not None:
                slow_closed_after.append(load["slow_closed_after"])
    calm_p99 = statistics.median(p99s["undisturbed"]) if p99s["undisturbed"] else None
    slow_p99 = statistics.median(p99s["with_slow"]) if p99s["with_slow"] else None
    slow_info = disturbed.get("slow") or {}
    return {
        "offered_per_s": rate * users * tabs,
        "rounds": sizes.slow_rounds,
        "p99_undisturbed_rounds": p99s["undisturbed"],
        "p99_with_slow_rounds": p99s["with_slow"],
        "p99_undisturbed": calm_p99,
        "p99_with_slow": slow_p99,
        "p99_ratio": round(slow_p99 / calm_p99, 2) if calm_p99 and slow_p99 else None,
        "others_losses": losses, "others_duplicates": duplicates,
        "others_order_violations": order_violations, "cross_user": cross_user,
        "slow_closed": bool(slow_closed_after) or bool(slow_info.get("closed")),
        "slow_close_code": slow_info.get("close_code"),
        "slow_closed_after_s": round(statistics.median(slow_closed_after), 1)
        if slow_closed_after else None,
        "peak_rss_mb": round(peak_rss / 2**20, 1),
        # What the stalled client's queue cost, apart from what earlier scenarios left behind.
        "peak_rss_growth_mb": round(peak_growth / 2**20, 1),
    }


SCENARIOS: Final = {
    "idle": idle, "connect": connect, "isolation": isolation, "burst": burst,
    "steady": steady, "steady-lockstep": steady_lockstep, "slow-consumer": slow_consumer,
    "tokens": tokens,
}


def dumps(value: Any) -> str:
    return json.dumps(value, indent=2, sort_keys=True)

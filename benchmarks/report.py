"""Turn the collected rows into results.json, results.md, PNG plots and the verdict lines.

Pure functions over plain dicts (``results``: ``{"meta": ..., "peers": {peer: {scenario:
row-or-rows}}}``) except :func:`write_all`, so rendering is unit-tested without a run.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

#: (scenario, columns) of the Markdown tables, in order.
COLUMNS: dict[str, list[str]] = {
    "burst": ["connections", "events_per_s", "server_cpu_us_per_event", "p50", "p99", "losses",
              "duplicates", "order_violations", "loadgen_cpu_share"],
    "steady": ["offered_per_s", "events_per_s", "server_cpu_us_per_event", "p50", "p99", "p999",
               "losses", "burst_deliveries", "loadgen_cpu_share", "sustained"],
    "steady-lockstep": ["offered_per_s", "events_per_s", "server_cpu_us_per_event", "p50", "p99",
                        "p999", "losses", "burst_deliveries", "loadgen_cpu_share", "sustained"],
    "tokens": ["connections", "offered_per_s", "events_per_s", "server_cpu_us_per_event",
               "server_cpu_share", "p50", "p99", "p999", "losses", "duplicates",
               "order_violations", "cross_user", "loadgen_cores_used", "sustained"],
    "idle": ["connections", "kb_per_connection", "rss_connected_mb", "connect_failures"],
    "connect": ["connections", "handshakes_per_s", "handshake_p99_ms", "failures"],
    "slow-consumer": ["offered_per_s", "p99_undisturbed", "p99_with_slow", "p99_ratio",
                      "others_losses", "slow_closed", "slow_close_code", "slow_closed_after_s",
                      "peak_rss_mb", "peak_rss_growth_mb"],
    "isolation": ["users", "delivered", "cross_user", "losses", "duplicates", "order_violations"],
    "floods": ["flood", "flooders", "offered_per_s", "p99_undisturbed", "p99_flooded",
               "p99_ratio", "server_cpu_share_undisturbed", "server_cpu_share",
               "flooder_cpu_share", "flood_connections_opened",
               "flood_refused", "flood_close_codes", "losses"],
    "scale-out": ["setup", "connections", "connections_per_worker", "events_per_s",
                  "server_cpu_us_per_event", "redis_cpu_us_per_event", "paced_per_s", "p50",
                  "p99", "added_p50", "added_p99", "closed_by_server", "losses", "duplicates",
                  "order_violations", "cross_user"],
}


def rows_of(value: Any) -> list[dict[str, Any]]:
    if value is None:
        return []
    return value if isinstance(value, list) else [value]


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return f"{value:g}"
    return str(value)


def markdown_table(results: dict[str, Any], scenario: str) -> str:
    """One Markdown table: a row per peer (and per size/level) for ``scenario``."""
    columns = COLUMNS[scenario]
    lines = ["| peer | " + " | ".join(columns) + " |", "|---" * (len(columns) + 1) + "|"]
    for peer, scenarios in results["peers"].items():
        for row in rows_of(scenarios.get(scenario)):
            lines.append(f"| {peer} | " + " | ".join(_cell(row.get(c)) for c in columns) + " |")
    return "\n".join(lines)


def saturation(rows: list[dict[str, Any]]) -> tuple[int, bool]:
    """(highest sustained offered rate, whether every level tried was sustained)."""
    best = max((r["offered_per_s"] for r in rows if r.get("sustained")), default=0)
    return best, all(r.get("sustained") for r in rows)


def verdicts(results: dict[str, Any]) -> list[str]:
    """One line per target of issue 4: met / missed, with the numbers."""
    peers = results["peers"]
    ours, ws = peers.get("agentcast", {}), peers.get("websockets", {})
    lines: list[str] = []
    for mine, theirs in zip(rows_of(ours.get("burst")), rows_of(ws.get("burst")), strict=False):
        a, b = mine["server_cpu_us_per_event"], theirs["server_cpu_us_per_event"]
        ok = a is not None and b is not None and a <= b / 2 and mine["losses"] == 0
        lines.append(
            f"burst {mine['connections']} conns: {'MET' if ok else 'MISSED'} — agentcast {a} "
            f"µs/event "
            f"vs websockets {b} (target ≤ {None if b is None else round(b / 2, 2)}), "
            f"losses {mine['losses']}"
        )
    mine_rows, their_rows = rows_of(ours.get("steady")), rows_of(ws.get("steady"))
    if mine_rows and their_rows:
        theirs_by = {r["offered_per_s"]: r for r in their_rows if r.get("sustained")}
        worse = [r["offered_per_s"] for r in mine_rows if r.get("sustained")
                 and r["offered_per_s"] in theirs_by
                 and (r["p99"] or 0) >= (theirs_by[r["offered_per_s"]]["p99"] or 0)]
        sat_a, all_a = saturation(mine_rows)
        sat_b, _ = saturation(their_rows)
        ok = not worse and sat_a > 0 and sat_a >= 2 * sat_b
        lines.append(
            f"steady: {'MET' if ok else 'MISSED'} — saturation agentcast "
            f"{'≥ ' if all_a else ''}{sat_a}/s vs websockets {sat_b}/s (target ≥ 2x); "
            f"levels where agentcast p99 was not lower: {worse or 'none'}"
        )
    idle = ours.get("idle")
    if idle:
        kb = idle["kb_per_connection"]
        lines.append(f"idle: {'MET' if kb is not None and kb <= 20 else 'MISSED'} — "
                     f"{kb} KB per idle connection (target ≤ 20)")
    slow = ours.get("slow-consumer")
    if slow:
        ratio = slow["p99_ratio"]
        ok = ratio is not None and ratio <= 1.2 and slow["others_losses"] == 0
        lines.append(
            f"slow-consumer: {'MET' if ok else 'MISSED'} — others' p99 {slow['p99_with_slow']} ms "
            f"vs {slow['p99_undisturbed']} ms undisturbed ({ratio}x, target ≤ 1.2x); stalled "
            f"client closed: {_cell(slow['slow_closed'])} (code {slow['slow_close_code']}); "
            f"peak RSS {slow['peak_rss_mb']} MB (+{slow.get('peak_rss_growth_mb')} MB during the "
            f"run); median of {slow.get('rounds', 1)} alternating rounds"
        )
    scale = rows_of(ours.get("scale-out"))
    if scale:
        rates = ", ".join(f"{r['setup']} {r['events_per_s']}/s" for r in scale)
        hops = [r for r in scale if "added_p50" in r and r is not scale[0]]
        faults = sum(r[k] for r in scale for k in ("losses", "duplicates", "order_violations",
                                                     "cross_user"))
        lines.append(
            f"scale-out (issue 5, measured, no target): burst delivered {rates}; the Redis hop "
            f"adds p50 {', '.join(str(r['added_p50']) for r in hops)} ms and p99 "
            f"{', '.join(str(r.get('added_p99')) for r in hops)} ms at "
            f"{scale[0]['paced_per_s']}/s; connections per worker "
            f"{scale[-1].get('connections_per_worker')}; lost/duplicated/reordered/misrouted "
            f"{faults}"
        )
    for row in rows_of(ours.get("floods")):
        ratio = row["p99_ratio"]
        ok = ratio is not None and ratio <= 1.2 and row["losses"] == 0
        lines.append(
            f"floods ({row['flood']}): {'MET' if ok else 'MISSED'} — others' p99 "
            f"{row['p99_flooded']} ms vs {row['p99_undisturbed']} ms undisturbed ({ratio}x, "
            f"target ≤ 1.2x); flooders closed with {row['flood_close_codes'] or 'nothing'}"
        )
    lines += token_verdicts(results)
    iso = ours.get("isolation")
    if iso:
        lines.append(f"isolation: {'MET' if iso['cross_user'] == 0 else 'MISSED'} — "
                     f"{iso['cross_user']} cross-user deliveries of {iso['delivered']}")
    return lines


def token_verdicts(results: dict[str, Any]) -> list[str]:
    """Issue 12's per-delivery target in ``tokens``: agentcast's server CPU per delivery at most
    the ``websockets`` peer's, per level; and each peer's highest level sustained."""
    peers = results["peers"]
    lines: list[str] = []
    theirs = {r["connections"]: r for r in rows_of(peers.get("websockets", {}).get("tokens"))}
    for mine in rows_of(peers.get("agentcast", {}).get("tokens")):
        other = theirs.get(mine["connections"])
        a = mine["server_cpu_us_per_event"]
        b = None if other is None else other["server_cpu_us_per_event"]
        # Past saturation a backlog batches, so CPU per delivery there flatters: only a level
        # agentcast sustained can meet the target.
        ok = (a is not None and b is not None and a <= b and not mine["losses"]
              and bool(mine.get("sustained")))
        held = "" if mine.get("sustained") else " (not sustained)"
        lines.append(
            f"tokens {mine['connections']} conns: {'MET' if ok else 'MISSED'} — agentcast {a} "
            f"µs of server CPU per delivery vs websockets {b} (target ≤ websockets'); p50/p99/"
            f"p999 {mine['p50']}/{mine['p99']}/{mine['p999']} ms; offered "
            f"{mine['offered_per_s']}/s, delivered {mine['events_per_s']}/s{held}"
        )
    sustained = {peer: tokens_sustained(rows_of(s.get("tokens"))) for peer, s in peers.items()
                 if s.get("tokens")}
    if sustained:
        lines.append("tokens, highest load sustained (deliveries/s): " + ", ".join(
            f"{peer} {value}" for peer, value in sustained.items()))
    return lines


def issue12_verdicts(results: dict[str, Any], status: str = "") -> list[str]:
    """Issue 12's server targets, each MET or MISSED with the figures of this run.

    ``status`` is appended to every verdict (e.g. "server work not yet addressed"), so a run
    taken before the server work says so next to each figure.
    """
    peers = results["peers"]
    ours, ws = peers.get("agentcast", {}), peers.get("websockets", {})
    note = f" ({status})" if status else ""
    lines: list[str] = []

    def verdict(ok: bool) -> str:
        return ("MET" if ok else "MISSED") + note

    theirs = {r["offered_per_s"]: r for r in rows_of(ws.get("steady")) if r.get("sustained")}
    pairs = [(r, theirs[r["offered_per_s"]]) for r in rows_of(ours.get("steady"))
             if r.get("sustained") and r["offered_per_s"] in theirs]
    if pairs:
        cpu = "server_cpu_us_per_event"
        worse = [a["offered_per_s"] for a, b in pairs if (a.get(cpu) or 0) > (b.get(cpu) or 0)]
        figures = ", ".join(f"{a['offered_per_s']}/s {a.get('server_cpu_us_per_event')} vs "
                            f"{b.get('server_cpu_us_per_event')}" for a, b in pairs)
        lines.append(f"steady CPU per delivery ≤ websockets': {verdict(not worse)} — µs "
                     f"agentcast vs websockets: {figures}")
    lines += [line.replace("MET", verdict(True)).replace("MISSED", verdict(False))
              for line in token_verdicts(results) if line.startswith("tokens ") and "conns" in line]
    mine = {r["offered_per_s"]: r for r in rows_of(ours.get("steady")) if r.get("sustained")}
    if mine:
        worse = []
        for peer, scenarios in peers.items():
            if peer == "agentcast":
                continue
            for row in rows_of(scenarios.get("steady")):
                a = mine.get(row["offered_per_s"])
                if a is None or not row.get("sustained"):
                    continue
                if (a["p50"] or 0) > (row["p50"] or 0) or (a["p99"] or 0) > (row["p99"] or 0):
                    worse.append(f"{peer}@{row['offered_per_s']}")
        lines.append(f"steady p50 and p99 ≤ every peer's at every level both sustain: "
                     f"{verdict(not worse)} — agentcast higher against: "
                     f"{', '.join(worse) or 'none'}")
    if ours.get("steady") and ws.get("steady"):
        sat_a, all_a = saturation(rows_of(ours.get("steady")))
        sat_b, _ = saturation(rows_of(ws.get("steady")))
        lines.append(f"steady saturation ≥ 2x websockets': {verdict(sat_a >= 2 * sat_b > 0)} — "
                     f"agentcast {'≥ ' if all_a else ''}{sat_a}/s vs websockets {sat_b}/s")
    idle = {peer: (s.get("idle") or {}).get("kb_per_connection") for peer, s in peers.items()}
    if idle.get("agentcast") is not None:
        kb, cf = idle["agentcast"], idle.get("centrifuge")
        assert kb is not None
        ok = kb <= 20 and (cf is None or kb < cf)
        lines.append(f"idle ≤ 20 KB per connection, below centrifuge's: {verdict(ok)} — "
                     f"agentcast {kb} KB, centrifuge {cf}, websockets {idle.get('websockets')}")
    hs = {peer: (s.get("connect") or {}).get("handshakes_per_s") for peer, s in peers.items()}
    ours_hs, theirs_hs = hs.get("agentcast"), hs.get("websockets")
    if ours_hs is not None and theirs_hs is not None:
        lines.append(f"handshakes/s ≥ websockets': {verdict(ours_hs >= theirs_hs)}"
                     f" — agentcast {ours_hs}/s vs websockets {theirs_hs}/s")
    if ours:
        failures = [f for f in integrity_failures({"peers": {"agentcast": ours}})]
        lines.append(f"no integrity regression (losses, duplicates, order, cross-user): "
                     f"{'MET' if not failures else 'MISSED'} — {', '.join(failures) or 'all 0'}")
    return lines


def tokens_sustained(rows: list[dict[str, Any]]) -> int:
    """Highest offered deliveries/s of a sustained ``tokens`` level (0 when none held)."""
    return max((r["offered_per_s"] for r in rows if r.get("sustained")), default=0)


def integrity_failures(results: dict[str, Any]) -> list[str]:
    """Losses, duplicates, order violations or cross-user deliveries where they must be 0.

    Every peer: burst, isolation and the sustained levels of steady, steady-lockstep and tokens
    (TCP and an awaited send lose nothing). agentcast also: the other clients in slow-consumer.
    """
    found = []
    keys = ("losses", "duplicates", "order_violations", "cross_user")
    for peer, scenarios in results["peers"].items():
        checked = rows_of(scenarios.get("burst")) + rows_of(scenarios.get("isolation"))
        checked += rows_of(scenarios.get("scale-out")) + rows_of(scenarios.get("floods"))
        paced = [r for name in ("steady", "steady-lockstep", "tokens")
                 for r in rows_of(scenarios.get(name))]
        checked += [r for r in paced if r.get("sustained")]
        for row in checked:
            found += [f"{peer}: {key}={row[key]}" for key in keys if row.get(key)]
        for row in paced:
            found += [f"{peer}: {key}={row[key]}" for key in keys[1:] if row.get(key)]
        slow = scenarios.get("slow-consumer")
        if slow:
            found += [f"{peer}: slow-consumer {k}={slow[k]}" for k in
                      ("others_duplicates", "others_order_violations", "cross_user") if slow[k]]
            if peer == "agentcast" and slow["others_losses"]:
                found.append(f"{peer}: slow-consumer others_losses={slow['others_losses']}")
        for name in ("idle", "connect"):
            row = scenarios.get(name)
            if row and (row.get("failures") or row.get("connect_failures")):
                found.append(f"{peer}: {name} connection failures")
    return found


def headline_table(results: dict[str, Any]) -> str:
    """One row per peer with the figure that matters most from each scenario."""
    head = ["peer", "burst µs/event (conns)", "burst events/s", "steady max sustained/s",
            "idle KB/conn", "handshakes/s", "slow-consumer p99 ratio", "cross-user",
            "tokens µs/delivery (conns)", "tokens max sustained/s"]
    lines = ["| " + " | ".join(head) + " |", "|---" * len(head) + "|"]
    for peer, scenarios in results["peers"].items():
        bursts = rows_of(scenarios.get("burst"))
        steady = rows_of(scenarios.get("steady"))
        slow = scenarios.get("slow-consumer") or {}
        iso = scenarios.get("isolation") or {}
        toks = rows_of(scenarios.get("tokens"))
        cells = [
            peer,
            ", ".join(
                f"{_cell(r['server_cpu_us_per_event'])} ({r['connections']})" for r in bursts
            ),
            ", ".join(_cell(r["events_per_s"]) for r in bursts),
            _cell(saturation(steady)[0]) if steady else "-",
            _cell((scenarios.get("idle") or {}).get("kb_per_connection")),
            _cell((scenarios.get("connect") or {}).get("handshakes_per_s")),
            _cell(slow.get("p99_ratio")),
            _cell(iso.get("cross_user")),
            ", ".join(f"{_cell(r['server_cpu_us_per_event'])} ({r['connections']})"
                      for r in toks) or "-",
            _cell(tokens_sustained(toks)) if toks else "-",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def markdown(results: dict[str, Any]) -> str:
    meta = results["meta"]
    parts = [
        "# agentcast benchmark results", "",
        f"`{meta['command']}` on {meta['machine']} — {meta['date']}", "",
        "Versions: " + ", ".join(f"{k} {v}" for k, v in meta["versions"].items()), "",
        "## Headline", "", headline_table(results), "",
        "Affinity: " + _affinity(meta.get("affinity")), "",
        "## Verdicts (issue 4 targets; issue 12 tokens)", "",
        *[f"- {line}" for line in verdicts(results)], "",
        "## Issue 12 server targets", "",
        *[f"- {line}" for line in issue12_verdicts(results)], "",
    ]
    for scenario in COLUMNS:
        if any(scenario in s for s in results["peers"].values()):
            parts += [f"## {scenario}", "", markdown_table(results, scenario), ""]
    parts += ["Latencies in ms; CPU in µs of server-process CPU per delivered event; "
              "`*_cpu_share` is CPU seconds per wall second (1.0 = one core).", ""]
    return "\n".join(parts)


def _affinity(affinity: dict[str, Any] | None) -> str:
    if not affinity or affinity.get("server") is None:
        return "not pinned (the kernel placed the server and the load generators)"
    return (f"server pinned to cores {affinity['server']}, load generators to "
            f"{affinity['loadgens']} (os.sched_setaffinity)")


def plots(results: dict[str, Any], out: Path) -> list[Path]:
    """latency_vs_load.png, cpu_per_event.png, memory_per_connection.png, tokens.png."""
    import matplotlib  # noqa: PLC0415 - heavy; only when writing plots

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415

    peers = results["peers"]
    written = []
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for peer, scenarios in peers.items():
        rows = [r for r in rows_of(scenarios.get("steady")) if r.get("p99") is not None]
        if rows:
            offered = [r["offered_per_s"] for r in rows]
            ax.plot(offered, [r["p99"] for r in rows], "o-", label=f"{peer} p99")
            ax.plot([r["offered_per_s"] for r in rows], [r["p50"] for r in rows], ":", alpha=0.6,
                    label=f"{peer} p50")
    ax.set(xscale="log", yscale="log", xlabel="offered deliveries/s", ylabel="latency (ms)",
           title="steady: latency vs offered load")
    if ax.get_legend_handles_labels()[0]:  # a run without steady rows has nothing to label
        ax.legend(fontsize=7)
    written.append(_save(fig, out / "latency_vs_load.png"))
    fig, ax = plt.subplots(figsize=(7, 4.5))
    names = list(peers)
    sizes = sorted({r["connections"] for s in peers.values() for r in rows_of(s.get("burst"))})
    width = 0.8 / max(1, len(sizes))
    for offset, size in enumerate(sizes):
        values = [next((r["server_cpu_us_per_event"] or 0 for r in rows_of(peers[p].get("burst"))
                        if r["connections"] == size), 0) for p in names]
        positions = [i + offset * width for i in range(len(names))]
        ax.bar(positions, values, width, label=f"{size} conns")
    ax.set_xticks([i + width * (len(sizes) - 1) / 2 for i in range(len(names))], names)
    ax.set(ylabel="server CPU µs per delivered event", title="burst: CPU per event")
    if sizes:
        ax.legend()
    written.append(_save(fig, out / "cpu_per_event.png"))
    fig, ax = plt.subplots(figsize=(7, 4.5))
    values = [(peers[p].get("idle") or {}).get("kb_per_connection") or 0 for p in names]
    ax.bar(names, values)
    ax.axhline(20, color="red", linestyle="--", label="target 20 KB")
    ax.set(ylabel="server RSS KB per idle connection", title="idle: memory per connection")
    ax.legend()
    written.append(_save(fig, out / "memory_per_connection.png"))
    written.append(_tokens_plot(peers, out / "tokens.png"))
    return written


def _tokens_plot(peers: dict[str, Any], path: Path) -> Path:
    """tokens: p99 latency and server CPU per delivery against connections, per peer."""
    import matplotlib.pyplot as plt  # noqa: PLC0415

    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4.5))
    for peer, scenarios in peers.items():
        rows = [r for r in rows_of(scenarios.get("tokens")) if r.get("p99") is not None]
        if rows:
            conns = [r["connections"] for r in rows]
            (line,) = left.plot(conns, [r["p99"] for r in rows], "o-", label=f"{peer} p99")
            left.plot(conns, [r["p50"] for r in rows], ":", color=line.get_color(),
                      label=f"{peer} p50")
            right.plot(conns, [r["server_cpu_us_per_event"] or 0 for r in rows], "o-",
                       color=line.get_color(), label=peer)
    left.set(xscale="log", yscale="log", xlabel="connections (one token stream each)",
             ylabel="latency (ms)", title="tokens: latency")
    right.set(xscale="log", yscale="log", xlabel="connections",
              ylabel="server CPU µs per delivery",
              title="tokens: CPU per delivery")
    for ax in (left, right):
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7)
    return _save(fig, path)


def _save(fig: Any, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    fig.clf()
    import matplotlib.pyplot as plt  # noqa: PLC0415

    plt.close(fig)
    return path


def write_all(results: dict[str, Any], out: Path) -> list[Path]:
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(results, indent=2, sort_keys=True))
    (out / "results.md").write_text(markdown(results))
    return [out / "results.json", out / "results.md", *plots(results, out)]

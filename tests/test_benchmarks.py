"""Pure parts of the benchmark runner: stream accounting, percentiles, report rendering.

No sockets, no timing: the runner's measurements are never asserted, only its arithmetic.
"""

from __future__ import annotations

import json
from itertools import pairwise
from pathlib import Path

import pytest
from benchmarks import report
from benchmarks.loadgen import _centrifuge_frame
from benchmarks.procs import Affinity, plan_affinity
from benchmarks.protocol import (
    TICK,
    TOKEN_RATE,
    Pacer,
    due,
    encode_event,
    pad_for,
    parse_schedule,
    pause,
    stagger,
    token_schedule,
    token_seed,
)
from benchmarks.stats import Histogram, StreamCheck, Tally, bucket_of, bucket_value, percentiles_ms


def test_stream_in_order_has_no_faults() -> None:
    check = StreamCheck()
    for n in range(1, 11):
        check.observe(n)
    assert (check.received(), check.losses(10), check.duplicates, check.order_violations) == (
        10, 0, 0, 0,
    )


def test_stream_counts_losses_duplicates_and_reordering() -> None:
    check = StreamCheck()
    for n in (1, 3, 2, 3, 5):
        check.observe(n)
    assert check.duplicates == 1  # the second 3
    assert check.order_violations == 1  # 2 after 3
    assert check.losses(6) == 2  # 4 and 6


def test_tally_merges_streams_and_cross_user() -> None:
    first, second = StreamCheck(), StreamCheck()
    for n in (1, 2, 2):
        first.observe(n)
    second.observe(2)
    tally = Tally(cross_user=1)
    tally.add_stream(first, 3)
    tally.add_stream(second, 3)
    other = Tally(delivered=5, cross_user=2)
    tally.merge(other)
    assert (tally.delivered, tally.losses, tally.duplicates, tally.cross_user) == (8, 3, 1, 3)
    assert tally.failures() == 3 + 1 + 3


def test_bucket_bounds_are_within_one_percent() -> None:
    for seconds in (2e-6, 1e-4, 0.0123, 1.5, 30.0):
        upper = bucket_value(bucket_of(seconds))
        assert seconds <= upper <= seconds * 1.0101


def test_percentiles_of_a_known_distribution() -> None:
    histogram = Histogram()
    for ms in range(1, 1001):
        histogram.record(ms / 1000)
    values = percentiles_ms(histogram)
    assert values["p50"] == pytest.approx(500, rel=0.011)
    assert values["p99"] == pytest.approx(990, rel=0.011)
    assert values["p999"] == pytest.approx(999, rel=0.011)


def test_histograms_merge_and_round_trip_through_json() -> None:
    first, second = Histogram(), Histogram()
    first.record(0.001)
    second.record(0.100)
    second.record(0.100)
    first.merge(Histogram.from_json(json.loads(json.dumps(second.to_json()))))
    assert first.total == 3
    assert first.percentile(0.5) == pytest.approx(0.1, rel=0.011)
    assert Histogram().percentile(0.5) is None


def test_pacing_schedule() -> None:
    assert due(0.0, 0, 50) == 50  # unpaced: everything at once
    assert due(0.0, 100.0, 50) == 1
    assert due(0.25, 100.0, 50) == 26
    assert due(10.0, 100.0, 50) == 50


def test_the_pacer_hands_out_each_event_once_in_order_then_stops() -> None:
    now = [0.0]
    pacer = Pacer(5, 10.0, clock=lambda: now[0])  # 10/s: event k is due at (k - 1) / 10 s
    assert list(pacer.due_now()) == [1]
    assert pacer.pause() == pytest.approx(0.1)
    now[0] = 0.25
    assert list(pacer.due_now()) == [2, 3]
    assert list(pacer.due_now()) == []  # nothing new until time moves
    now[0] = 10.0
    assert list(pacer.due_now()) == [4, 5]
    assert pacer.pause() is None
    unpaced = Pacer(3, 0.0, clock=lambda: 0.0)
    assert list(unpaced.due_now()) == [1, 2, 3]
    assert unpaced.pause() is None


def test_pacing_sleeps_until_the_next_event_is_due_but_at_least_a_tick() -> None:
    assert pause(0.0, 1, 10.0) == pytest.approx(0.1)  # event 2 of 10/s is due at 0.1 s
    assert pause(0.05, 1, 10.0) == pytest.approx(0.05)
    assert pause(0.0, 1, 10_000.0) == TICK  # fast emissions still go in ticks
    assert pause(0.5, 1, 10.0) == TICK  # late: check again soon, never a negative sleep
    assert pause(0.0, 5, 0) == 0.0  # unpaced


def test_stagger_spreads_users_evenly_over_one_period() -> None:
    phases = stagger(["a", "b", "c", "d"], 10.0)  # a period of 0.1 s
    assert list(phases.values()) == pytest.approx([0.0, 0.025, 0.05, 0.075])
    assert stagger(["a"], 0) == {}  # unpaced: nothing to stagger


def test_scheduled_emission_follows_its_schedule() -> None:
    schedule = parse_schedule({"schedule": [0, 30, 45, 100]})
    assert schedule == pytest.approx([0.0, 0.03, 0.045, 0.1])
    assert parse_schedule({"rate": 5}) is None
    assert due(0.0, 0, 4, schedule) == 1
    assert due(0.044, 0, 4, schedule) == 2
    assert due(5.0, 0, 4, schedule) == 4
    assert pause(0.01, 1, 0, schedule) == pytest.approx(0.02)  # until event 2 at 30 ms
    assert pause(0.05, 2, 0, schedule) == 0.0  # late: at once, never negative
    assert pause(0.2, 4, 0, schedule) == 0.0


def test_token_streams_are_jittered_within_the_rate_range_and_reproducible() -> None:
    seconds = 20.0
    streams = [token_schedule(token_seed(f"u{i}", 12), seconds) for i in range(200)]
    assert token_schedule(token_seed("u0", 12), seconds) == streams[0]  # same for every peer
    low, high = TOKEN_RATE
    for stream in streams:
        assert stream == sorted(stream)
        assert 0.8 * low <= len(stream) / seconds <= 1.2 * high
        gaps = {b - a for a, b in pairwise(stream)}
        assert len(gaps) > 10  # jitter: not a fixed period
    starts = sorted(stream[0] for stream in streams)
    assert starts[-1] - starts[0] > 20  # the users do not start on the same frame (ms)


def test_affinity_splits_cores_between_server_and_load_generators() -> None:
    assert plan_affinity([1, 0], pin=True) == Affinity((0,), (1,))
    assert plan_affinity(range(4), pin=True) == Affinity((0, 1), (2, 3))
    assert plan_affinity([0], pin=True) == Affinity()  # one core: nothing to split
    assert plan_affinity([0, 1], pin=False).describe() == {"server": None, "loadgens": None}


def test_centrifuge_replies_map_to_benchmark_frames() -> None:
    event = {"type": "agent_text", "data": {"n": 1, "u": "u1", "t": 1.0}}
    assert _centrifuge_frame({"id": 2, "result": {}}) == [{"type": "subscribed"}]
    assert _centrifuge_frame({"id": 2, "error": {"code": 103}}) == []
    assert _centrifuge_frame({"id": 3, "result": {}}) == []  # the RPC's own reply
    assert _centrifuge_frame({"result": {"channel": "u1/t1", "data": {"data": event}}}) == [event]
    assert _centrifuge_frame({"result": {"type": 3, "data": {}}}) == []  # not a publication


def test_event_frame_is_about_the_requested_size() -> None:
    frame = encode_event("t1", pad_for(200), 12, "burst100-u7", 1795387537.707)
    assert 180 <= len(frame) <= 220
    assert json.loads(frame)["data"]["n"] == 12


def _results() -> dict[str, object]:
    burst = {"connections": 100, "events_per_s": 1000, "server_cpu_us_per_event": 2.0,
             "p50": 1.0, "p99": 3.0, "losses": 0, "duplicates": 0, "order_violations": 0,
             "cross_user": 0, "loadgen_cpu_share": 0.5}
    steady = [{"offered_per_s": 1000, "events_per_s": 1000, "p50": 1.0, "p99": 2.0,
               "p999": 3.0, "losses": 0, "sustained": True}]
    slow = {"offered_per_s": 100, "p99_undisturbed": 2.0, "p99_with_slow": 2.2,
            "p99_ratio": 1.1, "others_losses": 0, "others_duplicates": 0,
            "others_order_violations": 0, "cross_user": 0, "slow_closed": True,
            "slow_close_code": 4008, "slow_closed_after_s": 3.0, "peak_rss_mb": 50.0}
    return {
        "meta": {"command": "python -m benchmarks --quick", "machine": "test", "date": "today",
                 "versions": {"agentcast": "0.1.0"}},
        "peers": {
            "agentcast": {"burst": [burst], "steady": steady, "slow-consumer": slow,
                          "idle": {"connections": 10, "kb_per_connection": 12.5,
                                   "rss_connected_mb": 40.0, "connect_failures": 0}},
            "websockets": {"burst": [{**burst, "server_cpu_us_per_event": 6.0}],
                           "steady": [{**steady[0], "p99": 4.0}]},
        },
    }


def test_markdown_has_a_row_per_peer_and_verdicts() -> None:
    text = report.markdown(_results())
    assert "| agentcast | 100 | 1000 | 2 |" in text
    assert "| websockets | 100 | 1000 | 6 |" in text
    assert "| agentcast | 2 (100) | 1000 | 1000 | 12.5 |" in report.headline_table(_results())
    verdicts = report.verdicts(_results())
    assert verdicts[0].startswith("burst 100 conns: MET")
    assert any(line.startswith("idle: MET") for line in verdicts)
    assert any(line.startswith("slow-consumer: MET") for line in verdicts)
    # Same saturation for both: the 2x saturation target is missed.
    assert any(line.startswith("steady: MISSED") for line in verdicts)


def test_tokens_rows_give_verdicts_and_the_highest_sustained_level() -> None:
    results = _results()
    row = {"connections": 1000, "offered_per_s": 35000, "events_per_s": 34900, "p50": 1.0,
           "p99": 5.0, "p999": 9.0, "server_cpu_us_per_event": 40.0, "losses": 0,
           "duplicates": 0, "order_violations": 0, "cross_user": 0, "sustained": True}
    peers = results["peers"]
    peers["agentcast"]["tokens"] = [row, {**row, "connections": 3000,  # type: ignore[index]
                                          "offered_per_s": 105000, "sustained": False}]
    peers["websockets"]["tokens"] = [{**row, "server_cpu_us_per_event": 25.0}]  # type: ignore[index]
    lines = report.token_verdicts(results)
    assert lines[0].startswith("tokens 1000 conns: MISSED — agentcast 40.0")  # 25 for websockets
    assert lines[1].startswith("tokens 3000 conns: MISSED")  # nothing to compare with
    assert lines[1].endswith("(not sustained)")
    peers["agentcast"]["tokens"][0]["sustained"] = False  # type: ignore[index]
    assert report.token_verdicts(results)[0].startswith("tokens 1000 conns: MISSED")
    peers["agentcast"]["tokens"][0]["sustained"] = True  # type: ignore[index]
    assert lines[2] == ("tokens, highest load sustained (deliveries/s): agentcast 35000, "
                        "websockets 35000")
    assert "| agentcast | 1000 | 35000 |" in report.markdown(results)
    # A lost event in an unsustained level is not an integrity failure; a duplicate is.
    peers["agentcast"]["tokens"][1]["losses"] = 7  # type: ignore[index]
    assert report.integrity_failures(results) == []
    peers["agentcast"]["tokens"][1]["duplicates"] = 1  # type: ignore[index]
    assert report.integrity_failures(results) == ["agentcast: duplicates=1"]


def test_issue12_targets_carry_figures_and_the_status() -> None:
    results = _results()
    peers = results["peers"]
    peers["agentcast"]["steady"][0]["server_cpu_us_per_event"] = 50.0  # type: ignore[index]
    peers["websockets"]["steady"][0]["server_cpu_us_per_event"] = 25.0  # type: ignore[index]
    peers["websockets"]["connect"] = {"handshakes_per_s": 800}  # type: ignore[index]
    peers["agentcast"]["connect"] = {"handshakes_per_s": 400}  # type: ignore[index]
    lines = report.issue12_verdicts(results, "not yet addressed")
    assert lines[0] == ("steady CPU per delivery ≤ websockets': MISSED (not yet addressed) — "
                        "µs agentcast vs websockets: 1000/s 50.0 vs 25.0")
    # agentcast's p99 (2 ms) is below websockets' (4 ms) at the one level both sustain.
    assert lines[1].startswith("steady p50 and p99 ≤ every peer's at every level both sustain: "
                               "MET (not yet addressed) — agentcast higher against: none")
    assert lines[2].startswith("steady saturation ≥ 2x websockets': MISSED")
    assert lines[3].startswith("idle ≤ 20 KB per connection, below centrifuge's: MET")
    assert lines[4] == ("handshakes/s ≥ websockets': MISSED (not yet addressed) — agentcast "
                        "400/s vs websockets 800/s")
    assert lines[5].endswith("MET — all 0")


def test_integrity_failures_are_reported_per_peer() -> None:
    results = _results()
    assert report.integrity_failures(results) == []
    results["peers"]["websockets"]["burst"][0]["duplicates"] = 2  # type: ignore[index]
    assert report.integrity_failures(results) == ["websockets: duplicates=2"]


def test_write_all_produces_every_file(tmp_path: Path) -> None:
    written = report.write_all(_results(), tmp_path)
    assert {path.name for path in written} == {
        "results.json", "results.md", "latency_vs_load.png", "cpu_per_event.png",
        "memory_per_connection.png", "tokens.png",
    }
    assert all(path.stat().st_size > 0 for path in written)

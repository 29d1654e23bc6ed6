"""Runs in the history, pure and synchronous: active runs, whole-run retention, the per-run and
per-thread byte bounds, and ``agent_text`` compaction (a replay from any seq rebuilds exactly
the text the client lacked)."""

from __future__ import annotations

import json
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from agentcast import ActiveRun, AgentEvent, EventType, RunTooLarge
from agentcast._events import encode_envelope
from agentcast._history import ThreadHistory
from agentcast._run_history import (
    SPAN_OVERHEAD,
    apply_replay,
    compact_frames,
    compactable_text,
)

TS = 1700000000.5


def started(run: str) -> AgentEvent:
    return AgentEvent(EventType.AGENT_STARTED, {"agent_name": "a"}, run)


def delta(run: str, text: str) -> AgentEvent:
    return AgentEvent(EventType.AGENT_TEXT, {"text": text}, run)


def completed(run: str) -> AgentEvent:
    return AgentEvent(EventType.AGENT_COMPLETED, {"result": None, "duration_ms": 1.0}, run)


def other(text: str = "x", run: str | None = None) -> AgentEvent:
    return AgentEvent(EventType.AGENT_THINKING, {"text": text}, run)


def put(history: ThreadHistory, event: AgentEvent, now: float = 0.0) -> int:
    history.admit(event)
    seq = history.next_seq()
    frame = encode_envelope(event, thread_id="t1", seq=seq, ts=TS + seq)
    history.append(seq, frame, now, event, TS + seq)
    return seq


def parsed(frames: Any) -> list[dict[str, Any]]:
    return [json.loads(frame) for frame in frames]


def history(**fields: Any) -> ThreadHistory:
    return ThreadHistory(**{"max_size": 1000, "ttl": 60.0, **fields})


# ---- active runs ------------------------------------------------------------------------------


def test_a_run_is_active_from_agent_started_until_its_terminal_event() -> None:
    h = history()
    put(h, other())
    first = put(h, started("r1"))
    put(h, delta("r1", "hi"))
    second = put(h, started("r2"))
    assert h.recover(None, None, 0.0).active_runs == (
        ActiveRun("r1", first), ActiveRun("r2", second)
    )
    put(h, completed("r1"))
    assert h.recover(None, None, 0.0).active_runs == (ActiveRun("r2", second),)


def test_a_run_silent_for_history_ttl_is_abandoned() -> None:
    h = history(ttl=10.0)
    put(h, started("r1"), now=0.0)
    assert h.active_runs(9.0) == [ActiveRun("r1", 1)]
    assert h.active_runs(10.5) == []


def test_events_of_a_run_never_started_here_are_not_tracked() -> None:
    h = history()
    put(h, delta("r9", "orphan"))
    assert h.active_runs(0.0) == []


# ---- run retention ----------------------------------------------------------------------------


def test_an_active_run_stays_whole_past_history_size() -> None:
    h = history(max_size=5)
    put(h, other())
    first = put(h, started("r1"))
    for n in range(40):
        put(h, other(f"step {n}", "r1"))
    recovery = h.recover(first - 1, h.epoch, 0.0)
    assert recovery.recovered
    assert [f["seq"] for f in parsed(recovery.frames)] == list(range(first, first + 41))
    # Before the run, history_size applies as usual.
    assert not h.recover(first - 2, h.epoch, 0.0).recovered


def test_an_ended_run_stays_whole_for_history_ttl_then_goes() -> None:
    h = history(max_size=3, ttl=10.0)
    first = put(h, started("r1"), now=0.0)
    for _ in range(10):
        put(h, other("s", "r1"), now=1.0)
    put(h, completed("r1"), now=2.0)
    assert h.recover(first - 1, h.epoch, 11.0).recovered  # 9 s after the end
    put(h, other(), now=12.5)  # 10.5 s after the end: the run is no longer kept
    assert not h.recover(first - 1, h.epoch, 12.5).recovered
    assert len(h) <= 3


def test_history_bytes_bounds_events_outside_runs() -> None:
    h = history(max_bytes=2000)
    for _ in range(100):
        put(h, other("y" * 100))
    assert 0 < h.retained_bytes <= 2000
    assert len(h) < 100
    # A kept run is not cut by it.
    first = put(h, started("r1"))
    for _ in range(100):
        put(h, other("z" * 100, "r1"))
    assert h.retained_bytes > 2000
    assert h.recover(first - 1, h.epoch, 0.0).recovered


# ---- the per-run byte cap ---------------------------------------------------------------------


def test_the_publish_that_crosses_max_run_bytes_is_refused_then_every_later_one() -> None:
    h = history(max_run_bytes=4000)
    put(h, started("r1"))
    for _ in range(16):  # 16 x (100 + 128) bytes fit in 4000
        put(h, other("w" * 100, "r1"))
    with pytest.raises(RunTooLarge, match="max_run_bytes"):
        put(h, other("w" * 100, "r1"))
    latest = h.latest_seq
    with pytest.raises(RunTooLarge):
        put(h, other("small", "r1"))
    assert h.latest_seq == latest  # refused before a seq was reserved: no gap
    put(h, completed("r1"))  # the terminal event is never refused
    recovery = h.recover(0, None, 0.0)
    assert recovery.recovered
    assert parsed(recovery.frames)[-1]["type"] == "agent_completed"
    # Other runs are unaffected.
    put(h, started("r2"))
    put(h, other("fine", "r2"))


# ---- compaction -------------------------------------------------------------------------------


def test_compactable_text_is_a_run_delta_with_exactly_a_text() -> None:
    assert compactable_text(delta("r1", "a")) == "a"
    assert compactable_text(AgentEvent(EventType.AGENT_TEXT, {"text": "a"})) is None
    assert compactable_text(AgentEvent(EventType.AGENT_TEXT, {"text": "a", "k": 1}, "r")) is None
    assert compactable_text(other("a", "r")) is None


def test_ten_thousand_deltas_cost_about_their_text() -> None:
    h = history()
    put(h, started("r1"))
    for _ in range(10_000):
        put(h, delta("r1", "abcd"))
    text_bytes = 40_000
    assert h.retained_bytes <= 2 * text_bytes + SPAN_OVERHEAD + 1000
    recovery = h.recover(0, None, 0.0)
    frames = parsed(recovery.frames)
    assert [f["type"] for f in frames] == ["agent_started", "agent_text"]
    assert frames[1]["seq"] == 10_001
    assert frames[1]["data"] == {"text": "abcd" * 10_000, "from_seq": 2}
    assert frames[1]["run_id"] == "r1"
    assert frames[1]["thread_id"] == "t1"
    assert frames[1]["ts"] == TS + 10_001


def test_a_single_delta_replays_unchanged_and_live_frames_never_change() -> None:
    h = history()
    put(h, started("r1"))
    seq = put(h, delta("r1", "only"))
    put(h, other("tool", "r1"))
    frames = parsed(h.recover(0, None, 0.0).frames)
    assert frames[1] == {"type": "agent_text", "thread_id": "t1", "run_id": "r1", "seq": seq,
                         "ts": TS + seq, "data": {"text": "only"}}


def test_compaction_off_keeps_every_frame() -> None:
    h = history(compact=False)
    put(h, started("r1"))
    for _ in range(5):
        put(h, delta("r1", "ab"))
    assert len(h.recover(0, None, 0.0).frames) == 6


events = st.lists(
    st.one_of(
        st.tuples(st.just("text"), st.sampled_from(["r1", "r2"]), st.text(max_size=6)),
        st.tuples(st.just("other"), st.sampled_from(["r1", "r2", None]), st.just("")),
    ),
    max_size=60,
)


@given(events=events, since=st.integers(0, 70))
def test_a_replay_from_any_seq_rebuilds_exactly_the_missing_text(
    events: list[tuple[str, str | None, str]], since: int
) -> None:
    compacted, plain = history(), history(compact=False)
    for h in (compacted, plain):
        put(h, started("r1"))
        put(h, started("r2"))
    for kind, run, text in events:
        for h in (compacted, plain):
            put(h, delta(run, text) if kind == "text" and run else other("o", run))
    since = min(since, plain.latest_seq)
    full = parsed(plain.recover(since, plain.epoch, 0.0).frames)
    short = parsed(compacted.recover(since, compacted.epoch, 0.0).frames)
    want, want_last = apply_replay(full, last_seq=since)
    got, got_last = apply_replay(short, last_seq=since)
    assert (got, got_last) == (want, want_last)
    # Same events otherwise, same last seq, and compaction never adds frames.
    assert [f for f in full if f["type"] != "agent_text"] == [
        f for f in short if f["type"] != "agent_text"]
    assert len(short) <= len(full)
    if full:
        assert short[-1]["seq"] == full[-1]["seq"]
    # The Redis replay (compaction of stored frames) gives the same frames.
    assert parsed(compact_frames(plain.recover(since, plain.epoch, 0.0).frames)) == short
    # compact=False expands every span back into the frames sent live: same seqs, same
    # data, one frame per delta; only a later delta's ts is its span's last one.
    expanded = parsed(compacted.recover(since, compacted.epoch, 0.0, compact=False).frames)
    assert [{**f, "ts": 0} for f in expanded] == [{**f, "ts": 0} for f in full]
    assert all(f["ts"] <= e["ts"] for f, e in zip(full, expanded, strict=True))


@given(
    steps=st.lists(
        st.tuples(st.sampled_from(["start", "text", "step", "end", "noise", "wait"]),
                  st.sampled_from(["a", "b", "c"])),
        max_size=80,
    ),
)
def test_active_runs_always_recover_whole_within_the_caps(
    steps: list[tuple[str, str]],
) -> None:
    h = history(max_size=4, max_bytes=800, ttl=30.0)
    now = 0.0
    firsts: dict[str, int] = {}
    for action, run in steps:
        if action == "wait":
            now += 7.0
            continue
        if action == "start" and run not in firsts:
            firsts[run] = put(h, started(run), now)
        elif action == "noise":
            put(h, other("n" * 50), now)
        elif run in firsts:
            event = {"text": delta(run, "tok"), "step": other("s", run),
                     "end": completed(run)}.get(action)
            if event is not None:
                put(h, event, now)
                if action == "end":
                    del firsts[run]
        for active in h.active_runs(now):
            recovery = h.recover(active.first_seq - 1, h.epoch, now)
            assert recovery.recovered, active
            frames = parsed(recovery.frames)
            assert frames[0]["seq"] == active.first_seq
            assert frames[0]["type"] == "agent_started"
        assert {a.run_id for a in h.active_runs(now)} <= set(firsts)


def test_the_replay_compaction_of_stored_frames_keeps_quotes_and_refuses_other_keys() -> None:
    tricky = 'say "hi" \\ and \\"more\\" ","k":"v'
    frames = [
        encode_envelope(delta("r1", tricky), thread_id="t1", seq=1, ts=TS),
        encode_envelope(delta("r1", "é✓"), thread_id="t1", seq=2, ts=TS),
        encode_envelope(AgentEvent(EventType.AGENT_TEXT, {"text": "a", "k": "b"}, "r1"),
                        thread_id="t1", seq=3, ts=TS),
        encode_envelope(AgentEvent(EventType.AGENT_TEXT, {"k": "b", "text": "a"}, "r1"),
                        thread_id="t1", seq=4, ts=TS),
        encode_envelope(AgentEvent(EventType.AGENT_TEXT, {"text": "a"}), thread_id="t1",
                        seq=5, ts=TS),
    ]
    out = parsed(compact_frames(frames))
    assert out[0]["data"] == {"text": tricky + "é✓", "from_seq": 1}
    assert out[0]["seq"] == 2
    assert out[1:] == parsed(frames[2:])

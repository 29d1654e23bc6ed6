"""The delivery latency histogram: publish time read back from the envelope, cumulative
buckets, and only live events observed (never replays)."""

from __future__ import annotations

import math

import trio
from hypothesis import given
from hypothesis import strategies as st

import agentcast
from agentcast import AgentEvent, ConnectionManager, EventType, UserContext
from agentcast._events import encode_envelope
from agentcast._latency import DELIVERY_BUCKETS, DeliveryLatency, event_ts

from .helpers import connect, thinking

ALICE = UserContext.from_request(user_id="alice")


@given(
    ts=st.floats(min_value=0, max_value=4e9, allow_nan=False),
    text=st.text(max_size=50),
    seq=st.none() | st.integers(min_value=1, max_value=10**12),
)
def test_the_publish_time_is_read_back_from_any_envelope(
    ts: float, text: str, seq: int | None
) -> None:
    # Data that itself contains '"ts":' must not be mistaken for the envelope's field.
    event = AgentEvent(EventType.AGENT_THINKING, {"text": f'"ts":1,{text}'})
    assert event_ts(encode_envelope(event, thread_id="t1", seq=seq, ts=ts)) == ts


def test_control_frames_have_no_publish_time() -> None:
    assert event_ts('{"type":"pong","id":1}') is None
    assert event_ts('{"type":"x","ts":"not a number","data":{}}') is None


def test_buckets_are_cumulative_and_count_every_event() -> None:
    histogram = DeliveryLatency()
    histogram.observe(0.0001)
    histogram.observe(0.003, events=4)
    histogram.observe(60.0)  # past the last bound: only in the total
    snapshot = histogram.snapshot()
    assert snapshot.bounds == DELIVERY_BUCKETS
    assert snapshot.count == 6
    assert math.isclose(snapshot.sum, 0.0001 + 0.012 + 60.0)
    by_bound = dict(zip(snapshot.bounds, snapshot.counts, strict=True))
    assert by_bound[0.0005] == 1
    assert by_bound[0.0025] == 1
    assert by_bound[0.005] == 5
    assert by_bound[10.0] == 5
    assert list(snapshot.counts) == sorted(snapshot.counts)


async def test_live_events_are_observed_and_replays_are_not(manager: ConnectionManager) -> None:
    session = agentcast.get_websocket_manager(ALICE)
    for n in range(3):
        await session.send_to_thread("t1", thinking(f"before {n}"))
    client, _ = await connect(session)
    await client.send({"type": "subscribe", "thread_id": "t1", "since_seq": 0})
    frames = [await client.receive() for _ in range(4)]
    assert [frame.get("seq") for frame in frames] == [3, 1, 2, 3]
    assert manager.get_stats().delivery_latency.count == 0
    for n in range(5):
        await session.send_to_thread("t1", thinking(f"live {n}"))
    for _ in range(5):
        await client.receive()
    await trio.testing.wait_all_tasks_blocked()
    latency = manager.get_stats().delivery_latency
    assert latency.count == 5
    assert latency.sum >= 0

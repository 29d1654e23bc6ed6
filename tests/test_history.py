"""ThreadHistory.recover: a replay is complete or not attempted; and the broker's sweep."""

from __future__ import annotations

import json
from typing import Any

import attrs
import pytest
import trio
from hypothesis import given
from hypothesis import strategies as st

from agentcast import AgentEvent, Config, EventType, InMemoryBroker
from agentcast._history import ThreadHistory


def fill(history: ThreadHistory, count: int, now: float = 0.0) -> list[str]:
    """Append ``count`` frames the way the broker does; return them."""
    frames = []
    for _ in range(count):
        seq = history.next_seq()
        frame = f'{{"seq":{seq}}}'
        history.append(seq, frame, now)
        frames.append(frame)
    return frames


def seqs(frames: Any) -> list[int]:
    return [json.loads(frame)["seq"] for frame in frames]


# ---- seqs ------------------------------------------------------------------------------------


def test_seqs_are_contiguous_from_one() -> None:
    history = ThreadHistory(max_size=10, ttl=60.0)
    assert history.latest_seq == 0
    assert [history.next_seq() for _ in range(5)] == [1, 2, 3, 4, 5]
    assert history.latest_seq == 5


def test_each_history_gets_its_own_epoch() -> None:
    first = ThreadHistory(max_size=10, ttl=60.0)
    second = ThreadHistory(max_size=10, ttl=60.0)
    assert first.epoch != second.epoch
    assert first.epoch


def test_retention_is_bounded_by_size() -> None:
    history = ThreadHistory(max_size=3, ttl=60.0)
    fill(history, 5)
    assert len(history) == 3
    assert history.oldest_seq == 3
    assert history.latest_seq == 5


def test_a_reserved_seq_never_appended_restarts_history_after_the_gap() -> None:
    history = ThreadHistory(max_size=10, ttl=60.0)
    fill(history, 3)
    history.next_seq()  # seq 4 reserved, never appended (its encoding failed, say)
    later = fill(history, 2)
    assert history.oldest_seq == 5
    assert not history.recover(2, history.epoch, 0.0).recovered  # would need the missing seq 4
    resumed = history.recover(4, history.epoch, 0.0)
    assert resumed.recovered
    assert list(resumed.frames) == later


def test_append_refuses_a_seq_that_is_not_the_latest_reserved() -> None:
    history = ThreadHistory(max_size=10, ttl=60.0)
    history.next_seq()
    history.next_seq()
    with pytest.raises(ValueError, match="not the latest reserved"):
        history.append(1, "{}", 0.0)


def test_oldest_seq_of_an_empty_history_is_one_past_latest() -> None:
    history = ThreadHistory(max_size=3, ttl=60.0)
    assert history.oldest_seq == 1
    fill(history, 2, now=0.0)
    history.prune(100.0)
    assert len(history) == 0
    assert history.oldest_seq == 3


# ---- recover ---------------------------------------------------------------------------------


def test_since_seq_none_means_live_only() -> None:
    history = ThreadHistory(max_size=10, ttl=60.0)
    fill(history, 3)
    recovery = history.recover(None, None, now=0.0)
    assert recovery.recovered is False
    assert list(recovery.frames) == []
    assert recovery.latest_seq == 3
    assert recovery.epoch == history.epoch


def test_since_seq_equal_to_latest_recovers_nothing_to_replay() -> None:
    history = ThreadHistory(max_size=10, ttl=60.0)
    fill(history, 4)
    recovery = history.recover(4, history.epoch, now=0.0)
    assert recovery.recovered is True
    assert list(recovery.frames) == []
    assert recovery.latest_seq == 4


def test_fresh_stream_recovers_from_zero() -> None:
    history = ThreadHistory(max_size=10, ttl=60.0)
    recovery = history.recover(0, None, now=0.0)
    assert recovery.recovered is True
    assert list(recovery.frames) == []
    assert recovery.latest_seq == 0


@pytest.mark.parametrize("since_seq", [0, 1, 3, 5, 6])
def test_within_window_replays_exactly_the_missed_frames(since_seq: int) -> None:
    history = ThreadHistory(max_size=10, ttl=60.0)
    frames = fill(history, 7)
    recovery = history.recover(since_seq, history.epoch, now=0.0)
    assert recovery.recovered is True
    assert list(recovery.frames) == frames[since_seq:]
    assert seqs(recovery.frames) == list(range(since_seq + 1, 8))


def test_since_seq_above_zero_without_epoch_is_never_recovered() -> None:
    # The seq may belong to another stream (e.g. from before a restart): never trusted.
    history = ThreadHistory(max_size=10, ttl=60.0)
    fill(history, 3)
    recovery = history.recover(1, None, now=0.0)
    assert (recovery.recovered, list(recovery.frames)) == (False, [])
    assert recovery.latest_seq == 3


def test_since_seq_zero_needs_no_epoch() -> None:
    history = ThreadHistory(max_size=10, ttl=60.0)
    frames = fill(history, 3)
    recovery = history.recover(0, None, now=0.0)
    assert recovery.recovered is True
    assert list(recovery.frames) == frames


def test_fell_out_by_count_is_not_recovered_and_replays_nothing() -> None:
    history = ThreadHistory(max_size=3, ttl=60.0)
    fill(history, 6)  # retains 4, 5, 6
    assert history.recover(3, history.epoch, now=0.0).recovered is True  # 4..6 all retained
    for since_seq in (0, 1, 2):
        recovery = history.recover(since_seq, history.epoch, now=0.0)
        assert recovery.recovered is False
        assert list(recovery.frames) == []
        assert recovery.latest_seq == 6


def test_fell_out_by_age_is_not_recovered_and_replays_nothing() -> None:
    history = ThreadHistory(max_size=100, ttl=10.0)
    fill(history, 2, now=0.0)  # seqs 1, 2
    fill(history, 2, now=8.0)  # seqs 3, 4
    in_window = history.recover(2, history.epoch, now=9.0)
    assert in_window.recovered is True
    assert seqs(in_window.frames) == [3, 4]
    expired = history.recover(1, history.epoch, now=12.0)  # seqs 1, 2 are older than 10 s
    assert expired.recovered is False
    assert list(expired.frames) == []
    still = history.recover(2, history.epoch, now=12.0)
    assert still.recovered is True
    assert seqs(still.frames) == [3, 4]


def test_everything_expired_still_recovers_an_up_to_date_client() -> None:
    history = ThreadHistory(max_size=100, ttl=10.0)
    fill(history, 3, now=0.0)
    assert history.recover(3, history.epoch, now=100.0).recovered is True
    behind = history.recover(2, history.epoch, now=100.0)
    assert behind.recovered is False
    assert list(behind.frames) == []


def test_since_seq_beyond_latest_is_not_recovered() -> None:
    history = ThreadHistory(max_size=10, ttl=60.0)
    fill(history, 3)
    recovery = history.recover(4, history.epoch, now=0.0)
    assert recovery.recovered is False
    assert list(recovery.frames) == []
    assert recovery.latest_seq == 3


def test_epoch_mismatch_is_not_recovered() -> None:
    history = ThreadHistory(max_size=10, ttl=60.0)
    fill(history, 3)
    recovery = history.recover(1, "some-other-epoch", now=0.0)
    assert recovery.recovered is False
    assert list(recovery.frames) == []
    assert recovery.epoch == history.epoch


def test_negative_since_seq_is_not_recovered() -> None:
    history = ThreadHistory(max_size=10, ttl=60.0)
    fill(history, 2)
    recovery = history.recover(-1, history.epoch, now=0.0)
    assert recovery.recovered is False
    assert list(recovery.frames) == []


# ---- property --------------------------------------------------------------------------------

OPERATIONS = st.lists(
    st.one_of(
        st.tuples(st.just("append"), st.integers(min_value=1, max_value=5)),
        st.tuples(st.just("advance"), st.floats(min_value=0, max_value=6)),
        st.tuples(st.just("prune"), st.just(0)),
        st.tuples(st.just("recover"), st.integers(min_value=-2, max_value=40)),
        st.tuples(st.just("recover_stale_epoch"), st.integers(min_value=0, max_value=40)),
    ),
    max_size=60,
)


@given(
    operations=OPERATIONS,
    max_size=st.integers(min_value=1, max_value=8),
    ttl=st.floats(min_value=0.5, max_value=20),
)
def test_recovery_is_complete_or_empty(
    operations: list[tuple[str, float]], max_size: int, ttl: float
) -> None:
    history = ThreadHistory(max_size=max_size, ttl=ttl)
    now = 0.0
    appended: dict[int, float] = {}  # seq -> when
    for operation, argument in operations:
        if operation == "append":
            for _ in range(int(argument)):
                seq = history.next_seq()
                history.append(seq, f'{{"seq":{seq}}}', now)
                appended[seq] = now
        elif operation == "advance":
            now += argument
        elif operation == "prune":
            history.prune(now)
        else:
            since_seq = int(argument)
            epoch = history.epoch if operation == "recover" else "stale"
            recovery = history.recover(since_seq, epoch, now)
            latest = history.latest_seq
            assert recovery.latest_seq == latest == len(appended)
            assert recovery.epoch == history.epoch
            if recovery.recovered:
                assert operation == "recover"
                assert 0 <= since_seq <= latest
                assert seqs(recovery.frames) == list(range(since_seq + 1, latest + 1))
                # Only events that are neither too old nor past the size bound come back.
                for seq in range(since_seq + 1, latest + 1):
                    assert appended[seq] >= now - ttl
                assert latest - since_seq <= max_size
            else:
                assert list(recovery.frames) == []
                # Refusal only when a complete replay was impossible (or the epoch is stale).
                if operation == "recover" and 0 <= since_seq <= latest:
                    missed = range(since_seq + 1, latest + 1)
                    assert latest - since_seq > max_size or any(
                        appended[seq] < now - ttl for seq in missed
                    )
        # Invariant: the retained entries are a contiguous suffix ending at latest.
        if len(history):
            assert history.oldest_seq + len(history) - 1 == history.latest_seq


# ---- the in-memory broker's sweep ------------------------------------------------------------


@attrs.define
class RecordingSink:
    held_users: set[str] = attrs.Factory(set)
    #: (user, thread) pairs a connection or run uses.
    held_threads: set[tuple[str, str]] = attrs.Factory(set)
    delivered: list[tuple[str, str, int, str]] = attrs.Factory(list)

    def deliver_thread(self, user_id: str, thread_id: str, seq: int, frame: str) -> None:
        self.delivered.append((user_id, thread_id, seq, frame))

    def deliver_user(self, user_id: str, frame: str) -> None:
        raise AssertionError("not used here")

    def deliver_all(self, frame: str) -> None:
        raise AssertionError("not used here")

    def holds_user(self, user_id: str) -> bool:
        return user_id in self.held_users

    def holds_thread(self, user_id: str, thread_id: str) -> bool:
        return (user_id, thread_id) in self.held_threads


async def test_sweep_forgets_idle_empty_streams_with_a_new_epoch() -> None:
    broker = InMemoryBroker(Config(history_ttl=10.0))
    first = await broker.recover("alice", "t1", None, None)
    assert broker.statistics().streams == 1
    broker.sweep(trio.current_time() + 5.0)  # not idle long enough
    assert broker.statistics().streams == 1
    assert (await broker.recover("alice", "t1", None, None)).epoch == first.epoch
    broker.sweep(trio.current_time() + 11.0)
    assert broker.statistics().streams == 0
    second = await broker.recover("alice", "t1", 0, first.epoch)
    assert second.epoch != first.epoch
    assert second.recovered is False
    assert second.latest_seq == 0


async def test_sweep_forgets_streams_whose_events_expired_and_restarts_seqs() -> None:
    broker = InMemoryBroker(Config(history_ttl=10.0))
    sink = RecordingSink()
    async with trio.open_nursery() as nursery:
        await nursery.start(broker.serve, sink)
        event = AgentEvent(EventType.AGENT_TEXT, {"text": "x"})
        assert [await broker.publish("alice", "t1", event) for _ in range(3)] == [1, 2, 3]
        assert [seq for _, _, seq, _ in sink.delivered] == [1, 2, 3]
        epoch = (await broker.recover("alice", "t1", None, None)).epoch
        before = await broker.recover("alice", "t1", 1, epoch)
        assert before.recovered is True
        assert seqs(before.frames) == [2, 3]
        assert broker.statistics().retained_events == 3
        broker.sweep(trio.current_time() + 11.0)
        assert broker.statistics().streams == 0
        assert await broker.publish("alice", "t1", event) == 1
        after = await broker.recover("alice", "t1", 3, before.epoch)
        assert after.epoch != before.epoch
        assert after.recovered is False
        assert list(after.frames) == []
        nursery.cancel_scope.cancel()


async def test_sweep_keeps_streams_in_use_and_forgets_a_live_sessions_idle_ones() -> None:
    broker = InMemoryBroker(Config(history_ttl=10.0))
    sink = RecordingSink(held_users={"alice"}, held_threads={("alice", "t1")})
    async with trio.open_nursery() as nursery:
        await nursery.start(broker.serve, sink)
        alice = await broker.recover("alice", "t1", None, None)
        await broker.recover("alice", "t2", None, None)  # alice is online, t2 unused
        await broker.recover("bob", "t1", None, None)
        broker.sweep(trio.current_time() + 100.0)
        assert broker.statistics().streams == 1
        assert (await broker.recover("alice", "t1", None, None)).epoch == alice.epoch
        nursery.cancel_scope.cancel()


async def test_streams_are_per_user() -> None:
    broker = InMemoryBroker(Config())
    sink = RecordingSink()
    async with trio.open_nursery() as nursery:
        await nursery.start(broker.serve, sink)
        event = AgentEvent(EventType.AGENT_TEXT, {"text": "x"})
        assert await broker.publish("alice", "t1", event) == 1
        assert await broker.publish("bob", "t1", event) == 1
        assert await broker.publish("alice", "t1", event) == 2
        bob = await broker.recover("bob", "t1", 0, None)
        assert seqs(bob.frames) == [1]
        nursery.cancel_scope.cancel()


async def test_publish_before_serve_is_refused() -> None:
    broker = InMemoryBroker(Config())
    with pytest.raises(RuntimeError, match="serve"):
        await broker.publish("alice", "t1", AgentEvent(EventType.AGENT_TEXT, {"text": "x"}))
    assert broker.statistics().ready is False

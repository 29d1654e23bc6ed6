"""The publish queue's pure decisions (bound, grouping into script calls, failure reports), the
batch channel message's format, and the pipeline's async shell under ``autojump_clock``
(admission order, the full-queue deadline, flush): no sockets, no Redis.
"""

from __future__ import annotations

import json

import pytest
import trio
import trio.testing
from hypothesis import given
from hypothesis import strategies as st

from agentcast import AgentEvent, BrokerUnavailable, EventType, RunTooLarge
from agentcast._events import encode_envelope
from agentcast.backplane.redis.keys import (
    parse_disconnect_message,
    parse_thread_message,
    parse_user_message,
    thread_batch_message,
    user_message,
)
from agentcast.backplane.redis.pipeline import PublishPipeline, QueuedPublish
from agentcast.backplane.redis.queue import FailureBook, QueueBudget, group_calls

# ---- the bound --------------------------------------------------------------------------


def test_the_budget_bounds_events_and_bytes_but_always_takes_one_into_an_empty_queue() -> None:
    budget = QueueBudget(max_events=2, max_bytes=100)
    assert budget.fits(1000)  # empty: a large event goes alone
    budget.take(1000)
    assert not budget.fits(1)
    budget.give(1000)
    budget.take(60)
    assert budget.fits(40)
    assert not budget.fits(41)
    budget.take(10)
    assert not budget.fits(1)  # two events: full by count
    budget.give(60)
    budget.give(10)
    assert (budget.events, budget.bytes) == (0, 0)


def test_a_budget_without_room_is_refused_with_a_message() -> None:
    with pytest.raises(ValueError, match="at least one event"):
        QueueBudget(max_events=0)


# ---- grouping into script calls ---------------------------------------------------------


def test_a_batch_becomes_one_call_per_thread_in_order_of_first_appearance() -> None:
    batch = [("a", 1), ("b", 1), ("a", 2), ("c", 1), ("b", 2), ("a", 3)]
    calls = group_calls(batch, key=lambda e: e[0], size=lambda e: 1)
    assert calls == [[("a", 1), ("a", 2), ("a", 3)], [("b", 1), ("b", 2)], [("c", 1)]]


def test_a_thread_is_split_over_calls_past_the_event_and_byte_caps() -> None:
    batch = [("a", n) for n in range(5)]
    assert [len(c) for c in group_calls(batch, lambda e: e[0], lambda e: 1, max_events=2)] == [
        2, 2, 1,
    ]
    sizes = {0: 5, 1: 5, 2: 20, 3: 1, 4: 1}
    calls = group_calls(batch, lambda e: e[0], lambda e: sizes[e[1]], max_bytes=10)
    assert [[n for _, n in call] for call in calls] == [[0, 1], [2], [3, 4]]


@given(
    st.lists(st.tuples(st.sampled_from("abcd"), st.integers(1, 50)), max_size=60),
    st.integers(1, 8),
    st.integers(1, 120),
)
def test_grouping_keeps_every_entry_once_each_threads_order_and_the_caps(
    batch: list[tuple[str, int]], max_events: int, max_bytes: int
) -> None:
    entries = list(enumerate(batch))  # (position, (thread, size)): every entry distinct
    calls = group_calls(
        entries, key=lambda e: e[1][0], size=lambda e: e[1][1],
        max_events=max_events, max_bytes=max_bytes,
    )
    flat = [entry for call in calls for entry in call]
    assert sorted(flat) == entries
    for thread in "abcd":
        mine = [entry for entry in flat if entry[1][0] == thread]
        assert mine == sorted(mine)  # a thread's calls go in queue order
    for call in calls:
        assert len({entry[1][0] for entry in call}) == 1
        assert len(call) <= max_events
        assert len(call) == 1 or sum(entry[1][1] for entry in call) <= max_bytes


# ---- failures of queued events -------------------------------------------------------------


def test_a_threads_failure_is_reported_once_with_its_class_thread_and_count() -> None:
    book = FailureBook()
    first = BrokerUnavailable("publish failed: Redis did not answer within 2 s")
    book.record("alice", "t1", first)
    book.record("alice", "t1", BrokerUnavailable("a later one"))
    book.record("alice", "t2", RunTooLarge("run r1 would retain more"))
    assert book.take("alice", "t3") is None
    error = book.take("alice", "t1")
    assert isinstance(error, BrokerUnavailable)
    assert str(error) == (
        "2 events queued earlier on thread 't1' not stored: publish failed: Redis did not "
        "answer within 2 s"
    )
    assert error.__cause__ is first
    assert book.take("alice", "t1") is None  # reported: gone
    refused = book.take("alice", "t2")
    assert isinstance(refused, RunTooLarge)
    assert str(refused).startswith("an event queued earlier on thread 't2' not stored: run r1")


def test_a_flush_takes_the_oldest_failure_of_its_own_user_only() -> None:
    book = FailureBook()
    book.record("bob", "t1", BrokerUnavailable("bob's"))
    book.record("alice", "t9", BrokerUnavailable("alice's first"))
    book.record("alice", "t1", BrokerUnavailable("alice's second"))
    assert "alice's first" in str(book.take_first("alice"))
    assert "bob's" in str(book.take_first(None))
    assert "alice's second" in str(book.take_first(None))
    assert book.take_first(None) is None


def test_past_the_cap_the_oldest_failure_is_dropped_and_counted() -> None:
    book = FailureBook(max_kept=2)
    for thread in ("t1", "t2", "t3"):
        book.record("alice", thread, BrokerUnavailable(thread))
    assert (len(book), book.dropped) == (2, 1)
    assert book.take("alice", "t1") is None
    assert book.take("alice", "t3") is not None


# ---- channel messages ----------------------------------------------------------------------


def frame(seq: int, text: str) -> str:
    return encode_envelope(
        AgentEvent(EventType.AGENT_TEXT, {"text": text}), thread_id="t1", seq=seq, ts=1.0
    )


@given(st.lists(st.text(min_size=1, max_size=20), min_size=1, max_size=20))
def test_a_batch_message_round_trips_frames_whatever_their_text(texts: list[str]) -> None:
    # Frames are single-line JSON: a newline in the text is escaped, never a line break.
    events = [(seq, frame(seq, text)) for seq, text in enumerate(texts, start=7)]
    message = thread_batch_message("t1", events)
    assert parse_thread_message(message) == ("t1", events)
    assert [json.loads(f)["data"]["text"] for _, f in events] == texts


def test_the_one_event_form_is_still_read_and_other_messages_are_not_thread_messages() -> None:
    assert parse_thread_message(f"t t1 3 {frame(3, 'hi')}") == ("t1", [(3, frame(3, "hi"))])
    assert parse_thread_message(user_message("{}")) is None
    assert parse_user_message(user_message('{"a":1}')) == '{"a":1}'
    assert parse_thread_message("x 4001 revoked") is None
    assert parse_disconnect_message("x 4001 revoked") == (4001, "revoked")


@pytest.mark.parametrize(
    "message", ["b t1", "b \n1 {}", "b t1\n1", "b t1\nseven {}", "t t1 3", "t  3 {}", "zzz"]
)
def test_malformed_channel_messages_raise_value_error(message: str) -> None:
    def parse(message: str) -> object:
        return parse_thread_message(message) or parse_user_message(message)

    with pytest.raises(ValueError, match="not an agentcast"):
        parse(message)


# ---- the async shell -----------------------------------------------------------------------


def entry(thread: str = "t1", text: str = "x") -> QueuedPublish:
    """A queued publish whose producer moved on (``queue_to_thread``)."""
    return QueuedPublish("alice", thread, f'{{"text":"{text}","seq":', "}", None, 0)


def text_of(queued: QueuedPublish) -> str:
    return queued.prefix.split('"')[3]


async def test_a_full_queue_admits_first_come_first_served_as_room_is_made(
    autojump_clock: trio.testing.MockClock,
) -> None:
    pipeline = PublishPipeline(timeout=2.0, budget=QueueBudget(max_events=2))
    pipeline.open()
    await pipeline.put(entry(text="a"))
    await pipeline.put(entry(text="b"))
    admitted: list[str] = []

    async def producer(text: str) -> None:
        await pipeline.put(entry(text=text))
        admitted.append(text)

    async with trio.open_nursery() as nursery:
        for text in "cde":
            nursery.start_soon(producer, text)
            await trio.testing.wait_all_tasks_blocked()
        assert admitted == []  # full: all three wait
        batch = await pipeline.take()
        assert [text_of(e) for e in batch] == ["a", "b"]
        for e in batch:
            e.seq = 1
        pipeline.finish(batch)  # room for two: c and d, queued in the order they came
        await trio.testing.wait_all_tasks_blocked()
        assert sorted(admitted) == ["c", "d"]  # (the scheduler picks who resumes first)
        batch = await pipeline.take()
        assert [text_of(e) for e in batch] == ["c", "d"]
        assert pipeline.depth == 2
        pipeline.finish(batch, BrokerUnavailable("gone"))
    assert sorted(admitted) == ["c", "d", "e"]  # the room made by c and d failing let e in
    assert [text_of(e) for e in await pipeline.take()] == ["e"]


async def test_a_producer_waits_at_most_the_timeout_then_gets_broker_unavailable(
    autojump_clock: trio.testing.MockClock,
) -> None:
    pipeline = PublishPipeline(timeout=2.0, budget=QueueBudget(max_events=1))
    pipeline.open()
    await pipeline.put(entry())
    start = trio.current_time()
    with pytest.raises(BrokerUnavailable, match=r"queue stayed full for 2 s.*was not queued"):
        await pipeline.put(entry())
    assert trio.current_time() - start == pytest.approx(2.0)
    assert pipeline.depth == 1  # the refused one left nothing behind


async def test_nothing_is_admitted_while_no_flusher_runs_and_waiters_fail_when_it_stops(
    autojump_clock: trio.testing.MockClock,
) -> None:
    pipeline = PublishPipeline(timeout=2.0, budget=QueueBudget(max_events=1))
    with pytest.raises(BrokerUnavailable, match="not connected"):
        await pipeline.put(entry())
    pipeline.open()
    queued = entry()
    await pipeline.put(queued)
    outcome: list[BaseException] = []

    async def waiter() -> None:
        try:
            await pipeline.put(entry())
        except BrokerUnavailable as exc:
            outcome.append(exc)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(waiter)
        await trio.testing.wait_all_tasks_blocked()
        pipeline.close(BrokerUnavailable("publish failed: the Redis connection was lost"))
    assert [str(e) for e in outcome] == ["publish failed: the Redis connection was lost"]
    assert pipeline.depth == 0
    with pytest.raises(BrokerUnavailable, match=r"queued earlier on thread 't1'.*lost"):
        pipeline.check("alice", "t1")  # the queued one's failure, reported once
    pipeline.check("alice", "t1")


async def test_flush_waits_for_what_was_queued_before_it_and_raises_its_failure(
    autojump_clock: trio.testing.MockClock,
) -> None:
    pipeline = PublishPipeline(timeout=2.0)
    pipeline.open()
    for thread in ("t1", "t2"):
        await pipeline.put(entry(thread))
    flushed: list[str] = []

    async def flush() -> None:
        try:
            await pipeline.wait_flushed("alice")
            flushed.append("ok")
        except RunTooLarge as exc:
            flushed.append(str(exc))

    async with trio.open_nursery() as nursery:
        nursery.start_soon(flush)
        await trio.testing.wait_all_tasks_blocked()  # the flush waits for t1 and t2
        batch = await pipeline.take()
        await pipeline.put(entry("t3"))  # after the flush began: not waited for
        await trio.testing.wait_all_tasks_blocked()
        assert flushed == []
        batch[0].seq = 1
        batch[1].error = RunTooLarge("run r1 would retain more")
        pipeline.finish(batch)
    assert flushed == [
        "an event queued earlier on thread 't2' not stored: run r1 would retain more"
    ]
    assert pipeline.depth == 1


async def test_a_flush_without_progress_fails_after_twice_the_timeout(
    autojump_clock: trio.testing.MockClock,
) -> None:
    pipeline = PublishPipeline(timeout=2.0)
    pipeline.open()
    await pipeline.put(entry())
    start = trio.current_time()
    with pytest.raises(BrokerUnavailable, match="stored nothing for 4 s; 1 events"):
        await pipeline.wait_flushed(None)
    assert trio.current_time() - start == pytest.approx(4.0)

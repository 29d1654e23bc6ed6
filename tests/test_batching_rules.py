"""The writer's batching rules, synchronously: gather what is queued, group it into messages."""

from __future__ import annotations

from collections import deque
from collections.abc import Callable

import pytest
from hypothesis import given
from hypothesis import strategies as st

from agentcast._batching import Outgoing, gather, messages


class Empty(Exception):
    pass


def queue(*items: Outgoing) -> tuple[deque[Outgoing], Callable[[], Outgoing]]:
    pending = deque(items)

    def receive_nowait() -> Outgoing:
        if not pending:
            raise Empty
        return pending.popleft()

    return pending, receive_nowait


def test_gather_takes_what_is_queued_in_order_and_counts_live_events() -> None:
    pending, pull = queue(("ack", "r1", "r2"), "e2", "e3")
    frames, events, oldest_live, live = gather("e1", pull, 100, (Empty,))
    assert frames == ["e1", "ack", "r1", "r2", "e2", "e3"]
    assert (events, oldest_live, live) == (5, "e1", 3)  # the ack is not an event
    assert not pending


def test_gather_stops_near_the_limit_but_never_splits_an_ack_from_its_replay() -> None:
    pending, pull = queue("e2", ("ack", "r1", "r2", "r3"), "e3")
    frames, events, oldest_live, live = gather("e1", pull, 3, (Empty,))
    assert frames == ["e1", "e2", "ack", "r1", "r2", "r3"]
    assert list(pending) == ["e3"]
    assert (events, oldest_live, live) == (5, "e1", 2)


def test_a_replay_alone_has_no_live_event_to_time() -> None:
    _, pull = queue()
    assert gather(("ack", "r1"), pull, 10, (Empty,)) == (["ack", "r1"], 1, None, 0)


def test_without_batching_every_frame_is_its_own_message() -> None:
    assert list(messages(["a", "b"], batch=False, max_bytes=1, max_events=1)) == ["a", "b"]


def test_batches_respect_both_bounds_and_a_large_frame_goes_alone() -> None:
    frames = ["aaaa", "bbbb", "c" * 20, "dd", "ee", "ff"]
    assert list(messages(frames, batch=True, max_bytes=10, max_events=2)) == [
        "aaaa\nbbbb", "c" * 20, "dd\nee", "ff"
    ]


@given(
    st.lists(st.text(alphabet="xyz", min_size=1, max_size=30), max_size=40),
    st.integers(1, 64), st.integers(1, 8),
)
def test_messages_keep_every_frame_in_order_within_the_bounds(
    frames: list[str], max_bytes: int, max_events: int
) -> None:
    out = list(messages(frames, batch=True, max_bytes=max_bytes, max_events=max_events))
    assert [line for message in out for line in message.split("\n")] == frames
    for message in out:
        lines = message.split("\n")
        assert len(lines) <= max_events
        assert len(lines) == 1 or len(message) <= max_bytes


@pytest.mark.parametrize("limit", [1, 2, 5])
def test_gather_with_nothing_queued_is_the_one_item(limit: int) -> None:
    _, pull = queue()
    assert gather("e", pull, limit, (Empty,)) == (["e"], 1, "e", 1)

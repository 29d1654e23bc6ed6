"""The subscribe/replay merge, synchronously: every subscribe gets its own ack in order, and
after the last ack the client sees each following seq once, without a gap, however replays,
live events and unsubscribes interleave."""

from __future__ import annotations

import json
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from agentcast._history import Recovery, ThreadHistory
from agentcast._subscriptions import HeldOverflow, Subscriptions

T = "t1"


def frame(seq: int) -> str:
    return json.dumps({"type": "agent_text", "thread_id": T, "seq": seq, "data": {"text": "x"}})


def parsed(group: tuple[str, ...]) -> list[dict[str, Any]]:
    return [json.loads(item) for item in group]


def test_a_live_subscription_passes_events_once_in_order() -> None:
    subs = Subscriptions(max_held=10)
    ticket, new = subs.begin(T)
    assert new
    [group] = subs.complete(T, ticket, Recovery(False, "e1", 0, ()))
    assert parsed(group) == [
        {"type": "subscribed", "thread_id": T, "seq": 0, "epoch": "e1", "recovered": False,
         "active_runs": []}
    ]
    assert subs.offer(T, 1, frame(1)) == frame(1)
    assert subs.offer(T, 1, frame(1)) is None  # duplicate
    assert subs.offer("other", 2, frame(2)) is None  # not subscribed


def test_a_second_subscribe_in_flight_gets_its_own_ack_after_the_first() -> None:
    subs = Subscriptions(max_held=10)
    server, _ = subs.begin(T)
    client, new = subs.begin(T)
    assert not new
    assert subs.offer(T, 4, frame(4)) is None  # held while both are in flight
    # The client's resume is answered first; it waits for the server's own subscribe.
    assert subs.complete(T, client, Recovery(True, "e1", 3, (frame(2), frame(3)))) == []
    groups = subs.complete(T, server, Recovery(False, "e1", 3, ()))
    assert [[f["type"] for f in parsed(g)] for g in groups] == [
        ["subscribed"], ["subscribed", "agent_text", "agent_text", "agent_text"]
    ]
    assert parsed(groups[1])[0]["recovered"] is True
    assert [f["seq"] for f in parsed(groups[1])[1:]] == [2, 3, 4]


def test_an_answer_after_unsubscribe_is_ignored() -> None:
    subs = Subscriptions(max_held=10)
    ticket, _ = subs.begin(T)
    assert subs.remove(T)
    assert subs.complete(T, ticket, Recovery(False, "e1", 0, ())) == []
    assert not subs.remove(T)


def test_too_many_held_events_is_an_overflow() -> None:
    subs = Subscriptions(max_held=2)
    subs.begin(T)
    subs.offer(T, 1, frame(1))
    subs.offer(T, 2, frame(2))
    with pytest.raises(HeldOverflow):
        subs.offer(T, 3, frame(3))


def test_a_failed_subscribe_does_not_block_the_acks_after_it() -> None:
    # The flaw this guards against: a subscribe the broker refuses (too_many_threads) used to
    # stay in flight for ever, so the client's resume behind it was never acked and the live
    # events held for it piled up until the connection was closed as a slow consumer.
    subs = Subscriptions(max_held=10)
    server, _ = subs.begin(T)
    client, _ = subs.begin(T)
    assert subs.offer(T, 4, frame(4)) is None
    assert subs.complete(T, client, Recovery(True, "e1", 3, (frame(3),))) == []
    release, forget = subs.abandon(T, server)
    assert not forget
    [group] = release
    assert isinstance(group, tuple)
    assert [(f["type"], f["seq"]) for f in parsed(group)] == [
        ("subscribed", 3), ("agent_text", 3), ("agent_text", 4)
    ]
    assert subs.offer(T, 5, frame(5)) == frame(5)  # live again


def test_abandoning_the_only_subscribe_of_a_new_thread_forgets_it() -> None:
    subs = Subscriptions(max_held=10)
    ticket, _ = subs.begin(T)
    subs.offer(T, 1, frame(1))
    assert subs.abandon(T, ticket) == ([], True)
    assert T not in subs
    assert subs.abandon(T, ticket) == ([], False)


def test_abandoning_a_resubscribe_goes_back_to_the_last_ack() -> None:
    subs = Subscriptions(max_held=10)
    first, _ = subs.begin(T)
    subs.complete(T, first, Recovery(False, "e1", 2, ()))
    assert subs.offer(T, 3, frame(3)) == frame(3)
    again, new = subs.begin(T)
    assert not new
    assert subs.offer(T, 4, frame(4)) is None
    # The held event follows the seq the client already has, as a live event: nothing lost.
    assert subs.abandon(T, again) == ([frame(4)], False)
    assert subs.offer(T, 4, frame(4)) is None
    assert subs.offer(T, 5, frame(5)) == frame(5)


# ---- the property -------------------------------------------------------------------------

#: One step of an interleaving. ``subscribe`` carries how the client asks: live only, from a
#: recent seq, from 0, from a seq too old for the window, or with a wrong epoch.
steps = st.lists(
    st.one_of(
        st.just(("publish",)),
        st.tuples(st.just("subscribe"), st.sampled_from(["live", "recent", "zero", "old",
                                                         "wrong_epoch"])),
        st.tuples(st.just("read"), st.integers(0, 5)),
        st.tuples(st.just("answer"), st.integers(0, 5)),
        st.tuples(st.just("fail"), st.integers(0, 5)),
        st.just(("unsubscribe",)),
    ),
    max_size=40,
)


@given(steps, st.randoms(use_true_random=False))
def test_after_the_last_ack_every_following_seq_arrives_once_without_gap(
    script: list[tuple[Any, ...]], rng: Any
) -> None:
    history = ThreadHistory(max_size=5, ttl=1e9)
    subs = Subscriptions(max_held=1000)
    #: ticket -> [since_seq asked, epoch asked, Recovery once read]
    flight: dict[int, list[Any]] = {}
    received: list[str | tuple[str, ...]] = []
    #: ticket -> since_seq, per subscribe that is to be acked, in the order they began.
    requests: dict[int, int | None] = {}

    def publish() -> None:
        seq = history.next_seq()
        history.append(seq, frame(seq), 0.0)
        if T in subs:
            sent = subs.offer(T, seq, frame(seq))
            if sent is not None:
                received.append(sent)

    def read(ticket: int) -> None:
        since, epoch = flight[ticket][:2]
        flight[ticket][2] = history.recover(since, epoch, 0.0)

    def answer(ticket: int) -> None:
        if flight[ticket][2] is None:
            read(ticket)
        received.extend(subs.complete(T, ticket, flight.pop(ticket)[2]))

    def fail(ticket: int) -> None:
        # The broker refused it: an error frame for the client, no ack.
        flight.pop(ticket)
        requests.pop(ticket, None)
        release, forget = subs.abandon(T, ticket)
        received.extend(release)
        if forget:
            assert not requests, "a thread is forgotten only if no subscribe waits for an ack"
            received.clear()

    for step in script:
        if step[0] == "publish":
            publish()
        elif step[0] == "subscribe":
            latest = history.latest_seq
            since, epoch = {
                "live": (None, None),
                "recent": (max(0, latest - 2), history.epoch),
                "zero": (0, history.epoch),
                "old": (0 if latest <= 5 else latest - 7, history.epoch),
                "wrong_epoch": (latest, "not-the-epoch"),
            }[step[1]]
            ticket, _ = subs.begin(T)
            flight[ticket] = [since, epoch, None]
            requests[ticket] = since
        elif step[0] in ("read", "answer", "fail") and flight:
            ticket = sorted(flight)[step[1] % len(flight)]
            {"read": read, "answer": answer, "fail": fail}[step[0]](ticket)
        elif step[0] == "unsubscribe":
            # Answers of subscribes still in flight are ignored from now on.
            subs.remove(T)
            requests.clear()
            received.clear()  # the client forgets the thread too
    # Let every subscribe in flight finish, in any order, then publish a little more.
    pending = sorted(flight)
    rng.shuffle(pending)
    for ticket in pending:
        answer(ticket)
    for _ in range(3):
        publish()

    check_client_view(received, list(requests.values()), history.latest_seq)


def check_client_view(
    received: list[str | tuple[str, ...]], requests: list[int | None], latest: int
) -> None:
    """One ack per subscribe, each followed by its own replay; after the last ack, every seq
    up to ``latest`` exactly once, in order."""
    if not requests:
        return
    frames = [
        json.loads(item)
        for group in received
        for item in ((group,) if isinstance(group, str) else group)
    ]
    acks = [i for i, f in enumerate(frames) if f["type"] == "subscribed"]
    assert len(acks) == len(requests), "every subscribe gets exactly one ack"
    for index, since in zip(acks, requests, strict=True):
        ack = frames[index]
        if ack["recovered"]:
            assert since is not None
            replay = [f["seq"] for f in frames[index + 1:index + 1 + ack["seq"] - since]]
            assert replay == list(range(since + 1, ack["seq"] + 1))
    last = frames[acks[-1]]
    since = requests[-1]
    start = since + 1 if last["recovered"] and since is not None else last["seq"] + 1
    after = [f["seq"] for f in frames[acks[-1] + 1:]]
    assert after == list(range(start, latest + 1))

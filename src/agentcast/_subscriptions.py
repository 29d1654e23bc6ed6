"""A connection's thread subscriptions: the subscribe/replay merge, as a pure state machine.

Rules of this module: no I/O, no trio. The connection (the trio shell) calls :meth:`begin` when
a subscribe starts (before it asks the broker what was missed, with the thread already routed
here), :meth:`offer` for every live event of the thread, and :meth:`complete` with the broker's
answer, or :meth:`abandon` when the broker refused it (the client then gets an error frame, not
an ack); it queues whatever these return, in order. Invariants:

- Every subscribe gets its own ack, and acks go out in the order the subscribes began, however
  their replays' fetches interleave or finish.
- While any subscribe of a thread is in flight its live events are held, not sent; a later
  subscribe supersedes an earlier one: after the last ack the client sees the seqs that follow
  it (its replay, then live events), each once, without a gap.
- A subscribe that is abandoned neither blocks the acks after it nor loses the events held for
  it: with none left in flight the thread goes back to where its last ack left it, or is
  forgotten (and must be unrouted) if it never had one.
- An ack that says ``recovered: false`` replays nothing and names the seq just before the first
  event that follows it, so a resync never loses what arrives meanwhile.
"""

from __future__ import annotations

import collections
from collections.abc import Iterator, Sequence
from typing import TypeAlias

import attrs

from ._history import Recovery
from ._protocol import subscribed_frame

__all__ = ["HeldOverflow", "Release", "Subscriptions"]

#: What to queue, in order: a plain str is a live event, a tuple is an ack and the events that
#: must stay with it (its replay and, for the last subscribe in flight, the held events).
Release: TypeAlias = list[str | tuple[str, ...]]


class HeldOverflow(Exception):
    """More live events arrived during a replay than may be held: the client is too slow."""


@attrs.define
class _Thread:
    #: Last seq queued to the client; None while a subscribe is in flight.
    position: int | None = None
    #: The seq the client's latest ack (plus the live events after it) left it at; None: the
    #: thread has never been acked here. Restored if every subscribe in flight is abandoned.
    acked_position: int | None = None
    #: Tickets of subscribes in flight, oldest first.
    pending: collections.deque[int] = attrs.Factory(collections.deque)
    #: ticket -> the broker's answer, kept until every earlier ticket has its answer too.
    answers: dict[int, Recovery] = attrs.Factory(dict)
    #: Live (seq, frame) that arrived while a subscribe was in flight, in arrival order.
    held: list[tuple[int, str]] = attrs.Factory(list)


@attrs.define
class Subscriptions:
    """Per-thread delivery positions of one connection."""

    #: Most live events held for one thread while its replay is fetched.
    max_held: int
    _threads: dict[str, _Thread] = attrs.Factory(dict)
    _tickets: int = 0

    def __contains__(self, thread_id: object) -> bool:
        return thread_id in self._threads

    def __len__(self) -> int:
        return len(self._threads)

    def __iter__(self) -> Iterator[str]:
        """The thread ids, in the order they were first subscribed."""
        return iter(self._threads)

    @property
    def threads(self) -> frozenset[str]:
        """The threads subscribed to (or being subscribed to)."""
        return frozenset(self._threads)

    def begin(self, thread_id: str) -> tuple[int, bool]:
        """Start a subscribe: from now on the thread's live events are held.

        Returns:
            (ticket for :meth:`complete`, whether the thread is new here and must be routed).
        """
        state = self._threads.get(thread_id)
        new = state is None
        if state is None:
            state = self._threads[thread_id] = _Thread()
        elif not state.pending:
            # Live until now: hold from here; this subscribe's ack resets the position.
            state.held = []
            state.acked_position = state.position
        self._tickets += 1
        state.pending.append(self._tickets)
        state.position = None
        return self._tickets, new

    def offer(self, thread_id: str, seq: int, frame: str) -> str | None:
        """A live event of the thread: the frame to queue now, or None (held, duplicate, or a
        thread not subscribed).

        Raises:
            HeldOverflow: more than ``max_held`` events are held for this thread.
        """
        state = self._threads.get(thread_id)
        if state is None:
            return None
        if state.position is None:
            state.held.append((seq, frame))
            if len(state.held) > self.max_held:
                raise HeldOverflow(f"more than {self.max_held} events held during a replay")
            return None
        if seq <= state.position:
            return None
        state.position = seq
        return frame

    def complete(
        self, thread_id: str, ticket: int, recovery: Recovery
    ) -> list[tuple[str, ...]]:
        """The broker answered the subscribe ``ticket``.

        Returns:
            Groups to queue, in order (each an ack, its replay and, for the last subscribe in
            flight, the held events that follow); empty while an earlier subscribe of the
            thread still waits for its answer, or if the thread was unsubscribed meanwhile.
        """
        state = self._threads.get(thread_id)
        if state is None or ticket not in state.pending:
            return []
        state.answers[ticket] = recovery
        return self._release(thread_id, state)

    def abandon(self, thread_id: str, ticket: int) -> tuple[Release, bool]:
        """The subscribe ``ticket`` failed (e.g. ``too_many_threads``): it gets no ack.

        Returns:
            (what to queue now: acks of later subscribes that only waited for this one, or,
            with none left in flight, the held events that follow the thread's last ack;
            whether the thread is forgotten and must be unrouted, because it was never acked).
        """
        state = self._threads.get(thread_id)
        if state is None or ticket not in state.pending:
            return [], False
        state.pending.remove(ticket)
        state.answers.pop(ticket, None)
        if state.pending:
            return list(self._release(thread_id, state)), False
        if state.acked_position is None:
            del self._threads[thread_id]
            return [], True
        live: Release = [*self._flush_held(state, state.acked_position)]
        return live, False

    def _release(self, thread_id: str, state: _Thread) -> list[tuple[str, ...]]:
        """Acks of the oldest subscribes in flight whose answers are all in, in order."""
        groups: list[tuple[str, ...]] = []
        while state.pending and state.pending[0] in state.answers:
            answer = state.answers.pop(state.pending.popleft())
            groups.append(self._ack(thread_id, state, answer, last=not state.pending))
        return groups

    def _ack(
        self, thread_id: str, state: _Thread, recovery: Recovery, *, last: bool
    ) -> tuple[str, ...]:
        if recovery.recovered:
            # The replay covers everything up to latest_seq; held events past it follow.
            position = recovery.latest_seq
        else:
            # Nothing replayed: the thread has been routed here since before any held event
            # arrived, so the held events are contiguous and the ack names the seq before them.
            held = state.held
            position = held[0][0] - 1 if held else recovery.latest_seq
        ack = subscribed_frame(
            thread_id, seq=position, epoch=recovery.epoch, recovered=recovery.recovered,
            active_runs=recovery.active_runs,
        )
        state.acked_position = position
        if not last:
            return (ack, *recovery.frames)
        return (ack, *recovery.frames, *self._flush_held(state, position))

    @staticmethod
    def _flush_held(state: _Thread, position: int) -> list[str]:
        """The held live events past ``position`` (the rest the replay covered), in order; the
        thread's position moves to the last one and nothing stays held."""
        live: list[str] = []
        for seq, frame in state.held:
            if seq > position:
                live.append(frame)
                position = seq
        state.held = []
        state.position = position
        return live

    def remove(self, thread_id: str) -> bool:
        """Unsubscribe; answers still in flight are then ignored. False if not subscribed."""
        return self._threads.pop(thread_id, None) is not None

    def held(self, thread_id: str) -> Sequence[tuple[int, str]]:
        """Events held for the thread (for statistics and tests)."""
        state = self._threads.get(thread_id)
        return () if state is None else tuple(state.held)

"""The benchmark control protocol every peer speaks, so one load generator drives them all.

Client -> server (JSON text frames; python-socketio carries the same objects as Socket.IO events
named after ``type``):

- ``{"type":"subscribe","thread_id":T}`` -> the server answers ``{"type":"subscribed",...}``
  and from then on sends that connection every event of (its user, T).
- ``{"type":"bench_burst","thread_id":T,"count":E,"size":S,"rate":R}`` -> the server emits E
  events on (user, T) to **every connection of that user subscribed to T**: as fast as it can
  when ``rate`` is 0, else paced at R events/s (same schedule in every peer: :func:`due`).
  Two optional keys: ``"schedule": [ms, ...]`` (event n is due ``schedule[n-1]`` ms after the
  frame arrived; it replaces ``rate``, and ``count`` is its length: the ``tokens`` scenario's
  jittered token streams, :func:`token_schedule`), and ``"event": "agent_text"`` (the event
  type to emit; default :data:`EVENT_TYPE`).

Server -> client events have agentcast's envelope shape
``{"type":"agent_thinking","thread_id":T,"seq":n,"ts":..,"data":{"text":pad,"n":n,"u":user,"t":ts}}``
where ``data.t`` is ``time.time()`` at emit, ``data.n`` the per-(user, thread) counter from 1
and ``data.u`` the emitting user (a delivery whose ``u`` is not the receiving user is a
cross-user delivery). ``text`` pads the whole frame to about ``size`` bytes.

Users identify themselves with ``?user=U`` on the URL (naive peers), Socket.IO ``auth``
(``{"user": U}``), or a signed token (agentcast). Peers print their bound port on the first line
of stdout and die by SIGALRM after ``--lifetime`` seconds at the latest.
"""

from __future__ import annotations

import json
import math
import random
import time
import zlib
from collections.abc import Callable, Sequence
from typing import Any, Final

#: Event type used for benchmark events (a known agentcast type; ``data.text`` is required).
EVENT_TYPE: Final = "agent_thinking"
#: Shortest pause between pacing checks of a rate-paced emission, in seconds.
TICK: Final = 0.005
#: Event type of the ``tokens`` scenario: a token delta of an agent's answer.
TOKEN_EVENT_TYPE: Final = "agent_text"
#: Token rate range of one stream (tokens/s), as the issue's agent-chat load: 20-50 per second.
TOKEN_RATE: Final = (20.0, 50.0)
#: Spread (lognormal sigma) of the gaps between tokens around ``1 / rate``: most gaps within
#: 0.6-1.6x of the mean, a few stalls of 2-3x, as a model streaming over a network does.
TOKEN_JITTER: Final = 0.5
#: Envelope overhead of an event besides the ``text`` padding (measured for typical ids).
_OVERHEAD: Final = 150


def pad_for(size: int) -> str:
    """Padding that makes an event about ``size`` bytes on the wire."""
    return "x" * max(0, size - _OVERHEAD)


def event_data(pad: str, n: int, user: str, ts: float) -> dict[str, Any]:
    """The ``data`` of benchmark event number ``n``."""
    return {"text": pad, "n": n, "u": user, "t": ts}


def encode_event(
    thread_id: str, pad: str, n: int, user: str, ts: float, *, event_type: str = EVENT_TYPE
) -> str:
    """The full event frame, agentcast's envelope shape, for the peers that build it themselves."""
    return json.dumps(
        {
            "type": event_type, "thread_id": thread_id, "run_id": None, "seq": n, "ts": ts,
            "data": event_data(pad, n, user, ts),
        },
        separators=(",", ":"),
    )


def due(elapsed: float, rate: float, count: int, schedule: Sequence[float] | None = None) -> int:
    """How many events of a paced emission should have been sent ``elapsed`` s after its start
    (by its ``schedule`` in seconds when it has one, see :func:`parse_schedule`)."""
    if schedule is not None:
        return min(count, scheduled_due(elapsed, schedule))
    if rate <= 0:
        return count
    return min(count, math.floor(elapsed * rate) + 1)


def pause(
    elapsed: float, sent: int, rate: float, schedule: Sequence[float] | None = None
) -> float:
    """Seconds to sleep after ``sent`` events, ``elapsed`` s into a paced emission: until the
    next event is due, but at least :data:`TICK`. A slow emission wakes once per event rather
    than every tick, which a server would otherwise pay for at every level; a fast one still
    emits in ticks. A scheduled emission sleeps exactly until its next event is due."""
    if schedule is not None:
        return max(0.0, schedule[sent] - elapsed) if sent < len(schedule) else 0.0
    return max(TICK, sent / rate - elapsed) if rate > 0 else 0.0


class Pacer:
    """The pacing of one ``bench_burst``, one copy for every peer (fairness needs them to pace
    alike): :meth:`due_now` gives the numbers of the events due since the last call,
    :meth:`pause` how long to sleep after sending them (None once all are sent)."""

    def __init__(
        self, count: int, rate: float, schedule: Sequence[float] | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.count, self.rate, self.schedule, self._clock = count, rate, schedule, clock
        self.sent = 0
        self._start = clock()

    @classmethod
    def of(cls, frame: dict[str, Any]) -> Pacer:
        """The pacing a ``bench_burst`` frame asks for (its count, rate and schedule)."""
        _thread_id, count, _size, rate = parse_burst(frame)
        return cls(count, rate, parse_schedule(frame))

    def due_now(self) -> range:
        """Event numbers (from 1) due now and not yet handed out."""
        target = max(self.sent, due(self._clock() - self._start, self.rate, self.count,
                                    self.schedule))
        numbers = range(self.sent + 1, target + 1)
        self.sent = target
        return numbers

    def pause(self) -> float | None:
        """Seconds to sleep before the next :meth:`due_now`; None when every event is out."""
        if self.sent >= self.count:
            return None
        return pause(self._clock() - self._start, self.sent, self.rate, self.schedule)


def event_type_of(frame: dict[str, Any]) -> str:
    """The event type a ``bench_burst`` asks for."""
    return str(frame.get("event", EVENT_TYPE))


def parse_burst(frame: dict[str, Any]) -> tuple[str, int, int, float]:
    """(thread_id, count, size, rate) of a ``bench_burst`` frame."""
    return (
        str(frame["thread_id"]), int(frame["count"]), int(frame.get("size", 200)),
        float(frame.get("rate", 0.0)),
    )


def parse_schedule(frame: dict[str, Any]) -> list[float] | None:
    """The ``schedule`` of a ``bench_burst`` frame in seconds (None when it is rate-paced)."""
    schedule = frame.get("schedule")
    return None if schedule is None else [float(ms) / 1000 for ms in schedule]


def scheduled_due(elapsed: float, schedule: Sequence[float]) -> int:
    """How many events of a scheduled emission are due ``elapsed`` s after its start."""
    low, high = 0, len(schedule)
    while low < high:  # bisect_right on a sorted schedule
        middle = (low + high) // 2
        if schedule[middle] <= elapsed:
            low = middle + 1
        else:
            high = middle
    return low


def token_seed(user: str, base: int) -> int:
    """A stable seed of ``user``'s token stream (``hash()`` of a str differs between
    processes, so the orchestrator and the load generators would disagree)."""
    return base * 1_000_003 + zlib.crc32(user.encode())


def token_schedule(seed: int, seconds: float) -> list[int]:
    """One user's token stream for ``seconds``: due times in ms from the emission's start.

    The stream has its own rate, drawn from :data:`TOKEN_RATE`, and its own phase (the first
    token within one mean gap), so many users make a smooth offered load, not a lockstep; gaps
    are lognormal around ``1 / rate`` (:data:`TOKEN_JITTER`). Deterministic for a seed, so
    every peer is offered the same streams.
    """
    rng = random.Random(seed)
    rate = rng.uniform(*TOKEN_RATE)
    sigma = TOKEN_JITTER
    at = rng.uniform(0.0, 1.0 / rate)
    out: list[int] = []
    while at < seconds:
        out.append(round(at * 1000))
        at += rng.lognormvariate(-sigma * sigma / 2, sigma) / rate
    return out


def stagger(users: Sequence[str], rate: float) -> dict[str, float]:
    """Start offset (s) of each user's rate-paced emission, spread evenly over one period, so
    the offered load is a smooth stream rather than every user emitting on the same frame."""
    if rate <= 0 or not users:
        return {}
    period = 1.0 / rate
    return {user: index * period / len(users) for index, user in enumerate(users)}

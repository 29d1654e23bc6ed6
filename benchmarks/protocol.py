"""The benchmark control protocol every peer speaks, so one load generator drives them all.

Client -> server (JSON text frames; python-socketio carries the same objects as Socket.IO events
named after ``type``):

- ``{"type":"subscribe","thread_id":T}`` -> the server answers ``{"type":"subscribed",...}``
  and from then on sends that connection every event of (its user, T).
- ``{"type":"bench_burst","thread_id":T,"count":E,"size":S,"rate":R}`` -> the server emits E
  events on (user, T) to **every connection of that user subscribed to T**: as fast as it can
  when ``rate`` is 0, else paced at R events/s (same schedule in every peer: :func:`due`).

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
from typing import Any, Final

#: Event type used for benchmark events (a known agentcast type; ``data.text`` is required).
EVENT_TYPE: Final = "agent_thinking"
#: Shortest pause between pacing checks of a rate-paced emission, in seconds.
TICK: Final = 0.005
#: Envelope overhead of an event besides the ``text`` padding (measured for typical ids).
_OVERHEAD: Final = 150


def pad_for(size: int) -> str:
    """Padding that makes an event about ``size`` bytes on the wire."""
    return "x" * max(0, size - _OVERHEAD)


def event_data(pad: str, n: int, user: str, ts: float) -> dict[str, Any]:
    """The ``data`` of benchmark event number ``n``."""
    return {"text": pad, "n": n, "u": user, "t": ts}


def encode_event(thread_id: str, pad: str, n: int, user: str, ts: float) -> str:
    """The full event frame, agentcast's envelope shape, for the peers that build it themselves."""
    return json.dumps(
        {
            "type": EVENT_TYPE, "thread_id": thread_id, "run_id": None, "seq": n, "ts": ts,
            "data": event_data(pad, n, user, ts),
        },
        separators=(",", ":"),
    )


def due(elapsed: float, rate: float, count: int) -> int:
    """How many events of a paced emission should have been sent ``elapsed`` s after its start."""
    if rate <= 0:
        return count
    return min(count, math.floor(elapsed * rate) + 1)


def pause(elapsed: float, sent: int, rate: float) -> float:
    """Seconds to sleep after ``sent`` events, ``elapsed`` s into a paced emission: until the
    next event is due, but at least :data:`TICK`. A slow emission wakes once per event rather
    than every tick, which a server would otherwise pay for at every level; a fast one still
    emits in ticks."""
    return max(TICK, sent / rate - elapsed) if rate > 0 else 0.0


def parse_burst(frame: dict[str, Any]) -> tuple[str, int, int, float]:
    """(thread_id, count, size, rate) of a ``bench_burst`` frame."""
    return (
        str(frame["thread_id"]), int(frame["count"]), int(frame.get("size", 200)),
        float(frame.get("rate", 0.0)),
    )

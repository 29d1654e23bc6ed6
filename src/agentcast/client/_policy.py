"""What a client does after a close code, an event and a ``subscribed`` ack.

Rules of this module: pure functions, no I/O, no trio. The tables are the same as the browser
client's (``clients/js/agentcast.js``: ``CLOSE_POLICY``, ``BACKOFF``, ``closeAction``,
``backoffDelay``, ``eventDecision``, ``ackDecision``); ``tests/test_client_policy.py`` checks
that the two agree. Delays here are in seconds (the JS module's are milliseconds).
"""

from __future__ import annotations

import enum
from collections.abc import Mapping, Sequence
from typing import Any, Final

import attrs

__all__ = [
    "BACKOFF",
    "CLOSE_POLICY",
    "DEFAULT_CLOSE_ACTION",
    "AckDecision",
    "Action",
    "Backoff",
    "EventDecision",
    "ack_decision",
    "backoff_delay",
    "close_action",
    "event_decision",
    "handshake_action",
]


class Action(enum.StrEnum):
    """What to do once a connection has closed."""

    #: Do not reconnect: the client is at fault, or was told to stop.
    STOP = "stop"
    #: Get a new token (``get_token``), then reconnect and resume.
    REFRESH = "refresh"
    #: Reconnect and resume after a longer backoff (the server asked us to slow down).
    THROTTLE = "throttle"
    #: Reconnect with backoff and resume.
    RESUME = "resume"


#: Close code -> action (docs/protocol.md, "Close codes").
CLOSE_POLICY: Final[Mapping[int, Action]] = {
    1000: Action.STOP,  # closed on purpose by the server
    1002: Action.STOP,  # a frame broke RFC 6455: a client (library) bug
    1003: Action.STOP,  # a binary message: a client bug, reconnecting would loop
    1007: Action.STOP,  # invalid UTF-8: a client bug
    1008: Action.STOP,  # policy: a message in too many fragments
    1009: Action.STOP,  # a message over the size limit: a client bug
    4003: Action.STOP,  # revoked: log in again
    4001: Action.REFRESH,  # token expired
    4029: Action.THROTTLE,  # over the inbound rate
    1001: Action.RESUME,  # server going away / session closed
    1006: Action.RESUME,  # dropped without a close frame
    1011: Action.RESUME,  # a fault in this user's session
    1012: Action.RESUME,  # service restart (lost its Redis backplane)
    4008: Action.RESUME,  # slow consumer
}
#: Action for a close code not in :data:`CLOSE_POLICY`.
DEFAULT_CLOSE_ACTION: Final = Action.RESUME

#: HTTP status of a refused handshake -> action (browsers cannot see these; Python can).
HANDSHAKE_POLICY: Final[Mapping[int, Action]] = {
    401: Action.REFRESH,  # missing, expired or revoked token
    429: Action.THROTTLE,  # per-user connection limit
    503: Action.RESUME,  # draining, or the revocation list is unavailable
}


@attrs.frozen
class Backoff:
    """Reconnect delays, in seconds."""

    #: First delay after a resumable close (doubled per failed attempt).
    initial: float = 0.5
    #: First delay after 4029 (or HTTP 429).
    throttle_initial: float = 5.0
    #: No delay grows beyond this.
    max: float = 30.0
    #: A connection open at least this long starts the attempt count over.
    stable_after: float = 10.0


#: The default backoff (the JS client's ``BACKOFF``, in seconds).
BACKOFF: Final = Backoff()


def close_action(code: int, *, can_refresh: bool) -> Action:
    """What to do after a close with ``code``; 4001 stops unless a new token can be had."""
    action = CLOSE_POLICY.get(code, DEFAULT_CLOSE_ACTION)
    if action is Action.REFRESH and not can_refresh:
        return Action.STOP
    return action


def handshake_action(status: int, *, can_refresh: bool) -> Action:
    """What to do after the server refused the handshake with HTTP ``status`` (403, 404, 400,
    426 and the like are a misconfiguration: stop)."""
    action = HANDSHAKE_POLICY.get(status, Action.STOP)
    if action is Action.REFRESH and not can_refresh:
        return Action.STOP
    return action


def backoff_delay(attempt: int, action: Action, random: float, backoff: Backoff = BACKOFF) -> float:
    """Seconds before reconnect attempt ``attempt`` (0 first): half the exponential delay plus
    ``random`` (in [0, 1)) times the other half, so clients spread out and none loops hot."""
    base = backoff.throttle_initial if action is Action.THROTTLE else backoff.initial
    ceiling: float = min(backoff.max, base * 2 ** min(attempt, 30))
    return ceiling / 2 + random * ceiling / 2


class EventDecision(enum.StrEnum):
    APPLY = "apply"
    DUPLICATE = "duplicate"
    #: A seq is missing (never after an ack, per the protocol): subscribe again from the last.
    GAP = "gap"


def event_decision(last_seq: int, seq: int, data: Mapping[str, Any]) -> EventDecision:
    """Whether to apply an event ``seq`` of a thread whose last applied seq is ``last_seq``;
    ``data["from_seq"]`` (a compacted replay of ``agent_text``) covers from_seq..seq.

    ``seq <= last_seq``: a duplicate, dropped (nothing in it is new). A frame that overlaps
    (``from_seq <= last_seq < seq``) is not applied either: its text cannot be split, so
    applying it would repeat text; like a gap it makes the client subscribe again from
    ``last_seq``, and the server's replay starts exactly at ``last_seq + 1``. (A normal resume
    never overlaps: its replay starts at ``since_seq + 1``.)"""
    if seq <= last_seq:
        return EventDecision.DUPLICATE
    from_seq = data.get("from_seq")
    first = from_seq if isinstance(from_seq, int) and not isinstance(from_seq, bool) else seq
    return EventDecision.APPLY if first == last_seq + 1 else EventDecision.GAP


@attrs.frozen
class AckDecision:
    """What a ``subscribed`` ack means."""

    #: ``resumed`` (replay follows), ``resync`` (events were missed), or ``fresh``.
    kind: str
    #: The last seq applied from now on.
    seq: int
    #: Subscribe again with ``since_seq`` = this to replay runs in progress; None: do not.
    rebuild_from: int | None


def ack_decision(
    requested: int | None, ack: Mapping[str, Any], *, rebuilding: bool = False
) -> AckDecision:
    """Decide on ``ack`` to a subscribe that sent ``since_seq`` = ``requested`` (None: none).

    ``ack["active_runs"]`` (``[{"run_id", "first_seq"}]``; absent means none) lists runs in
    progress: when the client does not hold their events (a fresh subscribe or a resync), it
    subscribes again from just before the first of them, once (``rebuilding``).
    """
    seq = int(ack["seq"])
    if requested is not None and ack.get("recovered") is True:
        return AckDecision("resumed", requested, None)
    kind = "resync" if requested is not None else "fresh"
    if rebuilding:
        return AckDecision(kind, seq, None)
    firsts = [
        run["first_seq"] for run in _runs(ack)
        if isinstance(run.get("first_seq"), int) and run["first_seq"] >= 1
    ]
    if not firsts:
        return AckDecision(kind, seq, None)
    start = min(firsts) - 1
    return AckDecision(kind, start, start)


def _runs(ack: Mapping[str, Any]) -> Sequence[Mapping[str, Any]]:
    runs = ack.get("active_runs")
    if not isinstance(runs, list):
        return []
    return [run for run in runs if isinstance(run, dict)]

"""What a connection's writer sends in one go: gather what is queued, group it into messages.

Rules of this module: pure, no I/O, no trio. The writer (the trio shell in ``_connection.py``)
hands :func:`gather` the item it woke up for and its channel's ``receive_nowait`` together with
the exceptions that mean "nothing more now" (so this module needs no trio import and the hot
path gains no call per item); it writes what :func:`messages` yields. Invariants: frames keep
their queue order; an ack and its replay (a tuple item) are never split across two gathers; a
message holds at most ``max_events`` frames and, unless one frame alone is larger, at most
``max_bytes`` characters.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import TypeAlias

__all__ = ["Gathered", "Outgoing", "gather", "messages"]

#: What travels through a connection's channel: an event frame (str), or a tuple whose first
#: element is a control frame, followed by events that must stay with it (an ack and its
#: replay). A tuple counts as one slot; its events are ``len(item) - 1``.
Outgoing: TypeAlias = str | tuple[str, ...]

#: (frames in order, events among them, the oldest live event frame or None, live events).
#: Live events are the plain strings: their latency is measured; replays are not live.
Gathered: TypeAlias = tuple[list[str], int, str | None, int]


def gather(
    item: Outgoing,
    receive_nowait: Callable[[], Outgoing],
    limit: int,
    empty: tuple[type[BaseException], ...],
) -> Gathered:
    """``item`` and what else ``receive_nowait`` has, until about ``limit`` frames or until it
    raises one of ``empty``.

    A tuple item is taken whole, so the result may pass ``limit`` by the rest of one tuple.
    """
    oldest_live: str | None = None
    live = 0
    if isinstance(item, str):
        frames, events, oldest_live, live = [item], 1, item, 1
    else:
        frames, events = list(item), len(item) - 1
    while len(frames) < limit:
        try:
            item = receive_nowait()
        except empty:
            break
        if isinstance(item, str):
            frames.append(item)
            events += 1
            live += 1
            if oldest_live is None:
                oldest_live = item
        else:
            frames.extend(item)
            events += len(item) - 1
    return frames, events, oldest_live, live


def messages(frames: list[str], *, batch: bool, max_bytes: int, max_events: int) -> Iterator[str]:
    """Group frames into WebSocket messages: one each, or, with ``batch``, newline-joined
    batches of at most ``max_events`` frames and ``max_bytes`` characters (a larger frame goes
    alone)."""
    if not batch:
        yield from frames
        return
    group: list[str] = []
    size = 0
    for frame in frames:
        if group and (size + len(frame) > max_bytes or len(group) >= max_events):
            yield "\n".join(group)
            group, size = [], 0
        group.append(frame)
        size += len(frame) + 1
    if group:
        yield "\n".join(group)

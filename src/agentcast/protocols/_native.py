"""Reading agentcast's own downstream frames, for the protocol translators.

Rules of this module: pure functions, no I/O, no trio. The connection's writer hands a
translator either one frame or a newline-delimited batch of them (JSON never carries a raw
newline, so splitting on ``\\n`` is exact); each line is one event envelope or control frame.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any, Final

import orjson

__all__ = ["EVENT_KEYS", "dump", "frames_of", "is_event"]

#: Keys every event envelope carries (``encode_envelope``); control frames lack ``seq``.
EVENT_KEYS: Final = frozenset({"type", "thread_id", "run_id", "seq", "data"})


def frames_of(message: str | bytes) -> Iterator[dict[str, Any]]:
    """The frames of one outgoing message (a single frame or an NDJSON batch), in order.

    Lines that are not JSON objects cannot come from agentcast's writer; they are skipped
    rather than allowed to stop the connection.
    """
    text = message.decode() if isinstance(message, bytes | bytearray) else message
    for line in text.split("\n"):
        if not line:
            continue
        try:
            frame = orjson.loads(line)
        except orjson.JSONDecodeError:
            continue
        if isinstance(frame, dict):
            yield frame


def is_event(frame: dict[str, Any]) -> bool:
    """Whether ``frame`` is an event envelope (it has a ``seq``), not a control frame."""
    return isinstance(frame.get("seq"), int) and isinstance(frame.get("data"), dict)


def dump(value: Any) -> str:
    """Compact JSON text (orjson, the encoder the core uses)."""
    return orjson.dumps(value, option=orjson.OPT_NON_STR_KEYS).decode()

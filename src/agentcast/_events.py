"""Agent events: the value type, its wire schema, and the one-time envelope encoding.

Rules of this module: no I/O, no trio. An event's ``data`` is JSON-encoded exactly once, when
the event is built; publishing adds ``thread_id``, ``run_id``, ``seq`` and ``ts`` by string
assembly, which is safe because ids are restricted to characters JSON never escapes.
"""

from __future__ import annotations

import enum
import math
import re
from collections.abc import Mapping
from typing import Any, Final

import attrs
import orjson

from ._errors import InvalidEvent
from ._ids import check_id

__all__ = [
    "CONTROL_TYPES",
    "REQUIRED_DATA",
    "TERMINAL_TYPES",
    "AgentEvent",
    "EventType",
    "encode_envelope",
]


class EventType(enum.StrEnum):
    """The event types agentcast knows; custom lowercase types are allowed as plain strings."""

    AGENT_STARTED = "agent_started"
    AGENT_THINKING = "agent_thinking"
    #: Streamed text (token deltas) of the agent's answer.
    AGENT_TEXT = "agent_text"
    TOOL_EXECUTING = "tool_executing"
    TOOL_COMPLETED = "tool_completed"
    AGENT_COMPLETED = "agent_completed"
    AGENT_ERROR = "agent_error"
    AGENT_CANCELLED = "agent_cancelled"
    #: An operator notice to every connection (``ConnectionManager.broadcast``).
    SYSTEM_NOTICE = "system_notice"


#: The event types that end a run; a run emits exactly one of them.
TERMINAL_TYPES: Final = frozenset(
    {EventType.AGENT_COMPLETED, EventType.AGENT_ERROR, EventType.AGENT_CANCELLED}
)

#: Keys ``data`` must carry for each known type (the schema in ``docs/protocol.md``).
REQUIRED_DATA: Final[Mapping[str, frozenset[str]]] = {
    EventType.AGENT_STARTED: frozenset({"agent_name"}),
    EventType.AGENT_THINKING: frozenset({"text"}),
    EventType.AGENT_TEXT: frozenset({"text"}),
    EventType.TOOL_EXECUTING: frozenset({"tool_name", "arguments"}),
    EventType.TOOL_COMPLETED: frozenset({"tool_name", "result", "duration_ms", "ok"}),
    EventType.AGENT_COMPLETED: frozenset({"result", "duration_ms"}),
    EventType.AGENT_ERROR: frozenset({"error_type", "message"}),
    EventType.AGENT_CANCELLED: frozenset({"reason"}),
    EventType.SYSTEM_NOTICE: frozenset({"message"}),
}

def _is_text(value: object) -> bool:
    return isinstance(value, str)


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_duration(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and value >= 0


def _is_fraction(value: object) -> bool:
    return _is_duration(value) and value <= 1  # type: ignore[operator]


#: Types of the known data fields of the known event types, as pinned in the schema.
FIELD_RULES: Final[Mapping[str, tuple[Any, str]]] = {
    "agent_name": (_is_text, "a string"),
    "text": (_is_text, "a string"),
    "step": (_is_int, "an integer"),
    "progress": (_is_fraction, "a number from 0 to 1"),
    "tool_name": (_is_text, "a string"),
    "arguments": (lambda value: isinstance(value, Mapping), "an object"),
    "duration_ms": (_is_duration, "a number >= 0"),
    "ok": (lambda value: isinstance(value, bool), "a boolean"),
    "error_type": (_is_text, "a string"),
    "message": (_is_text, "a string"),
    "reason": (_is_text, "a string"),
    "tool_call_id": (_is_text, "a string"),
}

#: Frame types the server sends that are not events; an event may not use these names.
CONTROL_TYPES: Final = frozenset({"subscribed", "unsubscribed", "error", "pong"})

_CUSTOM_TYPE: Final = re.compile(r"[a-z][a-z0-9_]{0,63}")


#: The built-in event types, accepted without the pattern check.
_KNOWN_TYPES: Final = frozenset(str(member) for member in EventType)


def _check_type(instance: AgentEvent, attribute: attrs.Attribute[str], value: str) -> None:
    if value in _KNOWN_TYPES:
        return
    if not isinstance(value, str) or _CUSTOM_TYPE.fullmatch(value) is None:
        raise InvalidEvent(
            f"event type {value!r} must be a known EventType or match [a-z][a-z0-9_]{{0,63}}"
        )
    if value in CONTROL_TYPES:
        raise InvalidEvent(f"event type {value!r} is reserved for control frames")


def _check_run_id(
    instance: AgentEvent, attribute: attrs.Attribute[str | None], value: object
) -> None:
    if value is not None:
        check_id("run_id", value)


def _has_non_finite(value: object) -> bool:
    """Whether NaN or an infinity hides anywhere in ``value`` (no paths: the fast check)."""
    kind = type(value)
    if kind is float:
        return not math.isfinite(value)  # type: ignore[arg-type]
    if kind is dict:
        values: Any = value.values()  # type: ignore[attr-defined]
    elif kind is list or kind is tuple:
        values = value
    elif isinstance(value, float):
        return not math.isfinite(value)
    elif isinstance(value, Mapping):
        values = value.values()
    elif isinstance(value, list | tuple):
        values = value
    else:
        return False
    return any(type(item) is not str and _has_non_finite(item) for item in values)


def _reject_non_finite(value: object, path: str) -> None:
    """Raise for the first NaN or infinity in ``value``, naming where it is."""
    if isinstance(value, float) and not math.isfinite(value):
        raise InvalidEvent(f"event data at {path} is {value!r}, which JSON cannot carry")
    if isinstance(value, Mapping):
        for key, item in value.items():
            _reject_non_finite(item, f"{path}.{key}")
    elif isinstance(value, list | tuple):
        for index, item in enumerate(value):
            _reject_non_finite(item, f"{path}[{index}]")


def _normalise_type(value: str) -> str:
    return str(value) if isinstance(value, EventType) else value


@attrs.frozen
class AgentEvent:
    """One event of an agent run, before it is given a thread, seq and timestamp.

    Args:
        type: an :class:`EventType` or a custom lowercase name.
        data: JSON-serialisable mapping; known types must carry the keys in ``REQUIRED_DATA``.
        run_id: the run it belongs to (the run scope fills it in).

    Raises:
        InvalidEvent: the type is malformed or reserved, a required key is missing, or ``data``
            is not JSON-serialisable.
    """

    type: str = attrs.field(converter=_normalise_type, validator=_check_type)
    data: Mapping[str, Any] = attrs.field(factory=dict, eq=False, hash=False)
    run_id: str | None = attrs.field(default=None, validator=_check_run_id)
    #: ``data`` encoded once, as JSON text; reused for every connection and for history.
    data_json: str = attrs.field(init=False, repr=False, eq=True, hash=False)

    def __attrs_post_init__(self) -> None:
        if not isinstance(self.data, Mapping):
            raise InvalidEvent(f"event data must be a mapping, got {type(self.data).__name__}")
        required = REQUIRED_DATA.get(self.type)
        if required is not None:
            missing = required - self.data.keys()
            if missing:
                raise InvalidEvent(
                    f"{self.type} event data is missing {', '.join(sorted(missing))}"
                )
            for key, (check, expected) in FIELD_RULES.items():
                if key in self.data and not check(self.data[key]):
                    raise InvalidEvent(
                        f"{self.type} event data.{key} must be {expected}, "
                        f"got {self.data[key]!r:.60}"
                    )
        try:
            encoded = orjson.dumps(self.data, option=orjson.OPT_NON_STR_KEYS)
        except TypeError as exc:
            raise InvalidEvent(f"{self.type} event data is not JSON-serialisable: {exc}") from None
        # orjson silently writes NaN and infinities as null; refuse instead of changing the
        # data. Output without "null" cannot hide one, which skips the walk for most events.
        if b"null" in encoded and _has_non_finite(self.data):
            _reject_non_finite(self.data, "data")
        object.__setattr__(self, "data_json", encoded.decode())

    @property
    def is_terminal(self) -> bool:
        """True for ``agent_completed``, ``agent_error`` and ``agent_cancelled``."""
        return self.type in TERMINAL_TYPES


def encode_envelope(
    event: AgentEvent, *, thread_id: str | None, seq: int | None, ts: float
) -> str:
    """Return the wire form ``{"type","thread_id","run_id","seq","ts","data"}`` of ``event``.

    ``thread_id`` and ``run_id`` must be validated ids (no characters JSON would escape).
    """
    thread = "null" if thread_id is None else f'"{thread_id}"'
    run = "null" if event.run_id is None else f'"{event.run_id}"'
    number = "null" if seq is None else str(seq)
    return (
        f'{{"type":"{event.type}","thread_id":{thread},"run_id":{run},'
        f'"seq":{number},"ts":{ts!r},"data":{event.data_json}}}'
    )

"""AgentEvent validation and the string-assembled envelope encoder."""

from __future__ import annotations

import json
import math
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from agentcast import AgentEvent, EventType, InvalidEvent, InvalidIdentifier
from agentcast._events import (
    CONTROL_TYPES,
    FIELD_RULES,
    REQUIRED_DATA,
    TERMINAL_TYPES,
    encode_envelope,
)

from .helpers import EVENT_TYPES, SCHEMA_VALIDATOR

ENVELOPE_KEYS = ["type", "thread_id", "run_id", "seq", "ts", "data"]

#: A schema-valid example of every known type's data.
VALID_DATA: dict[str, dict[str, Any]] = {
    EventType.AGENT_STARTED: {"agent_name": "planner"},
    EventType.AGENT_THINKING: {"text": "hmm", "step": 1, "progress": 0.5},
    EventType.AGENT_TEXT: {"text": "Hello"},
    EventType.TOOL_EXECUTING: {"tool_name": "search", "arguments": {"q": "trio"}},
    EventType.TOOL_COMPLETED: {
        "tool_name": "search", "result": ["a", "b"], "duration_ms": 12.5, "ok": True,
    },
    EventType.AGENT_COMPLETED: {"result": {"answer": 42}, "duration_ms": 100.0},
    EventType.AGENT_ERROR: {"error_type": "ValueError", "message": "boom"},
    EventType.AGENT_CANCELLED: {"reason": "cancelled by client"},
    EventType.SYSTEM_NOTICE: {"message": "maintenance at 5"},
}


def envelope(event: AgentEvent, **kwargs: Any) -> dict[str, Any]:
    options: dict[str, Any] = {"thread_id": "t1", "seq": 1, "ts": 1700000000.25}
    options.update(kwargs)
    parsed: dict[str, Any] = json.loads(encode_envelope(event, **options))
    return parsed


# ---- the type registry -----------------------------------------------------------------------


def test_event_types_match_the_schema_and_the_required_data() -> None:
    assert {str(member) for member in EventType} == EVENT_TYPES
    assert set(REQUIRED_DATA) == set(EventType)
    assert set(VALID_DATA) == set(EventType)


def test_terminal_types() -> None:
    assert {"agent_completed", "agent_error", "agent_cancelled"} == TERMINAL_TYPES
    assert AgentEvent(EventType.AGENT_ERROR, VALID_DATA[EventType.AGENT_ERROR]).is_terminal
    assert not AgentEvent(EventType.AGENT_TEXT, {"text": "x"}).is_terminal


# ---- required data ---------------------------------------------------------------------------


@pytest.mark.parametrize("event_type", list(EventType))
def test_every_known_type_accepts_its_valid_data(event_type: EventType) -> None:
    event = AgentEvent(event_type, VALID_DATA[event_type], "run-1")
    assert event.type == str(event_type)
    assert type(event.type) is str
    frame = envelope(event)
    SCHEMA_VALIDATOR.validate(frame)
    assert frame["data"] == VALID_DATA[event_type]


@pytest.mark.parametrize(
    ("event_type", "key"),
    [(event_type, key) for event_type, keys in REQUIRED_DATA.items() for key in sorted(keys)],
)
def test_missing_required_key_is_refused(event_type: EventType, key: str) -> None:
    data = {k: v for k, v in VALID_DATA[event_type].items() if k != key}
    with pytest.raises(InvalidEvent, match=rf"{event_type} event data is missing .*\b{key}\b"):
        AgentEvent(event_type, data)


def test_type_given_as_plain_string_gets_the_same_rules() -> None:
    with pytest.raises(InvalidEvent, match="missing agent_name"):
        AgentEvent("agent_started", {})
    assert AgentEvent("agent_started", {"agent_name": "a"}).type == "agent_started"


def test_all_missing_keys_are_named() -> None:
    with pytest.raises(InvalidEvent, match="missing duration_ms, ok, result, tool_name"):
        AgentEvent(EventType.TOOL_COMPLETED, {})


def test_custom_types_need_no_particular_keys() -> None:
    event = AgentEvent("user_message_echo", {})
    assert event.data_json == "{}"
    SCHEMA_VALIDATOR.validate(envelope(event))


# ---- types -----------------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(CONTROL_TYPES))
def test_control_types_are_reserved(name: str) -> None:
    with pytest.raises(InvalidEvent, match="reserved for control frames"):
        AgentEvent(name, {})


def test_reserved_names_are_exactly_the_server_control_frames() -> None:
    assert {"subscribed", "error", "pong", "unsubscribed"} == CONTROL_TYPES


@pytest.mark.parametrize(
    "name",
    ["", "Agent_started", "1abc", "_x", "has space", "dash-ed", "a" * 65, "caf\u00e9", "x\n",
     "a.b"],
)
def test_bad_type_names_are_refused(name: str) -> None:
    with pytest.raises(InvalidEvent, match="must be a known EventType or match"):
        AgentEvent(name, {})


@pytest.mark.parametrize("name", [None, 3, b"agent_text"])
def test_non_string_types_are_refused(name: object) -> None:
    with pytest.raises(InvalidEvent):
        AgentEvent(name, {})  # type: ignore[arg-type]


def test_longest_custom_type_is_accepted() -> None:
    name = "a" * 64
    assert AgentEvent(name, {}).type == name


def test_run_id_is_validated() -> None:
    with pytest.raises(InvalidIdentifier, match="run_id is the placeholder"):
        AgentEvent(EventType.AGENT_TEXT, {"text": "x"}, "null")
    with pytest.raises(InvalidIdentifier, match=r"run_id .* may only contain"):
        AgentEvent(EventType.AGENT_TEXT, {"text": "x"}, 'r"1')


# ---- data ------------------------------------------------------------------------------------


@pytest.mark.parametrize("data", [{"text": "x", "when": object()}, {"text": "x", "s": {1, 2}}])
def test_non_serialisable_data_is_refused(data: dict[str, Any]) -> None:
    with pytest.raises(InvalidEvent, match="not JSON-serialisable"):
        AgentEvent(EventType.AGENT_TEXT, data)


@pytest.mark.parametrize(
    ("data", "path"),
    [
        ({"text": "x", "score": math.nan}, "data.score"),
        ({"text": "x", "score": math.inf}, "data.score"),
        ({"text": "x", "deep": {"list": [1.0, -math.inf]}}, r"data.deep.list\[1\]"),
    ],
)
def test_non_finite_numbers_are_refused(data: dict[str, Any], path: str) -> None:
    with pytest.raises(InvalidEvent, match=rf"{path} is .* which JSON cannot carry"):
        AgentEvent(EventType.AGENT_TEXT, data)


def test_data_must_be_a_mapping() -> None:
    with pytest.raises(InvalidEvent, match="must be a mapping"):
        AgentEvent(EventType.AGENT_TEXT, ["text"])  # type: ignore[arg-type]


def test_lone_surrogate_in_data_is_refused() -> None:
    with pytest.raises(InvalidEvent, match="not JSON-serialisable"):
        AgentEvent(EventType.AGENT_TEXT, {"text": "\ud800"})


def test_integer_beyond_64_bits_is_refused() -> None:
    with pytest.raises(InvalidEvent, match="not JSON-serialisable"):
        AgentEvent("custom", {"n": 2**70})


def test_data_is_encoded_once_at_construction() -> None:
    data = {"text": "before"}
    event = AgentEvent(EventType.AGENT_TEXT, data)
    data["text"] = "after"
    assert json.loads(event.data_json) == {"text": "before"}
    assert envelope(event)["data"] == {"text": "before"}


# ---- the envelope ----------------------------------------------------------------------------


def test_envelope_has_exactly_the_documented_keys_in_order() -> None:
    event = AgentEvent(EventType.AGENT_THINKING, {"text": "hi"}, "run-1")
    frame = envelope(event, thread_id="thread-1", seq=7, ts=1700000000.5)
    assert list(frame) == ENVELOPE_KEYS
    assert frame == {
        "type": "agent_thinking", "thread_id": "thread-1", "run_id": "run-1", "seq": 7,
        "ts": 1700000000.5, "data": {"text": "hi"},
    }
    SCHEMA_VALIDATOR.validate(frame)


def test_live_only_envelope_has_null_thread_run_and_seq() -> None:
    event = AgentEvent(EventType.SYSTEM_NOTICE, {"message": "hello"})
    frame = envelope(event, thread_id=None, seq=None)
    assert list(frame) == ENVELOPE_KEYS
    assert (frame["thread_id"], frame["run_id"], frame["seq"]) == (None, None, None)
    SCHEMA_VALIDATOR.validate(frame)


def test_envelope_is_compact_single_line_json() -> None:
    event = AgentEvent(EventType.AGENT_TEXT, {"text": "line1\nline2\u2028"})
    text = encode_envelope(event, thread_id="t", seq=1, ts=1.0)
    assert "\n" not in text
    assert json.loads(text)["data"]["text"] == "line1\nline2\u2028"


def test_schema_rejects_an_envelope_missing_required_data() -> None:
    frame = envelope(AgentEvent(EventType.AGENT_TEXT, {"text": "x"}))
    del frame["data"]["text"]
    assert not SCHEMA_VALIDATOR.is_valid(frame)


ID_TEXT = st.from_regex(r"[A-Za-z0-9_.:@+\-]{1,128}", fullmatch=True).filter(
    lambda s: s.lower() not in {"none", "null", "undefined", "nan"}
)
JSON_SCALARS = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**63), max_value=2**64 - 1),
    st.floats(allow_nan=False, allow_infinity=False),
    st.text(),
)
JSON_VALUES = st.recursive(
    JSON_SCALARS,
    lambda children: st.one_of(
        st.lists(children, max_size=5),
        st.dictionaries(st.text(max_size=10), children, max_size=5),
    ),
    max_leaves=30,
)


@given(
    data=st.dictionaries(st.text(max_size=10), JSON_VALUES, max_size=6),
    ids=st.tuples(st.none() | ID_TEXT, st.none() | ID_TEXT),
    stamp=st.tuples(
        st.integers(min_value=1, max_value=2**53),
        st.floats(min_value=0, max_value=4e9, allow_nan=False),
    ),
    event_type=st.from_regex(r"[a-z][a-z0-9_]{0,63}", fullmatch=True).filter(
        lambda s: s not in CONTROL_TYPES and s not in REQUIRED_DATA
    ),
)
def test_envelope_round_trips_any_json_data(
    data: dict[str, Any],
    ids: tuple[str | None, str | None],
    stamp: tuple[int, float],
    event_type: str,
) -> None:
    thread_id, run_id = ids
    seq, ts = stamp
    event = AgentEvent(event_type, data, run_id)
    text = encode_envelope(event, thread_id=thread_id, seq=None if thread_id is None else seq,
                           ts=ts)
    frame = json.loads(text)
    assert list(frame) == ENVELOPE_KEYS
    assert frame["data"] == data
    assert frame["type"] == event_type
    assert frame["thread_id"] == thread_id
    assert frame["run_id"] == run_id
    assert frame["ts"] == ts
    SCHEMA_VALIDATOR.validate(frame)


# Keys with a type rule (e.g. duration_ms must be a number) are covered by their own tests.
@given(text=st.text(), key=st.text().filter(lambda key: key not in FIELD_RULES))
def test_known_type_round_trips_any_text(text: str, key: str) -> None:
    data = {"text": text, key or "k": text}
    event = AgentEvent(EventType.AGENT_TEXT, data, "run-1")
    frame = json.loads(encode_envelope(event, thread_id="t", seq=3, ts=2.0))
    assert frame["data"] == data
    SCHEMA_VALIDATOR.validate(frame)

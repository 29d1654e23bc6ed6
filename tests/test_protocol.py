"""Inbound frame parsing, close reasons and outbound control frames."""

from __future__ import annotations

import json
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from agentcast import BATCH_SUBPROTOCOL, ActiveRun, CloseCode
from agentcast._protocol import (
    MAX_CLOSE_REASON_BYTES,
    CancelRun,
    ClientFrame,
    CustomFrame,
    Ping,
    ProtocolError,
    Subscribe,
    Unsubscribe,
    close_reason,
    error_frame,
    parse_client_frame,
    pong_frame,
    subscribed_frame,
    unsubscribed_frame,
)

LIMIT = 64 * 1024
#: Any code point, lone surrogates included (they stand for invalid UTF-8 on the wire).
ANY_CHAR = st.characters(exclude_categories=()) | st.characters(categories=["Cs"])


def parse(frame: dict[str, Any] | str, max_bytes: int = LIMIT) -> object:
    text = frame if isinstance(frame, str) else json.dumps(frame)
    return parse_client_frame(text, max_bytes=max_bytes)


def refused(
    frame: dict[str, Any] | str | bytes | bytearray, max_bytes: int = LIMIT
) -> ProtocolError:
    text = frame if isinstance(frame, str | bytes | bytearray) else json.dumps(frame)
    with pytest.raises(ProtocolError) as info:
        parse_client_frame(bytes(text) if isinstance(text, bytearray) else text,
                           max_bytes=max_bytes)
    return info.value


# ---- constants -------------------------------------------------------------------------------


def test_close_codes_are_the_documented_values() -> None:
    assert {code.name: int(code) for code in CloseCode} == {
        "NORMAL": 1000,
        "GOING_AWAY": 1001,
        "PROTOCOL_ERROR": 1002,
        "UNSUPPORTED_DATA": 1003,
        "INVALID_PAYLOAD": 1007,
        "POLICY_VIOLATION": 1008,
        "MESSAGE_TOO_BIG": 1009,
        "INTERNAL_ERROR": 1011,
        "SERVICE_RESTART": 1012,
        "SLOW_CONSUMER": 4008,
        "TOKEN_EXPIRED": 4001,
        "REVOKED": 4003,
        "CONNECTION_LIMIT": 4009,
        "RATE_LIMITED": 4029,
    }


def test_batch_subprotocol_name() -> None:
    assert BATCH_SUBPROTOCOL == "agentcast.ndjson"


# ---- known frames ----------------------------------------------------------------------------


def test_subscribe_without_resume() -> None:
    assert parse({"type": "subscribe", "thread_id": "t1"}) == Subscribe("t1", None, None)


def test_subscribe_with_since_seq_and_epoch() -> None:
    frame = parse({"type": "subscribe", "thread_id": "t1", "since_seq": 17, "epoch": "abc123"})
    assert frame == Subscribe("t1", 17, "abc123")


def test_subscribe_with_since_seq_zero() -> None:
    assert parse({"type": "subscribe", "thread_id": "t1", "since_seq": 0}) == Subscribe("t1", 0)


def test_subscribe_with_null_optionals_means_absent() -> None:
    frame = parse({"type": "subscribe", "thread_id": "t1", "since_seq": None, "epoch": None})
    assert frame == Subscribe("t1", None, None)


def test_unsubscribe() -> None:
    assert parse({"type": "unsubscribe", "thread_id": "t1"}) == Unsubscribe("t1")


def test_cancel_run() -> None:
    assert parse({"type": "cancel_run", "run_id": "run-1"}) == CancelRun("run-1")


@pytest.mark.parametrize("ping_id", [7, "abc", [1, 2], {"k": "v"}, 1.5])
def test_ping_keeps_its_id(ping_id: object) -> None:
    assert parse({"type": "ping", "id": ping_id}) == Ping(ping_id)


def test_ping_without_id() -> None:
    assert parse({"type": "ping"}) == Ping(None)


def test_unknown_type_is_a_custom_frame_with_the_whole_payload() -> None:
    payload = {"type": "user_message", "thread_id": "t1", "text": "hi", "extra": [1, None]}
    frame = parse(payload)
    assert frame == CustomFrame("user_message", payload)


def test_custom_frame_type_is_not_restricted() -> None:
    frame = parse({"type": "Weird Type!"})
    assert isinstance(frame, CustomFrame)
    assert frame.type == "Weird Type!"


def test_whitespace_around_json_is_fine() -> None:
    assert parse('  {"type": "ping", "id": 1}\n') == Ping(1)


# ---- fatal faults: close codes ---------------------------------------------------------------


@pytest.mark.parametrize("data", [b'{"type":"ping"}', bytearray(b"{}"), b""])
def test_binary_frames_close_with_1003(data: bytes) -> None:
    error = refused(data)
    assert error.code == "binary_frame"
    assert error.close_code is CloseCode.UNSUPPORTED_DATA
    assert int(error.close_code) == 1003


def test_oversize_frame_closes_with_1009() -> None:
    error = refused({"type": "ping", "id": "x" * 200}, max_bytes=100)
    assert error.code == "message_too_big"
    assert error.close_code is CloseCode.MESSAGE_TOO_BIG
    assert int(error.close_code) == 1009
    assert "100 bytes" in error.message


def test_size_limit_counts_utf8_bytes_not_characters() -> None:
    # 40 characters, 120 bytes of UTF-8.
    text = json.dumps({"type": "ping", "id": "\u20ac" * 40}, ensure_ascii=False)
    assert len(text) < 100 < len(text.encode())
    assert refused(text, max_bytes=100).close_code == CloseCode.MESSAGE_TOO_BIG
    assert parse(text, max_bytes=len(text.encode())) == Ping("\u20ac" * 40)


def test_frame_of_exactly_the_limit_is_accepted() -> None:
    text = '{"type":"ping"}'
    assert parse(text, max_bytes=len(text)) == Ping(None)
    assert refused(text, max_bytes=len(text) - 1).close_code == CloseCode.MESSAGE_TOO_BIG


@pytest.mark.parametrize(
    "text", ['{"type":"ping","id":"\ud800"}', "\udfff", '{"type":"x\udc80"}']
)
def test_lone_surrogate_closes_with_1007(text: str) -> None:
    # A str with a lone surrogate is what invalid UTF-8 looks like once decoded leniently.
    error = refused(text)
    assert error.code == "invalid_utf8"
    assert error.close_code is CloseCode.INVALID_PAYLOAD
    assert int(error.close_code) == 1007


def test_oversize_check_comes_before_utf8_check_for_huge_frames() -> None:
    error = refused("\ud800" * 200, max_bytes=100)
    assert error.close_code == CloseCode.MESSAGE_TOO_BIG


# ---- recoverable faults: error frame, no close -----------------------------------------------


@pytest.mark.parametrize("text", ["", "{", "not json", '{"type": "ping",}', "{'type': 'ping'}",
                                  "[" * 2000, '{"type":"ping","id":1e400}'])
def test_malformed_json_is_bad_json(text: str) -> None:
    error = refused(text)
    assert error.code == "bad_json"
    assert error.close_code is None


@pytest.mark.parametrize("text", ["[]", "1", '"subscribe"', "null", "true", '[{"type":"ping"}]'])
def test_non_object_is_bad_frame(text: str) -> None:
    error = refused(text)
    assert error.code == "bad_frame"
    assert error.message == "frame must be a JSON object"
    assert error.close_code is None


@pytest.mark.parametrize(
    "frame", [{}, {"type": ""}, {"type": None}, {"type": 3}, {"type": ["ping"]}, {"id": 1}]
)
def test_missing_or_non_string_type_is_bad_frame(frame: dict[str, Any]) -> None:
    error = refused(frame)
    assert error.code == "bad_frame"
    assert "'type'" in error.message
    assert error.close_code is None


@pytest.mark.parametrize("since_seq", [-1, True, False, "5", 1.0, [1], {"n": 1}])
def test_bad_since_seq_is_invalid_field(since_seq: object) -> None:
    error = refused({"type": "subscribe", "thread_id": "t1", "since_seq": since_seq})
    assert error.code == "invalid_field"
    assert "since_seq must be a non-negative integer" in error.message
    assert error.close_code is None


@pytest.mark.parametrize("epoch", [1, True, ["e"], {"e": 1}])
def test_non_string_epoch_is_invalid_field(epoch: object) -> None:
    error = refused({"type": "subscribe", "thread_id": "t1", "epoch": epoch})
    assert error.code == "invalid_field"
    assert "epoch" in error.message
    assert error.close_code is None


def test_subscribe_compact_defaults_to_true_and_false_opts_out() -> None:
    assert parse({"type": "subscribe", "thread_id": "t1"}) == Subscribe("t1", compact=True)
    frame = parse({"type": "subscribe", "thread_id": "t1", "since_seq": 0, "compact": False})
    assert frame == Subscribe("t1", 0, None, compact=False)


@pytest.mark.parametrize("compact", [0, 1, "false", None, [False]])
def test_non_boolean_compact_is_invalid_field(compact: object) -> None:
    error = refused({"type": "subscribe", "thread_id": "t1", "compact": compact})
    assert error.code == "invalid_field"
    assert "compact must be true or false" in error.message


@pytest.mark.parametrize(
    ("kind", "field"), [("subscribe", "thread_id"), ("unsubscribe", "thread_id"),
                        ("cancel_run", "run_id")]
)
@pytest.mark.parametrize(
    ("value", "rule"),
    [
        (None, "must be a string"),
        (5, "must be a string"),
        ("", "must not be empty"),
        ("None", "placeholder"),
        ("  null ", "placeholder"),
        ("undefined", "placeholder"),
        ("a b", "may only contain"),
        ("a/b", "may only contain"),
        ("x" * 129, "at most 128"),
    ],
)
def test_bad_ids_are_invalid_field(kind: str, field: str, value: object, rule: str) -> None:
    frame: dict[str, Any] = {"type": kind}
    if value is not None:
        frame[field] = value
    error = refused(frame)
    assert error.code == "invalid_field"
    assert field in error.message
    assert rule in error.message
    assert error.close_code is None


def test_protocol_error_str_has_code_and_message() -> None:
    error = ProtocolError("bad_frame", "frame must be a JSON object")
    assert str(error) == "bad_frame: frame must be a JSON object"
    assert error.close_code is None


# ---- close reasons ---------------------------------------------------------------------------


def test_short_close_reason_is_unchanged() -> None:
    assert close_reason("slow consumer: send queue full") == "slow consumer: send queue full"


def test_long_ascii_close_reason_is_trimmed_to_123_bytes() -> None:
    reason = close_reason("x" * 500)
    assert reason == "x" * MAX_CLOSE_REASON_BYTES
    assert MAX_CLOSE_REASON_BYTES == 123


def test_close_reason_does_not_split_a_character() -> None:
    # 41 three-byte characters: 123 bytes fit exactly; with an ASCII prefix the last one breaks.
    assert close_reason("\u20ac" * 50) == "\u20ac" * 41
    assert close_reason("a" + "\u20ac" * 50) == "a" + "\u20ac" * 40
    assert close_reason("ab" + "\U0001f600" * 40) == "ab" + "\U0001f600" * 30


def test_close_reason_tolerates_lone_surrogates() -> None:
    reason = close_reason("bad \ud800 reason")
    reason.encode("utf-8")  # valid UTF-8, so it can go into a close frame
    assert reason.startswith("bad ")


@given(st.text(alphabet=ANY_CHAR, max_size=300))
def test_close_reason_always_fits_and_is_a_prefix(text: str) -> None:
    reason = close_reason(text)
    encoded = reason.encode("utf-8")
    assert len(encoded) <= MAX_CLOSE_REASON_BYTES
    if all(not 0xD800 <= ord(char) <= 0xDFFF for char in text):
        assert text.startswith(reason)
        full = text.encode()
        if len(full) <= MAX_CLOSE_REASON_BYTES:
            assert reason == text
        else:
            # Nothing was dropped but the tail of one split character.
            assert len(encoded) > MAX_CLOSE_REASON_BYTES - 4


# ---- control frames --------------------------------------------------------------------------


def test_subscribed_frame() -> None:
    runs = [ActiveRun("r1", 3), ActiveRun("r2", 9)]
    text = subscribed_frame("t1", seq=12, epoch="e1", recovered=True, active_runs=runs)
    assert json.loads(text) == {
        "type": "subscribed", "thread_id": "t1", "seq": 12, "epoch": "e1", "recovered": True,
        "active_runs": [{"run_id": "r1", "first_seq": 3}, {"run_id": "r2", "first_seq": 9}],
    }
    assert list(json.loads(text)) == [
        "type", "thread_id", "seq", "epoch", "recovered", "active_runs"
    ]
    assert json.loads(subscribed_frame("t1", seq=0, epoch="e", recovered=False))[
        "active_runs"] == []


def test_unsubscribed_frame() -> None:
    assert json.loads(unsubscribed_frame("t1")) == {"type": "unsubscribed", "thread_id": "t1"}


def test_pong_frame_echoes_the_id() -> None:
    assert json.loads(pong_frame(7)) == {"type": "pong", "id": 7}
    assert json.loads(pong_frame({"nested": [1]})) == {"type": "pong", "id": {"nested": [1]}}


def test_pong_frame_without_id() -> None:
    assert json.loads(pong_frame()) == {"type": "pong"}
    assert json.loads(pong_frame(None)) == {"type": "pong"}


def test_error_frame() -> None:
    assert json.loads(error_frame("bad_json", "frame is not valid JSON")) == {
        "type": "error", "code": "bad_json", "message": "frame is not valid JSON",
    }


def test_error_frame_with_extra_fields() -> None:
    frame = json.loads(error_frame("unknown_run", "no such run", run_id="r1"))
    assert frame == {"type": "error", "code": "unknown_run", "message": "no such run",
                     "run_id": "r1"}


def test_control_frames_are_single_lines() -> None:
    for text in (
        subscribed_frame("t1", seq=0, epoch="e", recovered=False),
        unsubscribed_frame("t1"),
        pong_frame("a\nb"),
        error_frame("x", "multi\nline"),
    ):
        assert "\n" not in text
        assert isinstance(json.loads(text), dict)


@given(ping_id=st.none() | st.integers(-(2**63), 2**63) | st.text() | st.lists(st.booleans()))
def test_ping_round_trips_to_pong(ping_id: object) -> None:
    frame = parse({"type": "ping", "id": ping_id})
    assert isinstance(frame, Ping)
    pong = json.loads(pong_frame(frame.id))
    assert pong.get("id") == ping_id


# ---- properties ------------------------------------------------------------------------------

FRAMEISH = st.one_of(
    st.text(alphabet=ANY_CHAR, max_size=200),
    st.text(alphabet='{}[]":,0123456789.-eE truefalsnl\\', max_size=200),
    st.fixed_dictionaries(
        {"type": st.sampled_from(["subscribe", "unsubscribe", "cancel_run", "ping", "x"])},
        optional={
            "thread_id": st.none() | st.integers() | st.text(max_size=140),
            "run_id": st.none() | st.booleans() | st.text(max_size=140),
            "since_seq": st.none() | st.booleans() | st.integers() | st.floats() | st.text(),
            "epoch": st.none() | st.integers() | st.text(max_size=20),
            "id": st.none() | st.integers() | st.text(),
        },
    ).map(json.dumps),
)


@given(text=FRAMEISH, max_bytes=st.integers(min_value=1, max_value=LIMIT))
def test_arbitrary_text_only_ever_raises_protocol_error(text: str, max_bytes: int) -> None:
    outcome: ClientFrame | ProtocolError
    try:
        outcome = parse_client_frame(text, max_bytes=max_bytes)
    except ProtocolError as exc:
        outcome = exc
    if isinstance(outcome, ProtocolError):
        assert outcome.code
        assert outcome.message
        assert outcome.close_code in {
            None, CloseCode.INVALID_PAYLOAD, CloseCode.MESSAGE_TOO_BIG,
        }
        return
    assert isinstance(outcome, Subscribe | Unsubscribe | CancelRun | Ping | CustomFrame)
    assert len(text.encode("utf-8")) <= max_bytes

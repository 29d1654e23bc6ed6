"""UserContext: every id rule, metadata rules, and the validation property."""

from __future__ import annotations

import re
from typing import Any

import attrs
import pytest
from hypothesis import given
from hypothesis import strategies as st

from agentcast import InvalidIdentifier, InvalidUserContext, UserContext
from agentcast._context import MAX_METADATA_BYTES
from agentcast._ids import MAX_ID_LENGTH, PLACEHOLDER_IDS, check_id, new_id

ID_PATTERN = re.compile(r"^[A-Za-z0-9_.:@+-]{1,128}$")
ID_FIELDS = ("user_id", "thread_id", "run_id", "request_id")


def build(field: str, value: object) -> UserContext:
    """A context that is valid except for ``field``."""
    kwargs: dict[str, Any] = {"user_id": "alice"}
    kwargs[field] = value
    return UserContext(**kwargs)


# ---- valid construction ----------------------------------------------------------------------


def test_valid_context_keeps_every_field() -> None:
    ctx = UserContext(
        user_id="user-1@example.com",
        thread_id="thread:42",
        run_id="run_7.a+b",
        request_id="req-1",
        metadata={"tenant": "acme", "version": [1, 2]},
    )
    assert ctx.user_id == "user-1@example.com"
    assert ctx.thread_id == "thread:42"
    assert ctx.run_id == "run_7.a+b"
    assert ctx.request_id == "req-1"
    assert dict(ctx.metadata) == {"tenant": "acme", "version": [1, 2]}


def test_optional_ids_default_to_none_and_metadata_to_empty() -> None:
    ctx = UserContext(user_id="alice")
    assert ctx.thread_id is None
    assert ctx.run_id is None
    assert dict(ctx.metadata) == {}


def test_longest_allowed_id_is_accepted() -> None:
    longest = "a" * MAX_ID_LENGTH
    assert UserContext(user_id=longest).user_id == longest


def test_request_id_is_generated_when_absent() -> None:
    first = UserContext(user_id="alice")
    second = UserContext(user_id="alice")
    assert ID_PATTERN.fullmatch(first.request_id)
    assert first.request_id.startswith("req-")
    assert first.request_id != second.request_id


def test_from_request_builds_a_validated_context() -> None:
    ctx = UserContext.from_request("alice", "t1", "r1", "req-9", tenant="acme", tier=2)
    assert (ctx.user_id, ctx.thread_id, ctx.run_id, ctx.request_id) == (
        "alice", "t1", "r1", "req-9",
    )
    assert dict(ctx.metadata) == {"tenant": "acme", "tier": 2}


def test_from_request_generates_request_id() -> None:
    ctx = UserContext.from_request(user_id="alice")
    assert ctx.request_id.startswith("req-")
    assert ID_PATTERN.fullmatch(ctx.request_id)
    assert ctx.thread_id is None
    assert ctx.run_id is None


def test_from_request_validates() -> None:
    with pytest.raises(InvalidUserContext, match="thread_id"):
        UserContext.from_request("alice", thread_id="None")
    with pytest.raises(InvalidUserContext, match="metadata"):
        UserContext.from_request("alice", blob=object())


def test_new_id_is_a_valid_id() -> None:
    value = new_id("run")
    assert value.startswith("run-")
    assert check_id("run_id", value) == value


def test_context_is_frozen() -> None:
    ctx = UserContext(user_id="alice")
    with pytest.raises(attrs.exceptions.FrozenInstanceError):
        ctx.user_id = "mallory"  # type: ignore[misc]
    assert ctx.user_id == "alice"


def test_invalid_user_context_is_a_value_error() -> None:
    assert issubclass(InvalidUserContext, ValueError)
    assert issubclass(InvalidUserContext, InvalidIdentifier)


# ---- id rules --------------------------------------------------------------------------------


@pytest.mark.parametrize("field", ID_FIELDS)
def test_empty_id_is_refused(field: str) -> None:
    with pytest.raises(InvalidUserContext, match=rf"{field} must not be empty"):
        build(field, "")


@pytest.mark.parametrize("field", ID_FIELDS)
def test_too_long_id_is_refused(field: str) -> None:
    with pytest.raises(
        InvalidUserContext, match=rf"{field} must be at most {MAX_ID_LENGTH} characters, got 129"
    ):
        build(field, "a" * (MAX_ID_LENGTH + 1))


@pytest.mark.parametrize("field", ID_FIELDS)
@pytest.mark.parametrize(
    "value", ["has space", "a/b", "caf\u00e9", "line\nbreak", "tab\there", "x\u0000", "\u0661"]
)
def test_bad_charset_is_refused(field: str, value: str) -> None:
    with pytest.raises(InvalidUserContext, match=rf"{field} .* may only contain"):
        build(field, value)


@pytest.mark.parametrize("field", ID_FIELDS)
@pytest.mark.parametrize(
    "value",
    ["None", "none", "NONE", "null", "Null", "undefined", "UNDEFINED", "nan", "NaN",
     " None", "null ", "\tundefined\n", "  NaN  "],
)
def test_placeholder_id_is_refused(field: str, value: str) -> None:
    with pytest.raises(InvalidUserContext, match=rf"{field} is the placeholder"):
        build(field, value)


@pytest.mark.parametrize("field", ID_FIELDS)
@pytest.mark.parametrize("value", [42, b"alice", ["alice"]])
def test_non_string_id_is_refused(field: str, value: object) -> None:
    with pytest.raises(InvalidUserContext, match=rf"{field} must be a string"):
        build(field, value)


def test_user_id_none_is_refused() -> None:
    with pytest.raises(InvalidUserContext, match="user_id must be a string"):
        UserContext(user_id=None)  # type: ignore[arg-type]


def test_request_id_none_is_refused_on_direct_construction() -> None:
    with pytest.raises(InvalidUserContext, match="request_id must be a string"):
        UserContext(user_id="alice", request_id=None)  # type: ignore[arg-type]


def test_placeholder_like_ids_that_are_not_placeholders_are_accepted() -> None:
    for value in ("none1", "nullable", "nan-bread", "undefined_x", "Nonetheless"):
        assert UserContext(user_id=value).user_id == value


# ---- metadata --------------------------------------------------------------------------------


def test_metadata_must_be_json_serialisable() -> None:
    with pytest.raises(InvalidUserContext, match="metadata must be JSON-serialisable"):
        UserContext(user_id="alice", metadata={"when": object()})


def test_metadata_with_non_string_nested_key_is_refused() -> None:
    with pytest.raises(InvalidUserContext, match="metadata must be JSON-serialisable"):
        UserContext(user_id="alice", metadata={"nested": {1: "x"}})


def test_metadata_with_non_string_key_is_refused() -> None:
    with pytest.raises(InvalidUserContext, match="metadata keys must be strings"):
        UserContext(user_id="alice", metadata={1: "x"})  # type: ignore[dict-item]


def test_metadata_must_be_a_mapping() -> None:
    with pytest.raises(InvalidUserContext, match="metadata must be a mapping"):
        UserContext(user_id="alice", metadata=[("a", 1)])  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "metadata",
    [
        {"score": float("nan")},
        {"score": float("inf")},
        {"nested": {"deep": [1.0, float("-inf")]}},
        {"tuple": (float("nan"),)},
    ],
)
def test_non_finite_metadata_is_refused(metadata: dict[str, Any]) -> None:
    with pytest.raises(InvalidUserContext, match=r"metadata must be JSON-serialisable.*not finite"):
        UserContext(user_id="alice", metadata=metadata)


@pytest.mark.parametrize("key", ID_FIELDS)
def test_metadata_key_may_not_shadow_an_id_field(key: str) -> None:
    with pytest.raises(InvalidUserContext, match=rf"metadata key '{key}' would shadow"):
        UserContext(user_id="alice", metadata={key: "x"})


def test_metadata_too_large_is_refused() -> None:
    with pytest.raises(
        InvalidUserContext, match=rf"metadata must encode to at most {MAX_METADATA_BYTES} bytes"
    ):
        UserContext(user_id="alice", metadata={"blob": "x" * MAX_METADATA_BYTES})


def test_metadata_just_under_the_limit_is_accepted() -> None:
    # {"blob":"..."} adds 11 bytes of JSON around the value.
    blob = "x" * (MAX_METADATA_BYTES - 11)
    ctx = UserContext(user_id="alice", metadata={"blob": blob})
    assert ctx.metadata["blob"] == blob


def test_metadata_is_read_only_and_copied() -> None:
    source = {"tenant": "acme"}
    ctx = UserContext(user_id="alice", metadata=source)
    with pytest.raises(TypeError):
        ctx.metadata["tenant"] = "evil"  # type: ignore[index]
    with pytest.raises(TypeError):
        del ctx.metadata["tenant"]  # type: ignore[attr-defined]
    source["tenant"] = "changed"
    assert ctx.metadata["tenant"] == "acme"


def test_metadata_does_not_affect_equality() -> None:
    first = UserContext(user_id="alice", request_id="r", metadata={"a": 1})
    second = UserContext(user_id="alice", request_id="r", metadata={"a": 2})
    assert first == second
    assert hash(first) == hash(second)


# ---- properties ------------------------------------------------------------------------------

ANY_TEXT = st.one_of(
    st.text(max_size=140),
    st.text(alphabet="AZaz09_.:@+-/ \n", max_size=140),
    st.sampled_from(sorted(PLACEHOLDER_IDS)).map(lambda s: f" {s.upper()} "),
)


@given(field=st.sampled_from(ID_FIELDS), value=ANY_TEXT)
def test_any_text_validates_or_raises_invalid_user_context(field: str, value: str) -> None:
    outcome: UserContext | InvalidUserContext
    try:
        outcome = build(field, value)
    except InvalidUserContext as exc:
        outcome = exc
    if isinstance(outcome, InvalidUserContext):
        assert field in str(outcome)
        return
    accepted = getattr(outcome, field)
    assert accepted == value
    assert ID_PATTERN.fullmatch(accepted)
    assert accepted.strip().lower() not in PLACEHOLDER_IDS


@given(value=st.text(alphabet="ABCXYZabcnoluldefinxyz0189_.:@+-", min_size=1, max_size=128))
def test_every_id_in_the_charset_is_accepted_unless_a_placeholder(value: str) -> None:
    if value.lower() in PLACEHOLDER_IDS:
        with pytest.raises(InvalidUserContext, match="placeholder"):
            UserContext(user_id=value)
    else:
        assert UserContext(user_id=value).user_id == value

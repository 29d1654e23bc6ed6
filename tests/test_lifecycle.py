"""The terminal-event decision, synchronously: how a body ended -> which event ends the run."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from agentcast import EventType, InvalidEvent
from agentcast._lifecycle import Terminal, decide_terminal


class Cancelled(BaseException):
    """Stands for an event loop's cancellation exception."""


def decide(**overrides: Any) -> Terminal:
    arguments: dict[str, Any] = {
        "body_error": None, "cancelled_caught": False, "cancel_reason": None,
        "result": None, "duration_ms": 1.5, "message_limit": 10, "cancelled_type": Cancelled,
    }
    arguments.update(overrides)
    return decide_terminal("run-1", **arguments)


def test_a_normal_end_completes_with_the_result_and_duration() -> None:
    terminal = decide(result={"a": [1]})
    assert terminal.event.type == EventType.AGENT_COMPLETED
    assert terminal.event.data == {"result": {"a": [1]}, "duration_ms": 1.5}
    assert terminal.event.run_id == "run-1"
    assert terminal.raise_after is None


def test_a_result_that_is_not_event_data_is_an_error_raised_after_publishing() -> None:
    terminal = decide(result=object())
    assert terminal.event.type == EventType.AGENT_ERROR
    assert terminal.event.data["error_type"] == "InvalidEvent"
    assert isinstance(terminal.raise_after, InvalidEvent)
    assert "run.result" in str(terminal.raise_after)


def test_an_exception_is_an_error_with_its_type_and_trimmed_message() -> None:
    terminal = decide(body_error=ValueError("x" * 50))
    assert terminal.event.type == EventType.AGENT_ERROR
    assert terminal.event.data == {"error_type": "ValueError", "message": "x" * 10}
    assert terminal.raise_after is None


def test_a_scope_cancellation_is_cancelled_with_the_runs_reason() -> None:
    assert decide(cancelled_caught=True, cancel_reason="stop").event.data == {"reason": "stop"}
    assert decide(cancelled_caught=True).event.data == {"reason": "cancelled"}


def test_other_base_exceptions_are_cancelled_and_named() -> None:
    terminal = decide(body_error=KeyboardInterrupt())
    assert terminal.event.type == EventType.AGENT_CANCELLED
    assert terminal.event.data == {"reason": "KeyboardInterrupt"}


leaf_errors = st.sampled_from([ValueError("v"), KeyError("k"), RuntimeError("r")])
leaf_cancels = st.builds(Cancelled)


def groups(leaves: st.SearchStrategy[BaseException]) -> st.SearchStrategy[BaseException]:
    return st.recursive(
        leaves,
        lambda inner: st.lists(inner, min_size=1, max_size=3).map(
            lambda items: BaseExceptionGroup("g", items)
        ),
        max_leaves=6,
    )


@given(groups(st.one_of(leaf_errors, leaf_cancels)), st.booleans())
def test_any_real_error_in_a_group_wins_over_cancellations(
    error: BaseException, caught: bool
) -> None:
    terminal = decide(body_error=error, cancelled_caught=caught, cancel_reason="why")

    def leaves(exc: BaseException) -> list[BaseException]:
        if isinstance(exc, BaseExceptionGroup):
            return [leaf for inner in exc.exceptions for leaf in leaves(inner)]
        return [exc]

    errors = [leaf for leaf in leaves(error) if isinstance(leaf, Exception)]
    if errors:
        assert terminal.event.type == EventType.AGENT_ERROR
        assert terminal.event.data["error_type"] == type(errors[0]).__name__
    else:
        assert terminal.event.type == EventType.AGENT_CANCELLED
        assert terminal.event.data == {"reason": "why"}
    assert terminal.raise_after is None


@pytest.mark.parametrize("limit", [0, 3])
def test_the_message_limit_applies_to_error_messages(limit: int) -> None:
    terminal = decide(body_error=ValueError("abcdef"), message_limit=limit)
    assert terminal.event.data["message"] == "abcdef"[:limit]

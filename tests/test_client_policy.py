"""The client decisions (``agentcast.client._policy``), synchronously, and the same tables in
the browser client (``clients/js/agentcast.js``, read through Node)."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest

from agentcast.client._policy import (
    BACKOFF,
    CLOSE_POLICY,
    DEFAULT_CLOSE_ACTION,
    AckDecision,
    Action,
    EventDecision,
    ack_decision,
    backoff_delay,
    close_action,
    event_decision,
    handshake_action,
)

JS = Path(__file__).resolve().parent.parent / "clients" / "js" / "agentcast.js"


@pytest.mark.parametrize("code", [1000, 1002, 1003, 1007, 1008, 1009, 4003])
def test_codes_that_are_never_retried(code: int) -> None:
    assert close_action(code, can_refresh=True) is Action.STOP


@pytest.mark.parametrize("code", [1001, 1006, 1011, 1012, 4008, 4999])
def test_codes_that_resume(code: int) -> None:
    assert close_action(code, can_refresh=False) is Action.RESUME


def test_4001_refreshes_only_with_a_token_source_and_4029_throttles() -> None:
    assert close_action(4001, can_refresh=True) is Action.REFRESH
    assert close_action(4001, can_refresh=False) is Action.STOP
    assert close_action(4029, can_refresh=False) is Action.THROTTLE
    assert handshake_action(401, can_refresh=True) is Action.REFRESH
    assert handshake_action(401, can_refresh=False) is Action.STOP
    assert handshake_action(429, can_refresh=False) is Action.THROTTLE
    assert handshake_action(503, can_refresh=False) is Action.RESUME
    assert handshake_action(403, can_refresh=True) is Action.STOP


def test_backoff_doubles_keeps_half_is_capped_and_throttles_longer() -> None:
    assert backoff_delay(0, Action.RESUME, 0.0) == BACKOFF.initial / 2
    assert backoff_delay(3, Action.RESUME, 0.0) == BACKOFF.initial * 8 / 2
    assert backoff_delay(3, Action.RESUME, 0.999) < BACKOFF.initial * 8
    assert backoff_delay(60, Action.RESUME, 0.0) == BACKOFF.max / 2
    assert backoff_delay(60, Action.RESUME, 0.999999) <= BACKOFF.max
    assert backoff_delay(0, Action.THROTTLE, 0.0) == BACKOFF.throttle_initial / 2


def test_event_decisions() -> None:
    assert event_decision(4, 5, {}) is EventDecision.APPLY
    assert event_decision(4, 4, {}) is EventDecision.DUPLICATE
    assert event_decision(4, 7, {}) is EventDecision.GAP
    assert event_decision(4, 9, {"from_seq": 5}) is EventDecision.APPLY
    assert event_decision(4, 9, {"from_seq": 6}) is EventDecision.GAP
    # Overlapping (from_seq <= last < seq): never applied twice; subscribe again from 4.
    assert event_decision(4, 9, {"from_seq": 3}) is EventDecision.GAP
    assert event_decision(4, 5, {"from_seq": True}) is EventDecision.APPLY  # not a number


def test_ack_decisions_and_runs_in_progress_rebuilt_once() -> None:
    ack = {"seq": 12, "epoch": "e", "recovered": True}
    assert ack_decision(8, ack) == AckDecision("resumed", 8, None)
    assert ack_decision(8, {**ack, "recovered": False}) == AckDecision("resync", 12, None)
    assert ack_decision(None, {**ack, "recovered": False}) == AckDecision("fresh", 12, None)
    running = {**ack, "recovered": False,
               "active_runs": [{"run_id": "r2", "first_seq": 9}, {"run_id": "r1", "first_seq": 4}]}
    assert ack_decision(None, running) == AckDecision("fresh", 3, 3)
    assert ack_decision(1, running) == AckDecision("resync", 3, 3)
    assert ack_decision(3, running, rebuilding=True) == AckDecision("resync", 12, None)
    assert ack_decision(None, {**running, "active_runs": "junk"}) == AckDecision("fresh", 12, None)


def test_the_browser_client_has_the_same_tables() -> None:
    node = shutil.which("node")
    assert node is not None, "Node (>= 20) is needed for the browser client; .ci/run uses it"
    script = (
        f"import({json.dumps(JS.as_uri())}).then((m) => console.log(JSON.stringify({{" +
        "policy: m.CLOSE_POLICY, fallback: m.DEFAULT_CLOSE_ACTION, backoff: m.BACKOFF,"
        "acks: [m.ackDecision({seq: 8, epoch: 'e'}, {seq: 12, epoch: 'e', recovered: true}),"
        " m.ackDecision(null, {seq: 12, epoch: 'e', recovered: false,"
        "  active_runs: [{run_id: 'r', first_seq: 4}]})],"
        "events: [m.eventDecision(4, {seq: 9, data: {from_seq: 6}}),"
        " m.eventDecision(4, {seq: 4, data: {}})]})))"
    )
    result = subprocess.run([node, "--input-type=module", "-e", script], capture_output=True,
                            text=True, timeout=30, check=True)
    js = json.loads(result.stdout)
    assert {int(code): action for code, action in js["policy"].items()} == {
        code: action.value for code, action in CLOSE_POLICY.items()
    }
    assert js["fallback"] == DEFAULT_CLOSE_ACTION.value
    assert js["backoff"] == {
        "initial": BACKOFF.initial * 1000, "throttleInitial": BACKOFF.throttle_initial * 1000,
        "max": BACKOFF.max * 1000, "stableAfter": BACKOFF.stable_after * 1000,
    }
    assert js["acks"] == [
        {"kind": "resumed", "seq": 8, "rebuildFrom": None},
        {"kind": "fresh", "seq": 3, "rebuildFrom": 3},
    ]
    assert js["events"] == ["gap", "duplicate"]

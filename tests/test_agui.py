"""AG-UI: the pure translator (every emitted event validated with the ``ag-ui-protocol``
models, a test-only dependency) and ``agentcast.agui`` over a real loopback server.

Real-socket tests: port 0, every wait under ``trio.fail_after``, the server's leak checks
(``serverkit.serving``) at the end.
"""

from __future__ import annotations

import json
from typing import Any

import orjson
import trio
from ag_ui.core import Event
from pydantic import TypeAdapter
from trio_websocket import open_websocket_url

from agentcast import AgentEvent, Config
from agentcast._events import encode_envelope
from agentcast.protocols import AGUI_SUBPROTOCOL
from agentcast.protocols.agui import (
    MAX_TRACKED_RUNS,
    MAX_TRACKED_THREADS,
    AguiTranslator,
    input_to_native,
    last_user_text,
)
from agentcast.server import issue_token
from agentcast.server._settings import ServerSettings

from .gated_agent import GatedAgent
from .serverkit import serving

EVENTS: TypeAdapter[Any] = TypeAdapter(Event)
SECRET = "a-test-secret-that-is-long-enough-for-hs256"


def validated(events: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Every event parses as an AG-UI ``Event``; returned unchanged for further checks."""
    for event in events:
        EVENTS.validate_python(event)
    return events


def envelope(seq: int, kind: str, data: dict[str, Any], run: str | None = "r-1") -> str:
    return encode_envelope(AgentEvent(kind, data, run_id=run), thread_id="t-1", seq=seq, ts=1.0)


ACK = orjson.dumps(
    {"type": "subscribed", "thread_id": "t-1", "seq": 0, "epoch": "e-1", "recovered": False}
).decode()

RUN = [
    envelope(1, "agent_started", {"agent_name": "demo"}),
    envelope(2, "agent_thinking", {"text": "reading", "step": 1, "progress": 0.2}),
    envelope(3, "agent_text", {"text": "Hello "}),
    envelope(4, "tool_executing",
             {"tool_name": "search", "arguments": {"q": "x"}, "tool_call_id": "call-a"}),
    envelope(5, "tool_executing",
             {"tool_name": "search", "arguments": {"q": "y"}, "tool_call_id": "call-b"}),
    envelope(6, "tool_completed", {"tool_name": "search", "result": {"hits": 2},
                                   "duration_ms": 3, "ok": True, "tool_call_id": "call-b"}),
    envelope(7, "tool_completed", {"tool_name": "search", "result": "none",
                                   "duration_ms": 4, "ok": False, "tool_call_id": "call-a"}),
    envelope(8, "agent_text", {"text": "world"}),
    envelope(9, "agent_completed", {"result": {"answer": 42}, "duration_ms": 12}),
]


def test_a_run_maps_onto_agui_events_with_seq_and_epoch() -> None:
    translator = AguiTranslator()
    events = validated(translator.translate(ACK) + translator.translate("\n".join(RUN)))
    assert [event["type"] for event in events] == [
        "CUSTOM", "RUN_STARTED", "ACTIVITY_SNAPSHOT", "TEXT_MESSAGE_START",
        "TEXT_MESSAGE_CONTENT", "TOOL_CALL_START", "TOOL_CALL_ARGS", "TOOL_CALL_END",
        "TOOL_CALL_START", "TOOL_CALL_ARGS", "TOOL_CALL_END", "TOOL_CALL_RESULT",
        "TOOL_CALL_RESULT", "TEXT_MESSAGE_CONTENT", "TEXT_MESSAGE_END", "RUN_FINISHED",
    ]
    assert events[0]["name"] == "agentcast.subscribed"
    assert events[0]["value"] == {"thread_id": "t-1", "seq": 0, "epoch": "e-1",
                                  "recovered": False}
    for event in events[1:]:
        assert event["metadata"]["epoch"] == "e-1"
        assert event["metadata"]["thread_id"] == "t-1"
    assert [event["metadata"]["seq"] for event in events[1:]] == [
        1, 2, 3, 3, 4, 4, 4, 5, 5, 5, 6, 7, 8, 9, 9,
    ]
    started, finished = events[1], events[-1]
    assert (started["threadId"], started["runId"]) == ("t-1", "r-1")
    assert finished["outcome"] == {"type": "success"}
    assert finished["result"] == {"answer": 42}
    # One synthesised messageId per run; tool calls paired by tool_call_id, not by name.
    assert {e["messageId"] for e in events if e["type"].startswith("TEXT_")} == {"r-1.text"}
    results = {e["toolCallId"]: e for e in events if e["type"] == "TOOL_CALL_RESULT"}
    assert json.loads(results["call-b"]["content"]) == {"hits": 2}
    assert results["call-a"]["content"] == "none"
    assert results["call-a"]["metadata"]["ok"] is False
    args = [e for e in events if e["type"] == "TOOL_CALL_ARGS"]
    assert [(e["toolCallId"], json.loads(e["delta"])) for e in args] == [
        ("call-a", {"q": "x"}), ("call-b", {"q": "y"}),
    ]
    assert events[2]["content"] == {"text": "reading", "step": 1, "progress": 0.2}


def test_cancelled_and_failed_runs() -> None:
    cancelled = AguiTranslator().translate("\n".join([
        envelope(1, "agent_started", {"agent_name": "demo"}),
        envelope(2, "agent_text", {"text": "par"}),
        envelope(3, "agent_cancelled", {"reason": "cancelled by client"}),
    ]))
    validated(cancelled)
    assert [e["type"] for e in cancelled][-2:] == ["TEXT_MESSAGE_END", "RUN_FINISHED"]
    assert cancelled[-1]["outcome"] == {"type": "cancelled"}
    assert cancelled[-1]["metadata"]["reason"] == "cancelled by client"
    failed = validated(AguiTranslator().translate("\n".join([
        envelope(1, "agent_started", {"agent_name": "demo"}),
        envelope(2, "agent_error", {"error_type": "ValueError", "message": "boom"}),
    ])))
    assert failed[-1] == {
        "type": "RUN_ERROR", "message": "boom", "code": "ValueError",
        "metadata": {"thread_id": "t-1", "seq": 2, "epoch": None},
    }


def test_a_resumed_stream_is_valid_on_its_own() -> None:
    """After a resume from seq 4 the stream starts mid-run: RUN_STARTED is synthesised
    (marked) with the seq of the event that caused it, and text opens again."""
    translator = AguiTranslator()
    ack = ACK.replace('"seq":0', '"seq":9').replace("false", "true")
    events = validated(translator.translate(ack) + translator.translate("\n".join(RUN[4:])))
    assert events[1]["type"] == "RUN_STARTED"
    assert events[1]["metadata"] == {"thread_id": "t-1", "seq": 5, "epoch": "e-1",
                                     "synthetic": True}
    assert [e["type"] for e in events].count("TEXT_MESSAGE_START") == 1
    assert events[-1]["type"] == "RUN_FINISHED"


def test_a_compacted_replay_frame_is_one_content_carrying_from_seq() -> None:
    """A replay's span of deltas 3..8 (``data.from_seq``) is one TEXT_MESSAGE_CONTENT whose
    metadata says the seqs it covers: seq the last, from_seq the first."""
    translator = AguiTranslator()
    ack = ACK.replace('"seq":0', '"seq":9').replace("false", "true")
    span = envelope(8, "agent_text", {"text": "Hello world", "from_seq": 3})
    events = validated(translator.translate(ack) + translator.translate(
        "\n".join([RUN[0], span, RUN[8]])
    ))
    contents = [e for e in events if e["type"] == "TEXT_MESSAGE_CONTENT"]
    assert [(e["delta"], e["metadata"]["seq"], e["metadata"]["from_seq"]) for e in contents] == [
        ("Hello world", 8, 3)
    ]
    # A live (uncompacted) delta carries no from_seq.
    live = AguiTranslator().translate(RUN[2])
    assert "from_seq" not in next(
        e for e in live if e["type"] == "TEXT_MESSAGE_CONTENT"
    )["metadata"]


def test_control_frames_and_custom_events_become_custom() -> None:
    translator = AguiTranslator()
    events = validated(translator.translate("\n".join([
        '{"type":"error","code":"bad_json","message":"frame is not valid JSON"}',
        '{"type":"heartbeat"}',
        envelope(1, "system_notice", {"message": "maintenance"}, run=None),
        envelope(2, "progress_report", {"percent": 5}),
    ])))
    assert [(e["type"], e["name"]) for e in events if e["type"] == "CUSTOM"] == [
        ("CUSTOM", "agentcast.error"), ("CUSTOM", "agentcast.heartbeat"),
        ("CUSTOM", "agentcast.system_notice"), ("CUSTOM", "agentcast.progress_report"),
    ]
    assert events[0]["value"]["code"] == "bad_json"


def test_empty_text_is_not_an_empty_delta() -> None:
    events = validated(AguiTranslator().translate(envelope(1, "agent_text", {"text": ""})))
    assert [e["type"] for e in events] == ["RUN_STARTED"]


def test_unfinished_runs_are_bounded() -> None:
    translator = AguiTranslator()
    for index in range(MAX_TRACKED_RUNS + 10):
        translator.translate(envelope(index + 1, "agent_started", {"agent_name": "a"},
                                      run=f"r-{index}"))
    assert len(translator._runs) == MAX_TRACKED_RUNS
    assert "r-0" not in translator._runs


def test_remembered_epochs_are_bounded() -> None:
    translator = AguiTranslator()
    for index in range(MAX_TRACKED_THREADS + 5):
        translator.translate(ACK.replace("t-1", f"t-{index}"))
    assert len(translator._epochs) == MAX_TRACKED_THREADS


def test_run_agent_input_becomes_subscribe_and_user_message() -> None:
    run_input = {
        "threadId": "t-9", "runId": "client-run", "state": {}, "tools": [], "context": [],
        "forwardedProps": {},
        "messages": [
            {"id": "1", "role": "user", "content": "first"},
            {"id": "2", "role": "assistant", "content": "ok"},
            {"id": "3", "role": "user", "content": [{"type": "text", "text": "second"}]},
        ],
    }
    frames = [json.loads(frame) for frame in input_to_native(json.dumps(run_input))]
    assert frames == [
        {"type": "subscribe", "thread_id": "t-9"},
        {"type": "user_message", "thread_id": "t-9", "text": "second"},
    ]
    # Native frames (a resume, a cancel) and garbage pass through for the native parser.
    for other in ('{"type":"cancel_run","run_id":"r"}', "not json threadId", b"\x00"):
        assert input_to_native(other) == [other]
    assert last_user_text([{"role": "assistant", "content": "x"}]) is None


SETTINGS = ServerSettings(
    port=0, secret=SECRET, demo=True, demo_speed=200.0, handshake_timeout=5.0,
    core=Config(shutdown_timeout=2.0),
)


async def read_agui(ws: Any) -> list[dict[str, Any]]:
    """One message of an ``agentcast.agui`` connection: NDJSON, one AG-UI event a line."""
    message = await ws.get_message()
    return validated([json.loads(line) for line in message.split("\n")])


async def test_agui_websocket_streams_a_demo_run_and_resumes_exactly() -> None:
    async with serving(SETTINGS) as served:
        url = f"ws://127.0.0.1:{served.running.port}/ws?token={issue_token(SECRET, 'alice')}"
        seen: list[dict[str, Any]] = []
        with trio.fail_after(20):
            async with open_websocket_url(url, subprotocols=[AGUI_SUBPROTOCOL]) as ws:
                assert ws.subprotocol == AGUI_SUBPROTOCOL
                await ws.send_message(json.dumps({
                    "threadId": "t-agui", "runId": "x", "state": {}, "tools": [],
                    "context": [], "forwardedProps": {},
                    "messages": [{"id": "m1", "role": "user", "content": "what is trio?"}],
                }))
                while not any(e["type"] == "TEXT_MESSAGE_CONTENT" for e in seen):
                    seen.extend(await read_agui(ws))
            # Dropped mid-answer; resume from the last seq seen, exactly as on the native
            # protocol, on a new connection.
            last = max(e["metadata"]["seq"] for e in seen if "metadata" in e)
            epoch = next(e["metadata"]["epoch"] for e in seen if "metadata" in e)
            rest: list[dict[str, Any]] = []
            async with open_websocket_url(url, subprotocols=[AGUI_SUBPROTOCOL]) as ws:
                await ws.send_message(json.dumps(
                    {"type": "subscribe", "thread_id": "t-agui", "since_seq": last,
                     "epoch": epoch}
                ))
                while not any(e["type"] == "RUN_FINISHED" for e in rest):
                    rest.extend(await read_agui(ws))
        ack = rest[0]
        assert ack["name"] == "agentcast.subscribed"
        assert ack["value"]["recovered"] is True
        # Continuity, with compacted replay frames: each frame's events carry its seq, and
        # a frame covers from_seq (when present) .. seq, starting right after the last one.
        covered, frames = last, 0
        for event in rest[1:]:
            meta = event["metadata"]
            if meta.get("synthetic") or meta["seq"] == covered:
                continue  # the synthesised RUN_STARTED, or another event of the same frame
            assert meta.get("from_seq", meta["seq"]) == covered + 1
            assert meta["seq"] >= covered + 1
            covered, frames = meta["seq"], frames + 1
        assert frames > 0
        assert covered == rest[-1]["metadata"]["seq"]
        assert rest[-1]["outcome"] == {"type": "success"}
        text = "".join(e["delta"] for e in seen + rest if e["type"] == "TEXT_MESSAGE_CONTENT")
        assert text.startswith("I found 3 sources")
        # Nothing lost or doubled across the drop: the text is the run's whole answer.
        assert text.strip() == rest[-1]["result"]["answer"]


async def test_agui_cancel_ends_the_run_with_outcome_cancelled() -> None:
    gated = GatedAgent()
    async with serving(SETTINGS, message_handler=gated.handler) as served:
        url = f"ws://127.0.0.1:{served.running.port}/ws?token={issue_token(SECRET, 'bob')}"
        events: list[dict[str, Any]] = []
        with trio.fail_after(20):
            async with open_websocket_url(url, subprotocols=[AGUI_SUBPROTOCOL]) as ws:
                await ws.send_message(json.dumps({
                    "threadId": "t-c", "runId": "x",
                    "messages": [{"id": "m1", "role": "user", "content": "long question"}],
                }))
                while not any(e["type"] == "TEXT_MESSAGE_CONTENT" for e in events):
                    events.extend(await read_agui(ws))
                run_id = next(e["runId"] for e in events if e["type"] == "RUN_STARTED")
                await ws.send_message(json.dumps({"type": "cancel_run", "run_id": run_id}))
                while not any(e["type"] in ("RUN_FINISHED", "RUN_ERROR") for e in events):
                    events.extend(await read_agui(ws))
        assert [e["type"] for e in events][-2:] == ["TEXT_MESSAGE_END", "RUN_FINISHED"]
        assert events[-1]["outcome"] == {"type": "cancelled"}
        assert not gated.gate.is_set()


async def test_agui_bad_input_gets_an_error_event_and_the_connection_goes_on() -> None:
    async with serving(SETTINGS) as served:
        url = f"ws://127.0.0.1:{served.running.port}/ws?token={issue_token(SECRET, 'carol')}"
        with trio.fail_after(20):
            async with open_websocket_url(url, subprotocols=[AGUI_SUBPROTOCOL]) as ws:
                await ws.send_message('{"threadId": "t", "messages": "nope"}')
                await ws.send_message("{not json")
                errors: list[dict[str, Any]] = []
                while [e["name"] for e in errors].count("agentcast.error") < 2:
                    errors.extend(await read_agui(ws))
                await ws.send_message('{"type":"ping","id":7}')
                while True:
                    pong = await read_agui(ws)
                    if pong[-1]["name"] == "agentcast.pong":
                        break
        codes = [e["value"]["code"] for e in errors if e["name"] == "agentcast.error"]
        assert codes == ["invalid_field", "bad_json"]
        assert pong[-1]["value"] == {"id": 7}

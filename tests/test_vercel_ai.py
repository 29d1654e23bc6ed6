"""The Vercel AI SDK's WebSocketChatTransport framing: the pure translator, then
``agentcast.vercel-ai`` over a real loopback server (port 0, bounded waits, leak checks).
The real ``ai`` transport from npm is driven in ``clients/agui-test`` (see .ci/run)."""

from __future__ import annotations

import json
from typing import Any

import trio
from trio_websocket import open_websocket_url

from agentcast import AgentEvent, Config
from agentcast._events import encode_envelope
from agentcast.protocols import VERCEL_SUBPROTOCOL
from agentcast.protocols.vercel_ai import MAX_REQUESTS, VercelTranslator
from agentcast.server import issue_token
from agentcast.server._settings import ServerSettings

from .gated_agent import GatedAgent
from .serverkit import serving

SECRET = "a-test-secret-that-is-long-enough-for-hs256"


def envelope(seq: int, kind: str, data: dict[str, Any], run: str = "r-1") -> str:
    return encode_envelope(AgentEvent(kind, data, run_id=run), thread_id="chat-1", seq=seq, ts=1.0)


def ack(seq: int, *, recovered: bool) -> str:
    return json.dumps({"type": "subscribed", "thread_id": "chat-1", "seq": seq, "epoch": "e",
                       "recovered": recovered})


def send_frame(request_id: str = "q1", text: str = "hi") -> str:
    return json.dumps({
        "type": "send", "requestId": request_id, "id": "chat-1", "trigger": "submit-message",
        "messageId": None, "headers": {}, "body": {}, "metadata": None,
        "messages": [{"id": "u1", "role": "user", "parts": [{"type": "text", "text": text}]}],
    })


RUN = [
    envelope(1, "agent_started", {"agent_name": "demo"}),
    envelope(2, "agent_thinking", {"text": "hmm"}),
    envelope(3, "tool_executing",
             {"tool_name": "search", "arguments": {"q": 1}, "tool_call_id": "c1"}),
    envelope(4, "tool_completed", {"tool_name": "search", "result": [1], "duration_ms": 1,
                                   "ok": True, "tool_call_id": "c1"}),
    envelope(5, "agent_text", {"text": "Hel"}),
    envelope(6, "agent_text", {"text": "lo"}),
    envelope(7, "agent_completed", {"result": "Hello", "duration_ms": 9}),
]


def frames(translator: VercelTranslator, *messages: str) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    for message in messages:
        out.extend(json.loads(text) for text in translator.downstream(message))
    return out


def test_send_maps_to_subscribe_and_user_message_and_the_run_to_chunks() -> None:
    translator = VercelTranslator()
    native = [json.loads(frame) for frame in translator.upstream(send_frame())]
    assert native == [
        {"type": "subscribe", "thread_id": "chat-1"},
        {"type": "user_message", "thread_id": "chat-1", "text": "hi"},
    ]
    out = frames(translator, ack(0, recovered=False), '{"type":"heartbeat"}', "\n".join(RUN))
    assert [f["type"] for f in out] == ["chunk"] * 11 + ["end"]
    assert [f["sequence"] for f in out[:-1]] == list(range(11))
    assert {f["requestId"] for f in out} == {"q1"}
    assert [f["chunk"]["type"] for f in out[:-1]] == [
        "start", "reasoning-start", "reasoning-delta", "reasoning-end", "tool-input-available",
        "tool-output-available", "text-start", "text-delta", "text-delta", "text-end", "finish",
    ]
    assert out[4]["chunk"] == {"type": "tool-input-available", "toolCallId": "c1",
                               "toolName": "search", "input": {"q": 1}}
    assert out[5]["chunk"] == {"type": "tool-output-available", "toolCallId": "c1",
                               "output": [1]}
    # Finished: later events of the thread go nowhere.
    assert translator.downstream(envelope(8, "agent_started", {"agent_name": "d"}, "r-2")) == []


def test_resume_replays_the_active_run_from_its_start_after_last_sequence() -> None:
    translator = VercelTranslator()
    native = translator.upstream(json.dumps(
        {"type": "resume", "requestId": "q2", "id": "chat-1", "lastSequence": 6}
    ))
    assert json.loads(native[0]) == {
        "type": "subscribe", "thread_id": "chat-1", "since_seq": 0, "compact": False,
    }
    older = [envelope(1, "agent_started", {"agent_name": "d"}, "r-0"),
             envelope(2, "agent_completed", {"result": 1, "duration_ms": 1}, "r-0")]
    replay = older + [e.replace('"seq":', '"seq":1') for e in RUN[:6]]  # seq 11..16
    out = frames(translator, ack(16, recovered=True), "\n".join(replay))
    assert out[0] == {"type": "start", "requestId": "q2"}
    assert [f["sequence"] for f in out[1:]] == [7, 8]  # text-delta "Hel", "lo"
    live = frames(translator, RUN[6].replace('"seq":7', '"seq":17'))
    assert [f.get("sequence") for f in live] == [9, 10, None]
    assert live[-1] == {"type": "end", "requestId": "q2"}


def test_resume_without_an_active_run_is_no_active_and_a_short_history_an_error() -> None:
    translator = VercelTranslator()
    translator.upstream(json.dumps({"type": "resume", "requestId": "q3", "id": "chat-1"}))
    out = frames(translator, ack(7, recovered=True), "\n".join(RUN))
    assert out == [{"type": "no-active", "requestId": "q3"}]
    translator.upstream(json.dumps({"type": "resume", "requestId": "q4", "id": "chat-1"}))
    assert frames(translator, ack(0, recovered=True)) == [{"type": "no-active",
                                                           "requestId": "q4"}]
    translator.upstream(json.dumps({"type": "resume", "requestId": "q5", "id": "chat-1"}))
    (error,) = frames(translator, ack(90, recovered=False))
    assert error["type"] == "error"
    assert error["requestId"] == "q5"
    assert "history" in error["errorText"]


def test_abort_cancels_the_run_and_a_cancelled_run_ends_with_abort() -> None:
    translator = VercelTranslator()
    translator.upstream(send_frame())
    frames(translator, RUN[0])
    assert [json.loads(f) for f in translator.upstream('{"type":"abort","requestId":"q1"}')] == [
        {"type": "cancel_run", "run_id": "r-1"}
    ]
    translator.upstream(send_frame("q9"))
    out = frames(translator, "\n".join([
        envelope(10, "agent_started", {"agent_name": "d"}, "r-9"),
        envelope(11, "agent_text", {"text": "x"}, "r-9"),
        envelope(12, "agent_cancelled", {"reason": "stop"}, "r-9"),
    ]))
    assert [f.get("chunk", {}).get("type") for f in out] == [
        "start", "text-start", "text-delta", "text-end", "abort", None,
    ]
    assert out[-1]["type"] == "end"


def test_refused_requests_are_answered_through_the_connection_as_errors() -> None:
    translator = VercelTranslator()
    (ping,) = translator.upstream(json.dumps({"type": "send", "requestId": "q1", "id": "chat-1",
                                              "messages": []}))
    pong = json.dumps({"type": "pong", "id": json.loads(ping)["id"]})
    (error,) = frames(translator, pong)
    assert error == {"type": "error", "requestId": "q1",
                     "errorText": "send needs a user message with a text part"}
    # A native error answers the request still waiting for its run.
    translator.upstream(send_frame("q2"))
    out = frames(translator, '{"type":"error","code":"too_many_runs","message":"at most 4"}')
    assert out == [{"type": "error", "requestId": "q2", "errorText": "too_many_runs: at most 4"}]
    # Garbage goes to the native parser unchanged; its error has no request to answer.
    assert translator.upstream("{nope") == ["{nope"]
    assert frames(translator, '{"type":"error","code":"bad_json","message":"x"}') == []


def test_hostile_frames_never_break_the_translator() -> None:
    translator = VercelTranslator()
    # A client's own ping with the reply key only echoes to itself; a non-object is ignored.
    assert frames(translator, '{"type":"pong","id":{"agentcast.vercel-ai":5}}') == []
    assert frames(translator, '{"type":"pong","id":{"agentcast.vercel-ai":{"x":1}}}') == [
        {"x": 1}
    ]
    # A requestId reused for another chat follows the new chat only.
    translator.upstream(send_frame("q1"))
    translator.upstream(send_frame("q1").replace("chat-1", "chat-2"))
    assert translator.downstream(RUN[0]) == []
    for bad in ('{"type":"send","requestId":7}', '{"type":"resume","requestId":"r","id":1}',
                '{"type":"resume","requestId":"r","id":"c","lastSequence":"x"}', "[]", b"\x00"):
        out = translator.upstream(bad)
        assert len(out) == 1
        if out[0] != bad:
            assert json.loads(out[0])["type"] == "ping"


def test_open_requests_are_bounded() -> None:
    translator = VercelTranslator()
    for index in range(MAX_REQUESTS):
        translator.upstream(send_frame(f"q{index}").replace("chat-1", f"chat-{index}"))
    (ping,) = translator.upstream(send_frame("one-more").replace("chat-1", "chat-x"))
    assert "at most" in json.loads(ping)["id"]["agentcast.vercel-ai"]["errorText"]


SETTINGS = ServerSettings(
    port=0, secret=SECRET, demo=True, demo_speed=200.0, handshake_timeout=5.0,
    core=Config(shutdown_timeout=2.0),
)


async def read_until(ws: Any, request_id: str, *types: str) -> list[dict[str, Any]]:
    """Frames of ``request_id`` until one of ``types`` (or a chunk of that type) arrives."""
    got: list[dict[str, Any]] = []
    while True:
        frame = json.loads(await ws.get_message())
        assert frame["requestId"] == request_id
        got.append(frame)
        if frame["type"] in types or frame.get("chunk", {}).get("type") in types:
            return got


async def test_vercel_websocket_chat_turn_and_resume_after_a_drop() -> None:
    gated = GatedAgent()
    async with serving(SETTINGS, message_handler=gated.handler) as served:
        url = f"ws://127.0.0.1:{served.running.port}/ws?token={issue_token(SECRET, 'alice')}"
        with trio.fail_after(20):
            async with open_websocket_url(url, subprotocols=[VERCEL_SUBPROTOCOL]) as ws:
                assert ws.subprotocol == VERCEL_SUBPROTOCOL
                await ws.send_message(send_frame("q1", "what is trio?"))
                first = await read_until(ws, "q1", "text-delta")
            # The socket dropped mid-answer; the transport resumes on a new one.
            async with open_websocket_url(url, subprotocols=[VERCEL_SUBPROTOCOL]) as ws:
                await ws.send_message(json.dumps(
                    {"type": "resume", "requestId": "q2", "id": "chat-1"}
                ))
                replayed = await read_until(ws, "q2", "text-delta")
                gated.gate.set()
                rest = await read_until(ws, "q2", "end")
        assert replayed[0] == {"type": "start", "requestId": "q2"}
        chunks = [f for f in replayed + rest if f["type"] == "chunk"]
        assert [f["sequence"] for f in chunks] == list(range(len(chunks)))
        # The replay gives the chunks the first request saw, with the same sequences.
        assert [(f["sequence"], f["chunk"]) for f in first] == [
            (f["sequence"], f["chunk"]) for f in chunks[:len(first)]
        ]
        assert [f["chunk"]["type"] for f in chunks] == [
            "start", "tool-input-available", "tool-output-available", "text-start",
            "text-delta", "text-delta", "text-end", "finish",
        ]
        text = "".join(f["chunk"]["delta"] for f in chunks if f["chunk"]["type"] == "text-delta")
        assert text == "Hello, world."


#: Deltas of the long run: half before the socket drops, half after.
DELTAS = 300


async def test_vercel_resume_mid_answer_of_many_deltas_rebuilds_exactly_the_text() -> None:
    """Compacted replays have fewer frames than the live stream: the translator's resume asks
    for ``compact: false`` so chunk sequences match and nothing is skipped or repeated."""
    gate, halfway = trio.Event(), trio.Event()

    async def agent(run: Any, text: str) -> str:
        for i in range(DELTAS):
            if i == DELTAS // 2:
                halfway.set()
                await gate.wait()
            await run.text(f"w{i} ")
        return "done"

    async def handle(session: Any, connection: Any, frame: dict[str, Any]) -> None:
        await trio.lowlevel.checkpoint()
        session.start_run(frame["thread_id"], agent, frame["text"], agent_name="long")

    async with serving(SETTINGS, message_handler=handle) as served:
        url = f"ws://127.0.0.1:{served.running.port}/ws?token={issue_token(SECRET, 'carol')}"
        with trio.fail_after(20):
            async with open_websocket_url(url, subprotocols=[VERCEL_SUBPROTOCOL]) as ws:
                await ws.send_message(send_frame("q1", "count"))
                first: list[dict[str, Any]] = []
                while len([f for f in first if f["chunk"]["type"] == "text-delta"]) < 40:
                    first += await read_until(ws, "q1", "text-delta")
            await halfway.wait()
            async with open_websocket_url(url, subprotocols=[VERCEL_SUBPROTOCOL]) as ws:
                await ws.send_message(json.dumps({
                    "type": "resume", "requestId": "q2", "id": "chat-1",
                    "lastSequence": first[-1]["sequence"],
                }))
                gate.set()
                rest = await read_until(ws, "q2", "end")
            manager = served.running.server.manager
            history = await manager.broker.recover("carol", "chat-1", 0, None)
        chunks = [f for f in first + rest if f["type"] == "chunk"]
        assert rest[0] == {"type": "start", "requestId": "q2"}
        assert [f["sequence"] for f in chunks] == list(range(len(chunks)))
        text = "".join(f["chunk"]["delta"] for f in chunks if f["chunk"]["type"] == "text-delta")
        assert text == "".join(f"w{i} " for i in range(DELTAS))
        # The server's (compacted) history holds the same text.
        stored = [json.loads(frame) for frame in history.frames]
        assert "".join(f["data"]["text"] for f in stored if f["type"] == "agent_text") == text
        assert any("from_seq" in f["data"] for f in stored if f["type"] == "agent_text")


async def test_vercel_abort_cancels_the_run() -> None:
    gated = GatedAgent()
    async with serving(SETTINGS, message_handler=gated.handler) as served:
        url = f"ws://127.0.0.1:{served.running.port}/ws?token={issue_token(SECRET, 'bob')}"
        with trio.fail_after(20):
            async with open_websocket_url(url, subprotocols=[VERCEL_SUBPROTOCOL]) as ws:
                await ws.send_message(send_frame("q1", "a long question"))
                await read_until(ws, "q1", "text-delta")
                await ws.send_message('{"type":"abort","requestId":"q1"}')
                # The aborted request gets nothing more; a resume shows its run has ended.
                session = served.running.server.manager.session("bob")
                assert session is not None
                while session.get_stats().active_runs:  # noqa: ASYNC110 - no event for it
                    await trio.sleep(0.005)
                await ws.send_message(json.dumps(
                    {"type": "resume", "requestId": "q2", "id": "chat-1"}
                ))
                answer = json.loads(await ws.get_message())
        assert answer == {"type": "no-active", "requestId": "q2"}
        assert not gated.gate.is_set()

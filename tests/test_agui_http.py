"""``POST /agui``: AG-UI's HttpAgent transport (a RunAgentInput in, the run's events as SSE out)
over a real loopback server: port 0, every wait bounded, the server's leak checks at the end.
The real ``@ag-ui/client`` HttpAgent is driven in ``clients/agui-test`` (see .ci/run)."""

from __future__ import annotations

import functools
import json
import socket
from typing import Any

import attrs
import trio
from ag_ui.core import Event
from pydantic import TypeAdapter
from trio_websocket import open_websocket_url

from agentcast import CloseCode, Config, MessageHandler, Run, UserSession
from agentcast.demo import simulated_agent
from agentcast.server import issue_token
from agentcast.server._settings import ServerSettings
from agentcast.server._sse import parse_last_event_id

from .gated_agent import GatedAgent
from .serverkit import serving

EVENTS: TypeAdapter[Any] = TypeAdapter(Event)
SECRET = "a-test-secret-that-is-long-enough-for-hs256"
SETTINGS = ServerSettings(
    port=0, secret=SECRET, demo=True, demo_speed=200.0, handshake_timeout=5.0,
    core=Config(shutdown_timeout=2.0),
)


def run_input(thread: str = "t-http", text: str = "what is trio?") -> dict[str, Any]:
    return {"threadId": thread, "runId": "client-run", "state": {}, "tools": [], "context": [],
            "forwardedProps": {}, "messages": [{"id": "m1", "role": "user", "content": text}]}


class SseStream:
    """A raw HTTP/1.1 POST whose answer is read event by event."""

    def __init__(self, stream: trio.SocketStream) -> None:
        self.stream = stream
        self.buffer = b""
        self.status = 0

    @classmethod
    async def post(cls, port: int, path: str, body: dict[str, Any], *headers: str) -> SseStream:
        stream = await trio.open_tcp_stream("127.0.0.1", port)
        data = json.dumps(body).encode()
        head = [f"POST {path} HTTP/1.1", "Host: x", "Content-Type: application/json",
                f"Content-Length: {len(data)}", "Accept: text/event-stream", *headers]
        await stream.send_all(("\r\n".join(head) + "\r\n\r\n").encode() + data)
        client = cls(stream)
        while b"\r\n\r\n" not in client.buffer:
            client.buffer += await client._receive()
        response_head, _, client.buffer = client.buffer.partition(b"\r\n\r\n")
        client.status = int(response_head.split()[1])
        return client

    async def _receive(self) -> bytes:
        data = await self.stream.receive_some(65536)
        if not data:
            raise EOFError
        return data

    async def body(self) -> Any:
        while True:
            try:
                self.buffer += await self._receive()
            except EOFError:
                return json.loads(self.buffer)

    async def event(self) -> tuple[str | None, dict[str, Any]] | None:
        """The next SSE event (id, data), validated as an AG-UI event; None at the end."""
        while b"\n\n" not in self.buffer:
            try:
                self.buffer += await self._receive()
            except EOFError:
                return None
        block, _, self.buffer = self.buffer.partition(b"\n\n")
        fields = dict(line.split(": ", 1) for line in block.decode().split("\n"))
        event = json.loads(fields["data"])
        EVENTS.validate_python(event)
        return fields.get("id"), event

    async def events(self) -> list[tuple[str | None, dict[str, Any]]]:
        got = []
        while (item := await self.event()) is not None:
            got.append(item)
        return got


def bearer(user: str) -> str:
    return f"Authorization: Bearer {issue_token(SECRET, user)}"


async def test_a_post_streams_the_run_as_sse_and_ends() -> None:
    async with serving(SETTINGS) as served:
        with trio.fail_after(20):
            sse = await SseStream.post(served.running.port, "/agui", run_input(), bearer("al"))
            assert sse.status == 200
            events = await sse.events()
            await sse.stream.aclose()
    types = [event["type"] for _, event in events]
    assert types[0] == "RUN_STARTED"
    assert types[-1] == "RUN_FINISHED"
    assert "TOOL_CALL_RESULT" in types
    assert "ACTIVITY_SNAPSHOT" in types
    ids = [parse_last_event_id(event_id) for event_id, _ in events]
    assert all(item is not None for item in ids)
    seqs = [item[0] for item in ids if item is not None]
    assert seqs == sorted(seqs)
    assert [event["metadata"]["seq"] for _, event in events] == seqs


async def test_last_event_id_resumes_a_dropped_stream_from_history() -> None:
    gated = GatedAgent()
    async with serving(SETTINGS, message_handler=gated.handler) as served:
        port = served.running.port
        with trio.fail_after(20):
            sse = await SseStream.post(port, "/agui", run_input(), bearer("bo"))
            first: list[tuple[str | None, dict[str, Any]]] = []
            while not any(event["type"] == "TEXT_MESSAGE_CONTENT" for _, event in first):
                item = await sse.event()
                assert item is not None
                first.append(item)
            await sse.stream.aclose()  # dropped mid-answer; the run goes on
            last_id = first[-1][0]
            resumed = await SseStream.post(
                port, "/agui", run_input(), bearer("bo"), f"Last-Event-ID: {last_id}"
            )
            # Nothing after Last-Event-ID until the agent goes on: let it.
            gated.gate.set()
            opened = await resumed.event()
            rest = await resumed.events()
            await resumed.stream.aclose()
    assert opened is not None
    assert opened[1]["type"] == "RUN_STARTED"
    assert opened[1]["metadata"]["synthetic"] is True
    text = "".join(e["delta"] for _, e in first + rest if e["type"] == "TEXT_MESSAGE_CONTENT")
    assert text == "Hello, world."
    assert [e["type"] for _, e in rest][-2:] == ["TEXT_MESSAGE_END", "RUN_FINISHED"]
    assert parse_last_event_id(rest[0][0])[0] == parse_last_event_id(last_id)[0] + 1  # type: ignore[index]


async def test_cancel_endpoint_ends_the_stream_with_outcome_cancelled() -> None:
    gated = GatedAgent()
    async with serving(SETTINGS, message_handler=gated.handler) as served:
        port = served.running.port
        with trio.fail_after(20):
            sse = await SseStream.post(port, "/agui", run_input(), bearer("cy"))
            started = await sse.event()
            assert started is not None
            run_id = started[1]["runId"]
            cancel = await SseStream.post(port, "/agui/cancel", {"runId": run_id}, bearer("cy"))
            assert (cancel.status, await cancel.body()) == (200, {"cancelled": True})
            await cancel.stream.aclose()
            rest = await sse.events()
            await sse.stream.aclose()
            other = await SseStream.post(port, "/agui/cancel", {"runId": run_id}, bearer("zed"))
            assert other.status == 404  # another user's run cannot be named
            await other.stream.aclose()
    assert rest[-1][1]["type"] == "RUN_FINISHED"
    assert rest[-1][1]["outcome"] == {"type": "cancelled"}


async def test_refusals_auth_method_body() -> None:
    async with serving(SETTINGS) as served:
        port = served.running.port
        with trio.fail_after(20):
            for headers, body, status in [
                ((), run_input(), 401),
                (("Authorization: Bearer forged",), run_input(), 401),
                ((bearer("dd"),), {"threadId": "t"}, 400),
                ((bearer("dd"),), {"messages": []}, 400),
                ((bearer("dd"), "Last-Event-ID: 3:nope"), {"threadId": "t-x"}, 200),
            ]:
                answer = await SseStream.post(port, "/agui", body, *headers)
                assert answer.status == status
                if status == 200:
                    # A resume the history cannot serve says so, and the stream ends.
                    (only,) = await answer.events()
                    assert only[1]["type"] == "RUN_ERROR"
                    assert only[1]["code"] == "resume_failed"
                await answer.stream.aclose()
            stream = await trio.open_tcp_stream("127.0.0.1", port)
            await stream.send_all(b"GET /agui HTTP/1.1\r\nHost: x\r\n\r\n")
            reply = b""
            while chunk := await stream.receive_some(65536):
                reply += chunk
            await stream.aclose()
            assert reply.startswith(b"HTTP/1.1 405")


async def flood_agent(run: Run, text: str) -> str:
    """Streams far more than any socket buffer holds, without waiting for anyone."""
    for _ in range(3000):
        await run.text("x" * 2000)
    return "flooded"


def flood_or_demo() -> MessageHandler:
    async def handle(session: UserSession, connection: Any, frame: dict[str, Any]) -> None:
        await trio.lowlevel.checkpoint()
        agent = flood_agent if frame["text"] == "flood" else functools.partial(
            simulated_agent, speed=200.0
        )
        session.start_run(frame["thread_id"], agent, frame["text"], agent_name="bench")

    return handle


async def test_a_client_that_stops_reading_is_cut_off_and_others_stream_on() -> None:
    settings = attrs.evolve(
        SETTINGS, http_write_timeout=1.0, core=Config(shutdown_timeout=2.0, write_timeout=1.0)
    )
    async with serving(settings, message_handler=flood_or_demo()) as served:
        port, manager = served.running.port, served.running.server.manager
        with trio.fail_after(20):
            # The attacker: a tiny receive buffer, reads the response head and stops reading.
            sock = trio.socket.socket(trio.socket.AF_INET, trio.socket.SOCK_STREAM)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            await sock.connect(("127.0.0.1", port))
            attacker = SseStream(trio.SocketStream(sock))
            body = json.dumps(run_input("t-flood", "flood")).encode()
            await attacker.stream.send_all(
                b"POST /agui HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                + f"{bearer('mallory')}\r\nContent-Length: {len(body)}\r\n\r\n".encode() + body
            )
            while b"\r\n\r\n" not in attacker.buffer:
                attacker.buffer += await attacker._receive()
            assert attacker.buffer.startswith(b"HTTP/1.1 200")
            while b"RUN_STARTED" not in attacker.buffer:  # its stream began; now it stops
                attacker.buffer += await attacker._receive()
            session = manager.session("mallory")
            assert session is not None
            (stuck,) = session.connections()
            # A bystander's run streams complete and in order meanwhile.
            url = f"ws://127.0.0.1:{port}/ws?token={issue_token(SECRET, 'bystander')}"
            events: list[dict[str, Any]] = []
            async with open_websocket_url(url) as ws:
                await ws.send_message('{"type":"subscribe","thread_id":"t-b"}')
                await ws.send_message('{"type":"user_message","thread_id":"t-b","text":"hi"}')
                while not events or events[-1]["type"] != "agent_completed":
                    frame = json.loads(await ws.get_message())
                    if "seq" in frame and frame["type"] != "subscribed":
                        events.append(frame)
            await stuck.wait_closed()  # cut by the write deadline or the full queue
            await attacker.stream.aclose()
    assert stuck.close_code in (CloseCode.SLOW_CONSUMER, 1006), stuck.close_code
    assert [event["seq"] for event in events] == list(range(1, len(events) + 1))


async def test_streams_count_against_the_per_user_connection_limit() -> None:
    gated = GatedAgent()
    settings = attrs.evolve(SETTINGS, max_connections_per_user=1)
    async with serving(settings, message_handler=gated.handler) as served:
        port = served.running.port
        with trio.fail_after(20):
            held = await SseStream.post(port, "/agui", run_input(), bearer("eve"))
            assert (await held.event()) is not None  # its connection is counted now
            refused = await SseStream.post(port, "/agui", run_input("t-2"), bearer("eve"))
            assert refused.status == 429
            assert "connections" in (await refused.body())["error"]
            await refused.stream.aclose()
            gated.gate.set()
            rest = await held.events()
            await held.stream.aclose()
    assert rest[-1][1]["type"] == "RUN_FINISHED"


def test_last_event_id_parsing() -> None:
    assert parse_last_event_id("12:ab34") == (12, "ab34")
    assert parse_last_event_id(" 0:e ") == (0, "e")
    for bad in (None, "", "12", "x:e", "-1:e", "12:", "9" * 19 + ":e"):
        assert parse_last_event_id(bad) is None


async def test_a_resume_after_the_run_ended_does_not_follow_the_next_run() -> None:
    async with serving(SETTINGS) as served:
        port = served.running.port
        with trio.fail_after(20):
            done = await SseStream.post(port, "/agui", run_input("t-e"), bearer("fay"))
            events = await done.events()
            await done.stream.aclose()
            finished_id = events[-1][0]
            resumed = await SseStream.post(
                port, "/agui", run_input("t-e"), bearer("fay"), f"Last-Event-ID: {finished_id}"
            )
            # Nothing after the id; then the thread's next run starts (another POST).
            again = await SseStream.post(port, "/agui", run_input("t-e"), bearer("fay"))
            (only,) = await resumed.events()
            await resumed.stream.aclose()
            assert (await again.events())[-1][1]["type"] == "RUN_FINISHED"
            await again.stream.aclose()
    assert only[1]["type"] == "RUN_ERROR"
    assert only[1]["code"] == "run_ended"

"""The ASGI examples under real servers: ``hypercorn -k trio`` (native) and ``uvicorn`` (the
threaded bridge), each a separate process on 127.0.0.1 port 0, driven by a ``websockets``
client. Stream, cancel, drop and resume with nothing lost, a refused handshake's status code,
SIGTERM, and two uvicorn workers sharing one Redis. Every wait is bounded by ``fail_after``.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import struct
import subprocess
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import attrs
import pytest
import trio
from websockets.exceptions import ConnectionClosed, InvalidStatus
from websockets.trio.client import ClientConnection, connect
from websockets.typing import Subprotocol

from .redis_server import RedisServer

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / "examples"
#: Seconds a server process may take to start, and any one test step.
START = 30
STEP = 20
LISTENING = re.compile(rb"[Rr]unning on http://127\.0\.0\.1:(\d+)")
TERMINAL = {"agent_completed", "agent_error", "agent_cancelled"}


@attrs.define
class ServerProcess:
    process: trio.Process
    port: int
    output: bytearray

    def url(self, path: str, token: str = "demo", user: str = "alice") -> str:
        return f"ws://127.0.0.1:{self.port}{path}?user={user}&token={token}"


def command(server: str, module: str, *extra: str) -> list[str]:
    if server == "hypercorn":
        return [sys.executable, "-m", "hypercorn", "--worker-class", "trio", "--bind",
                "127.0.0.1:0", "--graceful-timeout", "1", *extra, f"{module}:app"]
    return [sys.executable, "-m", "uvicorn", "--port", "0", "--timeout-graceful-shutdown", "1",
            *extra, f"{module}:app"]


async def _drain(stream: trio.abc.ReceiveStream, output: bytearray, port: list[int],
                 started: trio.Event, workers: int) -> None:
    while chunk := await stream.receive_some(65536):
        output += chunk
        found = LISTENING.search(output)
        # uvicorn prints its address before its workers listen: wait for each one's startup.
        # (hypercorn runs the lifespan startup before it binds and prints.)
        ready = workers == 0 or output.count(b"startup complete") >= workers
        if found and ready and not started.is_set():
            port.append(int(found.group(1)))
            started.set()


@asynccontextmanager
async def running(server: str, module: str, *extra: str,
                  env: dict[str, str] | None = None) -> AsyncIterator[ServerProcess]:
    """A server process with the example ``module``; its output is kept for assertions."""
    full_env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), **(env or {})}
    if server == "uvicorn":
        full_env["AGENTCAST_BRIDGE"] = "thread"
    process = await trio.lowlevel.open_process(
        command(server, module, *extra), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        env=full_env, cwd=EXAMPLES,
    )
    assert process.stdout is not None
    output = bytearray()
    port: list[int] = []
    started = trio.Event()
    try:
        async with trio.open_nursery() as nursery:
            workers = 0 if server == "hypercorn" else (
                int(extra[extra.index("--workers") + 1]) if "--workers" in extra else 1)
            nursery.start_soon(
                _drain, process.stdout, output, port, started, workers, name="drain"
            )
            with trio.fail_after(START):
                await started.wait()
            yield ServerProcess(process, port[0], output)
            if process.returncode is None:
                process.terminate()
            with trio.fail_after(STEP):
                await process.wait()
    finally:
        if process.returncode is None:
            process.kill()
            with trio.move_on_after(STEP):
                await process.wait()
        await process.stdout.aclose()


async def post_run(port: int, body: dict[str, Any]) -> dict[str, Any]:
    """``POST /runs`` as alice over a plain HTTP/1.1 connection."""
    payload = json.dumps(body).encode()
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    async with stream:
        await stream.send_all(
            b"POST /runs?user=alice&token=demo HTTP/1.1\r\nHost: 127.0.0.1\r\n"
            b"Content-Type: application/json\r\nConnection: close\r\n"
            + f"Content-Length: {len(payload)}\r\n\r\n".encode() + payload
        )
        answer = b""
        while not _complete(answer):
            chunk = await stream.receive_some(65536)
            assert chunk, f"the server closed before a whole response: {answer!r}"
            answer += chunk
    head, _, rest = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200"), answer
    if b"transfer-encoding: chunked" in head.lower():
        size, _, rest = rest.partition(b"\r\n")
        rest = rest[: int(size, 16)]
    result: dict[str, Any] = json.loads(rest)
    return result


def _complete(answer: bytes) -> bool:
    """Whether ``answer`` holds a whole response (Content-Length or chunked; some servers keep
    the connection open despite ``Connection: close``)."""
    head, found, rest = answer.partition(b"\r\n\r\n")
    if not found:
        return False
    length = re.search(rb"(?i)content-length: *(\d+)", head)
    if length:
        return len(rest) >= int(length.group(1))
    return rest.endswith(b"0\r\n\r\n")


async def frames(ws: ClientConnection) -> list[dict[str, Any]]:
    """The frames of the next message (a batched message holds several, one per line)."""
    message = await ws.recv()
    assert isinstance(message, str)
    return [json.loads(line) for line in message.split("\n")]


async def read_until(ws: ClientConnection, done: Any) -> list[dict[str, Any]]:
    seen: list[dict[str, Any]] = []
    while not seen or not done(seen):
        seen.extend(await frames(ws))
    return seen


async def read_all(ws: ClientConnection, into: list[dict[str, Any]]) -> None:
    """Append the events read to ``into`` until the connection closes (which raises)."""
    while True:
        into += events_of(await frames(ws))


def seqs_covered(events: list[dict[str, Any]]) -> list[int]:
    """The seqs the events stand for: a replayed ``agent_text`` with ``data.from_seq`` joins
    the deltas ``from_seq`` .. ``seq`` (docs/protocol.md, "Compaction")."""
    return [seq for e in events for seq in range(
        e["data"]["from_seq"] if e["type"] == "agent_text" and "from_seq" in e["data"]
        else e["seq"], e["seq"] + 1)]


def events_of(seen: list[dict[str, Any]], thread: str = "t1") -> list[dict[str, Any]]:
    return [f for f in seen if f.get("thread_id") == thread and f.get("seq")
            and f["type"] not in ("subscribed", "unsubscribed")]


async def subscribe(ws: ClientConnection, since: int | None = None,
                    epoch: str | None = None) -> list[dict[str, Any]]:
    frame: dict[str, Any] = {"type": "subscribe", "thread_id": "t1"}
    if since is not None:
        frame |= {"since_seq": since, "epoch": epoch}
    await ws.send(json.dumps(frame))
    return await read_until(ws, lambda s: s[0]["type"] == "subscribed")


#: The subprotocols these tests offer (websockets types them).
NDJSON, V1, AGUI = (Subprotocol(name) for name in (
    "agentcast.ndjson", "agentcast.v1", "agentcast.agui"))

CASES = [
    ("hypercorn", "fastapi_app", "/ws/"),
    ("hypercorn", "starlette_app", "/ws"),
    ("hypercorn", "quart_trio_app", "/ws"),
    ("uvicorn", "fastapi_app", "/ws/"),
]


@pytest.mark.parametrize(("server", "module", "path"), CASES,
                         ids=[f"{s}-{m}" for s, m, _ in CASES])
async def test_stream_drop_resume_cancel_and_refusal(server: str, module: str, path: str) -> None:
    async with running(server, module) as srv:
        with trio.fail_after(STEP):
            # A refused handshake is a real 401 (both servers offer websocket.http.response).
            with pytest.raises(InvalidStatus) as refused:
                async with connect(srv.url(path, token="wrong")):
                    pass
            assert refused.value.response.status_code == 401
            assert b"APP_TOKEN" in refused.value.response.body

            with trio.CancelScope() as drop:
                async with connect(srv.url(path), subprotocols=[NDJSON]) as ws:
                    assert ws.subprotocol == "agentcast.ndjson"
                    ack = (await subscribe(ws))[0]
                    assert ack["recovered"] is False
                    run = await post_run(srv.port, {"thread_id": "t1", "steps": 2000,
                                                    "delay": 0.01})
                    first = events_of(await read_until(ws, lambda s: len(events_of(s)) >= 10))
                    # Drop without a close handshake: a TCP reset from the server's view.
                    assert isinstance(ws.stream, trio.SocketStream)
                    ws.stream.socket.setsockopt(
                        socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                    drop.cancel()
                    await trio.sleep_forever()
            last = first[-1]["seq"]

            async with connect(srv.url(path), subprotocols=[V1]) as ws:
                assert ws.subprotocol == "agentcast.v1"
                seen = await subscribe(ws, since=last, epoch=ack["epoch"])
                assert seen[0]["recovered"] is True
                await ws.send(json.dumps({"type": "cancel_run", "run_id": run["run_id"]}))
                seen += await read_until(ws, lambda s: events_of(s)[-1:] and
                                         events_of(s)[-1]["type"] in TERMINAL)
                second = events_of(seen)
        every = first + second
        covered = seqs_covered(every)
        assert covered == list(range(1, len(covered) + 1))  # nothing lost
        assert {e["run_id"] for e in every} == {run["run_id"]}
        assert every[0]["type"] == "agent_started"
        assert every[-1]["type"] == "agent_cancelled"
        assert every[-1]["data"]["reason"] == "cancelled by client"
        assert len(every) < 2000  # cancelled mid-run


@pytest.mark.parametrize("server", ["hypercorn", "uvicorn"])
async def test_fastapi_depends_route_streams_and_refuses_with_403(server: str) -> None:
    async with running(server, "fastapi_app") as srv:
        with trio.fail_after(STEP):
            with pytest.raises(InvalidStatus) as refused:
                async with connect(srv.url("/ws-depends", token="wrong")):
                    pass
            assert refused.value.response.status_code == 403  # closed before accept
            async with connect(srv.url("/ws-depends")) as ws:
                await subscribe(ws)
                run = await post_run(srv.port, {"thread_id": "t1", "steps": 3, "delay": 0})
                seen = events_of(await read_until(
                    ws, lambda s: any(f["type"] in TERMINAL for f in s)))
        assert [e["type"] for e in seen] == ["agent_started", "agent_thinking"] + [
            "agent_text"] * 3 + ["agent_completed"]
        assert {e["run_id"] for e in seen} == {run["run_id"]}


#: What a client sees on SIGTERM, measured: hypercorn 0.18 (trio worker) drops the TCP connection
#: at once without a close frame (1006; older versions sent 1001 after --graceful-timeout);
#: uvicorn sends 1012 at once. Either way the lifespan shutdown then cancels the run.
@pytest.mark.parametrize(("server", "codes"), [("hypercorn", {1001, 1006}), ("uvicorn", {1012})])
async def test_sigterm_closes_clients_and_the_run_ends_in_history(
    server: str, codes: set[int], redis_server: RedisServer
) -> None:
    """The run's terminal event reaches history however the server orders its shutdown; a
    client reconnecting to the next process resumes and gets it."""
    env = {"AGENTCAST_REDIS_URL": redis_server.url}
    async with running(server, "fastapi_app", env=env) as srv:
        with trio.fail_after(STEP):
            async with connect(srv.url("/ws/")) as ws:
                ack = (await subscribe(ws))[0]
                run = await post_run(srv.port, {"thread_id": "t1", "steps": 5000, "delay": 0.01})
                first = events_of(await read_until(ws, lambda s: len(events_of(s)) >= 5))
                srv.process.send_signal(signal.SIGTERM)
                with pytest.raises(ConnectionClosed):
                    await read_all(ws, first)
                assert ws.close_code in codes
            # uvicorn re-raises the signal once it has shut down cleanly (its documented exit).
            assert await srv.process.wait() == (0 if server == "hypercorn" else -signal.SIGTERM)
            if server == "uvicorn":
                assert b"Application shutdown complete" in srv.output
    async with running(server, "fastapi_app", env=env) as srv:
        with trio.fail_after(STEP):
            async with connect(srv.url("/ws/")) as ws:
                seen = await subscribe(ws, since=first[-1]["seq"], epoch=ack["epoch"])
                assert seen[0]["recovered"] is True
                if not any(f["type"] in TERMINAL for f in events_of(seen)):
                    seen += await read_until(ws, lambda s: any(
                        f["type"] in TERMINAL for f in events_of(s)))
    every = first + events_of(seen)
    covered = seqs_covered(every)
    assert covered == list(range(1, len(covered) + 1))
    assert every[-1]["type"] == "agent_cancelled"
    assert every[-1]["run_id"] == run["run_id"]
    assert every[-1]["data"]["reason"] == "server shutting down"


async def test_two_uvicorn_workers_share_events_through_redis(redis_server: RedisServer) -> None:
    """Runs started on either worker reach every client, whichever worker holds it."""
    env = {"AGENTCAST_REDIS_URL": redis_server.url}
    async with running("uvicorn", "fastapi_app", "--workers", "2", env=env) as srv:
        with trio.fail_after(2 * STEP):
            async with (connect(srv.url("/ws/")) as a, connect(srv.url("/ws/")) as b,
                        connect(srv.url("/ws/")) as c, connect(srv.url("/ws/")) as d):
                clients = [a, b, c, d]
                for ws in clients:
                    await subscribe(ws)
                pids: set[int] = set()
                runs = 0
                while len(pids) < 2 or runs < 4:
                    answer = await post_run(srv.port, {"thread_id": "t1", "steps": 1,
                                                       "delay": 0})
                    pids.add(answer["pid"])
                    runs += 1
                    assert runs <= 40, "every POST went to the same worker"
                # Each run is started, thinking, one text, completed: 4 events.
                for ws in clients:
                    seen = events_of(await read_until(ws, lambda s: sum(
                        f["type"] == "agent_completed" for f in s) >= runs))
                    assert [e["seq"] for e in seen] == list(range(1, 4 * runs + 1))
    assert len(pids) == 2


@pytest.mark.parametrize("server", ["hypercorn", "uvicorn"])
async def test_an_agui_client_is_translated_under_both_servers(server: str) -> None:
    """``agentcast.agui`` is selected and translated under the trio endpoint (hypercorn) and
    the threaded bridge (uvicorn) alike, as by ``agentcast serve``."""
    async with running(server, "fastapi_app") as srv:
        with trio.fail_after(STEP):
            async with connect(srv.url("/ws/"), subprotocols=[AGUI]) as ws:
                assert ws.subprotocol == "agentcast.agui"
                await ws.send(json.dumps({"type": "subscribe", "thread_id": "t1"}))
                events = [json.loads(line) for line in str(await ws.recv()).split("\n")]
                assert (events[0]["type"], events[0]["name"]) == ("CUSTOM", "agentcast.subscribed")
                await post_run(srv.port, {"thread_id": "t1", "steps": 3, "delay": 0})
                while not any(e["type"] == "RUN_FINISHED" for e in events):
                    events += [json.loads(line) for line in str(await ws.recv()).split("\n")]
        types = [e["type"] for e in events]
        assert "RUN_STARTED" in types
        assert types.index("RUN_STARTED") < types.index("RUN_FINISHED")

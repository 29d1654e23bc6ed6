"""The README's examples run as written: the in-memory stream demo and the embedded server.

The server test uses a real socket on 127.0.0.1, port 0, and bounds every wait.
"""

from __future__ import annotations

import importlib.util
import json
import os
import signal
import subprocess
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import trio
import trio.testing
from trio_websocket import open_websocket

from agentcast import Config
from agentcast.client import Event, connect
from agentcast.server import ServerSettings, issue_token, serve

from .redis_server import RedisServer

ROOT = Path(__file__).resolve().parent.parent
HANDSHAKE = (
    b"GET %s HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
    b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
)


def load_example(name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(name, ROOT / "examples" / f"{name}.py")
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


async def test_stream_demo_prints_a_whole_run(
    autojump_clock: trio.testing.MockClock, capsys: pytest.CaptureFixture[str]
) -> None:
    await load_example("stream_demo").main()
    lines = capsys.readouterr().out.splitlines()
    kinds = [line.split()[1] for line in lines[:-1]]
    assert kinds[0] == "subscribed"
    assert kinds[1] == "agent_started"
    assert {"agent_thinking", "tool_executing", "tool_completed", "agent_text"} <= set(kinds)
    assert kinds[-1] == "agent_completed"
    assert lines[-1].startswith("done:")


async def test_embedded_server_streams_a_run_over_a_real_socket() -> None:
    example = load_example("embed_server")
    with trio.fail_after(20):
        async with trio.open_nursery() as nursery:
            server = await nursery.start(example.main, 0)
            port = server.port
            async with open_websocket("127.0.0.1", port, "/?user=alice", use_ssl=False) as ws:
                await ws.send_message(json.dumps({"type": "subscribe", "thread_id": "t1"}))
                ack = json.loads(await ws.get_message())
                assert ack["type"] == "subscribed"
                await ws.send_message(
                    json.dumps({"type": "user_message", "thread_id": "t1", "text": "hi"})
                )
                seen: list[str] = []
                while not seen or seen[-1] != "agent_completed":
                    seen.append(json.loads(await ws.get_message())["type"])
                assert seen[0] == "agent_started"
                await ws.send_message(json.dumps({"type": "user_message"}))
                error = json.loads(await ws.get_message())
                assert error["type"] == "error"
            # A placeholder user id is refused at the handshake. (Raw bytes: trio-websocket's
            # client leaks its socket when a handshake is rejected.)
            stream = await trio.open_tcp_stream("127.0.0.1", port)
            async with stream:
                await stream.send_all(HANDSHAKE % b"/?user=None")
                response = b""
                while b"placeholder" not in response:  # bounded by fail_after above
                    response += await stream.receive_some(4096)
            assert response.startswith(b"HTTP/1.1 400")
            nursery.cancel_scope.cancel()


def test_examples_are_importable_without_side_effects() -> None:
    before = set(sys.modules)
    load_example("embed_server")
    assert "agentcast" in sys.modules or "agentcast" in before


def test_publish_from_asyncio_reaches_the_stream(
    redis_server: RedisServer, capsys: pytest.CaptureFixture[str]
) -> None:
    import asyncio

    import coredis

    asyncio.run(load_example("publish_from_asyncio").main(redis_server.url))
    assert capsys.readouterr().out.startswith("published run run-")

    async def read_back() -> list[str]:
        async with coredis.Redis.from_url(redis_server.url, decode_responses=True) as client:
            entries = await client.xrange("agentcast:{alice}:t:thread-1:events")
        return [json.loads(entry.field_values["f"])["type"] for entry in entries]

    types = trio.run(read_back)
    assert types[0] == "agent_started"
    assert types[-1] == "agent_completed"
    assert types.count("agent_text") == 4


# ---- issue 14: the three ways events get into a standalone server, and a clean Ctrl-C -------

SECRET = "a-test-secret-that-is-long-enough-for-hs256"


async def test_stream_demo_total_counts_the_events_it_printed(
    autojump_clock: trio.testing.MockClock, capsys: pytest.CaptureFixture[str]
) -> None:
    await load_example("stream_demo").main()
    lines = capsys.readouterr().out.splitlines()
    events = [line for line in lines[:-1] if line.split()[1] != "subscribed"]
    assert lines[-1] == f"done: {len(events)} events received, in seq order"


async def read_run(client: Any, thread_id: str, first: dict[str, Any] | None = None) -> list[str]:
    """The event types of the next run on ``thread_id``, through ``agentcast.client``."""
    sub = client.subscribe(thread_id)
    if first is not None:
        await client.send(first)
    seen: list[str] = []
    async for item in sub:
        assert isinstance(item, Event)
        seen.append(item.type)
        if item.type == "agent_completed":
            return seen
    raise AssertionError("the subscription ended before the run did")


async def test_way_1_a_message_handler_passed_to_serve(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AGENTCAST_SECRET", SECRET)
    with trio.fail_after(20):
        async with trio.open_nursery() as nursery:
            running = await nursery.start(load_example("serve_with_handler").main, 0)
            async with connect(f"ws://127.0.0.1:{running.port}/ws",
                               token=issue_token(SECRET, "alice")) as client:
                seen = await read_run(client, "t1", {"type": "ask", "thread_id": "t1",
                                                     "question": "why nurseries?"})
            nursery.cancel_scope.cancel()
    assert seen[0] == "agent_started"
    assert "agent_text" in seen


async def test_way_2_the_embedded_servers_manager(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AGENTCAST_SECRET", SECRET)
    with trio.fail_after(20):
        async with trio.open_nursery() as nursery:
            running = await nursery.start(load_example("serve_and_publish").main, 0, 0.2)
            assert running.manager is running.server.manager
            async with connect(f"ws://127.0.0.1:{running.port}/ws",
                               token=issue_token(SECRET, "alice")) as client:
                seen = await read_run(client, "news")
            nursery.cancel_scope.cancel()
    assert seen == ["agent_started", "agent_text", "agent_completed"]


async def test_way_3_redis_publisher_from_another_process(redis_server: RedisServer) -> None:
    settings = ServerSettings(port=0, secret=SECRET, redis_url=redis_server.url,
                              core=Config(shutdown_timeout=2.0))
    stop = trio.Event()
    with trio.fail_after(40):
        async with trio.open_nursery() as nursery:
            running = await nursery.start(
                lambda task_status: serve(settings, stop=stop, task_status=task_status)
            )
            async with connect(f"ws://127.0.0.1:{running.port}/ws",
                               token=issue_token(SECRET, "alice")) as client:
                sub = client.subscribe("thread-1")
                script = ROOT / "examples" / "publish_from_asyncio.py"
                published = await trio.run_process(
                    [sys.executable, str(script), redis_server.url], capture_stdout=True
                )
                seen: list[str] = []
                async for item in sub:
                    assert isinstance(item, Event)
                    seen.append(item.type)
                    if item.type == "agent_completed":
                        break
            stop.set()
    assert published.stdout.decode().startswith("published run run-")
    assert seen[0] == "agent_started"
    assert seen.count("agent_text") == 4


@pytest.mark.parametrize("name", ["embed_server", "serve_with_handler", "serve_and_publish"])
async def test_servers_print_a_start_up_line_and_stop_cleanly_on_ctrl_c(name: str) -> None:
    script = ROOT / "examples" / f"{name}.py"
    env = {**os.environ, "AGENTCAST_SECRET": SECRET}
    with trio.fail_after(30):
        process = await trio.lowlevel.open_process(
            [sys.executable, str(script), "0"], stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT, env=env,
        )
        assert process.stdout is not None
        output = b""
        while b"\n" not in output:
            chunk = await process.stdout.receive_some(4096)
            assert chunk, f"exited before printing a line: {output!r}"
            output += chunk
        assert output.startswith(b"listening on ws://127.0.0.1:")
        process.send_signal(signal.SIGINT)
        while chunk := await process.stdout.receive_some(4096):
            output += chunk
        assert await process.wait() == 0
    assert b"Traceback" not in output
    assert output.rstrip().endswith(b"stopped")

"""The README's examples run as written: the in-memory stream demo and the embedded server.

The server test uses a real socket on 127.0.0.1, port 0, and bounds every wait.
"""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path
from types import ModuleType

import pytest
import trio
from trio_websocket import open_websocket

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
                seen = []
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

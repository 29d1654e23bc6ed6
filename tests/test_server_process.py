"""``agentcast serve`` as a real process: the first line names the bound address, and SIGTERM or
SIGINT stops accepting, closes every connection with 1001 and exits 0 within the drain bound."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys

import pytest
import trio
from trio_websocket import ConnectionClosed, WebSocketConnection, open_websocket_url

from agentcast.server import issue_token

SECRET = "a-test-secret-that-is-long-enough-for-hs256"


async def read_line(stream: trio.abc.ReceiveStream, buffer: bytearray) -> str:
    while b"\n" not in buffer:
        chunk = await stream.receive_some(4096)
        if not chunk:
            raise EOFError(f"the server exited before a full line; got {bytes(buffer)!r}")
        buffer += chunk
    line, _, rest = bytes(buffer).partition(b"\n")
    buffer[:] = rest
    return line.decode()


async def read_until_closed(ws: WebSocketConnection) -> None:
    while True:
        await ws.get_message()


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
async def test_a_signal_drains_every_connection_with_1001_and_exits_0(
    signum: signal.Signals,
) -> None:
    env = {**os.environ, "AGENTCAST_SECRET": SECRET, "AGENTCAST_LOG_LEVEL": "WARNING"}
    command = [sys.executable, "-m", "agentcast", "serve", "--port", "0"]
    with trio.fail_after(30):
        process = await trio.lowlevel.open_process(
            command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env
        )
        assert process.stdout is not None
        try:
            output = bytearray()
            first = await read_line(process.stdout, output)
            assert first.startswith("agentcast listening on http://127.0.0.1:")
            port = int(first.rsplit(":", 1)[1])
            url = f"ws://127.0.0.1:{port}/ws?token={issue_token(SECRET, 'alice')}"
            async with open_websocket_url(url) as ws:
                await ws.send_message(json.dumps({"type": "subscribe", "thread_id": "t1"}))
                assert json.loads(await ws.get_message())["type"] == "subscribed"
                process.send_signal(signum)
                with pytest.raises(ConnectionClosed) as closed:
                    await read_until_closed(ws)
                assert closed.value.reason is not None
                assert closed.value.reason.code == 1001
                await trio.aclose_forcefully(ws._stream)
            assert await process.wait() == 0
            rest = await process.stdout.receive_some(65536)
            while chunk := await process.stdout.receive_some(65536):
                rest += chunk
            assert f"{signum.name}, draining" in (bytes(output) + rest).decode()
        finally:
            if process.returncode is None:
                process.kill()
                await process.wait()
            await process.stdout.aclose()


async def test_the_readme_main_command_serves_the_demo_page() -> None:
    command = [sys.executable, "-m", "agentcast", "serve", "--demo", "--port", "0"]
    env = {key: value for key, value in os.environ.items() if not key.startswith("AGENTCAST_")}
    with trio.fail_after(30):
        process = await trio.lowlevel.open_process(
            command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env
        )
        assert process.stdout is not None
        try:
            output = bytearray()
            port = int((await read_line(process.stdout, output)).rsplit(":", 1)[1])
            assert "demo page: http://127.0.0.1:" in await read_line(process.stdout, output)
            assert (await read_line(process.stdout, output)).startswith("demo token: ")
            stream = await trio.open_tcp_stream("127.0.0.1", port)
            async with stream:
                await stream.send_all(b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
                page = b""
                while chunk := await stream.receive_some(65536):
                    page += chunk
            assert page.startswith(b"HTTP/1.1 200")
            assert b"<html" in page
            assert b"__AGENTCAST_DEMO_TOKEN__" not in page  # a real token is baked in
            process.send_signal(signal.SIGTERM)
            assert await process.wait() == 0
        finally:
            if process.returncode is None:
                process.kill()
                await process.wait()
            await process.stdout.aclose()


def _few_file_descriptors() -> None:  # runs in the child before exec
    import resource

    resource.setrlimit(resource.RLIMIT_NOFILE, (48, 48))


async def test_running_out_of_file_descriptors_at_accept_is_survived() -> None:
    env = {**os.environ, "AGENTCAST_SECRET": SECRET, "AGENTCAST_LOG_LEVEL": "ERROR"}
    command = [sys.executable, "-m", "agentcast", "serve", "--port", "0"]
    with trio.fail_after(30):
        process = await trio.lowlevel.open_process(
            command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env,
            preexec_fn=_few_file_descriptors,
        )
        assert process.stdout is not None
        try:
            output = bytearray()
            port = int((await read_line(process.stdout, output)).rsplit(":", 1)[1])
            url = f"ws://127.0.0.1:{port}/ws?token={issue_token(SECRET, 'alice')}"
            async with open_websocket_url(url) as ws:
                # More silent TCP connections than the server has descriptors for.
                hogs = [await trio.open_tcp_stream("127.0.0.1", port) for _ in range(60)]
                # The server says it is out of descriptors, and keeps serving the open socket.
                while b"EMFILE" not in output:
                    output += await process.stdout.receive_some(65536)
                await ws.send_message(json.dumps({"type": "ping", "id": "still-here"}))
                assert json.loads(await ws.get_message()) == {"type": "pong", "id": "still-here"}
                for hog in hogs:
                    await hog.aclose()
                # Descriptors come back, and new connections are accepted again.
                stream = await trio.open_tcp_stream("127.0.0.1", port)
                async with stream:
                    await stream.send_all(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
                    assert (await stream.receive_some(65536)).startswith(b"HTTP/1.1 200")
                process.send_signal(signal.SIGTERM)
                with pytest.raises(ConnectionClosed):
                    await read_until_closed(ws)
                await trio.aclose_forcefully(ws._stream)
            assert await process.wait() == 0
        finally:
            if process.returncode is None:
                process.kill()
                await process.wait()
            await process.stdout.aclose()

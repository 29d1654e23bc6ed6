"""Real ``agentcast serve --redis-url`` processes on one machine: failover between nodes, the
``--workers`` supervisor, and the refusals of the CLI.

Rules: each process gets a port picked by the kernel (``--port 0``, read from its first line of
output); every wait is bounded; processes are always reaped.
"""

from __future__ import annotations

import gc
import json
import os
import signal
import subprocess
import sys
import warnings
from collections.abc import Iterator
from contextlib import contextmanager

import pytest
import trio
from trio_websocket import ConnectionClosed, WebSocketConnection, open_websocket_url

from agentcast import RedisPublisher
from agentcast.server import issue_token

from .helpers import thinking
from .redis_server import RedisServer

SECRET = "a-test-secret-that-is-long-enough-for-hs256"
#: Seconds any single step may take.
STEP = 15.0


@contextmanager
def agentcast_serve(*args: str) -> Iterator[tuple[subprocess.Popen[str], int]]:
    """Start ``agentcast serve`` and yield (process, port) once it is listening."""
    env = {**os.environ, "AGENTCAST_SECRET": SECRET, "AGENTCAST_LOG_LEVEL": "WARNING"}
    process = subprocess.Popen(
        [sys.executable, "-m", "agentcast", "serve", "--port", "0", *args],
        stdout=subprocess.PIPE, text=True, env=env,
    )
    try:
        assert process.stdout is not None
        first = process.stdout.readline()
        assert first.startswith("agentcast listening on http://"), first
        yield process, int(first.rsplit(":", 1)[1])
    finally:
        if process.poll() is None:
            process.kill()
        process.wait(STEP)
        if process.stdout is not None:
            process.stdout.close()




async def thinking_seqs(ws: WebSocketConnection, count: int) -> list[int]:
    seqs: list[int] = []
    while len(seqs) < count:
        message = await ws.get_message()
        assert isinstance(message, str)
        for line in message.split("\n"):
            frame = json.loads(line)
            if frame["type"] == "agent_thinking":
                seqs.append(frame["seq"])
    return seqs


def url(port: int) -> str:
    return f"ws://127.0.0.1:{port}/ws?token={issue_token(SECRET, 'alice')}"


# trio-websocket leaves the socket of a connection whose peer vanished to the garbage collector.
@pytest.mark.filterwarnings("ignore:unclosed <socket:ResourceWarning")
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
async def test_a_killed_nodes_client_resumes_on_another_node(redis_server: RedisServer) -> None:
    with agentcast_serve("--redis-url", redis_server.url) as (first, port_a), \
            agentcast_serve("--redis-url", redis_server.url) as (_, port_b):
        async with RedisPublisher(redis_server.url) as pub:
            with trio.fail_after(STEP):
                seen: list[int] = []
                epoch = ""
                broken = False
                try:
                    async with open_websocket_url(url(port_a)) as ws:
                        await ws.send_message(json.dumps({"type": "subscribe", "thread_id": "t1"}))
                        ack = json.loads(await ws.get_message())
                        epoch = ack["epoch"]
                        for i in range(20):
                            await pub.send_to_thread("alice", "t1", thinking(str(i)))
                        seen += await thinking_seqs(ws, 10)
                        first.send_signal(signal.SIGKILL)
                        await trio.to_thread.run_sync(first.wait)
                        for i in range(20, 30):  # published while the client is away
                            await pub.send_to_thread("alice", "t1", thinking(str(i)))
                        while True:  # what reached the client before the node died, then the end
                            seen += await thinking_seqs(ws, 1)
                except* (ConnectionClosed, trio.BrokenResourceError, OSError):
                    broken = True  # the connection to the SIGKILLed node breaks
                assert broken
                assert seen == list(range(1, len(seen) + 1))
                async with open_websocket_url(url(port_b)) as ws:
                    await ws.send_message(json.dumps({
                        "type": "subscribe", "thread_id": "t1", "since_seq": seen[-1],
                        "epoch": epoch,
                    }))
                    resumed = json.loads(await ws.get_message())
                    assert resumed["recovered"] is True
                    await pub.send_to_thread("alice", "t1", thinking("live"))
                    rest = await thinking_seqs(ws, 31 - len(seen))
        assert seen + rest == list(range(1, 32))
    with warnings.catch_warnings():  # collect it here, not in a later test
        warnings.simplefilter("ignore", ResourceWarning)
        gc.collect()


@pytest.mark.filterwarnings("ignore:unclosed <socket:ResourceWarning")
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
async def test_a_frozen_node_neither_delays_nor_loses_the_other_nodes_stream(
    redis_server: RedisServer,
) -> None:
    """The slowest node there is: SIGSTOPped, its event loop runs nothing at all."""
    with agentcast_serve("--redis-url", redis_server.url) as (slow, port_slow), \
            agentcast_serve("--redis-url", redis_server.url) as (_, port_fast):
        async with RedisPublisher(redis_server.url) as pub, \
                open_websocket_url(url(port_fast)) as fast, \
                open_websocket_url(url(port_slow)) as frozen:
            for ws in (fast, frozen):  # alice has a tab on each node
                await ws.send_message(json.dumps({"type": "subscribe", "thread_id": "t1"}))
                assert json.loads(await ws.get_message())["type"] == "subscribed"
            slow.send_signal(signal.SIGSTOP)
            try:
                with trio.fail_after(STEP):
                    for i in range(200):
                        # Publishing never waits for the frozen node...
                        await pub.send_to_thread("alice", "t1", thinking(str(i)))
                        if i % 50 == 49:
                            # ...and the other node delivers each batch while it is frozen.
                            assert await thinking_seqs(fast, 50) == list(range(i - 48, i + 2))
            finally:
                slow.send_signal(signal.SIGCONT)
            # Thawed, the frozen node catches up from what Redis buffered for it, in order.
            with trio.fail_after(STEP):
                assert await thinking_seqs(frozen, 200) == list(range(1, 201))


def test_workers_share_a_port_and_drain_on_sigterm(redis_server: RedisServer) -> None:
    with agentcast_serve("--redis-url", redis_server.url, "--workers", "2") as (parent, port):
        async def health() -> int:
            stream = await trio.open_tcp_stream("127.0.0.1", port)
            async with stream:
                await stream.send_all(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
                return int((await stream.receive_some(1024)).split()[1])

        statuses = [trio.run(health) for _ in range(4)]
        assert statuses == [200] * 4
        parent.send_signal(signal.SIGTERM)
        assert parent.wait(STEP) == 0


def test_workers_without_redis_are_refused() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "agentcast", "serve", "--workers", "2", "--secret", SECRET],
        capture_output=True, text=True, timeout=STEP, check=False,
    )
    assert result.returncode == 2
    assert "--workers needs --redis-url" in result.stderr


async def test_server_starts_not_ready_without_redis_and_says_why() -> None:
    from agentcast.server import ServerSettings, serve

    from .redis_server import free_port

    settings = ServerSettings(port=0, secret=SECRET,
                              redis_url=f"redis://127.0.0.1:{free_port()}/0")
    stop = trio.Event()
    with trio.fail_after(STEP):
        async with trio.open_nursery() as nursery:
            running = await nursery.start(
                lambda task_status: serve(settings, stop=stop, task_status=task_status)
            )
            stream = await trio.open_tcp_stream("127.0.0.1", running.port)
            async with stream:
                await stream.send_all(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
                response = b""
                while chunk := await stream.receive_some(4096):
                    response += chunk
            head, _, body = response.partition(b"\r\n\r\n")
            assert head.split()[1] == b"503"
            health = json.loads(body)
            assert health["ready"] is False
            assert "redis unavailable" in health["reason"]
            stop.set()

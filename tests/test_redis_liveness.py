"""Liveness of the Redis backplane against a real redis-server: frozen (SIGSTOP by its PID),
restarted and unreachable at start; readiness, producers' deadlines, 1012 after the grace, and
what gets logged.

Rules: real sockets, so no ``autojump_clock``; every wait is on a condition within a bound; a
frozen redis-server is always thawed (``frozen`` is a context manager), or it could not be
stopped. The bounds are the guarantees (not-ready within ``timeout``, a producer's answer within
``timeout``) with slack for a loaded machine; nothing asserts how fast anything was.
"""

from __future__ import annotations

import gc
import json
import logging
import os
import signal
import subprocess
import sys
import warnings
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager
from typing import Any

import pytest
import trio
from trio_websocket import ConnectionClosed, open_websocket_url

import agentcast
from agentcast import (
    BrokerUnavailable,
    Config,
    ConnectionManager,
    ManagerNotReady,
    RedisBroker,
    RedisPublisher,
    UserContext,
)
from agentcast.server import issue_token

from .helpers import connect, thinking
from .redis_server import RedisServer, free_port
from .test_redis import seqs_until, session, wait_for

#: Seconds any single step of these tests may take.
STEP = 10.0
#: The Redis timeout these tests run with: short, so a freeze is noticed quickly.
TIMEOUT = 1.0
#: Slack on top of a guaranteed bound, for a loaded 2-core machine.
SLACK = 2.0
SECRET = "a-test-secret-that-is-long-enough-for-hs256"


@contextmanager
def frozen(redis: RedisServer) -> Iterator[None]:
    """SIGSTOP the redis-server for the block: it keeps its sockets and answers nothing."""
    assert redis.process is not None
    os.kill(redis.process.pid, signal.SIGSTOP)
    try:
        yield
    finally:
        os.kill(redis.process.pid, signal.SIGCONT)


@asynccontextmanager
async def node(
    url: str, *, grace: float = 60.0, **config: Any
) -> AsyncIterator[ConnectionManager]:
    cfg = Config(**{"session_linger": 0.2, **config})
    broker = RedisBroker(url, cfg, timeout=TIMEOUT, outage_grace=grace)
    async with agentcast.open_manager(cfg, broker=broker) as manager:
        yield manager


def broker_of(manager: ConnectionManager) -> RedisBroker:
    assert isinstance(manager.broker, RedisBroker)
    return manager.broker


async def test_a_frozen_redis_is_not_ready_within_the_timeout_and_a_short_one_costs_nothing(
    redis_server: RedisServer,
) -> None:
    async with node(redis_server.url) as a:
        await a.wait_ready()
        broker = broker_of(a)
        client, _ = await connect(session(a), ("t1",), capacity=256)
        assert (await client.receive())["type"] == "subscribed"
        for i in range(3):
            await session(a).send_to_thread("t1", thinking(str(i)))
        assert await seqs_until(client, 3) == [1, 2, 3]
        with frozen(redis_server):
            # A producer racing the freeze: its publish waits on Redis, but not past the timeout.
            with trio.fail_after(TIMEOUT + SLACK), pytest.raises(BrokerUnavailable):
                await session(a).send_to_thread("t1", thinking("racing the freeze"))
            with trio.fail_after(TIMEOUT + SLACK):
                await wait_for(lambda: not broker.statistics().ready)
            assert "did not answer" in broker.statistics().reason
            # Once not ready, producers fail at once.
            with trio.fail_after(SLACK), pytest.raises(BrokerUnavailable, match="did not answer"):
                await session(a).send_to_thread("t1", thinking("refused"))
            assert broker.backplane_stats().stalls == 1
        with trio.fail_after(STEP):
            await a.wait_ready()
        assert broker.statistics().reason == ""
        # Within the grace nobody was disconnected, and the stream goes on where it was; the
        # racing publish may or may not have reached Redis: if it did, its seq is delivered.
        await session(a).send_to_thread("t1", thinking("after"))
        seqs = await seqs_until(client, 1)
        if seqs == [4]:
            seqs += await seqs_until(client, 1)
        assert seqs in ([4], [4, 5])
        assert [c.close_code for c in session(a).connections()] == [None]
        assert broker.backplane_stats().reconnects == 0


async def test_past_the_grace_clients_get_1012_and_resume_everything_redis_kept(
    redis_server: RedisServer,
) -> None:
    async with node(redis_server.url, grace=1.0) as a:
        await a.wait_ready()
        broker = broker_of(a)
        client, _ = await connect(session(a), ("t1",), capacity=256)
        ack = await client.receive()
        for i in range(5):
            await session(a).send_to_thread("t1", thinking(str(i)))
        assert await seqs_until(client, 5) == [1, 2, 3, 4, 5]
        with frozen(redis_server):
            with trio.fail_after(TIMEOUT + 1.0 + TIMEOUT + SLACK):
                _, code = await client.receive_closed()
            assert code == 1012
        with trio.fail_after(STEP):
            await a.wait_ready()
        assert broker.backplane_stats().reconnects == 1
        back, _ = await connect(session(a), capacity=256)
        await back.send({"type": "subscribe", "thread_id": "t1", "since_seq": 2,
                         "epoch": ack["epoch"]})
        resumed = await back.receive()
        assert resumed["recovered"] is True
        assert await seqs_until(back, 3) == [3, 4, 5]
        await session(a).send_to_thread("t1", thinking("live"))
        assert await seqs_until(back, 1) == [6]


async def test_the_publisher_fails_within_its_timeout_on_a_frozen_redis_then_recovers(
    redis_server: RedisServer,
) -> None:
    async with RedisPublisher(redis_server.url, timeout=TIMEOUT) as pub:
        assert await pub.send_to_thread("alice", "t1", thinking("before")) == 1
        with frozen(redis_server):
            with trio.fail_after(TIMEOUT + SLACK), pytest.raises(BrokerUnavailable):
                await pub.send_to_thread("alice", "t1", thinking("frozen"))
            with trio.fail_after(TIMEOUT + SLACK), pytest.raises(BrokerUnavailable):
                await pub.presence("alice")
        with trio.fail_after(STEP):
            seq = await pub.send_to_thread("alice", "t1", thinking("after"))
        # The frozen publish was sent before the deadline: Redis ran it when it woke up.
        assert seq == 3


async def test_a_publisher_cannot_hang_on_connecting_to_a_frozen_redis(
    redis_server: RedisServer,
) -> None:
    with frozen(redis_server), trio.fail_after(TIMEOUT + SLACK), pytest.raises(
        BrokerUnavailable
    ):
        async with RedisPublisher(redis_server.url, timeout=TIMEOUT):
            pass


async def test_get_websocket_manager_async_waits_for_redis_and_refuses_a_closed_port() -> None:
    url = f"redis://127.0.0.1:{free_port()}/0"  # nothing listens there
    ctx = UserContext.from_request(user_id="alice")
    async with node(url, ready_timeout=1.0) as a:
        with trio.fail_after(STEP), pytest.raises(ManagerNotReady, match="redis unavailable"):
            await agentcast.get_websocket_manager_async(ctx, manager=a)


async def test_get_websocket_manager_async_returns_once_redis_answers(
    tmp_path: Any,
) -> None:
    from .redis_server import redis_binary

    server = RedisServer(redis_binary(), tmp_path, free_port())
    ctx = UserContext.from_request(user_id="alice")
    async with node(server.url, ready_timeout=STEP) as a, trio.open_nursery() as nursery:
        got: list[agentcast.UserSession] = []

        async def waiter() -> None:
            got.append(await agentcast.get_websocket_manager_async(ctx, manager=a))

        nursery.start_soon(waiter)
        await trio.testing.wait_all_tasks_blocked()
        assert got == []  # Redis is not there yet: still waiting
        await trio.to_thread.run_sync(server.start)
        try:
            with trio.fail_after(STEP):
                while not got:  # noqa: ASYNC110 - the waiter finishes when Redis answers
                    await trio.sleep(0.01)
            assert broker_of(a).ready
            await got[0].send_to_thread("t1", thinking("x"))
        finally:
            await trio.to_thread.run_sync(server.stop)


async def test_the_first_publish_and_a_clean_stop_log_nothing_alarming(
    redis_server: RedisServer, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    async with node(redis_server.url) as a:
        await a.wait_ready()
        client, _ = await connect(session(a), ("t1",))
        await client.receive()
        await session(a).send_to_thread("t1", thinking("first"))
        assert await seqs_until(client, 1) == [1]
        async with RedisPublisher(redis_server.url) as pub:
            await pub.send_to_thread("alice", "t1", thinking("second"))
        assert await seqs_until(client, 1) == [2]
    text = caplog.text
    assert "No matching script" not in text
    assert "NOSCRIPT" not in text
    assert "lost the Redis backplane" not in text
    assert [r for r in caplog.records if r.levelno >= logging.WARNING] == []


async def test_an_outage_is_logged_in_single_lines_without_tracebacks(
    redis_server: RedisServer, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="agentcast")
    async with node(redis_server.url, grace=0.5) as a:
        await a.wait_ready()
        with frozen(redis_server):
            with trio.fail_after(TIMEOUT + 0.5 + TIMEOUT + SLACK):
                await wait_for(lambda: broker_of(a).backplane_stats().stalls == 1
                               and broker_of(a)._ops is None)
        with trio.fail_after(STEP):
            await a.wait_ready()
    ours = [r for r in caplog.records if r.name == "agentcast"]
    messages = [r.getMessage() for r in ours]
    assert any("stopped answering" in m for m in messages), messages
    assert any("lost the Redis backplane" in m for m in messages), messages
    assert all(r.exc_info is None and "\n" not in r.getMessage() for r in ours), messages


# ---- the server as a process ---------------------------------------------------------------


@contextmanager
def agentcast_serve(*args: str) -> Iterator[tuple[subprocess.Popen[str], int]]:
    """``agentcast serve`` as a process; yields (process, port). Its stderr is collected."""
    env = {**os.environ, "AGENTCAST_SECRET": SECRET, "AGENTCAST_LOG_LEVEL": "INFO"}
    process = subprocess.Popen(
        [sys.executable, "-m", "agentcast", "serve", "--port", "0", *args],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
    )
    try:
        assert process.stdout is not None
        first = process.stdout.readline()
        assert first.startswith("agentcast listening on http://"), first
        yield process, int(first.rsplit(":", 1)[1])
    finally:
        if process.returncode is None:
            process.kill()
            process.communicate(timeout=STEP)


async def health(port: int) -> dict[str, Any]:
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    async with stream:
        await stream.send_all(b"GET /health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        data = b""
        while chunk := await stream.receive_some(65536):
            data += chunk
    body: dict[str, Any] = json.loads(data.split(b"\r\n\r\n", 1)[1])
    return body


async def wait_health(port: int, ready: bool) -> dict[str, Any]:
    while True:
        body = await health(port)
        if body["ready"] is ready:
            return body
        await trio.sleep(0.05)


# trio-websocket leaves the socket of a connection closed under it to the garbage collector.
@pytest.mark.filterwarnings("ignore:unclosed <socket:ResourceWarning")
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
async def test_a_serve_process_on_a_frozen_redis_goes_not_ready_closes_1012_and_recovers(
    redis_server: RedisServer,
) -> None:
    token = issue_token(SECRET, "alice")
    with agentcast_serve("--redis-url", redis_server.url, "--redis-timeout", str(TIMEOUT),
                         "--redis-grace", "2") as (process, port):
        with trio.fail_after(STEP):
            await wait_health(port, ready=True)
        async with RedisPublisher(redis_server.url) as pub:
            async with open_websocket_url(f"ws://127.0.0.1:{port}/ws?token={token}") as ws:
                await ws.send_message(json.dumps({"type": "subscribe", "thread_id": "t1"}))
                with trio.fail_after(STEP):
                    ack = json.loads(await ws.get_message())
                    await pub.send_to_thread("alice", "t1", thinking("kept"))
                    assert json.loads(await ws.get_message())["seq"] == 1
                with frozen(redis_server):
                    with trio.fail_after(TIMEOUT + SLACK):
                        body = await wait_health(port, ready=False)
                    assert "did not answer" in body["reason"]
                    with trio.fail_after(TIMEOUT + 2 + TIMEOUT + SLACK):
                        with pytest.raises(ConnectionClosed) as closed:
                            await ws.get_message()
                    assert closed.value.reason is not None
                    assert closed.value.reason.code == 1012
                    del closed  # its traceback holds the closed socket (collected below)
            with trio.fail_after(STEP):
                await wait_health(port, ready=True)
            await pub.send_to_thread("alice", "t1", thinking("after"))
        async with open_websocket_url(f"ws://127.0.0.1:{port}/ws?token={token}") as ws:
            await ws.send_message(json.dumps({
                "type": "subscribe", "thread_id": "t1", "since_seq": 0, "epoch": ack["epoch"],
            }))
            with trio.fail_after(STEP):
                resumed = json.loads(await ws.get_message())
                assert resumed["recovered"] is True
                seqs = [json.loads(await ws.get_message())["seq"] for _ in range(2)]
            assert seqs == [1, 2]
        with warnings.catch_warnings():  # collect the 1012-closed socket here, not later
            warnings.simplefilter("ignore", ResourceWarning)
            gc.collect()
        process.send_signal(signal.SIGTERM)
        _, stderr = process.communicate(timeout=STEP)
    assert process.returncode == 0
    lines = stderr.splitlines()
    assert any("stopped answering" in line for line in lines), stderr
    assert not any("Traceback" in line for line in lines), stderr
    # One loss (the grace ran out), none at the clean SIGTERM that followed.
    assert sum("lost the Redis backplane" in line for line in lines) == 1, stderr


async def test_a_clean_sigterm_logs_no_lost_backplane(redis_server: RedisServer) -> None:
    with agentcast_serve("--redis-url", redis_server.url) as (process, port):
        with trio.fail_after(STEP):
            await wait_health(port, ready=True)
        process.send_signal(signal.SIGTERM)
        _, stderr = process.communicate(timeout=STEP)
    assert process.returncode == 0
    assert "lost the Redis backplane" not in stderr
    assert "No matching script" not in stderr
    assert "Traceback" not in stderr


ADMIN = "an-admin-token-that-is-at-least-32-bytes-long"


async def get_metrics(port: int) -> str:
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    async with stream:
        await stream.send_all(
            f"GET /metrics HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {ADMIN}\r\n"
            "Connection: close\r\n\r\n".encode()
        )
        data = b""
        while chunk := await stream.receive_some(65536):
            data += chunk
    return data.split(b"\r\n\r\n", 1)[1].decode()


def metric(text: str, name: str) -> float:
    for line in text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    raise AssertionError(f"{name} is not in /metrics")


async def test_metrics_report_the_backplanes_figures(redis_server: RedisServer) -> None:
    from agentcast.server._serve import serve
    from agentcast.server._settings import ServerSettings

    settings = ServerSettings(
        port=0, secret=SECRET, admin_token=ADMIN, redis_url=redis_server.url,
        redis_timeout=TIMEOUT, redis_grace=0.5, core=Config(shutdown_timeout=2.0),
    )
    stop = trio.Event()
    with trio.fail_after(4 * STEP):
        async with trio.open_nursery() as nursery:
            running = await nursery.start(
                lambda task_status: serve(settings, stop=stop, task_status=task_status)
            )
            manager = running.server.manager
            await manager.wait_ready()
            client, _ = await connect(session(manager), ("t1",), capacity=256)
            await client.receive()
            for i in range(5):
                await session(manager).send_to_thread("t1", thinking(str(i)))
            assert await seqs_until(client, 5) == [1, 2, 3, 4, 5]
            before = await get_metrics(running.port)
            assert metric(before, "agentcast_redis_publish_seconds_count") == 5
            assert metric(before, 'agentcast_redis_publish_seconds_bucket{le="+Inf"}') == 5
            assert metric(before, "agentcast_redis_pipeline_depth") == 0
            assert metric(before, "agentcast_redis_reconnects_total") == 0
            assert metric(before, "agentcast_redis_pubsub_messages_total") >= 5
            with frozen(redis_server):
                await wait_for(lambda: broker_of_server(manager)._ops is None)
            await manager.wait_ready()
            after = await get_metrics(running.port)
            assert metric(after, "agentcast_redis_reconnects_total") == 1
            assert metric(after, "agentcast_redis_stalls_total") == 1
            stop.set()


def broker_of_server(manager: ConnectionManager) -> RedisBroker:
    inner = getattr(manager.broker, "inner", None)
    assert isinstance(inner, RedisBroker)
    return inner


async def test_a_node_started_on_a_frozen_redis_starts_not_ready_then_connects(
    redis_server: RedisServer,
) -> None:
    with frozen(redis_server):
        with trio.fail_after(TIMEOUT + SLACK):
            async with node(redis_server.url) as a:
                broker = broker_of(a)
                assert not broker.statistics().ready
                assert "did not answer" in broker.statistics().reason
                opened = a
        assert opened.closing
    async with node(redis_server.url) as a:
        with trio.fail_after(STEP):
            await a.wait_ready()
        assert await session(a).send_to_thread("t1", thinking("x")) == 1


# trio-websocket leaves the socket of a connection closed under it to the garbage collector.
@pytest.mark.filterwarnings("ignore:unclosed <socket:ResourceWarning")
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
async def test_a_serve_process_without_redis_at_start_then_through_a_restart(
    tmp_path: Any,
) -> None:
    from .redis_server import redis_binary

    redis = RedisServer(redis_binary(), tmp_path, free_port(), persist=True)
    token = issue_token(SECRET, "alice")
    ws_url = f"ws://127.0.0.1:{{}}/ws?token={token}"
    try:
        with agentcast_serve("--redis-url", redis.url, "--redis-timeout", str(TIMEOUT)) as (
            process, port,
        ):
            with trio.fail_after(STEP):
                body = await wait_health(port, ready=False)
            assert "redis unavailable" in body["reason"]
            await trio.to_thread.run_sync(redis.start)
            with trio.fail_after(STEP):
                await wait_health(port, ready=True)
            async with RedisPublisher(redis.url) as pub, open_websocket_url(
                ws_url.format(port)
            ) as ws:
                await ws.send_message(json.dumps({"type": "subscribe", "thread_id": "t1"}))
                with trio.fail_after(STEP):
                    ack = json.loads(await ws.get_message())
                    await pub.send_to_thread("alice", "t1", thinking("kept"))
                    assert json.loads(await ws.get_message())["seq"] == 1
                await trio.to_thread.run_sync(redis.stop)
                with trio.fail_after(STEP), pytest.raises(ConnectionClosed) as closed:
                    await ws.get_message()
                assert closed.value.reason is not None
                assert closed.value.reason.code == 1012
                del closed
            with trio.fail_after(STEP):
                body = await wait_health(port, ready=False)
            assert "redis unavailable" in body["reason"]
            await trio.to_thread.run_sync(redis.start)
            with trio.fail_after(STEP):
                await wait_health(port, ready=True)
            async with open_websocket_url(ws_url.format(port)) as ws:
                await ws.send_message(json.dumps({
                    "type": "subscribe", "thread_id": "t1", "since_seq": 0,
                    "epoch": ack["epoch"],
                }))
                with trio.fail_after(STEP):
                    resumed = json.loads(await ws.get_message())
                    assert resumed["recovered"] is True
                    assert json.loads(await ws.get_message())["seq"] == 1
            with warnings.catch_warnings():  # collect the 1012-closed socket here, not later
                warnings.simplefilter("ignore", ResourceWarning)
                gc.collect()
            process.send_signal(signal.SIGTERM)
            _, stderr = process.communicate(timeout=STEP)
        assert process.returncode == 0
        assert "Traceback" not in stderr, stderr
        assert sum("lost the Redis backplane" in line for line in stderr.splitlines()) == 1
    finally:
        await trio.to_thread.run_sync(redis.stop)

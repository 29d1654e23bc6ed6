"""``agentcast.client`` against a real server (``serve`` in-process, loopback, port 0): a run
streams whole, a dropped socket resumes with no gap, a server restart mid-run is surfaced as a
``Resync`` with nothing silently lost, and codes that must not be retried stop the client.

Every wait is bounded by ``fail_after``; each test ends with no connection left on the server.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import orjson
import pytest
import trio
from trio_websocket import open_websocket_url

from agentcast import Config
from agentcast._run_history import apply_replay
from agentcast.client import Backoff, ClientClosed, Event, Resync, connect
from agentcast.server import issue_token
from agentcast.server._serve import RunningServer, serve
from agentcast.server._settings import ServerSettings

from .serverkit import open_fds

SECRET = "a-test-secret-that-is-long-enough-for-hs256"
FAST = Backoff(initial=0.05, throttle_initial=0.4, max=1.0)
TERMINAL = {"agent_completed", "agent_error", "agent_cancelled"}


def settings(port: int = 0) -> ServerSettings:
    return ServerSettings(port=port, secret=SECRET, demo=True, demo_speed=4.0,
                          core=Config(shutdown_timeout=2.0))


async def start(nursery: trio.Nursery, port: int = 0) -> tuple[RunningServer, trio.Event]:
    stop = trio.Event()
    running: RunningServer = await nursery.start(
        lambda task_status: serve(settings(port), stop=stop, task_status=task_status)
    )
    return running, stop


@pytest.fixture
async def server() -> AsyncIterator[RunningServer]:
    baseline = open_fds()
    with trio.fail_after(60):
        async with trio.open_nursery() as nursery:
            running, stop = await start(nursery)
            yield running
            # Every client connection has finished closing and left nothing counted.
            manager = running.server.manager
            for user in manager.user_ids():
                session = manager.session(user)
                for connection in session.connections() if session is not None else []:
                    await connection.wait_closed()
            assert manager.get_stats(per_user=False).connections == 0
            stop.set()
    assert open_fds() <= baseline


def ws_url(running: RunningServer) -> str:
    return f"ws://127.0.0.1:{running.port}/ws"


async def until_terminal(items: AsyncIterator[Event | Resync], seen: list[Any]) -> None:
    async for item in items:
        seen.append(item)
        if isinstance(item, Event) and item.type in TERMINAL:
            return


async def test_a_run_streams_whole_and_in_order(server: RunningServer) -> None:
    for batch in (True, False):
        with trio.fail_after(20):
            async with connect(ws_url(server), token=issue_token(SECRET, "py-a"),
                               batch=batch) as client:
                sub = client.subscribe("t1")
                await client.send({"type": "user_message", "thread_id": "t1", "text": "hi"})
                seen: list[Any] = []
                await until_terminal(aiter(sub), seen)
        assert all(isinstance(item, Event) for item in seen)
        seqs = [item.seq for item in seen]
        assert seqs == list(range(seqs[0], seqs[0] + len(seqs)))
        assert seen[0].type == "agent_started"
        assert seen[-1].type == "agent_completed"
        assert not client.close_codes  # never reconnected


async def test_a_dropped_socket_resumes_mid_run_with_no_gap(server: RunningServer) -> None:
    with trio.fail_after(20):
        async with connect(ws_url(server), token=issue_token(SECRET, "py-drop"),
                           backoff=FAST) as client:
            items = aiter(client.subscribe("t1"))
            await client.send({"type": "user_message", "thread_id": "t1", "text": "drop"})
            seen: list[Any] = []
            async for item in items:
                seen.append(item)
                if isinstance(item, Event) and item.type == "tool_executing":
                    break
            client.drop()
            await until_terminal(items, seen)
    assert not any(isinstance(item, Resync) for item in seen)
    seqs = [item.seq for item in seen]
    assert seqs == list(range(1, len(seqs) + 1))
    assert seen[-1].type == "agent_completed"
    assert client.connections == 2
    assert client.reconnects == 1


async def test_a_server_restart_mid_run_is_a_resync_and_nothing_is_silently_lost() -> None:
    with trio.fail_after(40):
        async with trio.open_nursery() as nursery:
            first, stop_first = await start(nursery)
            port = first.port
            async with connect(f"ws://127.0.0.1:{port}/ws", token=issue_token(SECRET, "py-r"),
                               backoff=FAST) as client:
                items = aiter(client.subscribe("t1"))
                await client.send({"type": "user_message", "thread_id": "t1", "text": "a"})
                seen: list[Any] = []
                async for item in items:
                    seen.append(item)
                    if isinstance(item, Event) and item.type == "agent_thinking":
                        break
                old_epoch = client._subs["t1"].epoch
                stop_first.set()  # mid-run: the run is cancelled, connections get 1001
                await until_terminal(items, seen)
                assert seen[-1].type == "agent_cancelled"
                _, stop_second = await start(nursery, port)
                resync = await anext(items)
                assert isinstance(resync, Resync)
                await client.send({"type": "user_message", "thread_id": "t1", "text": "b"})
                after: list[Any] = []
                await until_terminal(items, after)
            stop_second.set()
    before = [item.seq for item in seen]
    assert before == list(range(1, len(before) + 1)), "the first server's events, all, in order"
    assert resync.last_seq == before[-1]
    assert resync.epoch != old_epoch  # the restarted server's stream
    assert client.close_codes[0] == 1001
    assert [item.seq for item in after] == list(range(resync.seq + 1, resync.seq + 1 + len(after)))
    assert after[-1].type == "agent_completed"


async def test_1009_stops_the_client_and_iteration_says_why(server: RunningServer) -> None:
    with trio.fail_after(20):
        async with connect(ws_url(server), token=issue_token(SECRET, "py-1009"),
                           backoff=FAST) as client:
            sub = client.subscribe("t1")
            await client.send({"type": "user_message", "thread_id": "t1", "text": "x" * 70000})
            with pytest.raises(ClientClosed) as closed:
                async for _ in sub:
                    pass
    assert closed.value.code == 1009
    assert client.reconnects == 0


async def test_a_refused_handshake_raises_from_connect(server: RunningServer) -> None:
    with trio.fail_after(20), pytest.raises(ClientClosed) as closed:
        async with connect(ws_url(server), token="not-a-token"):
            pass
    assert closed.value.code == 401


async def test_401_with_get_token_refreshes_and_a_duplicate_replay_is_dropped(
    server: RunningServer,
) -> None:
    good = issue_token(SECRET, "py-dup")

    async def get_token() -> str:
        await trio.lowlevel.checkpoint()
        return good

    with trio.fail_after(20):
        async with connect(ws_url(server), token=good, get_token=get_token) as client:
            items = aiter(client.subscribe("t1"))
            await client.send({"type": "user_message", "thread_id": "t1", "text": "one"})
            seen: list[Any] = []
            await until_terminal(items, seen)
            # The whole stream again: every replayed event is one already delivered.
            sub = client._subs["t1"]
            await client.send({"type": "subscribe", "thread_id": "t1", "since_seq": 0,
                               "epoch": sub.epoch})
            await client.send({"type": "user_message", "thread_id": "t1", "text": "two"})
            more: list[Any] = []
            await until_terminal(items, more)
        # What the server replayed of the first run: compacted (a run's agent_text deltas
        # may be one frame covering data.from_seq..seq), so fewer frames than were live.
        history = await server.server.manager.broker.recover("py-dup", "t1", 0, sub.epoch)
    stored = [orjson.loads(frame) for frame in history.frames]
    replayed_first = [f for f in stored if f["seq"] <= len(seen)]
    assert any("from_seq" in f["data"] for f in replayed_first)  # compaction is in place
    assert len(replayed_first) < len(seen)
    # Every replayed frame of the first run was dropped as a duplicate by its seq ...
    assert client.duplicates == len(replayed_first)
    # ... nothing was applied twice or skipped ...
    seqs = [item.seq for item in seen + more]
    assert seqs == list(range(1, len(seqs) + 1))
    # ... and each run's text is complete: the client's equals the server's history.
    texts, last = apply_replay(stored)
    assert last == seqs[-1]
    delivered: dict[str, str] = {}
    for item in seen + more:
        if item.type == "agent_text" and item.run_id:
            delivered[item.run_id] = delivered.get(item.run_id, "") + item.data["text"]
    assert delivered == texts
    assert len(texts) == 2
    assert all(texts.values())


async def test_users_tests_can_drive_a_server_with_it(server: RunningServer) -> None:
    """The shape a user's own test takes: a raw client publishes, the client reads."""
    token = issue_token(SECRET, "py-user")
    with trio.fail_after(20):
        async with connect(f"http://127.0.0.1:{server.port}", token=token) as client:
            items = aiter(client.subscribe("t9"))
            async with open_websocket_url(f"{ws_url(server)}?token={token}") as other:
                await other.send_message(
                    '{"type":"user_message","thread_id":"t9","text":"from another tab"}'
                )
                seen: list[Any] = []
                await until_terminal(items, seen)
    assert seen[-1].type == "agent_completed"

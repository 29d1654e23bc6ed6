"""Heartbeats that proxies see (issue 10, item 4): with ``Config.heartbeat_interval`` set, a
connection to which the server has sent nothing for that long gets a ``{"type":"heartbeat"}``
data frame; off by default; sent by the manager's write watchdog, not a task per connection.

In-process tests run on ``autojump_clock`` (trio's virtual clock, so the instants below are
exact, not measured); the server test uses a real loopback socket on port 0, bounded by
``trio.fail_after``, and checks that nothing is left behind.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from types import SimpleNamespace
from typing import Any

import attrs
import pytest
import trio

import agentcast
from agentcast import Config, ConnectionManager, UserContext
from agentcast.server import _cli

from .helpers import Client, connect, thinking
from .tokenserver import SETTINGS, bystander, running_node, token

ALICE = UserContext.from_request(user_id="alice")
INTERVAL = 10.0


@pytest.fixture
async def beating() -> AsyncIterator[ConnectionManager]:
    config = Config(heartbeat_interval=INTERVAL, write_timeout=5.0, session_linger=0.0)
    async with agentcast.open_manager(config) as running:
        yield running


async def next_frame(client: Client) -> tuple[float, dict[str, Any]]:
    frame = await client.receive()
    return trio.current_time(), frame


async def test_an_idle_connection_gets_a_heartbeat_every_interval(
    beating: ConnectionManager, autojump_clock: trio.testing.MockClock
) -> None:
    session = beating.get_websocket_manager(ALICE)
    client, connection = await connect(session, ("t1",))
    assert (await client.receive())["type"] == "subscribed"
    sent_at = trio.current_time()
    for _ in range(3):
        at, frame = await next_frame(client)
        assert frame == {"type": "heartbeat"}
        # The watchdog checks every quarter interval: due at INTERVAL, sent by 1.25 times it.
        assert INTERVAL <= at - sent_at <= 1.25 * INTERVAL
        sent_at = at
    assert session.get_stats().live_tasks == 2  # the reader and the writer: no heartbeat task
    connection.close(1000)


async def test_a_busy_connection_gets_no_heartbeat_until_it_falls_idle(
    beating: ConnectionManager, autojump_clock: trio.testing.MockClock
) -> None:
    session = beating.get_websocket_manager(ALICE)
    client, _ = await connect(session, ("t1",))
    assert (await client.receive())["type"] == "subscribed"
    for _ in range(12):  # an event every 0.8 intervals, for almost 10 intervals
        await trio.sleep(0.8 * INTERVAL)
        await session.send_to_thread("t1", thinking("tick"))
        assert (await client.receive())["type"] == "agent_thinking"
    last = trio.current_time()
    at, frame = await next_frame(client)
    assert frame == {"type": "heartbeat"}
    assert INTERVAL <= at - last <= 1.25 * INTERVAL


async def test_heartbeats_are_off_by_default(
    manager: ConnectionManager, autojump_clock: trio.testing.MockClock
) -> None:
    assert Config().heartbeat_interval is None
    session = manager.get_websocket_manager(ALICE)
    client, _ = await connect(session, ("t1",))
    assert (await client.receive())["type"] == "subscribed"
    await trio.sleep(3600)
    await client.send({"type": "ping", "id": "probe"})
    assert await client.receive() == {"type": "pong", "id": "probe"}


async def test_a_heartbeat_is_one_frame_of_a_batch_when_batching(
    beating: ConnectionManager, autojump_clock: trio.testing.MockClock
) -> None:
    session = beating.get_websocket_manager(ALICE)
    client, _ = await connect(session, ("t1",), batch=True)
    assert (await client.receive())["type"] == "subscribed"
    assert await client.receive() == {"type": "heartbeat"}
    await session.send_to_thread("t1", thinking("after"))
    assert (await client.receive())["seq"] == 1


@pytest.mark.parametrize("bad", [0.0, -1.0])
def test_a_heartbeat_interval_must_be_positive(bad: float) -> None:
    with pytest.raises(ValueError, match="heartbeat_interval must be > 0"):
        Config(heartbeat_interval=bad)


# ---- the server's --heartbeat ---------------------------------------------------------------

SECRET = "a-test-secret-that-is-long-enough-for-hs256"


def serve_settings(monkeypatch: pytest.MonkeyPatch, *args: str, **env: str) -> Any:
    """What ``agentcast serve ARGS`` would run, without running it."""
    ran: list[Any] = []
    monkeypatch.setattr(_cli, "trio", SimpleNamespace(run=lambda _fn, settings: ran.append(
        settings)))
    monkeypatch.setattr(_cli, "tune_gc", lambda _threshold: None)
    for name in ("AGENTCAST_HEARTBEAT",):
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    assert _cli.main(["serve", "--secret", SECRET, *args]) == 0
    [settings] = ran
    return settings


def test_the_heartbeat_option_and_its_environment_variable(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    assert serve_settings(monkeypatch).core.heartbeat_interval is None
    assert serve_settings(monkeypatch, "--heartbeat", "15").core.heartbeat_interval == 15.0
    assert serve_settings(monkeypatch, AGENTCAST_HEARTBEAT="25").core.heartbeat_interval == 25.0


@pytest.mark.parametrize("value", ["0.5", "0", "often"])
def test_a_bad_heartbeat_is_one_line_and_exit_status_2(
    value: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert _cli.main(["serve", "--secret", SECRET, "--heartbeat", value]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert "--heartbeat (or AGENTCAST_HEARTBEAT) must be a number of at least 1.0" in err


async def test_a_real_socket_idle_for_the_interval_gets_heartbeats() -> None:
    """Over loopback: an idle, subscribed client gets heartbeats as text frames and still its
    events afterwards; a bystander's stream stays complete; nothing is left behind."""
    settings = attrs.evolve(SETTINGS, core=attrs.evolve(SETTINGS.core, heartbeat_interval=0.2))
    async with running_node(settings) as node, bystander(node) as watcher:
        with trio.fail_after(10):
            async with node.connect(token("alice", threads=["t1"], ttl=600)) as ws:
                assert json.loads(await ws.get_message())["type"] == "subscribed"
                for _ in range(2):
                    assert json.loads(await ws.get_message()) == {"type": "heartbeat"}
                await node.publish("alice", "t1", 1)
                frame = json.loads(await ws.get_message())
                while frame["type"] == "heartbeat":
                    frame = json.loads(await ws.get_message())
                assert (frame["type"], frame["seq"]) == ("agent_text", 1)
        await watcher.check_complete()

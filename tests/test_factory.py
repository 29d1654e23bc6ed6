"""The factory: ``get_websocket_manager(ctx)`` is synchronous, keyed by user, and only works
where a manager runs (or is passed explicitly)."""

from __future__ import annotations

import pytest
import trio
import trio.testing

import agentcast
from agentcast import (
    Config,
    ConnectionManager,
    InMemoryBroker,
    InvalidUserContext,
    ManagerNotReady,
    ManagerNotRunning,
    UserContext,
    UserSession,
)

from .helpers import connect, settle

ALICE = UserContext.from_request(user_id="alice")
BOB = UserContext.from_request(user_id="bob")
PLACEHOLDERS = ["None", "null", "undefined", "nan", "NULL", "NaN", "Undefined", "none"]


async def test_factory_is_synchronous_and_keyed_by_user(manager: ConnectionManager) -> None:
    session = agentcast.get_websocket_manager(ALICE)
    assert isinstance(session, UserSession)
    assert session.user_id == "alice"
    # Same user (even with another request id, thread or metadata) -> the same object.
    again = UserContext.from_request(user_id="alice", thread_id="t9", tenant="acme")
    assert agentcast.get_websocket_manager(again) is session
    assert agentcast.get_websocket_manager(ALICE) is session
    # Another user -> another session.
    other = agentcast.get_websocket_manager(BOB)
    assert other is not session
    assert other.user_id == "bob"
    # The method on the manager is the same factory.
    assert manager.get_websocket_manager(ALICE) is session
    assert manager.get_websocket_manager(BOB) is other
    assert manager.session("alice") is session
    assert manager.get_stats().users == 2


async def test_awaiting_the_factory_is_a_type_error(manager: ConnectionManager) -> None:
    with pytest.raises(TypeError):
        await agentcast.get_websocket_manager(ALICE)  # type: ignore[misc]
    # The session it returned before the await failed is a normal, usable one.
    session = agentcast.get_websocket_manager(ALICE)
    client, _ = await connect(session)
    await client.send({"type": "ping", "id": 1})
    assert await client.receive() == {"type": "pong", "id": 1}


async def test_outside_open_manager_raises_manager_not_running() -> None:
    with pytest.raises(ManagerNotRunning, match="open_manager") as info:
        agentcast.get_websocket_manager(ALICE)
    assert "manager=" in str(info.value)
    with pytest.raises(ManagerNotRunning, match="open_manager"):
        await agentcast.get_websocket_manager_async(ALICE)


def test_outside_trio_raises_manager_not_running() -> None:
    with pytest.raises(ManagerNotRunning, match="open_manager"):
        agentcast.get_websocket_manager(ALICE)


async def test_explicit_manager_works_outside_the_block_context() -> None:
    send, receive = trio.open_memory_channel[ConnectionManager](1)
    results: dict[str, object] = {}

    async def elsewhere() -> None:
        # Started before the manager existed: the context variable is not visible here.
        running = await receive.receive()
        with pytest.raises(ManagerNotRunning):
            agentcast.get_websocket_manager(ALICE)
        session = agentcast.get_websocket_manager(ALICE, manager=running)
        results["session"] = session
        results["async"] = await agentcast.get_websocket_manager_async(ALICE, manager=running)
        client, _ = await connect(session)
        await client.send({"type": "ping", "id": "x"})
        results["pong"] = await client.receive()

    async with trio.open_nursery() as outer:
        outer.start_soon(elsewhere)
        async with agentcast.open_manager() as running:
            await send.send(running)
            await settle()
            assert results["session"] is running.session("alice")
            assert results["async"] is results["session"]
            assert results["pong"] == {"type": "pong", "id": "x"}


async def test_passing_a_string_is_a_helpful_type_error(manager: ConnectionManager) -> None:
    with pytest.raises(TypeError, match=r"UserContext") as info:
        agentcast.get_websocket_manager("alice")  # type: ignore[arg-type]
    assert "str" in str(info.value)
    assert "from_request" in str(info.value)
    with pytest.raises(TypeError, match=r"UserContext"):
        manager.get_websocket_manager("alice")  # type: ignore[arg-type]
    assert manager.get_stats().users == 0


async def test_async_factory_returns_the_same_session_with_an_open_nursery(
    manager: ConnectionManager,
) -> None:
    # The synchronous factory hands the session out before its nursery is open: a run started
    # now is parked until the supervisor starts.
    early = agentcast.get_websocket_manager(BOB)
    early.start_run("t1", _wait_forever)
    assert early.get_stats().live_tasks == 0

    session = await agentcast.get_websocket_manager_async(ALICE)
    assert session is agentcast.get_websocket_manager(ALICE)
    assert not session.closed
    # The nursery is open: work starts in it at once, with no checkpoint in between.
    run_id = session.start_run("t1", _wait_forever)
    assert session.get_stats().live_tasks == 1
    assert session.cancel_run(run_id)
    # And a connection can be added straight away.
    client, connection = await connect(session, ("t1",))
    assert (await client.receive())["type"] == "subscribed"
    assert connection in session.connections()


async def _wait_forever(run: agentcast.Run) -> None:
    await trio.sleep_forever()


async def test_async_factory_raises_manager_not_ready_after_ready_timeout(
    autojump_clock: trio.testing.MockClock,
) -> None:
    config = Config(ready_timeout=3.0)
    async with trio.open_nursery() as nursery:
        # A manager whose broker never became ready.
        never_ready = ConnectionManager(config, InMemoryBroker(config), nursery, None)
        start = trio.current_time()
        with pytest.raises(ManagerNotReady, match=r"3\.0"):
            await agentcast.get_websocket_manager_async(ALICE, manager=never_ready)
        assert trio.current_time() - start == pytest.approx(3.0)
        assert never_ready.get_stats().users == 0


@pytest.mark.parametrize("placeholder", PLACEHOLDERS)
def test_placeholder_user_ids_never_build_a_context(placeholder: str) -> None:
    with pytest.raises(InvalidUserContext, match="placeholder"):
        UserContext.from_request(user_id=placeholder)
    with pytest.raises(InvalidUserContext):
        UserContext(user_id=placeholder)


async def test_two_users_with_broken_ids_are_never_merged(manager: ConnectionManager) -> None:
    for broken in ("None", "null", "undefined", "nan", ""):
        with pytest.raises(InvalidUserContext):
            agentcast.get_websocket_manager(UserContext.from_request(user_id=broken))
    assert manager.get_stats().users == 0
    assert manager.session("None") is None


async def test_after_the_block_exits_the_factory_raises() -> None:
    async with agentcast.open_manager() as running:
        session = agentcast.get_websocket_manager(ALICE)
        assert running.session("alice") is session
    with pytest.raises(ManagerNotRunning, match="open_manager"):
        agentcast.get_websocket_manager(ALICE)
    with pytest.raises(ManagerNotRunning, match="shutting down"):
        agentcast.get_websocket_manager(ALICE, manager=running)
    with pytest.raises(ManagerNotRunning):
        running.get_websocket_manager(ALICE)
    assert running.closing
    assert session.closed


async def test_open_manager_reraises_the_body_exception_itself() -> None:
    clients = []

    async def body() -> None:
        async with agentcast.open_manager():
            session = agentcast.get_websocket_manager(ALICE)
            client, _ = await connect(session, ("t1",))
            clients.append(client)
            assert (await client.receive())["type"] == "subscribed"
            raise ValueError("from the body")

    with pytest.raises(ValueError, match="from the body") as info:
        await body()
    assert type(info.value) is ValueError
    assert not isinstance(info.value, BaseExceptionGroup)
    # The session was shut down on the way out.
    _, code = await clients[0].receive_closed()
    assert code == 1001

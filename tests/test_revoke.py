"""Revocation (issue 9, FAULTS #28): ``ConnectionManager.disconnect_user`` closes every tab of a
user with 4003, on this node and, over Redis, on every node; ``POST /admin/revoke`` and
``agentcast revoke`` also refuse that user's tokens issued until then, at the handshake and on
``refresh``, while another user's stream stays complete and in order.

Real loopback sockets on port 0 (in-process servers), a throwaway redis-server for the
two-node tests; every wait is bounded by ``fail_after``.
"""

from __future__ import annotations

import json
from collections.abc import Callable

import attrs
import pytest
import trio
from trio_websocket import ConnectionClosed, WebSocketConnection

import agentcast
from agentcast import BATCH_SUBPROTOCOL, CloseCode, Config, InvalidIdentifier, UserContext
from agentcast.server._cli import main

from .helpers import connect
from .redis_server import RedisServer
from .tokenserver import ADMIN, SETTINGS, Node, bystander, running_node, token

#: Seconds any one step may take.
STEP = 15
#: The default clock leeway (5 s): tokens minted "a second after the revocation" pass iat.
REVOKE_SETTINGS = attrs.evolve(SETTINGS, token_leeway=5.0)


async def close_code(ws: WebSocketConnection) -> int:
    try:
        while True:
            await ws.get_message()
    except ConnectionClosed as exc:
        return exc.reason.code if exc.reason is not None else 1006


async def wait_for(condition: Callable[[], bool]) -> None:
    """Poll state another process (Redis) changes, failing after ``STEP`` seconds."""
    with trio.fail_after(STEP):
        while not condition():  # noqa: ASYNC110 - the change comes from another process
            await trio.sleep(0.01)


async def test_disconnect_user_closes_only_that_users_connections() -> None:
    async with agentcast.open_manager(Config(session_linger=0.5)) as manager:
        alice = manager.get_websocket_manager(UserContext(user_id="alice"))
        bob = manager.get_websocket_manager(UserContext(user_id="bob"))
        tabs = [await connect(alice, ("t1",)) for _ in range(2)]
        other, _ = await connect(bob, ("t1",))
        with trio.fail_after(STEP):
            assert await manager.disconnect_user("alice", reason="account locked") == 2
            for client, _ in tabs:
                _, code = await client.receive_closed()
                assert code == CloseCode.REVOKED
            assert await manager.disconnect_user("alice") == 0  # nothing left to close
            await bob.send_to_thread("t1", agentcast.AgentEvent(
                agentcast.EventType.AGENT_TEXT, {"text": "still here"}
            ))
            frames = await other.receive_until("agent_text")
        assert frames[-1]["data"] == {"text": "still here"}
        assert len(bob.connections()) == 1
        with pytest.raises(InvalidIdentifier):
            await manager.disconnect_user("None")


async def test_revoke_closes_every_tab_with_4003_and_refuses_old_tokens() -> None:
    async with running_node(REVOKE_SETTINGS) as node, bystander(node) as watcher:
        old = token("alice", ttl=600)
        with trio.fail_after(STEP):
            async with node.connect(old) as plain, \
                    node.connect(old, [BATCH_SUBPROTOCOL, f"bearer.{old}"]) as batched, \
                    node.connect(old) as survivor_attempt:
                status, answer = await node.revoke("alice")
                assert status == 200
                assert answer["user"] == "alice"
                assert answer["closed_here"] == 3
                codes = [await close_code(ws) for ws in (plain, batched, survivor_attempt)]
            assert codes == [4003, 4003, 4003]
            assert (await node.handshake(old)).startswith(b"HTTP/1.1 401")
            # A token minted after the revocation is accepted, and cannot be refreshed with an
            # old one.
            fresh = token("alice", ttl=600, now=answer["revoked_before"] + 1)
            async with node.connect(fresh) as ws:
                await ws.send_message(json.dumps({"type": "refresh", "token": old}))
                error = json.loads(await ws.get_message())
                assert error["type"] == "error"
                assert error["code"] == "bad_token"
                assert "revocation" in error["message"]
            await watcher.check_complete()
        rejections = node.running.server.rejections
        assert rejections.get("auth_revoked") == 1


@pytest.mark.parametrize(
    ("method", "target", "headers", "status"),
    [
        pytest.param("POST", "/admin/revoke?user=alice", (), 401, id="no-admin-token"),
        pytest.param("POST", "/admin/revoke?user=alice", ("Authorization: Bearer wrong",), 401,
                     id="wrong-admin-token"),
        pytest.param("GET", "/admin/revoke?user=alice", (f"Authorization: Bearer {ADMIN}",), 405,
                     id="get"),
        pytest.param("POST", "/admin/revoke", (f"Authorization: Bearer {ADMIN}",), 400,
                     id="no-user"),
        pytest.param("POST", "/admin/revoke?user=None", (f"Authorization: Bearer {ADMIN}",), 400,
                     id="placeholder-user"),
    ],
)
async def test_the_revoke_endpoint_refuses_bad_requests_and_revokes_nothing(
    method: str, target: str, headers: tuple[str, ...], status: int
) -> None:
    async with running_node(REVOKE_SETTINGS) as node:
        old = token("alice", ttl=600)
        with trio.fail_after(STEP):
            async with node.connect(old) as ws:
                answer_status, answer = await node.http(method, target, *headers)
                assert answer_status == status
                assert ADMIN not in json.dumps(answer)
                await ws.send_message(json.dumps({"type": "ping", "id": 1}))
                assert json.loads(await ws.get_message()) == {"type": "pong", "id": 1}
            assert (await node.handshake(old)).startswith(b"HTTP/1.1 101")


async def test_without_an_admin_token_revoke_is_off_with_403() -> None:
    async with running_node(attrs.evolve(REVOKE_SETTINGS, admin_token=None)) as node:
        with trio.fail_after(STEP):
            status, answer = await node.revoke("alice")
        assert status == 403
        assert "--admin-token" in answer["error"]


async def test_agentcast_revoke_against_a_running_server() -> None:
    async with running_node(REVOKE_SETTINGS) as node, bystander(node) as watcher:
        url = f"http://127.0.0.1:{node.port}"
        with trio.fail_after(STEP):
            async with node.connect(token("alice", ttl=600)) as ws:
                status = await trio.to_thread.run_sync(
                    main, ["revoke", "--user", "alice", "--url", url, "--admin-token", ADMIN]
                )
                assert status == 0
                assert await close_code(ws) == 4003
            wrong = await trio.to_thread.run_sync(
                main, ["revoke", "--user", "bob", "--url", url, "--admin-token", "x" * 40]
            )
            assert wrong == 2
            await watcher.check_complete()
        assert await trio.to_thread.run_sync(main, ["revoke", "--user", "alice"]) == 2


def ready(node: Node) -> bool:
    return bool(node.manager.broker.statistics().ready)


# trio-websocket leaves the socket of a connection closed under it to the garbage collector.
@pytest.mark.filterwarnings("ignore:unclosed <socket:ResourceWarning")
async def test_revoke_on_one_node_closes_and_refuses_on_every_node(
    redis_server: RedisServer,
) -> None:
    settings = attrs.evolve(REVOKE_SETTINGS, redis_url=redis_server.url)
    async with running_node(settings) as a, running_node(settings) as b, \
            bystander(a) as watcher:
        await wait_for(lambda: ready(a) and ready(b))
        old = token("alice", ttl=600)
        with trio.fail_after(STEP):
            async with a.connect(old) as on_a, b.connect(old) as on_b:
                status, answer = await a.revoke("alice")
                assert status == 200
                assert answer["closed_here"] == 1
                assert [await close_code(ws) for ws in (on_a, on_b)] == [4003, 4003]
            # The cut-off is in Redis: the other node refuses the old token too.
            assert (await b.handshake(old)).startswith(b"HTTP/1.1 401")
            assert (await a.handshake(old)).startswith(b"HTTP/1.1 401")
            await watcher.check_complete()


@pytest.mark.filterwarnings("ignore:unclosed <socket:ResourceWarning")
async def test_agentcast_revoke_over_redis_reaches_every_node(redis_server: RedisServer) -> None:
    settings = attrs.evolve(REVOKE_SETTINGS, redis_url=redis_server.url)
    async with running_node(settings) as a, running_node(settings) as b:
        await wait_for(lambda: ready(a) and ready(b))
        old = token("alice", ttl=600)
        with trio.fail_after(STEP):
            async with a.connect(old) as on_a, b.connect(old) as on_b, \
                    b.connect(token("bob", ttl=600)) as bob:
                status = await trio.to_thread.run_sync(
                    main, ["revoke", "--user", "alice", "--redis-url", redis_server.url]
                )
                assert status == 0
                assert [await close_code(ws) for ws in (on_a, on_b)] == [4003, 4003]
                await bob.send_message(json.dumps({"type": "ping", "id": 2}))
                assert json.loads(await bob.get_message()) == {"type": "pong", "id": 2}
            for node in (a, b):
                assert (await node.handshake(old)).startswith(b"HTTP/1.1 401")

"""Tokens on live sockets (issue 9, FAULTS #28), over real loopback sockets: a connection is
closed with 4001 at its token's expiry unless it sent a valid ``refresh``; ``token_expiring``
comes first; a refresh may only keep or narrow the threads; the claims fail closed at the
handshake; the bearer token is never echoed as the selected subprotocol.

Each server here runs with ``token_leeway=0`` and a watchdog sweep every 50 ms, so a 2 s token
resolves in about two seconds of real time; every wait is bounded by ``fail_after``. Another
user's stream is checked complete and in order around each fault, and the node checks on exit
that no connection, connection task or file descriptor is left.
"""

from __future__ import annotations

import json
import time
from typing import Any

import attrs
import jwt
import pytest
import trio
from trio_websocket import ConnectionClosed, WebSocketConnection

from agentcast import BATCH_SUBPROTOCOL, Connection, UserContext

from .tokenserver import SECRET, SETTINGS, Node, bystander, running_node, token

#: Seconds any one test may take (a 2 s token, its refresh, the close).
STEP = 15


async def alice_connection(node: Node) -> Connection:
    """alice's connection once the server has registered it."""
    session = node.manager.get_websocket_manager(UserContext(user_id="alice"))
    while not session.connections():
        await trio.lowlevel.checkpoint()
    connection: Connection = session.connections()[0]
    return connection


async def frames_until(ws: WebSocketConnection, kind: str) -> list[dict[str, Any]]:
    """Frames up to and including the first of type ``kind``."""
    frames: list[dict[str, Any]] = []
    while not frames or frames[-1]["type"] != kind:
        frames.append(json.loads(await ws.get_message()))
    return frames


async def frames_until_closed(ws: WebSocketConnection) -> tuple[list[dict[str, Any]], int]:
    """Every frame until the server closes, and the close code."""
    frames: list[dict[str, Any]] = []
    try:
        while True:
            frames.append(json.loads(await ws.get_message()))
    except ConnectionClosed as exc:
        return frames, exc.reason.code if exc.reason is not None else 1006


async def test_a_2s_token_is_warned_then_closed_with_4001_at_expiry() -> None:
    async with running_node() as node, bystander(node) as watcher:
        short = token("alice", ttl=2)
        expires_at = jwt.decode(short, options={"verify_signature": False})["exp"]
        with trio.fail_after(STEP):
            async with node.connect(short) as ws:
                connection = await alice_connection(node)
                # Served until then: the connection answers while its token is valid.
                await ws.send_message(json.dumps({"type": "ping", "id": 1}))
                frames, code = await frames_until_closed(ws)
        assert code == 4001
        assert connection.close_code == 4001
        assert {"type": "pong", "id": 1} in frames
        assert [frame for frame in frames if frame["type"] != "pong"] == [
            {"type": "token_expiring", "expires_at": expires_at}
        ]
        await watcher.check_complete()


async def test_a_refresh_before_expiry_keeps_the_connection_open() -> None:
    async with running_node() as node, bystander(node):
        old = token("alice", ttl=2)
        fresh = token("alice", ttl=600)
        with trio.fail_after(STEP):
            async with node.connect(old) as control, node.connect(old) as renewed:
                await renewed.send_message(json.dumps({"type": "refresh", "token": fresh}))
                answer = (await frames_until(renewed, "refreshed"))[-1]
                # The control tab, opened with the same old token, proves the old expiry has
                # passed and the watchdog has swept both tabs.
                _, code = await frames_until_closed(control)
                assert code == 4001
                await renewed.send_message(json.dumps({"type": "ping", "id": 7}))
                assert (await frames_until(renewed, "pong"))[-1] == {"type": "pong", "id": 7}
        expected = jwt.decode(fresh, options={"verify_signature": False})["exp"]
        assert answer == {"type": "refreshed", "expires_at": expected}


@pytest.mark.parametrize(
    "new_token",
    [
        pytest.param("not-a-jwt", id="garbage"),
        pytest.param(token("mallory", ttl=600), id="another-user"),
        pytest.param(
            jwt.encode({"sub": "alice", "iat": int(time.time()), "exp": int(time.time()) + 600},
                       "a-forged-secret-that-is-also-long-enough"),
            id="forged",
        ),
        pytest.param(token("alice", ttl=1, now=time.time() - 3600), id="expired"),
    ],
)
async def test_a_bad_refresh_gets_bad_token_and_the_old_expiry_stands(new_token: str) -> None:
    async with running_node() as node, bystander(node) as watcher:
        with trio.fail_after(STEP):
            async with node.connect(token("alice", ttl=2)) as ws:
                await ws.send_message(json.dumps({"type": "refresh", "token": new_token}))
                frames, code = await frames_until_closed(ws)
        errors = [frame for frame in frames if frame["type"] == "error"]
        assert [error["code"] for error in errors] == ["bad_token"]
        assert new_token not in json.dumps(frames)  # the token is never echoed
        assert "refreshed" not in [frame["type"] for frame in frames]
        assert code == 4001
        await watcher.check_complete()


async def test_a_narrower_refresh_narrows_and_unsubscribes_what_it_no_longer_allows() -> None:
    async with running_node() as node, bystander(node):
        with trio.fail_after(STEP):
            async with node.connect(token("alice", threads=["t1", "t2"], ttl=600)) as ws:
                acks = [json.loads(await ws.get_message()) for _ in range(2)]
                assert {ack["thread_id"] for ack in acks} == {"t1", "t2"}
                narrower = token("alice", threads=["t1"], ttl=600)
                await ws.send_message(json.dumps({"type": "refresh", "token": narrower}))
                frames = await frames_until(ws, "refreshed")
                assert {"type": "unsubscribed", "thread_id": "t2"} in frames
                await ws.send_message(json.dumps({"type": "subscribe", "thread_id": "t2"}))
                refused = (await frames_until(ws, "error"))[-1]
                assert refused["code"] == "forbidden_thread"
                await node.publish("alice", "t2", 3)
                await node.publish("alice", "t1", 1)
                event = (await frames_until(ws, "agent_text"))[-1]
                assert event["thread_id"] == "t1"  # nothing of t2 arrived before it


@pytest.mark.parametrize(
    "threads", [pytest.param(["t1", "t2"], id="more-threads"), pytest.param(None, id="every")]
)
async def test_a_wider_refresh_is_refused(threads: list[str] | None) -> None:
    async with running_node() as node, bystander(node):
        with trio.fail_after(STEP):
            async with node.connect(token("alice", threads=["t1"], ttl=600)) as ws:
                assert json.loads(await ws.get_message())["type"] == "subscribed"
                wider = token("alice", threads=threads or (), ttl=600)
                await ws.send_message(json.dumps({"type": "refresh", "token": wider}))
                error = (await frames_until(ws, "error"))[-1]
                assert error["code"] == "bad_token"
                assert "narrow" in error["message"]
                await ws.send_message(json.dumps({"type": "subscribe", "thread_id": "t2"}))
                assert (await frames_until(ws, "error"))[-1]["code"] == "forbidden_thread"


@pytest.mark.parametrize(
    "threads",
    [pytest.param([], id="empty-list"), pytest.param(False, id="false"),
     pytest.param(0, id="zero"), pytest.param("", id="empty-string"),
     pytest.param(None, id="null"), pytest.param(["t1", ""], id="empty-id")],
)
async def test_a_threads_claim_that_grants_nothing_is_refused_with_401(threads: object) -> None:
    async with running_node() as node:
        now = int(time.time())
        claims = {"sub": "alice", "iat": now, "exp": now + 600, "threads": threads}
        with trio.fail_after(STEP):
            head = await node.handshake(jwt.encode(claims, SECRET))
        assert head.startswith(b"HTTP/1.1 401")


@pytest.mark.parametrize(
    ("claims", "status"),
    [
        pytest.param({"iss": "https://login.example", "aud": "agentcast"}, 101, id="matching"),
        pytest.param({"aud": "agentcast"}, 401, id="no-issuer"),
        pytest.param({"iss": "https://evil.example", "aud": "agentcast"}, 401, id="wrong-issuer"),
        pytest.param({"iss": "https://login.example"}, 401, id="no-audience"),
        pytest.param({"iss": "https://login.example", "aud": "other"}, 401, id="wrong-audience"),
    ],
)
async def test_issuer_and_audience_must_match_when_configured(
    claims: dict[str, str], status: int
) -> None:
    settings = attrs.evolve(
        SETTINGS, token_issuer="https://login.example", token_audience="agentcast"
    )
    async with running_node(settings) as node:
        now = int(time.time())
        signed = jwt.encode({"sub": "alice", "iat": now, "exp": now + 600, **claims}, SECRET)
        with trio.fail_after(STEP):
            head = await node.handshake(signed)
        assert head.startswith(f"HTTP/1.1 {status}".encode())


async def test_an_audience_claim_is_not_refused_when_no_audience_is_configured() -> None:
    async with running_node() as node:
        with trio.fail_after(STEP):
            head = await node.handshake(token("alice", audience="someone-else", ttl=600))
        assert head.startswith(b"HTTP/1.1 101")


def _selected(head: bytes) -> str | None:
    for line in head.decode().split("\r\n")[1:]:
        name, _, value = line.partition(":")
        if name.strip().lower() == "sec-websocket-protocol":
            return value.strip()
    return None


@pytest.mark.parametrize(
    ("offer", "selected"),
    [
        pytest.param(["agentcast.v1", "bearer.{t}"], "agentcast.v1", id="plain"),
        pytest.param([BATCH_SUBPROTOCOL, "bearer.{t}"], BATCH_SUBPROTOCOL, id="batched"),
        pytest.param(["bearer.{t}", "agentcast.v1", BATCH_SUBPROTOCOL], BATCH_SUBPROTOCOL,
                     id="both-prefers-batches"),
        pytest.param(["bearer.{t}"], None, id="bearer-only"),
        pytest.param([], None, id="query-token"),
    ],
)
async def test_the_selected_subprotocol_never_echoes_the_token(
    offer: list[str], selected: str | None
) -> None:
    async with running_node() as node:
        secret_token = token("alice", ttl=600)
        entries = [entry.format(t=secret_token) for entry in offer]
        headers = [f"Sec-WebSocket-Protocol: {', '.join(entries)}"] if entries else []
        with trio.fail_after(STEP):
            head = await node.handshake(None if entries else secret_token, *headers)
        assert head.startswith(b"HTTP/1.1 101")
        assert _selected(head) == selected
        assert secret_token.encode() not in head


async def test_a_browser_style_plain_client_gets_one_frame_per_message(
) -> None:
    async with running_node() as node:
        offer = ["agentcast.v1", f"bearer.{token('alice', ttl=600)}"]
        with trio.fail_after(STEP):
            async with node.connect("", subprotocols=offer) as ws:
                assert ws.subprotocol == "agentcast.v1"
                await ws.send_message(json.dumps({"type": "subscribe", "thread_id": "t1"}))
                assert json.loads(await ws.get_message())["type"] == "subscribed"
                await node.publish("alice", "t1", 3)
                messages = [await ws.get_message() for _ in range(3)]
        assert [json.loads(message)["seq"] for message in messages] == [1, 2, 3]

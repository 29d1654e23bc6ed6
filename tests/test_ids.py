"""User ids in Auth0's ``sub`` format (``auth0|abc123``) go everywhere an id goes: the id rule,
JSON envelopes, Redis keys and their hash tags, backplane messages, tokens, ``?user=`` and the
Prometheus text of ``/metrics``; end to end over a real server and a real Redis."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any
from urllib.parse import quote

import coredis
import pytest
import trio
from prometheus_client.parser import text_string_to_metric_families

from agentcast import AgentEvent, Config, EventType, InvalidIdentifier, RedisPublisher
from agentcast._events import encode_envelope
from agentcast._ids import check_id
from agentcast.backplane.redis.keys import (
    meta_key,
    parse_thread_message,
    stream_key,
    thread_message,
    threads_key,
    user_channel,
)
from agentcast.client import Event, connect
from agentcast.server import issue_token
from agentcast.server._auth import verify_token
from agentcast.server._serve import RunningServer, serve
from agentcast.server._settings import ServerSettings

from .redis_server import RedisServer

SECRET = "a-test-secret-that-is-long-enough-for-hs256"
ADMIN = "an-admin-token-that-is-at-least-32-bytes-long"
AUTH0 = "auth0|abc123"
PIPED = ["auth0|abc123", "google-oauth2|110169484474386276334", "samlp|corp|jdoe", "|"]


@pytest.mark.parametrize("value", PIPED)
def test_pipe_ids_are_accepted(value: str) -> None:
    assert check_id("user", value) == value


@pytest.mark.parametrize("value", ["a b", "{u}", "a/b", "a\nb", "a\"b", "a\\b", "a*b", "é"])
def test_what_stays_refused(value: str) -> None:
    with pytest.raises(InvalidIdentifier, match=r"letters, digits and _ \. : @ \+ \| -"):
        check_id("user", value)


def hash_tag(key: str) -> str:
    """The part of a key Redis Cluster hashes: between the first ``{`` and the next ``}``."""
    start = key.index("{")
    return key[start + 1:key.index("}", start)]


def test_redis_keys_hash_on_the_whole_user_id_and_messages_round_trip() -> None:
    for key in (meta_key(AUTH0, "t|1"), stream_key(AUTH0, "t|1"), threads_key(AUTH0),
                user_channel(AUTH0)):
        assert hash_tag(key) == AUTH0
    frame = encode_envelope(AgentEvent(EventType.AGENT_TEXT, {"text": "hi"}),
                            thread_id="t|1", seq=3, ts=1.0)
    assert json.loads(frame)["thread_id"] == "t|1"
    assert parse_thread_message(thread_message("t|1", 3, frame)) == ("t|1", [(3, frame)])


def test_tokens_carry_the_id_as_it_is() -> None:
    token = issue_token(SECRET, AUTH0, threads=["t|1"])
    claims = verify_token(token, SECRET, claimed_user=AUTH0)
    assert claims.user_id == AUTH0
    assert claims.threads == ("t|1",)


@pytest.fixture
async def server() -> AsyncIterator[RunningServer]:
    stop = trio.Event()
    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            running: RunningServer = await nursery.start(lambda task_status: serve(
                ServerSettings(port=0, secret=SECRET, admin_token=ADMIN, demo=True,
                               demo_speed=8.0, core=Config(shutdown_timeout=2.0)),
                stop=stop, task_status=task_status,
            ))
            yield running
            stop.set()


async def scrape(port: int) -> str:
    with trio.fail_after(10):
        stream = await trio.open_tcp_stream("127.0.0.1", port)
        async with stream:
            await stream.send_all(
                f"GET /metrics HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {ADMIN}\r\n\r\n"
                .encode()
            )
            answer = b""
            while chunk := await stream.receive_some(65536):
                answer += chunk
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200")
    return body.decode()


async def test_a_pipe_user_streams_a_run_and_metrics_stay_parseable(
    server: RunningServer,
) -> None:
    token = issue_token(SECRET, AUTH0)
    url = f"ws://127.0.0.1:{server.port}/ws?user={quote(AUTH0)}"
    seen: list[Any] = []
    with trio.fail_after(20):
        async with connect(url, token=token) as client:
            sub = client.subscribe("thread|1")
            await client.send({"type": "user_message", "thread_id": "thread|1", "text": "hi"})
            async for item in sub:
                seen.append(item)
                if isinstance(item, Event) and item.type == "agent_completed":
                    break
            assert server.server.manager.user_ids() == [AUTH0]
            families = list(text_string_to_metric_families(await scrape(server.port)))
    assert {item.thread_id for item in seen} == {"thread|1"}
    assert {family.name for family in families} >= {"agentcast_connections"}


async def test_redis_publisher_stores_a_pipe_user_under_its_hash_tag(
    redis_server: RedisServer,
) -> None:
    async with RedisPublisher(redis_server.url) as pub:
        seq = await pub.send_to_thread(AUTH0, "t|1", AgentEvent(EventType.AGENT_TEXT,
                                                                {"text": "piped"}))
    async with coredis.Redis.from_url(redis_server.url, decode_responses=True) as redis:
        entries = await redis.xrange(stream_key(AUTH0, "t|1"))
        meta = await redis.hgetall(meta_key(AUTH0, "t|1"))
    frames = [json.loads(entry.field_values["f"]) for entry in entries]
    assert [(f["thread_id"], f["seq"], f["data"]["text"]) for f in frames] == [
        ("t|1", seq, "piped")
    ]
    assert int(meta["seq"]) == seq

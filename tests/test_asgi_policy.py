"""The pure decisions of agentcast.asgi (synchronous tests), the plain error under asyncio, and
the layering rule: the trio-only core never imports the ASGI package."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from typing import Any

import pytest

import agentcast
import agentcast.asgi
from agentcast.asgi._policy import (
    CLOSE_BEFORE_ACCEPT_STATUS,
    choose_subprotocol,
    disconnect_reason,
    needs_trio_message,
    refusal_events,
)


@pytest.mark.parametrize(
    ("offered", "selected"),
    [
        (["agentcast.ndjson"], "agentcast.ndjson"),
        (["agentcast.v1"], "agentcast.v1"),
        (["agentcast.v1", "agentcast.ndjson"], "agentcast.ndjson"),
        ([" agentcast.v1 ", "bearer.abc"], "agentcast.v1"),
        (["agentcast.agui"], "agentcast.agui"),
        (["agentcast.vercel-ai", "bearer.abc"], "agentcast.vercel-ai"),
        (["agentcast.vercel-ai", "agentcast.agui"], "agentcast.agui"),
        (["agentcast.agui", "agentcast.v1"], "agentcast.v1"),
        (["bearer.secret-token"], None),  # never echo the token
        ([], None),
    ],
)
def test_the_subprotocol_rule_is_the_standalone_servers(
    offered: list[str], selected: str | None
) -> None:
    assert choose_subprotocol(offered) == selected


def test_a_refusal_is_a_real_http_response_where_the_server_offers_the_extension() -> None:
    start, body = refusal_events(401, "bad token", {"websocket.http.response": {}})
    assert start["type"] == "websocket.http.response.start"
    assert start["status"] == 401
    assert (b"www-authenticate", b"Bearer") in start["headers"]
    assert (b"content-length", str(len(body["body"])).encode()) in start["headers"]
    assert json.loads(body["body"]) == {"error": "bad token"}
    assert body["more_body"] is False


def test_without_the_extension_a_refusal_is_a_close_before_accept() -> None:
    cases: list[dict[str, Any] | None] = [None, {}, {"websocket.http.response.other": {}}]
    for extensions in cases:
        (event,) = refusal_events(429, "too many connections " * 20, extensions)
        assert event["type"] == "websocket.close"  # the server answers it with 403
        assert len(event["reason"]) <= 120
    assert CLOSE_BEFORE_ACCEPT_STATUS == 403


@pytest.mark.parametrize(
    ("event", "expected"),
    [
        ({"type": "websocket.disconnect", "code": 1001}, (1001, None)),
        ({"type": "websocket.disconnect", "code": 1000, "reason": "bye"}, (1000, "bye")),
        ({"type": "websocket.disconnect"}, (1005, None)),
        ({"type": "websocket.disconnect", "code": "x", "reason": ""}, (1005, None)),
    ],
)
def test_disconnect_reasons(event: dict[str, object], expected: tuple[int, str | None]) -> None:
    assert disconnect_reason(event) == expected


def test_refuse_needs_an_error_status() -> None:
    refusal = agentcast.asgi.Refuse(429, "slow down")
    assert (refusal.status, refusal.reason) == (429, "slow down")
    assert isinstance(refusal, agentcast.AgentcastError)
    with pytest.raises(ValueError, match="4xx or 5xx"):
        agentcast.asgi.Refuse(200, "fine")


def test_the_trio_lifespan_under_asyncio_says_what_to_do() -> None:
    async def start() -> None:
        async with agentcast.asgi.lifespan():
            raise AssertionError("must not start under asyncio")

    with pytest.raises(agentcast.asgi.AsyncioNotSupported) as raised:
        asyncio.run(start())
    message = str(raised.value)
    assert "asyncio" in message
    assert "hypercorn --worker-class trio" in message
    assert "agentcast.asgi.threaded()" in message
    assert message == needs_trio_message("asyncio", "agentcast.asgi.lifespan()")


async def test_the_threaded_bridge_under_trio_says_to_use_the_lifespan() -> None:
    with pytest.raises(agentcast.asgi.AsyncioNotSupported, match=r"asgi\.lifespan\(\)"):
        async with agentcast.asgi.threaded():
            raise AssertionError("must not start under trio")


async def test_an_endpoint_without_a_manager_says_how_to_give_it_one() -> None:
    app = agentcast.asgi.endpoint(authenticate=lambda scope: agentcast.UserContext(user_id="a"))

    async def receive() -> dict[str, object]:
        raise AssertionError("not reached")

    async def send(message: object) -> None:
        raise AssertionError("not reached")

    with pytest.raises(agentcast.ManagerNotRunning, match=r"lifespan=agentcast\.asgi\.lifespan"):
        await app({"type": "websocket", "state": {}}, receive, send)


def test_the_core_never_imports_the_asgi_package() -> None:
    code = (
        "import sys, agentcast, agentcast.server; "
        "print(sorted(m for m in sys.modules if m.startswith(('agentcast.asgi', 'starlette', "
        "'hypercorn', 'fastapi', 'quart'))))"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            check=True, timeout=60)
    assert result.stdout.strip() == "[]"


def test_the_public_names_of_the_contract() -> None:
    for name in ("lifespan", "endpoint", "Refuse", "serve_websocket", "threaded"):
        assert hasattr(agentcast.asgi, name), name

"""``GET /client.js``: the browser client, served with its content type, a strong ETag (304 on
``If-None-Match``), cache headers and HEAD; over a real socket on 127.0.0.1, port 0."""

from __future__ import annotations

import hashlib
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import trio

from agentcast import Config
from agentcast.server._client_js import CONTENT_TYPE, client_script, not_modified
from agentcast.server._serve import RunningServer, serve
from agentcast.server._settings import ServerSettings

SECRET = "a-test-secret-that-is-long-enough-for-hs256"
SOURCE = Path(__file__).resolve().parent.parent / "clients" / "js" / "agentcast.js"


def test_if_none_match() -> None:
    etag = '"abc"'
    assert not_modified('"abc"', etag)
    assert not_modified('W/"abc"', etag)
    assert not_modified('"x", "abc"', etag)
    assert not_modified("*", etag)
    assert not not_modified('"abd"', etag)
    assert not not_modified(None, etag)
    assert not not_modified("", etag)


def test_the_served_script_is_the_client_module() -> None:
    script = client_script()
    assert script.body == SOURCE.read_bytes()
    assert script.etag == f'"{hashlib.sha256(script.body).hexdigest()[:32]}"'


@pytest.fixture
async def server() -> AsyncIterator[RunningServer]:
    stop = trio.Event()
    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            running: RunningServer = await nursery.start(lambda task_status: serve(
                ServerSettings(port=0, secret=SECRET, core=Config(shutdown_timeout=2.0)),
                stop=stop, task_status=task_status,
            ))
            yield running
            stop.set()


async def get(port: int, request: str) -> tuple[int, dict[str, str], bytes]:
    with trio.fail_after(10):
        stream = await trio.open_tcp_stream("127.0.0.1", port)
        async with stream:
            await stream.send_all(request.encode())
            answer = b""
            while chunk := await stream.receive_some(65536):
                answer += chunk
    head, _, body = answer.partition(b"\r\n\r\n")
    lines = head.decode().split("\r\n")
    headers = {}
    for line in lines[1:]:
        name, _, value = line.partition(": ")
        headers[name.lower()] = value
    return int(lines[0].split()[1]), headers, body


async def test_client_js_is_served_with_etag_and_304(server: RunningServer) -> None:
    status, headers, body = await get(server.port, "GET /client.js HTTP/1.1\r\nHost: x\r\n\r\n")
    assert status == 200
    assert headers["content-type"] == CONTENT_TYPE == "text/javascript; charset=utf-8"
    assert headers["cache-control"] == "no-cache"
    assert headers["x-content-type-options"] == "nosniff"
    assert body == SOURCE.read_bytes()
    assert b"export function connect(" in body
    etag = headers["etag"]
    status, again, body = await get(
        server.port, f"GET /client.js HTTP/1.1\r\nHost: x\r\nIf-None-Match: {etag}\r\n\r\n"
    )
    assert (status, body, again["etag"]) == (304, b"", etag)
    status, _, body = await get(
        server.port, 'GET /client.js HTTP/1.1\r\nHost: x\r\nIf-None-Match: "old"\r\n\r\n'
    )
    assert status == 200
    assert body == SOURCE.read_bytes()
    status, head_headers, body = await get(
        server.port, "HEAD /client.js HTTP/1.1\r\nHost: x\r\n\r\n"
    )
    assert (status, body) == (200, b"")
    assert head_headers["content-length"] == str(len(SOURCE.read_bytes()))
